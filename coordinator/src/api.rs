//! The HTTP API (`/api/v1/...`): routes, authentication, and JSON errors.
//!
//! Every failure is a JSON [`ErrorBody`] `{"message", "detail"}` with a fitting status,
//! including the ones axum's extractors would answer in plain text (bad JSON, body too
//! large, unknown route).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use iroh::{RelayUrl, SecretKey};
use mesh::api::{
    self, AgentToken, BuildInfo, CreateToken, CreateUser, CreateWorkspace, CreatedToken,
    CreatedWorkspace, Credentials, ErrorBody, FirstUserStatus, RotatedAgentToken, Session,
    TokenInfo,
};
use mesh::control::{ConnectInfo, ConnectRequest};
use mesh::ticket::TicketClaims;
use mesh::{Name, Timestamp};
use serde::Deserialize;

use crate::auth;
use crate::ledger::AgentLedger;
use crate::metrics::CoordinatorMetrics;
use crate::registry::MeshRegistry;
use crate::relay::{self, RelayState};
use crate::status::{ConnectionTimes, StatusPolicy, agent_status};
use crate::store::{
    AgentRecord, AgentReports, Store, StoreError, StoredConnection, TokenKind, TokenRecord,
    UserRecord, WorkspaceRecord,
};

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a login session lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default and longest lifetime of a named API token.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Agents in one workspace.
const MAX_AGENTS: usize = 64;
/// Apps of one agent.
const MAX_APPS: usize = 64;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub access_url: String,
    /// Who is on the mesh now.
    pub registry: MeshRegistry,
    /// Signs connection tickets; agents learn its public half on the control channel.
    pub signing_key: Arc<SecretKey>,
    /// The relay mounted on this listener.
    pub relay_url: RelayUrl,
    pub relay: RelayState,
    /// QUIC address discovery: what peers are told, and the server for its counters.
    pub relay_quic: mesh::control::RelayQuic,
    pub qad: Arc<crate::qad::QadServer>,
    /// Heartbeats and agent reports, group-committed to the store.
    pub ledger: AgentLedger,
    pub metrics: CoordinatorMetrics,
    /// How often agents heartbeat, and the status rules that follow from it.
    pub heartbeat_interval: Duration,
    pub policy: StatusPolicy,
}

/// How long a connection ticket is valid. A connection made in time lives on after.
const TICKET_LIFETIME: Duration = Duration::from_secs(5 * 60);

pub fn router(state: AppState) -> Router {
    // Counts requests by their matched route, so it wraps routes, not the router.
    let counted =
        axum::middleware::from_fn_with_state(state.metrics.clone(), crate::metrics::count_requests);
    let api = Router::new()
        .route("/buildinfo", get(buildinfo))
        .route(
            "/users/first",
            get(first_user_status).post(create_first_user),
        )
        .route("/users/login", post(login))
        .route("/users/logout", post(logout))
        .route("/users/me", get(me))
        .route("/users", get(list_users).post(create_user))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{name}", delete(delete_token))
        .route("/workspaces", get(list_workspaces).post(create_workspace))
        .route(
            "/workspaces/{owner}/{name}",
            get(get_workspace).delete(delete_workspace),
        )
        .route(
            "/workspaces/{owner}/{name}/agents/{agent}/token",
            post(rotate_agent_token),
        )
        .route("/workspaces/{owner}/{name}/connect", post(connect))
        .route("/netcheck", get(netcheck_targets))
        .route(
            "/workspaces/{owner}/{name}/agents/{agent}/logs",
            get(agent_logs),
        )
        .route("/agent/control", get(crate::control::control_handler))
        .route("/debug/relay", get(relay_stats))
        .route_layer(counted.clone());
    let relay_routes = Router::new()
        .route(iroh_relay::http::RELAY_PATH, get(relay::relay_handler))
        .route(iroh_relay::http::RELAY_PROBE_PATH, get(relay::ping_handler))
        .with_state(state.relay.clone())
        .route_layer(counted.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route_layer(counted.clone())
        .nest("/api/v1", api)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
        .merge(relay_routes)
}

/// `GET /metrics` on the API listener: admins only, since it names every user's
/// workspaces (a `--prometheus-address` listener serves it without a token).
async fn metrics(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let ms = crate::metrics::MetricsState {
        metrics: state.metrics.clone(),
        store: state.store.clone(),
        policy: state.policy,
    };
    Ok(crate::metrics::scrape_response(ms, &headers).await)
}

/// How many log lines `GET .../logs` returns at most.
const LOG_LINES_SHOWN: usize = 10_000;

/// `GET /api/v1/workspaces/{owner}/{name}/agents/{agent}/logs`: the agent's startup
/// and shutdown script output, oldest first.
async fn agent_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path((owner, name, agent)): Path<(String, String, String)>,
) -> ApiResult<Json<Vec<api::LogLine>>> {
    let ws = find_workspace(&state, &caller, &owner, &name).await?;
    let agent = path_name("agent name", &agent)?;
    let id = agent_named(&ws, &agent)?.id.clone();
    let store = state.store.clone();
    let lines = blocking(move || Ok(store.agent_logs(&id, LOG_LINES_SHOWN)?)).await?;
    Ok(Json(lines))
}

/// An API failure, answered as JSON `{"message", "detail"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            detail: detail.into(),
        }
    }
    pub(crate) fn bad_request(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, detail)
    }
    fn unauthorized(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message, detail)
    }
    fn forbidden(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message, detail)
    }
    fn not_found(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message, detail)
    }
    fn conflict(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message, detail)
    }
    pub(crate) fn internal(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message, detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, message = %self.message, detail = %self.detail, "request failed");
        }
        let body = ErrorBody {
            message: self.message,
            detail: self.detail,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => {
                Self::conflict(format!("{what} already exists"), "pick another name")
            }
            StoreError::NotFound(what) => Self::not_found(format!("{what} not found"), ""),
            StoreError::FirstUserExists => Self::conflict(
                "the first user has already been created",
                "log in with `myco login URL`, or ask an admin to create your user",
            ),
            other => Self::internal("the coordinator's store failed", other.to_string()),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs blocking store or hashing work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("a coordinator task failed", e.to_string()))?
}

/// `Json<T>` whose rejections are JSON errors: 400 for a body that is not the JSON we
/// expect, 413 for one over [`MAX_BODY_BYTES`], 415 without a JSON content type.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let detail = rejection.body_text();
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {MAX_BODY_BYTES} bytes"),
            detail,
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "request body must be JSON",
            "send the header Content-Type: application/json",
        ),
        _ => ApiError::bad_request("request body is not valid JSON for this endpoint", detail),
    }
}

/// The authenticated user behind a request's `Authorization: Bearer` token.
pub struct Caller {
    pub user: UserRecord,
    pub token: TokenRecord,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "missing API token",
                    "send Authorization: Bearer <token>; run `myco login URL` to get one",
                )
            })?
            .to_str()
            .map_err(|_| ApiError::unauthorized("malformed Authorization header", ""))?;
        let text = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "Authorization header is not a bearer token",
                    "send Authorization: Bearer <token>",
                )
            })?
            .trim()
            .to_owned();
        let invalid = || {
            ApiError::unauthorized(
                "invalid API token",
                "the token is malformed, revoked or unknown; run `myco login URL` again",
            )
        };
        let store = state.store.clone();
        let (token, user) = blocking(move || {
            let Some(token) = auth::find_token(&store, &text)? else {
                return Ok((None, None));
            };
            let user = match &token.kind {
                TokenKind::Session { user } | TokenKind::Api { user, .. } => {
                    store.user(user.as_str())?
                }
                TokenKind::Agent { .. } => None,
            };
            Ok((Some(token), user))
        })
        .await?;
        let token = token.ok_or_else(invalid)?;
        if let Some(exp) = token.expires_at
            && exp <= Timestamp::now()
        {
            return Err(ApiError::unauthorized(
                "API token expired",
                format!("it expired at {exp}; run `myco login URL` or create a new token"),
            ));
        }
        let user = user.ok_or_else(|| {
            ApiError::unauthorized(
                "this token does not belong to a user",
                "agent tokens are only for `myco agent`",
            )
        })?;
        Ok(Caller { user, token })
    }
}

impl Caller {
    fn require_admin(&self) -> ApiResult<()> {
        if self.user.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "only admins may do this",
                format!("user {} is not an admin", self.user.username),
            ))
        }
    }
}

fn user_view(u: &UserRecord) -> api::User {
    api::User {
        username: u.username.clone(),
        admin: u.admin,
        created_at: u.created_at,
    }
}

/// What a workspace listing judges agents with: their stored state, the live
/// registry, the status policy and one `now` for all of them.
pub(crate) struct ViewContext<'a> {
    pub connections: &'a std::collections::HashMap<String, StoredConnection>,
    pub reports: &'a std::collections::HashMap<String, AgentReports>,
    pub registry: &'a MeshRegistry,
    pub policy: &'a StatusPolicy,
    pub now: Timestamp,
}

fn workspace_view(w: &WorkspaceRecord, cx: &ViewContext<'_>) -> api::Workspace {
    let registry = cx.registry;
    api::Workspace {
        id: w.id.clone(),
        owner: w.owner.clone(),
        name: w.name.clone(),
        created_at: w.created_at,
        agents: w
            .agents
            .iter()
            .map(|a| {
                let conn = cx.connections.get(&a.id).copied().unwrap_or_default();
                let reports = cx.reports.get(&a.id);
                let times = ConnectionTimes::from_stored(a.created_at, &conn);
                api::Agent {
                    status: agent_status(&times, cx.policy, cx.now),
                    lifecycle_state: reports.map(|r| r.lifecycle_state).unwrap_or_default(),
                    lifecycle_changed_at: reports.and_then(|r| r.lifecycle_changed_at),
                    first_connected_at: conn.first_connected_at,
                    last_connected_at: conn.last_connected_at,
                    disconnected_at: conn.disconnected_at,
                    apps_health: a
                        .apps
                        .iter()
                        .map(|app| {
                            let reported =
                                reports.and_then(|r| r.apps_health.get(&app.slug)).copied();
                            (
                                app.slug.clone(),
                                crate::status::app_health(app.healthcheck.is_some(), reported),
                            )
                        })
                        .collect(),
                    stats: reports.and_then(|r| r.stats.clone()),
                    metadata: reports
                        .map(|r| r.metadata.values().cloned().collect())
                        .unwrap_or_default(),
                    netcheck: reports.and_then(|r| r.netcheck.clone()),
                    id: a.id.clone(),
                    name: a.name.clone(),
                    created_at: a.created_at,
                    apps: a.apps.clone(),
                    startup_script: a.startup_script.clone(),
                    shutdown_script: a.shutdown_script.clone(),
                    ssh_host_key: a.ssh_host_key.clone(),
                    connection: registry.live(&a.id).map(|live| {
                        let addr = live.addr.as_ref();
                        api::AgentConnection {
                            connected_at: live.connected_at,
                            endpoint_id: addr.map(|x| x.id.to_string()).unwrap_or_default(),
                            relay_url: addr
                                .and_then(|x| x.relay_urls().next().map(|u| u.to_string())),
                            direct_addrs: addr
                                .map(|x| x.ip_addrs().map(|a| a.to_string()).collect())
                                .unwrap_or_default(),
                        }
                    }),
                }
            })
            .collect(),
    }
}

fn check_password(password: &str) -> ApiResult<()> {
    if password.chars().count() < auth::MIN_PASSWORD_LEN {
        return Err(ApiError::bad_request(
            "password is too short",
            format!("use at least {} characters", auth::MIN_PASSWORD_LEN),
        ));
    }
    Ok(())
}

/// `me` in a path is the caller; reserved so no user can be called that.
const ME: &str = "me";

fn check_username(name: &Name) -> ApiResult<()> {
    if name.as_str() == ME {
        return Err(ApiError::bad_request(
            "username \"me\" is reserved",
            "it stands for the caller in API paths; pick another",
        ));
    }
    Ok(())
}

fn path_name(what: &str, s: &str) -> ApiResult<Name> {
    Name::new(s).map_err(|e| ApiError::bad_request(format!("bad {what} in path"), e.to_string()))
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

async fn first_user_status(State(state): State<AppState>) -> ApiResult<Json<FirstUserStatus>> {
    let store = state.store.clone();
    let exists = blocking(move || Ok(store.has_users()?)).await?;
    Ok(Json(FirstUserStatus { exists }))
}

async fn new_session(store: Arc<Store>, user: UserRecord) -> ApiResult<Session> {
    let now = Timestamp::now();
    let expires_at = now.saturating_add(SESSION_LIFETIME);
    let issued = auth::issue_token(
        TokenKind::Session {
            user: user.username.clone(),
        },
        now,
        Some(expires_at),
    );
    let record = issued.record;
    blocking(move || Ok(store.insert_token(&record)?)).await?;
    Ok(Session {
        user: user_view(&user),
        token: issued.text,
        expires_at,
    })
}

async fn create_first_user(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<(StatusCode, Json<Session>)> {
    check_username(&body.username)?;
    check_password(&body.password)?;
    let store = state.store.clone();
    let user = blocking(move || {
        if store.has_users()? {
            return Err(StoreError::FirstUserExists.into());
        }
        let hash = auth::hash_password(&body.password)
            .map_err(|e| ApiError::internal("could not hash the password", e.to_string()))?;
        let user = UserRecord {
            username: body.username,
            password_hash: hash,
            admin: true,
            created_at: Timestamp::now(),
        };
        store.create_first_user(&user)?;
        Ok(user)
    })
    .await?;
    tracing::info!(user = %user.username, "first user created");
    let session = new_session(state.store.clone(), user).await?;
    Ok((StatusCode::CREATED, Json(session)))
}

async fn login(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<Json<Session>> {
    let store = state.store.clone();
    let user = blocking(move || {
        let user = store.user(body.username.as_str())?;
        let ok = auth::verify_password(
            user.as_ref().map(|u| u.password_hash.as_str()),
            &body.password,
        );
        Ok(user.filter(|_| ok))
    })
    .await?
    .ok_or_else(|| {
        ApiError::unauthorized(
            "wrong username or password",
            "check both; an admin can create users with `myco users create`",
        )
    })?;
    Ok(Json(new_session(state.store.clone(), user).await?))
}

async fn logout(State(state): State<AppState>, caller: Caller) -> ApiResult<StatusCode> {
    if !matches!(caller.token.kind, TokenKind::Session { .. }) {
        return Err(ApiError::bad_request(
            "this is an API token, not a login session",
            "revoke API tokens with `myco tokens rm NAME`",
        ));
    }
    let store = state.store.clone();
    let id = caller.token.id;
    blocking(move || Ok(store.delete_token(&id)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(caller: Caller) -> Json<api::User> {
    Json(user_view(&caller.user))
}

async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<api::User>>> {
    caller.require_admin()?;
    let store = state.store.clone();
    let users = blocking(move || Ok(store.users()?)).await?;
    Ok(Json(users.iter().map(user_view).collect()))
}

async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateUser>,
) -> ApiResult<(StatusCode, Json<api::User>)> {
    caller.require_admin()?;
    check_username(&body.username)?;
    check_password(&body.password)?;
    let store = state.store.clone();
    let user = blocking(move || {
        if store.user(body.username.as_str())?.is_some() {
            return Err(StoreError::Conflict(format!("user {}", body.username)).into());
        }
        let hash = auth::hash_password(&body.password)
            .map_err(|e| ApiError::internal("could not hash the password", e.to_string()))?;
        let user = UserRecord {
            username: body.username,
            password_hash: hash,
            admin: body.admin,
            created_at: Timestamp::now(),
        };
        store.create_user(&user)?;
        Ok(user)
    })
    .await?;
    tracing::info!(user = %user.username, admin = user.admin, by = %caller.user.username, "user created");
    Ok((StatusCode::CREATED, Json(user_view(&user))))
}

fn token_info(t: &TokenRecord) -> Option<TokenInfo> {
    match &t.kind {
        TokenKind::Api { user, name } => Some(TokenInfo {
            name: name.clone(),
            owner: user.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at.unwrap_or(t.created_at),
        }),
        _ => None,
    }
}

async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<TokenInfo>>> {
    let store = state.store.clone();
    let owner = caller.user.username.clone();
    let tokens = blocking(move || Ok(store.api_tokens(Some(&owner))?)).await?;
    Ok(Json(tokens.iter().filter_map(token_info).collect()))
}

async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let lifetime = match body.lifetime_seconds {
        None => DEFAULT_TOKEN_LIFETIME,
        Some(0) => {
            return Err(ApiError::bad_request(
                "token lifetime must be positive",
                "give a lifetime such as 30d",
            ));
        }
        Some(s) if Duration::from_secs(s) > MAX_TOKEN_LIFETIME => {
            return Err(ApiError::bad_request(
                "token lifetime is too long",
                format!(
                    "the longest is {} days",
                    MAX_TOKEN_LIFETIME.as_secs() / 86400
                ),
            ));
        }
        Some(s) => Duration::from_secs(s),
    };
    let now = Timestamp::now();
    let issued = auth::issue_token(
        TokenKind::Api {
            user: caller.user.username.clone(),
            name: body.name,
        },
        now,
        Some(now.saturating_add(lifetime)),
    );
    let record = issued.record.clone();
    let store = state.store.clone();
    blocking(move || Ok(store.insert_token(&record)?)).await?;
    let info =
        token_info(&issued.record).ok_or_else(|| ApiError::internal("token kind mismatch", ""))?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            info,
            token: issued.text,
        }),
    ))
}

async fn delete_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let name = path_name("token name", &name)?;
    let store = state.store.clone();
    let owner = caller.user.username.clone();
    let n = name.clone();
    let existed = blocking(move || Ok(store.delete_api_token(&owner, &n)?)).await?;
    if !existed {
        return Err(ApiError::not_found(
            format!("token {name} not found"),
            "list your tokens with `myco tokens ls`",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ListQuery {
    /// Admins only: every user's workspaces.
    #[serde(default)]
    all: bool,
}

async fn list_workspaces(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<api::Workspace>>> {
    let Query(query) =
        query.map_err(|e| ApiError::bad_request("bad query string", e.body_text()))?;
    if query.all {
        caller.require_admin()?;
    }
    let owner = (!query.all).then(|| caller.user.username.clone());
    let store = state.store.clone();
    let now = Timestamp::now();
    let snap = blocking(move || Ok(store.snapshot(owner.as_ref())?)).await?;
    let cx = ViewContext {
        connections: &snap.connections,
        reports: &snap.reports,
        registry: &state.registry,
        policy: &state.policy,
        now,
    };
    Ok(Json(
        snap.workspaces
            .iter()
            .map(|w| workspace_view(w, &cx))
            .collect(),
    ))
}

fn validate_workspace(spec: &CreateWorkspace) -> ApiResult<()> {
    if spec.agents.is_empty() {
        return Err(ApiError::bad_request(
            "a workspace needs at least one agent",
            "add an agent, e.g. {\"name\": \"main\"}",
        ));
    }
    if spec.agents.len() > MAX_AGENTS {
        return Err(ApiError::bad_request(
            format!("too many agents ({})", spec.agents.len()),
            format!("a workspace holds at most {MAX_AGENTS}"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for agent in &spec.agents {
        if !seen.insert(&agent.name) {
            return Err(ApiError::bad_request(
                format!("agent name {} is used twice", agent.name),
                "agent names are unique within a workspace",
            ));
        }
        if agent.apps.len() > MAX_APPS {
            return Err(ApiError::bad_request(
                format!(
                    "agent {} has too many apps ({})",
                    agent.name,
                    agent.apps.len()
                ),
                format!("an agent holds at most {MAX_APPS}"),
            ));
        }
        let mut slugs = std::collections::HashSet::new();
        for app in &agent.apps {
            if !slugs.insert(&app.slug) {
                return Err(ApiError::bad_request(
                    format!("app {} of agent {} is defined twice", app.slug, agent.name),
                    "app slugs are unique within an agent",
                ));
            }
            check_url(
                &format!("app {} of agent {}", app.slug, agent.name),
                &app.url,
            )?;
            if let Some(hc) = &app.healthcheck {
                let what = format!("health check of app {}", app.slug);
                check_url(&what, &hc.url)?;
                if hc.interval == 0 || hc.threshold == 0 {
                    return Err(ApiError::bad_request(
                        format!("{what}: interval and threshold must be at least 1"),
                        "",
                    ));
                }
            }
        }
        for (kind, script) in [
            ("startup", &agent.startup_script),
            ("shutdown", &agent.shutdown_script),
        ] {
            if let Some(s) = script
                && s.timeout == 0
            {
                return Err(ApiError::bad_request(
                    format!(
                        "{kind} script of agent {}: timeout must be at least 1 second",
                        agent.name
                    ),
                    "",
                ));
            }
        }
    }
    Ok(())
}

fn check_url(what: &str, url: &str) -> ApiResult<()> {
    let ok = ["http://", "https://"]
        .iter()
        .any(|p| url.strip_prefix(p).is_some_and(|rest| !rest.is_empty()));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            format!("{what}: {url:?} is not an http(s) URL"),
            "write it like http://localhost:8080",
        ))
    }
}

async fn create_workspace(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(spec): ApiJson<CreateWorkspace>,
) -> ApiResult<(StatusCode, Json<CreatedWorkspace>)> {
    validate_workspace(&spec)?;
    let now = Timestamp::now();
    let ws_id = auth::new_id();
    let mut agents = Vec::with_capacity(spec.agents.len());
    let mut tokens = Vec::with_capacity(spec.agents.len());
    let mut shown = Vec::with_capacity(spec.agents.len());
    for a in spec.agents {
        let agent_id = auth::new_id();
        let issued = auth::issue_token(
            TokenKind::Agent {
                workspace_id: ws_id.clone(),
                agent_id: agent_id.clone(),
            },
            now,
            None,
        );
        agents.push(AgentRecord {
            id: agent_id,
            name: a.name.clone(),
            created_at: now,
            token_id: issued.record.id.clone(),
            apps: a.apps,
            startup_script: a.startup_script,
            shutdown_script: a.shutdown_script,
            metadata: a.metadata,
            ssh_host_key: None,
        });
        tokens.push(issued.record);
        shown.push(AgentToken {
            agent: a.name,
            token: issued.text,
        });
    }
    let ws = WorkspaceRecord {
        id: ws_id,
        owner: caller.user.username.clone(),
        name: spec.name,
        created_at: now,
        agents,
    };
    let store = state.store.clone();
    let ws = blocking(move || {
        store.create_workspace(&ws, &tokens)?;
        Ok(ws)
    })
    .await?;
    tracing::info!(owner = %ws.owner, workspace = %ws.name, "workspace created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedWorkspace {
            workspace: workspace_view(
                &ws,
                &ViewContext {
                    connections: &Default::default(),
                    reports: &Default::default(),
                    registry: &state.registry,
                    policy: &state.policy,
                    now,
                },
            ),
            agent_tokens: shown,
            access_url: state.access_url.clone(),
        }),
    ))
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

async fn get_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path((owner, name)): Path<(String, String)>,
) -> ApiResult<Json<api::Workspace>> {
    let now = Timestamp::now();
    let ws = find_workspace(&state, &caller, &owner, &name).await?;
    let store = state.store.clone();
    let ids: Vec<String> = ws.agents.iter().map(|a| a.id.clone()).collect();
    let (connections, reports) = blocking(move || Ok(store.agents_state(&ids)?)).await?;
    let cx = ViewContext {
        connections: &connections,
        reports: &reports,
        registry: &state.registry,
        policy: &state.policy,
        now,
    };
    Ok(Json(workspace_view(&ws, &cx)))
}

async fn delete_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path((owner, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let ws = find_workspace(&state, &caller, &owner, &name).await?;
    let store = state.store.clone();
    let (o, n) = (ws.owner.clone(), ws.name.clone());
    blocking(move || Ok(store.delete_workspace(&o, &n)?)).await?;
    tracing::info!(owner = %ws.owner, workspace = %ws.name, by = %caller.user.username, "workspace deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate_agent_token(
    State(state): State<AppState>,
    caller: Caller,
    Path((owner, name, agent)): Path<(String, String, String)>,
) -> ApiResult<Json<RotatedAgentToken>> {
    let ws = find_workspace(&state, &caller, &owner, &name).await?;
    let agent = path_name("agent name", &agent)?;
    let rec = agent_named(&ws, &agent)?;
    let issued = auth::issue_token(
        TokenKind::Agent {
            workspace_id: ws.id.clone(),
            agent_id: rec.id.clone(),
        },
        Timestamp::now(),
        None,
    );
    let store = state.store.clone();
    let record = issued.record;
    let (o, n, a) = (ws.owner.clone(), ws.name.clone(), agent.clone());
    blocking(move || Ok(store.rotate_agent_token(&o, &n, &a, &record)?)).await?;
    tracing::info!(owner = %ws.owner, workspace = %ws.name, agent = %agent, "agent token rotated");
    Ok(Json(RotatedAgentToken {
        agent_token: AgentToken {
            agent,
            token: issued.text,
        },
        access_url: state.access_url.clone(),
    }))
}

/// The agent behind a request's agent token.
pub struct AgentCaller {
    pub agent_id: String,
    pub workspace_id: String,
    /// `owner/workspace.agent`
    pub target: String,
    /// What the agent should run and check, from its workspace's spec.
    pub manifest: mesh::control::Manifest,
}

impl FromRequestParts<AppState> for AgentCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let invalid = || {
            ApiError::unauthorized(
                "invalid agent token",
                "the token is malformed, rotated or its workspace deleted; get a new one with `myco rotate-agent-token WS.AGENT`",
            )
        };
        let text = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "missing agent token",
                    "send Authorization: Bearer <agent token>",
                )
            })?;
        let text = text.to_owned();
        let store = state.store.clone();
        let found = blocking(move || {
            let Some(token) = auth::find_token(&store, &text)? else {
                return Ok(None);
            };
            let TokenKind::Agent {
                workspace_id,
                agent_id,
            } = token.kind
            else {
                return Ok(None);
            };
            Ok(store
                .workspace_by_id(&workspace_id)?
                .map(|ws| (agent_id, ws)))
        })
        .await?;
        let (agent_id, ws) = found.ok_or_else(invalid)?;
        let agent = ws
            .agents
            .iter()
            .find(|a| a.id == agent_id)
            .ok_or_else(invalid)?;
        Ok(AgentCaller {
            target: format!("{}/{}.{}", ws.owner, ws.name, agent.name),
            manifest: mesh::control::Manifest {
                apps: agent.apps.clone(),
                startup_script: agent.startup_script.clone(),
                shutdown_script: agent.shutdown_script.clone(),
                metadata: agent.metadata.clone(),
            },
            agent_id,
            workspace_id: ws.id.clone(),
        })
    }
}

async fn connect(
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
    let addr = state
        .registry
        .live(&agent.id)
        .and_then(|l| l.addr)
        .ok_or_else(|| {
            ApiError::conflict(
                format!("agent {target} is not connected"),
                "start it inside the workspace with `myco agent --url URL --token TOKEN`",
            )
        })?;
    let now = Timestamp::now();
    let expires_at = now.saturating_add(TICKET_LIFETIME);
    let claims = TicketClaims {
        client: req.client_id,
        agent: addr.id,
        user: caller.user.username.to_string(),
        target: target.clone(),
        expires_at,
    };
    let ticket = mesh::ticket::sign(&state.signing_key, &claims);
    state.registry.allow_client(req.client_id, expires_at, now);
    tracing::info!(user = %caller.user.username, agent = %target, client = %req.client_id.fmt_short(), "ticket issued");
    Ok(Json(ConnectInfo {
        agent: target,
        agent_addr: addr,
        ticket,
        relay_url: state.relay_url.clone(),
        relay_quic: Some(state.relay_quic.clone()),
        expires_at,
        ssh_host_key: agent.ssh_host_key.clone(),
    }))
}

/// What `myco netcheck` probes: the relay and both QAD ports. Public, like the relay
/// and the QAD ports themselves, so a machine can be checked before anyone logs in.
async fn netcheck_targets(State(state): State<AppState>) -> Json<api::NetcheckTargets> {
    Json(api::NetcheckTargets {
        relay_url: state.relay_url.clone(),
        relay_quic: Some(state.relay_quic.clone()),
    })
}

async fn relay_stats(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<api::RelayStats>> {
    caller.require_admin()?;
    let m = &state.relay.metrics;
    Ok(Json(api::RelayStats {
        bytes_sent: m.bytes_sent.get(),
        bytes_recv: m.bytes_recv.get(),
        packets_sent: m.send_packets_sent.get(),
        packets_recv: m.send_packets_recv.get(),
        accepts: m.accepts.get(),
        disconnects: m.disconnects.get(),
        qad_connections: state.qad.connections(),
    }))
}
