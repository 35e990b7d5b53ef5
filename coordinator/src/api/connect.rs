//! `POST .../connect`: checks the caller may reach the agent, signs a short-lived
//! ticket for the client's endpoint and admits that endpoint to the relay.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use mesh::Timestamp;
use mesh::control::{ConnectInfo, ConnectRequest};
use mesh::ticket::TicketClaims;

use super::callers::Caller;
use super::{AppState, agent_named, find_workspace};
use crate::error::{ApiError, ApiJson, ApiResult};

use mesh::ticket::LIFETIME as TICKET_LIFETIME;

/// The longest a connect waits for an agent to come up.
const MAX_WAIT: Duration = Duration::from_secs(25);

pub(super) async fn connect(
    State(state): State<AppState>,
    caller: Caller,
    Path((owner, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<ConnectRequest>,
) -> ApiResult<Json<ConnectInfo>> {
    let ws = find_workspace(&state, &caller, &owner, &name).await?;
    let agent = match &req.agent {
        Some(n) => agent_named(&ws, n)?,
        None => match ws.agents.as_slice() {
            [one] => one,
            many => {
                return Err(ApiError::bad_request(
                    format!(
                        "workspace {}/{} has {} agents",
                        ws.owner,
                        ws.name,
                        many.len()
                    ),
                    "name one as WS.AGENT",
                ));
            }
        },
    };
    let target = format!("{}/{}.{}", ws.owner, ws.name, agent.name);
    // Within the request timeout, which would answer 503 otherwise.
    let wait = Duration::from_secs(req.wait.unwrap_or(0))
        .min(MAX_WAIT)
        .min(state.request_timeout / 2);
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribed before each look, so an address published after it wakes this.
    let mut changes = state.registry.address_changes();
    let mut waited = false;
    let addr = loop {
        changes.borrow_and_update();
        if let Some(addr) = state.registry.live(&agent.id).and_then(|l| l.addr) {
            break addr;
        }
        waited = true;
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::conflict(
                format!("agent {target} is not connected"),
                "start it inside the workspace with `myco agent --url URL --token TOKEN`",
            ));
        }
        // The sender lives in the registry, which `state` holds.
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    };
    // An agent that came up while this waited reported its SSH host key before its
    // address (the control channel's order): read it again.
    let mut ssh_host_key = agent.ssh_host_key.clone();
    if waited && ssh_host_key.is_none() {
        let now = find_workspace(&state, &caller, &owner, &name).await?;
        ssh_host_key = now
            .agents
            .iter()
            .find(|a| a.id == agent.id)
            .and_then(|a| a.ssh_host_key.clone());
    }
    // The agent's home relay is ours (its welcome named it), but an address it
    // published before it reached the relay lacks it; a client that got only direct
    // addresses it cannot reach would never try the relay.
    let addr = if addr.relay_urls().next().is_none() {
        addr.with_relay_url(state.relay_url.clone())
    } else {
        addr
    };
    let now = Timestamp::now();
    let expires_at = now.saturating_add(TICKET_LIFETIME);
    let claims = TicketClaims {
        client: req.client_id,
        agent: addr.id,
        workspace_id: ws.id.clone(),
        agent_id: agent.id.clone(),
        user: caller.user.username.to_string(),
        token_id: caller.token.id.clone(),
        target: target.clone(),
        expires_at,
    };
    let ticket = mesh::ticket::sign(&state.signing_key, &claims);
    state
        .registry
        .allow_client(req.client_id, expires_at, now, &caller.token.id);
    tracing::info!(user = %caller.user.username, agent = %target, client = %req.client_id.fmt_short(), "ticket issued");
    Ok(Json(ConnectInfo {
        agent: target,
        agent_addr: addr,
        ticket,
        relay_url: state.relay_url.clone(),
        relay_quic: Some(state.relay_quic.relay_quic()),
        expires_at,
        ssh_host_key,
    }))
}
