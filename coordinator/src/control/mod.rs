//! The agent's control channel: a WebSocket at `GET /api/v1/agent/control`,
//! authenticated by the agent token. The coordinator welcomes the agent (its ticket
//! key, the relay, its manifest), then records the addresses it publishes in the
//! registry and its heartbeats and reports in the ledger until the channel ends.
//!
//! This file is the I/O: the socket, the store, the registry and the ledger. What each
//! frame, push and timeout means is decided in [`dispatch`], a pure state machine.

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{
    Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::response::{IntoResponse, Response};
use mesh::Timestamp;
use mesh::control::{AgentMessage, CoordinatorMessage};
use tokio::time::Instant;
use tracing::Instrument;

use crate::api::AppState;
use crate::api::callers::AgentCaller;
use crate::error::ApiError;
use crate::store::{ClaimEndpointError, EndpointClaim};
use dispatch::{ControlChannel, End, Received, Step, idle_timeout};

mod dispatch;

/// How often agents heartbeat on the control channel unless the operator says
/// otherwise (`myco server --heartbeat-interval`).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);

/// `GET /api/v1/agent/control`: upgrades to the agent's control channel.
///
/// # Cancel safety
/// Cancel safe (it runs under the request deadline): it only checks the request and
/// answers the upgrade. The channel runs in the task axum spawns once the upgrade
/// completes, which the deadline does not bound.
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
    let sent = send(&mut socket, &welcome).await;
    let mut core = ControlChannel::new(
        agent.agent_id.clone(),
        agent.manifest.clone(),
        challenge,
        idle_timeout(state.heartbeat_interval),
        Instant::now(),
    );
    let reason = if sent {
        loop {
            // Each branch is cancel safe: `recv` on the socket and on the push queue
            // loses nothing when another wins. Biased: a push (close, revoke) goes
            // first, as the agent cannot flood that queue; frames that arrived while
            // the loop was busy (a slow store write, a stalled runtime) count before
            // the idle timer may end the channel for silence.
            let step = tokio::select! {
                biased;
                push = pushed.recv() => core.handle_push(push),
                received = socket.recv() => {
                    let now = Instant::now();
                    match &received {
                        None => core.handle_received(Received::Ended, now),
                        Some(Err(_)) => core.handle_received(Received::Failed, now),
                        Some(Ok(Message::Text(text))) => {
                            core.handle_received(Received::Text(text.as_str()), now)
                        }
                        Some(Ok(Message::Close(_))) => core.handle_received(Received::Close, now),
                        Some(Ok(_)) => core.handle_received(Received::Other, now),
                    }
                }
                () = tokio::time::sleep_until(core.poll_timeout()) => {
                    match core.handle_timeout(Instant::now()) {
                        Some(end) => Step::End(end),
                        None => continue,
                    }
                }
            };
            if let Err(reason) = apply(step, &mut core, &mut socket, &state, &agent, channel).await
            {
                break reason;
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

/// Carries out one step of the channel; an error is why the channel ended.
async fn apply(
    step: Step,
    core: &mut ControlChannel,
    socket: &mut WebSocket,
    state: &AppState,
    agent: &AgentCaller,
    channel: u64,
) -> Result<(), &'static str> {
    let id = &agent.agent_id;
    match step {
        Step::Nothing => {}
        Step::Send(msg) => {
            if !send(socket, &msg).await {
                return Err("channel failed");
            }
        }
        Step::End(end) => {
            if let Some(frame) = &end.close_frame {
                close(socket, frame).await;
            }
            return Err(end.reason);
        }
        Step::ClaimEndpoint(addr) => {
            if let Err(refusal) = claim_endpoint(state, agent, &addr).await {
                let refusal = refusal.to_string();
                tracing::warn!(endpoint = %addr.id, "agent address refused: {refusal}");
                close(socket, &refusal).await;
                return Err(End::endpoint_refused(refusal).reason);
            }
            core.endpoint_claimed(addr.id);
            publish(socket, state, id, channel, addr).await?;
        }
        Step::PublishAddr(addr) => publish(socket, state, id, channel, addr).await?,
        Step::Heartbeat => {
            state.ledger.heartbeat(id, Timestamp::now());
            state.metrics.heartbeat();
        }
        Step::HostKey(openssh) => {
            let store = state.store.clone();
            let (ws, id) = (agent.workspace_id.clone(), id.clone());
            let saved =
                tokio::task::spawn_blocking(move || store.set_agent_host_key(&ws, &id, &openssh))
                    .await;
            match saved {
                Ok(Ok(true)) => tracing::info!("agent SSH host key recorded"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!("cannot record the agent's SSH host key: {e}"),
                Err(e) => tracing::warn!("cannot record the agent's SSH host key: {e}"),
            }
        }
        Step::Report(msg) => record(state, id, msg),
    }
    Ok(())
}

/// Publishes the address of the endpoint this channel proved; the registry refuses an
/// endpoint another live agent holds.
async fn publish(
    socket: &mut WebSocket,
    state: &AppState,
    id: &str,
    channel: u64,
    addr: iroh::EndpointAddr,
) -> Result<(), &'static str> {
    tracing::info!(endpoint = %addr.id.fmt_short(), addrs = ?addr.addrs, "agent address");
    if state.registry.agent_addr(id, channel, addr) {
        return Ok(());
    }
    let refusal = "this endpoint id is in use by another live agent";
    tracing::warn!("agent address refused: {refusal}");
    close(socket, refusal).await;
    Err(End::endpoint_refused(refusal).reason)
}

/// Hands a checked report to the ledger.
fn record(state: &AppState, id: &str, msg: AgentMessage) {
    match msg {
        AgentMessage::Lifecycle {
            state: s,
            changed_at,
        } => {
            tracing::info!(lifecycle = %s, "agent lifecycle");
            state.ledger.lifecycle(id, s, changed_at);
        }
        AgentMessage::AppHealth { changes } => state.ledger.app_health(id, changes),
        AgentMessage::Stats { stats } => state.ledger.stats(id, stats),
        AgentMessage::Metadata { items } => state.ledger.metadata(id, items),
        AgentMessage::Logs { lines } => state.ledger.logs(id, lines),
        AgentMessage::Netcheck { result } => {
            tracing::info!(reason = %result.reason, summary = %result.report.summary(), "agent netcheck");
            state.ledger.netcheck(id, result);
        }
        // The channel's core routes these elsewhere.
        AgentMessage::Addr { .. } | AgentMessage::Heartbeat | AgentMessage::HostKey { .. } => {}
    }
}

/// Sends one message; false when the channel failed.
async fn send(socket: &mut WebSocket, msg: &CoordinatorMessage) -> bool {
    match serde_json::to_string(msg) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    }
}

/// Why the endpoint an agent proved is not recorded as its own; the message is the
/// refusal the agent logs.
#[derive(Debug, thiserror::Error)]
enum ClaimError {
    /// The store's task did not finish (it panicked or the runtime is stopping).
    #[error("the coordinator failed to record the endpoint: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The store could not record it.
    #[error("the coordinator failed to record the endpoint: {0}")]
    Store(#[source] ClaimEndpointError),
    /// Another agent holds the endpoint's key.
    #[error(
        "endpoint {} is another agent's; do not copy an agent's data dir (its key) between workspaces",
        .0.fmt_short()
    )]
    Taken(iroh::EndpointId),
}

/// Records the endpoint the agent proved as the agent's unless another agent holds it.
async fn claim_endpoint(
    state: &AppState,
    agent: &AgentCaller,
    addr: &iroh::EndpointAddr,
) -> Result<(), ClaimError> {
    let store = state.store.clone();
    let (ws, id, endpoint) = (
        agent.workspace_id.clone(),
        agent.agent_id.clone(),
        addr.id.to_string(),
    );
    let claim =
        tokio::task::spawn_blocking(move || store.claim_agent_endpoint(&ws, &id, &endpoint))
            .await
            .map_err(ClaimError::Task)?
            .map_err(ClaimError::Store)?;
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
            Err(ClaimError::Taken(addr.id))
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
