//! The control channel: connect, take the coordinator's welcome, publish our address
//! on every change, heartbeat, send what the reporters queued ([`crate::reports`]),
//! and reconnect with exponential backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use iroh::{SecretKey, Watcher};
use mesh::control::{AgentMessage, CONTROL_PATH, CoordinatorMessage};
use mesh::endpoint::EndpointOptions;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest, http};

use crate::backoff::Backoff;
use crate::reports::Reports;
use crate::stats::MeshActivity;
use crate::{AgentConfig, EndpointCell, ServerSlot, Welcome};

type WelcomeTx = tokio::sync::watch::Sender<Option<Welcome>>;

/// The agent's configuration plus its SSH host key.
pub struct ChannelConfig {
    pub agent: AgentConfig,
    pub host_key: russh::keys::PrivateKey,
}

impl std::ops::Deref for ChannelConfig {
    type Target = AgentConfig;
    fn deref(&self) -> &AgentConfig {
        &self.agent
    }
}

/// Control-channel failures retrying cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The coordinator refused the agent token.
    #[error(
        "the coordinator refused the agent token ({0}); get a new one with `myco rotate-agent-token WS.AGENT`"
    )]
    TokenRefused(String),
    /// The URL is not an http(s) URL.
    #[error("bad coordinator URL {0:?}; write it like http://127.0.0.1:3000")]
    BadUrl(String),
    /// The mesh endpoint could not be started.
    #[error(transparent)]
    Endpoint(#[from] mesh::endpoint::EndpointError),
    /// The mesh endpoint closed while the channel ran: nothing can reach the agent.
    #[error("the agent's mesh endpoint closed; restart the agent")]
    EndpointClosed,
    /// The coordinator is not the one this agent pinned.
    #[error(transparent)]
    Pin(#[from] crate::pin::PinError),
    /// The pin file could not be read or written.
    #[error(transparent)]
    PinFile(#[from] crate::pin::PinFileError),
}

/// Why one control channel ended; all are retried.
#[derive(Debug, thiserror::Error)]
enum ChannelEnd {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("channel closed by the coordinator{}", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed(Option<String>),
    #[error("channel failed: {0}")]
    Failed(String),
    #[error("fatal: {0}")]
    Fatal(ControlError),
}

fn control_url(url: &str) -> Result<String, ControlError> {
    let base = url.trim_end_matches('/');
    if let Some(rest) = base.strip_prefix("http://") {
        Ok(format!("ws://{rest}{CONTROL_PATH}"))
    } else if let Some(rest) = base.strip_prefix("https://") {
        Ok(format!("wss://{rest}{CONTROL_PATH}"))
    } else {
        Err(ControlError::BadUrl(url.to_owned()))
    }
}

pub async fn run(
    config: ChannelConfig,
    key: SecretKey,
    welcome: WelcomeTx,
    endpoint: EndpointCell,
    server: &ServerSlot,
    reports: Reports,
    activity: Arc<MeshActivity>,
) -> Result<(), ControlError> {
    let url = control_url(&config.url)?;
    let mut backoff = Backoff::default();
    loop {
        backoff.started(tokio::time::Instant::now());
        let shared = Shared {
            welcome: &welcome,
            endpoint: &endpoint,
            server,
            reports: &reports,
            activity: &activity,
        };
        match channel(&config, &url, &key, shared).await {
            ChannelEnd::Fatal(e) => return Err(e),
            end => tracing::warn!("control channel: {end}"),
        }
        let wait = backoff.ended(tokio::time::Instant::now(), crate::jitter());
        tracing::info!(?wait, "reconnecting");
        tokio::time::sleep(wait).await;
    }
}

/// What a channel shares with the rest of the agent.
#[derive(Clone, Copy)]
struct Shared<'a> {
    welcome: &'a WelcomeTx,
    endpoint: &'a EndpointCell,
    server: &'a ServerSlot,
    reports: &'a Reports,
    activity: &'a Arc<MeshActivity>,
}

async fn channel(
    config: &ChannelConfig,
    url: &str,
    key: &SecretKey,
    Shared {
        welcome,
        endpoint,
        server,
        reports,
        activity,
    }: Shared<'_>,
) -> ChannelEnd {
    let mut request = match url.into_client_request() {
        Ok(r) => r,
        Err(e) => return ChannelEnd::Fatal(ControlError::BadUrl(format!("{url}: {e}"))),
    };
    let Ok(auth) = http::HeaderValue::from_str(&format!("Bearer {}", config.token)) else {
        return ChannelEnd::Fatal(ControlError::TokenRefused(
            "it holds characters a header cannot".into(),
        ));
    };
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, auth);
    let tls = tokio_tungstenite::Connector::Rustls(trust::get().client_config());
    let (mut ws, _) = match tokio_tungstenite::connect_async_tls_with_config(
        request,
        None,
        true,
        Some(tls),
    )
    .await
    {
        Ok(ok) => ok,
        Err(tungstenite::Error::Http(resp)) if resp.status() == http::StatusCode::UNAUTHORIZED => {
            let body = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice::<mesh::api::ErrorBody>(b).ok())
                .map(|b| b.message)
                .unwrap_or_else(|| "401".into());
            return ChannelEnd::Fatal(ControlError::TokenRefused(body));
        }
        Err(e) => return ChannelEnd::Connect(e.to_string()),
    };
    let first = match ws.next().await {
        Some(Ok(Message::Text(t))) => t,
        Some(Ok(Message::Close(frame))) => return ChannelEnd::Closed(close_reason(frame)),
        Some(Ok(_)) | None => return ChannelEnd::Closed(None),
        Some(Err(e)) => return ChannelEnd::Failed(e.to_string()),
    };
    let Ok(CoordinatorMessage::Welcome {
        coordinator_key,
        workspace_id,
        agent_id,
        challenge,
        relay_url,
        agent,
        heartbeat_interval_ms,
        relay_quic,
        relay_quic_signature,
        manifest,
    }) = serde_json::from_str::<CoordinatorMessage>(&first)
    else {
        return ChannelEnd::Failed("the first message was not a welcome".into());
    };
    // Nothing of a welcome is used before its key passed the pin.
    if let Err(e) = pin_coordinator(
        config,
        coordinator_key,
        relay_quic.as_ref(),
        relay_quic_signature.as_deref(),
    ) {
        return ChannelEnd::Fatal(e);
    }
    tracing::info!(%agent, relay = %relay_url, "control channel up");
    let proof = mesh::sign::endpoint_proof(key, &challenge, &agent_id);
    welcome.send_replace(Some(Welcome {
        coordinator_key,
        workspace_id,
        agent_id,
        agent,
        relay_url: relay_url.clone(),
        relay_quic: relay_quic.clone(),
        heartbeat_interval: Duration::from_millis(heartbeat_interval_ms.max(1000)),
        manifest: Arc::new(manifest),
    }));
    let ep = match endpoint.get() {
        Some(ep) => ep.clone(),
        None => {
            let ep = match mesh::endpoint::bind(EndpointOptions {
                secret_key: key.clone(),
                relay_url,
                relay_only: false,
                bind_addr: config.bind_addr,
                portmapper: config.portmapper,
                alpns: mesh::alpn::agent_alpns(),
                relay_token: Some(config.token.clone()),
                relay_quic,
            })
            .await
            {
                Ok(ep) => ep,
                Err(e) => return ChannelEnd::Fatal(e.into()),
            };
            server.put(crate::serve::MeshServer::spawn(
                ep.endpoint.clone(),
                welcome.subscribe(),
                crate::ssh::config(config.host_key.clone(), config.ssh_idle_timeout),
                activity.clone(),
            ));
            let _ = endpoint.set(ep.clone());
            ep
        }
    };

    let host_key = AgentMessage::HostKey {
        openssh: config
            .host_key
            .public_key()
            .to_openssh()
            .unwrap_or_default(),
    };
    if let Err(e) = send(&mut ws, &host_key).await {
        return ChannelEnd::Failed(e.to_string());
    }
    reports.channel_opened();
    let mut addrs = ep.endpoint.watch_addr();
    let mut heartbeat =
        tokio::time::interval(Duration::from_millis(heartbeat_interval_ms.max(1000)));
    heartbeat.tick().await;
    let mut last_sent = None;
    loop {
        let addr = addrs.get();
        if last_sent.as_ref() != Some(&addr) {
            let msg = AgentMessage::Addr {
                addr: addr.clone(),
                proof: proof.clone(),
            };
            if let Err(e) = send(&mut ws, &msg).await {
                return ChannelEnd::Failed(e.to_string());
            }
            tracing::debug!(addrs = ?addr.addrs, "published address");
            last_sent = Some(addr);
        }
        while let Some(msg) = reports.poll_transmit() {
            if let Err(e) = send(&mut ws, &msg).await {
                reports.requeue(msg);
                return ChannelEnd::Failed(e.to_string());
            }
        }
        reports.sent();
        let batch_due = reports.poll_timeout();
        tokio::select! {
            () = reports.pushed() => {}
            () = crate::sleep_until(batch_due) => {}
            changed = addrs.updated() => {
                if changed.is_err() {
                    return ChannelEnd::Fatal(ControlError::EndpointClosed);
                }
            }
            _ = heartbeat.tick() => {
                if let Err(e) = send(&mut ws, &AgentMessage::Heartbeat).await {
                    return ChannelEnd::Failed(e.to_string());
                }
            }
            msg = ws.next() => match msg {
                None => return ChannelEnd::Closed(None),
                Some(Ok(Message::Close(frame))) => return ChannelEnd::Closed(close_reason(frame)),
                Some(Err(e)) => return ChannelEnd::Failed(e.to_string()),
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<CoordinatorMessage>(&text) {
                    Ok(CoordinatorMessage::Revoke { token_ids }) => {
                        let closed = activity.revoke(&token_ids, "the coordinator revoked this session's access");
                        tracing::info!(closed, "access revoked by the coordinator");
                    }
                    Ok(CoordinatorMessage::Welcome { .. }) => {
                        return ChannelEnd::Failed("a second welcome on one channel".into());
                    }
                    Err(e) => tracing::warn!("unknown message from the coordinator: {e}"),
                },
                Some(Ok(_)) => {}
            },
        }
    }
}

/// The reason a close frame gives, if any.
fn close_reason(frame: Option<tungstenite::protocol::CloseFrame>) -> Option<String> {
    frame
        .map(|f| f.reason.to_string())
        .filter(|r| !r.is_empty())
}

/// Checks the welcome's key against the pin and the `--coordinator-key` flag, and
/// stores the pin when it is new or changed.
fn pin_coordinator(
    config: &ChannelConfig,
    key: iroh::PublicKey,
    relay_quic: Option<&mesh::control::RelayQuic>,
    relay_quic_signature: Option<&str>,
) -> Result<(), ControlError> {
    let path = config.data_dir.join(crate::pin::PIN_FILE);
    let stored = crate::pin::load(&path)?;
    let decision = crate::pin::check(
        stored.as_ref(),
        config.coordinator_key,
        &path,
        key,
        relay_quic,
        relay_quic_signature,
    )?;
    if let crate::pin::PinDecision::Store(pin) = decision {
        crate::pin::save(&path, &pin)?;
        tracing::info!(coordinator_key = %pin.coordinator_key, file = %path.display(), "coordinator pinned");
    }
    Ok(())
}

/// Why a message could not be sent on the control channel.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// The message could not be encoded as JSON.
    #[error(transparent)]
    Encode(#[from] serde_json::Error),
    /// The WebSocket failed.
    #[error(transparent)]
    Socket(#[from] tungstenite::Error),
}

async fn send<S>(ws: &mut S, msg: &AgentMessage) -> Result<(), SendError>
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let text = serde_json::to_string(msg)?;
    Ok(ws.send(Message::Text(text.into())).await?)
}
