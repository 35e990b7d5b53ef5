//! The agent's control channel: a WebSocket at `GET /api/v1/agent/control`,
//! authenticated by the agent token. The coordinator welcomes the agent (its ticket
//! key, the relay), then records the addresses it publishes until the channel ends.

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{
    Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::response::{IntoResponse, Response};
use mesh::Timestamp;
use mesh::control::{AgentMessage, CoordinatorMessage};
use tracing::Instrument;

use crate::api::{AgentCaller, ApiError, AppState};

/// How often agents heartbeat on the control channel.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// A channel silent this long is considered dead (two missed heartbeats).
const IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 15 + 5);

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
    ws.on_upgrade(move |socket| {
        let span = tracing::info_span!("control", agent = %agent.target);
        run_channel(socket, state, agent).instrument(span)
    })
}

async fn run_channel(mut socket: WebSocket, state: AppState, agent: AgentCaller) {
    let channel = state
        .registry
        .agent_connected(&agent.agent_id, Timestamp::now());
    tracing::info!(channel, "agent connected");
    let welcome = CoordinatorMessage::Welcome {
        coordinator_key: state.signing_key.public(),
        relay_url: state.relay_url.clone(),
        agent: agent.target.clone(),
        heartbeat_interval_ms: u64::try_from(HEARTBEAT_INTERVAL.as_millis()).unwrap_or(15_000),
        relay_quic: Some(state.relay_quic.clone()),
        manifest: agent.manifest.clone(),
    };
    let sent = match serde_json::to_string(&welcome) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    };
    let reason = if sent {
        loop {
            let msg = match tokio::time::timeout(IDLE_TIMEOUT, socket.recv()).await {
                Err(_) => break "no heartbeat in time",
                Ok(None) => break "channel closed",
                Ok(Some(Err(_))) => break "channel failed",
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(text) => match serde_json::from_str::<AgentMessage>(&text) {
                    Ok(AgentMessage::Addr { addr }) => {
                        tracing::info!(endpoint = %addr.id.fmt_short(), addrs = ?addr.addrs, "agent address");
                        state.registry.agent_addr(&agent.agent_id, channel, addr);
                    }
                    Ok(AgentMessage::Heartbeat) => {}
                    Ok(AgentMessage::HostKey { openssh }) => {
                        let store = state.store.clone();
                        let (ws, id) = (agent.workspace_id.clone(), agent.agent_id.clone());
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
                    Ok(
                        m @ (AgentMessage::Lifecycle { .. }
                        | AgentMessage::AppHealth { .. }
                        | AgentMessage::Stats { .. }
                        | AgentMessage::Metadata { .. }
                        | AgentMessage::Logs { .. }),
                    ) => {
                        // Recorded by the agent-state slice of issue 5; accepted so
                        // newer agents keep their channel.
                        tracing::trace!(?m, "agent report");
                    }
                    Err(e) => {
                        tracing::warn!("bad control message: {e}");
                        break "protocol error";
                    }
                },
                Message::Close(_) => break "agent closed the channel",
                _ => {}
            }
        }
    } else {
        "welcome failed"
    };
    state.registry.agent_disconnected(&agent.agent_id, channel);
    tracing::info!(reason, "agent disconnected");
}
