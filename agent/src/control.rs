//! The control channel: connect, take the coordinator's welcome, publish our address
//! on every change, heartbeat, send what the reporters queued ([`crate::reports`]),
//! and reconnect with exponential backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use iroh::{SecretKey, Watcher};
use mesh::control::{AgentMessage, CoordinatorMessage};
use mesh::control_channel::{self as wire, ConnectError, Received, RecvError, SendError};
use mesh::endpoint::EndpointOptions;

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

/// Why one control channel ended; all but `Fatal` are retried.
#[derive(Debug, thiserror::Error)]
enum ChannelEnd {
    /// The channel could not be opened.
    #[error("cannot connect: {0}")]
    Connect(ConnectError),
    /// The coordinator closed it, with its reason if it gave one.
    #[error("channel closed by the coordinator{}", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed(Option<String>),
    /// A message could not be sent.
    #[error("channel failed: {0}")]
    Send(#[from] SendError),
    /// The socket failed while receiving.
    #[error("channel failed: {0}")]
    Recv(RecvError),
    /// The coordinator's first message was something else than a welcome.
    #[error("channel failed: the first message was not a welcome")]
    NotWelcome,
    /// The coordinator sent a second welcome on one channel.
    #[error("channel failed: a second welcome on one channel")]
    SecondWelcome,
    /// Retrying cannot help.
    #[error("fatal: {0}")]
    Fatal(ControlError),
}

/// Holds the control channel: opens it, serves it until it ends, and opens it again
/// after a backoff, until something retrying cannot fix.
///
/// # Errors
/// [`ControlError`]: a bad URL, a refused token, a coordinator other than the pinned
/// one, or the mesh endpoint failed.
///
/// # Cancel safety
/// Not cancel safe: dropping it closes the channel without a word to the coordinator
/// and loses the reports it had taken but not sent. [`crate::run`] polls it by
/// reference in `select!` and drops it only as the agent stops.
pub async fn run(
    config: ChannelConfig,
    key: SecretKey,
    welcome: WelcomeTx,
    endpoint: EndpointCell,
    server: &ServerSlot,
    reports: Reports,
    activity: Arc<MeshActivity>,
) -> Result<(), ControlError> {
    // A bad URL stays bad: say so now rather than on every retry.
    wire::control_url(&config.url).map_err(|_| ControlError::BadUrl(config.url.clone()))?;
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
        match channel(&config, &key, shared).await {
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
    key: &SecretKey,
    Shared {
        welcome,
        endpoint,
        server,
        reports,
        activity,
    }: Shared<'_>,
) -> ChannelEnd {
    let mut ws = match wire::connect(&config.url, &config.token, None).await {
        Ok(ws) => ws,
        Err(ConnectError::Url(_)) => {
            return ChannelEnd::Fatal(ControlError::BadUrl(config.url.clone()));
        }
        Err(ConnectError::BadRequest { url, source }) => {
            return ChannelEnd::Fatal(ControlError::BadUrl(format!("{url}: {source}")));
        }
        Err(ConnectError::BadToken) => {
            return ChannelEnd::Fatal(ControlError::TokenRefused(
                "it holds characters a header cannot".into(),
            ));
        }
        Err(ConnectError::Refused(message)) => {
            return ChannelEnd::Fatal(ControlError::TokenRefused(message));
        }
        Err(e) => return ChannelEnd::Connect(e),
    };
    let first = match ws.recv().await {
        Ok(Received::Message(m)) => m,
        Ok(Received::Closed(reason)) => return ChannelEnd::Closed(reason),
        Err(RecvError::Decode(_)) => return ChannelEnd::NotWelcome,
        Err(e @ RecvError::Socket(_)) => return ChannelEnd::Recv(e),
    };
    let CoordinatorMessage::Welcome {
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
    } = first
    else {
        return ChannelEnd::NotWelcome;
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
    if let Err(e) = ws.send(&host_key).await {
        return e.into();
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
            if let Err(e) = ws.send(&msg).await {
                return e.into();
            }
            tracing::debug!(addrs = ?addr.addrs, "published address");
            last_sent = Some(addr);
        }
        while let Some(msg) = reports.poll_transmit() {
            if let Err(e) = ws.send(&msg).await {
                reports.requeue(msg);
                return e.into();
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
                if let Err(e) = ws.send(&AgentMessage::Heartbeat).await {
                    return e.into();
                }
            }
            msg = ws.recv() => match msg {
                Ok(Received::Closed(reason)) => return ChannelEnd::Closed(reason),
                Err(e @ RecvError::Socket(_)) => return ChannelEnd::Recv(e),
                Ok(Received::Message(CoordinatorMessage::Revoke { token_ids })) => {
                    let closed = activity.revoke(&token_ids, "the coordinator revoked this session's access");
                    tracing::info!(closed, "access revoked by the coordinator");
                }
                Ok(Received::Message(CoordinatorMessage::Welcome { .. })) => {
                    return ChannelEnd::SecondWelcome;
                }
                Err(RecvError::Decode(e)) => tracing::warn!("unknown message from the coordinator: {e}"),
            },
        }
    }
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
