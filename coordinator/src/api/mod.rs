//! The HTTP API (`/api/v1/...`): the router, its state, and what its resources share.
//!
//! Every failure is a JSON [`ErrorBody`] `{"message", "detail"}` with a fitting status,
//! including the ones axum's extractors would answer in plain text (bad JSON, body too
//! large, unknown route); the error type is [`crate::error::ApiError`].
//!
//! One module per resource: `users`, `tokens`, `workspaces`, `connect` (tickets) and
//! `diagnostics` (`/metrics`, also on a `--prometheus-address` listener, relay stats,
//! netcheck targets); `callers` authenticates.
//!
//! [`ErrorBody`]: mesh::api::ErrorBody

pub(crate) mod bootstrap;
mod builds;
pub(crate) mod callers;
mod connect;
mod diagnostics;
mod provisioners;
mod templates;
mod tokens;
mod users;
mod workspaces;

pub(crate) use self::diagnostics::{MetricsState, prometheus_router};

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use iroh::{RelayUrl, SecretKey};
use mesh::Name;
use mesh::api::BuildInfo;

use self::callers::Caller;
use crate::error::{ApiError, ApiResult, MAX_BODY_BYTES};
use crate::ledger::AgentLedger;
use crate::metrics::{CoordinatorMetrics, HttpLabels};
use crate::registry::{MeshRegistry, Push};
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
    pub(crate) relay_quic: crate::qad::QadInfo,
    pub(crate) qad: Arc<crate::qad::QadServer>,
    /// Heartbeats and agent reports, group-committed to the store.
    pub(crate) ledger: AgentLedger,
    pub(crate) metrics: CoordinatorMetrics,
    /// How often agents heartbeat, and the status rules that follow from it.
    pub(crate) heartbeat_interval: Duration,
    pub(crate) policy: StatusPolicy,
    /// Login rate limits and the argon2 thread budget.
    pub(crate) throttle: Arc<crate::throttle::Throttle>,
    pub(crate) quotas: crate::quota::Quotas,
    /// Needed to create the first user (a listener off loopback); see `Coordinator`.
    pub(crate) setup_code: Option<Arc<str>>,
    /// How long a request may take; see `ServerConfig::request_timeout`.
    pub(crate) request_timeout: Duration,
    /// The agent binaries `/bin` serves.
    pub(crate) agent_binaries: bootstrap::AgentBinaries,
    /// Wakes the coordinator's own provisioners when a build is queued.
    pub(crate) builds: crate::builds::BuildQueue,
}

/// One route the coordinator serves: what the auth matrix test walks, so a route
/// added without rows there fails it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    /// The full path, with `{param}` placeholders.
    pub path: String,
}

/// The API's routes (under `/api/v1`) as a router and as a table, built together.
struct Routes {
    router: Router<AppState>,
    table: Vec<Route>,
}

impl Routes {
    fn at<H, T>(mut self, method: axum::http::Method, path: &'static str, handler: H) -> Self
    where
        H: axum::handler::Handler<T, AppState>,
        T: 'static,
    {
        let filter = axum::routing::MethodFilter::try_from(method.clone())
            .unwrap_or(axum::routing::MethodFilter::GET);
        self.router = self.router.route(path, axum::routing::on(filter, handler));
        self.table.push(Route {
            method: method_name(&method),
            path: format!("/api/v1{path}"),
        });
        self
    }
}

fn method_name(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

fn api_routes() -> Routes {
    use axum::http::Method;
    let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
    Routes {
        router: Router::new(),
        table: Vec::new(),
    }
    .at(get.clone(), "/buildinfo", buildinfo)
    .at(get.clone(), "/users/first", users::first_user_status)
    .at(post.clone(), "/users/first", users::create_first_user)
    .at(post.clone(), "/users/login", users::login)
    .at(post.clone(), "/users/logout", users::logout)
    .at(get.clone(), "/users/me", users::me)
    .at(get.clone(), "/users", users::list_users)
    .at(post.clone(), "/users", users::create_user)
    .at(delete.clone(), "/users/{name}", users::delete_user)
    .at(post.clone(), "/users/{name}/disable", users::disable_user)
    .at(post.clone(), "/users/{name}/enable", users::enable_user)
    .at(post.clone(), "/users/{name}/revoke", users::revoke_user)
    .at(
        put.clone(),
        "/users/{name}/password",
        users::change_password,
    )
    .at(get.clone(), "/tokens", tokens::list_tokens)
    .at(post.clone(), "/tokens", tokens::create_token)
    .at(delete.clone(), "/tokens/{name}", tokens::delete_token)
    .at(get.clone(), "/workspaces", workspaces::list_workspaces)
    .at(post.clone(), "/workspaces", workspaces::create_workspace)
    .at(
        get.clone(),
        "/workspaces/{owner}/{name}",
        workspaces::get_workspace,
    )
    .at(
        delete.clone(),
        "/workspaces/{owner}/{name}",
        workspaces::delete_workspace,
    )
    .at(
        post.clone(),
        "/workspaces/{owner}/{name}/agents/{agent}/token",
        workspaces::rotate_agent_token,
    )
    .at(
        post.clone(),
        "/workspaces/{owner}/{name}/connect",
        connect::connect,
    )
    .at(
        post.clone(),
        "/workspaces/{owner}/{name}/builds",
        builds::create_build,
    )
    .at(
        get.clone(),
        "/workspaces/{owner}/{name}/builds",
        builds::list_builds,
    )
    .at(
        get.clone(),
        "/workspaces/{owner}/{name}/builds/{number}/logs",
        builds::build_logs,
    )
    .at(
        post.clone(),
        "/workspaces/{owner}/{name}/builds/{number}/cancel",
        builds::cancel_build,
    )
    .at(
        put.clone(),
        "/workspaces/{owner}/{name}/schedule",
        builds::set_schedule,
    )
    .at(post.clone(), "/provisioner-keys", provisioners::create_key)
    .at(get.clone(), "/provisioner-keys", provisioners::list_keys)
    .at(
        delete.clone(),
        "/provisioner-keys/{name}",
        provisioners::delete_key,
    )
    .at(post.clone(), "/provisioner/acquire", provisioners::acquire)
    .at(
        post.clone(),
        "/provisioner/jobs/{workspace}/{number}/logs",
        provisioners::job_logs,
    )
    .at(
        post.clone(),
        "/provisioner/jobs/{workspace}/{number}/renew",
        provisioners::renew,
    )
    .at(
        post,
        "/provisioner/jobs/{workspace}/{number}/finish",
        provisioners::finish,
    )
    .at(get.clone(), "/templates", templates::list_templates)
    .at(get.clone(), "/templates/{name}", templates::get_template)
    .at(put, "/templates/{name}", templates::push_template)
    .at(delete, "/templates/{name}", templates::delete_template)
    .at(get.clone(), "/netcheck", diagnostics::netcheck_targets)
    .at(
        get.clone(),
        "/workspaces/{owner}/{name}/agents/{agent}/logs",
        workspaces::agent_logs,
    )
    .at(
        get.clone(),
        "/agent/control",
        crate::control::control_handler,
    )
    .at(get.clone(), "/debug/relay", diagnostics::relay_stats)
    .at(get, "/init-script/linux/{arch}", bootstrap::init_script)
}

/// Every route of [`router`], for tests that must cover them all.
pub fn route_table() -> Vec<Route> {
    let mut table = vec![
        Route {
            method: "GET",
            path: "/healthz".into(),
        },
        Route {
            method: "GET",
            path: "/metrics".into(),
        },
        Route {
            method: "GET",
            path: "/bin/{file}".into(),
        },
        Route {
            method: "GET",
            path: iroh_relay::http::RELAY_PATH.into(),
        },
        Route {
            method: "GET",
            path: iroh_relay::http::RELAY_PROBE_PATH.into(),
        },
    ];
    table.extend(api_routes().table);
    table
}

pub(crate) fn router(state: AppState) -> Router {
    // Counts requests by their matched route, so it wraps routes, not the router.
    let counted = axum::middleware::from_fn_with_state(state.metrics.clone(), count_requests);
    let api = api_routes().router.route_layer(counted.clone());
    let relay_routes = Router::new()
        .route(iroh_relay::http::RELAY_PATH, get(relay::relay_handler))
        .route(iroh_relay::http::RELAY_PROBE_PATH, get(relay::ping_handler))
        .with_state(state.relay.clone())
        .route_layer(counted.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(diagnostics::metrics))
        .route("/bin/{file}", get(bootstrap::binary))
        .route_layer(counted.clone())
        .nest("/api/v1", api)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.request_timeout,
            request_deadline,
        ))
        .with_state(state)
        .merge(relay_routes)
}

/// Counts every request by method, matched route and status code.
async fn count_requests(
    axum::extract::State(metrics): axum::extract::State<CoordinatorMetrics>,
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    metrics.http_request(HttpLabels {
        method,
        route,
        code: resp.status().as_u16().to_string(),
    });
    resp
}

/// Answers `503` when a request (its body read included: a client trickling a body
/// is as slow as one trickling headers) takes longer than `limit`. A WebSocket
/// upgrade is answered at once, so a channel outlives it.
async fn request_deadline(
    axum::extract::State(limit): axum::extract::State<Duration>,
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = req.uri().path().to_owned();
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::warn!(path, ?limit, "request timed out");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the request took longer than {}s", limit.as_secs_f64()),
                "send the whole request promptly; if the coordinator is overloaded, try again",
            )
            .into_response()
        }
    }
}

/// Revocation on live state: closes `agent_ids`' control channels now (their token
/// was rotated, their workspace deleted) and drops their endpoints from the relay;
/// the registry forgets them as their channels end, so the relay admits them no more.
pub(crate) fn close_agents(state: &AppState, agent_ids: &[String], reason: &str) {
    let endpoints = state
        .registry
        .push(agent_ids, &Push::Close(reason.to_owned()));
    state.relay.disconnect(&endpoints);
}

/// Revocation on live state: withdraws what `token_ids` (deleted, or their user
/// disabled) granted: the relay admission of the clients that got tickets under
/// them, and, on every live agent, the mesh sessions those tickets opened.
fn revoke_tokens(state: &AppState, token_ids: Vec<String>) {
    if token_ids.is_empty() {
        return;
    }
    let clients = state.registry.revoke_clients(&token_ids);
    state.relay.disconnect(&clients);
    let agents = state.registry.live_agent_ids();
    // In bounded messages: a user may have piled up many sessions.
    for chunk in token_ids.chunks(REVOKE_CHUNK) {
        state.registry.push(
            &agents,
            &Push::Revoke {
                token_ids: chunk.to_vec(),
            },
        );
    }
}

/// Token ids in one `Revoke` message (about 20 KiB of JSON).
const REVOKE_CHUNK: usize = 1000;

/// Runs blocking store or hashing work off the async runtime.
///
/// # Cancel safety
/// Every handler runs under the request deadline, so this may be dropped: `f` still
/// runs to its end on the blocking pool and its result is lost. A store write in it
/// is committed whole or not at all, whether or not anyone waits for it.
pub(crate) async fn blocking<T: Send + 'static>(
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
