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
use crate::error::ApiError;

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
        .max_message_size(4 * 1024 * 1024)
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
    let channel = state.registry.agent_connected(&id, now);
    state.ledger.connected(&id, stored, now);
    state.metrics.channel_opened();
    tracing::info!(channel, "agent connected");
    let welcome = CoordinatorMessage::Welcome {
        coordinator_key: state.signing_key.public(),
        relay_url: state.relay_url.clone(),
        agent: agent.target.clone(),
        heartbeat_interval_ms: u64::try_from(state.heartbeat_interval.as_millis())
            .unwrap_or(15_000),
        relay_quic: Some(state.relay_quic.clone()),
        manifest: agent.manifest.clone(),
    };
    let sent = match serde_json::to_string(&welcome) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    };
    let idle = idle_timeout(state.heartbeat_interval);
    let reason = if sent {
        loop {
            let msg = match tokio::time::timeout(idle, socket.recv()).await {
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
                    Ok(AgentMessage::Heartbeat) => {
                        state.ledger.heartbeat(&id, Timestamp::now());
                        state.metrics.heartbeat();
                    }
                    Ok(AgentMessage::HostKey { openssh }) => {
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
                    Ok(AgentMessage::Lifecycle {
                        state: s,
                        changed_at,
                    }) => {
                        tracing::info!(lifecycle = %s, "agent lifecycle");
                        state.ledger.lifecycle(&id, s, changed_at);
                    }
                    Ok(AgentMessage::AppHealth { changes }) => {
                        state.ledger.app_health(&id, changes);
                    }
                    Ok(AgentMessage::Stats { stats }) => state.ledger.stats(&id, stats),
                    Ok(AgentMessage::Metadata { items }) => state.ledger.metadata(&id, items),
                    Ok(AgentMessage::Logs { lines }) => state.ledger.logs(&id, lines),
                    Ok(AgentMessage::Netcheck { result }) => {
                        tracing::info!(reason = %result.reason, summary = %result.report.summary(), "agent netcheck");
                        state.ledger.netcheck(&id, result);
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
    let current = state.registry.agent_disconnected(&id, channel);
    state.ledger.disconnected(&id, current, Timestamp::now());
    state.metrics.channel_closed();
    tracing::info!(reason, "agent disconnected");
}
