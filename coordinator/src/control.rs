//! The agent's control channel: a WebSocket at `GET /api/v1/agent/control`,
//! authenticated by the agent token. The coordinator welcomes the agent (its ticket
//! key, the relay, its manifest), then records the addresses it publishes in the
//! registry and its heartbeats and reports in the ledger until the channel ends.

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{
    Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::response::{IntoResponse, Response};
use mesh::Timestamp;
use mesh::control::{AgentMessage, CoordinatorMessage};
use tracing::Instrument;

use crate::api::AppState;
use crate::api::callers::AgentCaller;
use crate::bucket::TokenBucket;
use crate::error::ApiError;
use crate::registry::Push;
use crate::store::EndpointClaim;

/// How often agents heartbeat on the control channel unless the operator says
/// otherwise (`myco server --heartbeat-interval`).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);

/// A channel silent this long is closed: two missed heartbeats and some slack.
fn idle_timeout(heartbeat: Duration) -> Duration {
    heartbeat.saturating_mul(2) + Duration::from_secs(5)
}

pub async fn control_handler(
    State(state): State<AppState>,
    agent: AgentCaller,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => {
            return ApiError::bad_request("the control channel is a WebSocket", r.body_text())
                .into_response();
        }
    };
    // Control messages are small: 4 KiB buffers instead of tungstenite's 128 KiB keep
    // 10k channels in tens of MiB, and written messages go out at once. The largest
    // message is a batch of script log lines.
    ws.read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(mesh::limits::MESSAGE_MAX)
        .on_upgrade(move |socket| {
            let span = tracing::info_span!("control", agent = %agent.target);
            run_channel(socket, state, agent).instrument(span)
        })
}

async fn run_channel(mut socket: WebSocket, state: AppState, agent: AgentCaller) {
    let id = agent.agent_id.clone();
    let stored = if state.ledger.has_channel(&id) {
        None
    } else {
        let (store, id) = (state.store.clone(), id.clone());
        match tokio::task::spawn_blocking(move || store.agent_state(&id)).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                // Without its stored state the agent would lose its first connection
                // time and reports at the next flush; better to refuse this channel
                // and let it retry.
                tracing::error!("cannot read the agent's state, closing its channel: {e}");
                return;
            }
            Err(e) => {
                tracing::error!("cannot read the agent's state, closing its channel: {e}");
                return;
            }
        }
    };
    let now = Timestamp::now();
    let (channel, mut pushed) = state.registry.agent_connected(&id, now);
    state.ledger.connected(&id, stored, now);
    state.metrics.channel_opened();
    tracing::info!(channel, "agent connected");
    let challenge = mesh::sign::new_challenge();
    let relay_quic = state.relay_quic.relay_quic();
    let welcome = CoordinatorMessage::Welcome {
        coordinator_key: state.signing_key.public(),
        workspace_id: agent.workspace_id.clone(),
        agent_id: agent.agent_id.clone(),
        challenge: challenge.clone(),
        relay_quic_signature: Some(mesh::sign::qad_cert_signature(
            &state.signing_key,
            &relay_quic.cert_der_hex,
        )),
        relay_url: state.relay_url.clone(),
        agent: agent.target.clone(),
        heartbeat_interval_ms: u64::try_from(state.heartbeat_interval.as_millis())
            .unwrap_or(15_000),
        relay_quic: Some(relay_quic),
        manifest: agent.manifest.clone(),
    };
    let sent = match serde_json::to_string(&welcome) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    };
    let idle = idle_timeout(state.heartbeat_interval);
    // The endpoint this channel proved and the store accepted for this agent.
    let mut proven: Option<iroh::EndpointId> = None;
    let mut budget = ChannelBudget::new(tokio::time::Instant::now());
    let reason = if sent {
        loop {
            let received = tokio::select! {
                r = tokio::time::timeout(idle, socket.recv()) => r,
                push = pushed.recv() => match push {
                    Some(Push::Close(reason)) => {
                        tracing::info!(%reason, "closing the agent's channel");
                        close(&mut socket, &reason).await;
                        break "closed by the coordinator";
                    }
                    Some(Push::Revoke { token_ids }) => {
                        let msg = CoordinatorMessage::Revoke { token_ids };
                        let text = serde_json::to_string(&msg).unwrap_or_default();
                        if socket.send(Message::Text(text.into())).await.is_err() {
                            break "channel failed";
                        }
                        continue;
                    }
                    None => {
                        close(&mut socket, "replaced by a newer channel of this agent").await;
                        break "replaced by a newer channel";
                    }
                },
            };
            let msg = match received {
                Err(_) => break "no heartbeat in time",
                Ok(None) => break "channel closed",
                Ok(Some(Err(_))) => break "channel failed",
                Ok(Some(Ok(m))) => m,
            };
            let text = match msg {
                Message::Text(text) => text,
                Message::Close(_) => break "agent closed the channel",
                _ => continue,
            };
            let m = match serde_json::from_str::<AgentMessage>(&text) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("bad control message: {e}");
                    break "protocol error";
                }
            };
            if let Err(over) = budget.admit(&m, tokio::time::Instant::now()) {
                tracing::warn!("closing the agent's channel: {over}");
                close(&mut socket, &over).await;
                break "over its limits";
            }
            if let Err(refusal) = mesh::limits::check_agent_message(&m, &agent.manifest) {
                tracing::warn!(kind = m.kind(), "agent report refused: {refusal}");
                budget.refused += 1;
                if budget.refused > MAX_REFUSALS {
                    close(&mut socket, "too many refused reports").await;
                    break "too many refused reports";
                }
                continue;
            }
            match m {
                AgentMessage::Addr { addr, proof } => {
                    if proven != Some(addr.id) {
                        budget.endpoint_claims += 1;
                        if budget.endpoint_claims > MAX_ENDPOINT_CLAIMS {
                            close(&mut socket, "too many endpoint keys on one channel").await;
                            break "over its limits";
                        }
                        if let Err(refusal) =
                            prove_endpoint(&state, &agent, &challenge, &addr, &proof).await
                        {
                            tracing::warn!(endpoint = %addr.id, "agent address refused: {refusal}");
                            close(&mut socket, &refusal).await;
                            break "endpoint refused";
                        }
                        proven = Some(addr.id);
                    }
                    tracing::info!(endpoint = %addr.id.fmt_short(), addrs = ?addr.addrs, "agent address");
                    if !state.registry.agent_addr(&agent.agent_id, channel, addr) {
                        let refusal = "this endpoint id is in use by another live agent";
                        tracing::warn!("agent address refused: {refusal}");
                        close(&mut socket, refusal).await;
                        break "endpoint refused";
                    }
                }
                AgentMessage::Heartbeat => {
                    state.ledger.heartbeat(&id, Timestamp::now());
                    state.metrics.heartbeat();
                }
                AgentMessage::HostKey { openssh } => {
                    // Checked above; what is stored is the canonical form.
                    let Ok(openssh) = mesh::limits::canonical_host_key(&openssh) else {
                        continue;
                    };
                    let store = state.store.clone();
                    let (ws, id) = (agent.workspace_id.clone(), id.clone());
                    let saved = tokio::task::spawn_blocking(move || {
                        store.set_agent_host_key(&ws, &id, &openssh)
                    })
                    .await;
                    match saved {
                        Ok(Ok(true)) => tracing::info!("agent SSH host key recorded"),
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!("cannot record the agent's SSH host key: {e}")
                        }
                        Err(e) => tracing::warn!("cannot record the agent's SSH host key: {e}"),
                    }
                }
                AgentMessage::Lifecycle {
                    state: s,
                    changed_at,
                } => {
                    tracing::info!(lifecycle = %s, "agent lifecycle");
                    state.ledger.lifecycle(&id, s, changed_at);
                }
                AgentMessage::AppHealth { changes } => {
                    state.ledger.app_health(&id, changes);
                }
                AgentMessage::Stats { stats } => state.ledger.stats(&id, stats),
                AgentMessage::Metadata { items } => state.ledger.metadata(&id, items),
                AgentMessage::Logs { lines } => state.ledger.logs(&id, lines),
                AgentMessage::Netcheck { result } => {
                    tracing::info!(reason = %result.reason, summary = %result.report.summary(), "agent netcheck");
                    state.ledger.netcheck(&id, result);
                }
            }
        }
    } else {
        "welcome failed"
    };
    let current = state.registry.agent_disconnected(&id, channel);
    state.ledger.disconnected(&id, current, Timestamp::now());
    state.metrics.channel_closed();
    tracing::info!(reason, "agent disconnected");
}

/// Refused reports one channel may send before it is closed.
const MAX_REFUSALS: u32 = 100;
/// Messages a channel may send in a burst, and per second after.
const MESSAGE_BURST: f64 = 200.0;
const MESSAGES_PER_SECOND: f64 = 50.0;
/// Store writes a channel may cause: endpoint keys proven and host keys. An honest
/// agent sends its host key once per channel and keeps one endpoint key.
const MAX_ENDPOINT_CLAIMS: u32 = 4;
const MAX_HOST_KEYS: u32 = 2;

/// What one channel has spent of its limits; pure, time passed in.
#[derive(Debug)]
struct ChannelBudget {
    messages: TokenBucket,
    endpoint_claims: u32,
    host_keys: u32,
    refused: u32,
}

impl ChannelBudget {
    fn new(now: tokio::time::Instant) -> Self {
        Self {
            messages: TokenBucket::new(MESSAGES_PER_SECOND, MESSAGE_BURST, now),
            endpoint_claims: 0,
            host_keys: 0,
            refused: 0,
        }
    }

    /// Takes one message; an error says which limit it broke.
    fn admit(&mut self, msg: &AgentMessage, now: tokio::time::Instant) -> Result<(), String> {
        if !self.messages.try_take(1.0, now) {
            return Err(format!(
                "more than {MESSAGES_PER_SECOND} messages a second (burst {MESSAGE_BURST})"
            ));
        }
        if let AgentMessage::HostKey { .. } = msg {
            self.host_keys += 1;
            if self.host_keys > MAX_HOST_KEYS {
                return Err(format!(
                    "more than {MAX_HOST_KEYS} SSH host keys on one channel"
                ));
            }
        }
        Ok(())
    }
}

/// Checks that the agent holds the key of the endpoint it announces (its signature
/// over this channel's challenge) and that no other agent holds that endpoint, and
/// records it as the agent's. Returns the refusal, worded for the agent's log.
async fn prove_endpoint(
    state: &AppState,
    agent: &AgentCaller,
    challenge: &str,
    addr: &iroh::EndpointAddr,
    proof: &str,
) -> Result<(), String> {
    mesh::sign::verify_endpoint_proof(&addr.id, challenge, &agent.agent_id, proof)
        .map_err(|e| format!("no proof this agent holds its endpoint's key ({e})"))?;
    let store = state.store.clone();
    let (ws, id, endpoint) = (
        agent.workspace_id.clone(),
        agent.agent_id.clone(),
        addr.id.to_string(),
    );
    let claim =
        tokio::task::spawn_blocking(move || store.claim_agent_endpoint(&ws, &id, &endpoint))
            .await
            .map_err(|e| format!("the coordinator failed to record the endpoint: {e}"))?
            .map_err(|e| format!("the coordinator failed to record the endpoint: {e}"))?;
    match claim {
        EndpointClaim::Unchanged => Ok(()),
        EndpointClaim::Claimed { previous } => {
            if let Some(previous) = previous {
                tracing::info!(%previous, new = %addr.id, "agent proved a new endpoint key");
            }
            Ok(())
        }
        EndpointClaim::Taken { by_agent } => {
            tracing::warn!(other_agent = %by_agent, endpoint = %addr.id, "agent announced another agent's endpoint id");
            Err(format!(
                "endpoint {} is another agent's; do not copy an agent's data dir (its key) between workspaces",
                addr.id.fmt_short()
            ))
        }
    }
}

/// Closes the channel with `reason`, which the agent logs; a close frame's reason is
/// at most 123 bytes.
async fn close(socket: &mut WebSocket, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::POLICY,
        reason: reason[..end].into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}
