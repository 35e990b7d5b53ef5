//! The HTTP API (`/api/v1/...`): the router, its state, and what its resources share.
//!
//! Every failure is a JSON [`ErrorBody`] `{"message", "detail"}` with a fitting status,
//! including the ones axum's extractors would answer in plain text (bad JSON, body too
//! large, unknown route); the error type is [`crate::error::ApiError`].
//!
//! One module per resource: `users`, `tokens`, `workspaces`, `connect` (tickets) and
//! `diagnostics` (`/metrics`, relay stats, netcheck targets); `callers` authenticates.
//!
//! [`ErrorBody`]: mesh::api::ErrorBody

pub(crate) mod callers;
mod connect;
mod diagnostics;
mod tokens;
mod users;
mod workspaces;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use iroh::{RelayUrl, SecretKey};
use mesh::Name;
use mesh::api::BuildInfo;

use self::callers::Caller;
use crate::error::{ApiError, ApiResult, MAX_BODY_BYTES};
use crate::ledger::AgentLedger;
use crate::metrics::CoordinatorMetrics;
use crate::registry::MeshRegistry;
use crate::relay::{self, RelayState};
use crate::status::StatusPolicy;
use crate::store::{AgentRecord, Store, WorkspaceRecord};

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) store: Arc<Store>,
    pub(crate) access_url: String,
    /// Who is on the mesh now.
    pub(crate) registry: MeshRegistry,
    /// Signs connection tickets; agents learn its public half on the control channel.
    pub(crate) signing_key: Arc<SecretKey>,
    /// The relay mounted on this listener.
    pub(crate) relay_url: RelayUrl,
    pub(crate) relay: RelayState,
    /// QUIC address discovery: what peers are told, and the server for its counters.
    pub(crate) relay_quic: mesh::control::RelayQuic,
    pub(crate) qad: Arc<crate::qad::QadServer>,
    /// Heartbeats and agent reports, group-committed to the store.
    pub(crate) ledger: AgentLedger,
    pub(crate) metrics: CoordinatorMetrics,
    /// How often agents heartbeat, and the status rules that follow from it.
    pub(crate) heartbeat_interval: Duration,
    pub(crate) policy: StatusPolicy,
}

pub(crate) fn router(state: AppState) -> Router {
    // Counts requests by their matched route, so it wraps routes, not the router.
    let counted =
        axum::middleware::from_fn_with_state(state.metrics.clone(), crate::metrics::count_requests);
    let api = Router::new()
        .route("/buildinfo", get(buildinfo))
        .route(
            "/users/first",
            get(users::first_user_status).post(users::create_first_user),
        )
        .route("/users/login", post(users::login))
        .route("/users/logout", post(users::logout))
        .route("/users/me", get(users::me))
        .route("/users", get(users::list_users).post(users::create_user))
        .route(
            "/tokens",
            get(tokens::list_tokens).post(tokens::create_token),
        )
        .route("/tokens/{name}", delete(tokens::delete_token))
        .route(
            "/workspaces",
            get(workspaces::list_workspaces).post(workspaces::create_workspace),
        )
        .route(
            "/workspaces/{owner}/{name}",
            get(workspaces::get_workspace).delete(workspaces::delete_workspace),
        )
        .route(
            "/workspaces/{owner}/{name}/agents/{agent}/token",
            post(workspaces::rotate_agent_token),
        )
        .route("/workspaces/{owner}/{name}/connect", post(connect::connect))
        .route("/netcheck", get(diagnostics::netcheck_targets))
        .route(
            "/workspaces/{owner}/{name}/agents/{agent}/logs",
            get(workspaces::agent_logs),
        )
        .route("/agent/control", get(crate::control::control_handler))
        .route("/debug/relay", get(diagnostics::relay_stats))
        .route_layer(counted.clone());
    let relay_routes = Router::new()
        .route(iroh_relay::http::RELAY_PATH, get(relay::relay_handler))
        .route(iroh_relay::http::RELAY_PROBE_PATH, get(relay::ping_handler))
        .with_state(state.relay.clone())
        .route_layer(counted.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(diagnostics::metrics))
        .route_layer(counted.clone())
        .nest("/api/v1", api)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
        .merge(relay_routes)
}

/// Runs blocking store or hashing work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("a coordinator task failed", e.to_string()))?
}

/// `me` in a path is the caller; reserved so no user can be called that.
const ME: &str = "me";

fn path_name(what: &str, s: &str) -> ApiResult<Name> {
    Name::new(s).map_err(|e| ApiError::bad_request(format!("bad {what} in path"), e.to_string()))
}

/// Resolves `{owner}/{name}` for the caller: `me` is the caller; another user's
/// workspace is "not found" unless the caller is an admin, so its existence stays hidden.
async fn find_workspace(
    state: &AppState,
    caller: &Caller,
    owner: &str,
    name: &str,
) -> ApiResult<WorkspaceRecord> {
    let owner = if owner == ME {
        caller.user.username.clone()
    } else {
        path_name("workspace owner", owner)?
    };
    let name = path_name("workspace name", name)?;
    let not_found = || {
        ApiError::not_found(
            format!("workspace {owner}/{name} not found"),
            "list your workspaces with `myco ls`",
        )
    };
    if owner != caller.user.username && !caller.user.admin {
        return Err(not_found());
    }
    let store = state.store.clone();
    let (o, n) = (owner.clone(), name.clone());
    blocking(move || Ok(store.workspace(&o, &n)?))
        .await?
        .ok_or_else(not_found)
}

/// The agent called `name` in `ws`, or a 404 that names both.
fn agent_named<'a>(ws: &'a WorkspaceRecord, name: &Name) -> ApiResult<&'a AgentRecord> {
    ws.agents.iter().find(|a| &a.name == name).ok_or_else(|| {
        ApiError::not_found(
            format!(
                "agent {name} not found in workspace {}/{}",
                ws.owner, ws.name
            ),
            "see the agents with `myco show WS`",
        )
    })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn buildinfo() -> Json<BuildInfo> {
    Json(BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn no_route(req: Request) -> ApiError {
    ApiError::not_found(
        format!("no route {} {}", req.method(), req.uri().path()),
        "the API lives under /api/v1; check the URL",
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
        "",
    )
}
