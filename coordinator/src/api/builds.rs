//! Builds of a workspace made from a template: queue one (start, stop, delete),
//! list them, read one's output (waiting for more with `wait`), cancel one.
//!
//! A build's output is followed by long-poll (`.../builds/N/logs?after=L&wait=S`,
//! within half the request timeout): a waiting request sleeps on the store's
//! build-change signal (a `watch` bumped after every commit that adds output or ends
//! a build, any workspace's), then reads its build again; nothing polls.
//!
//! A start build mints new agent tokens (the old ones stop working) and hands them to
//! the template's command as `MYCO_AGENT_TOKEN[_<AGENT>]`, with `MYCO_INIT_SCRIPT`;
//! tokens are stored hashed, so they exist in clear only in the build's environment.
//! A template's `MYCO_STATE_DIR` is a directory per workspace on the provisioner's
//! machine, kept from build to build and removed after a delete succeeds.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use mesh::Timestamp;
use mesh::api::{self, Build, BuildLogs, CreateBuild, Transition, WorkspaceState};
use serde::Deserialize;

use super::callers::Caller;
use super::{AppState, blocking, find_workspace};
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::store::{QueueBuildError, WorkspaceRecord};

/// Builds listed at most.
const BUILDS_SHOWN: usize = 100;
/// Output lines returned by one request at most.
const LOG_LINES_PER_REQUEST: usize = 5_000;
/// The longest a logs request waits for new output.
const MAX_WAIT: Duration = Duration::from_secs(25);

/// Whether `transition` makes sense in the workspace's state; a 409 that says what
/// to do when not.
fn check_transition(ws: &WorkspaceRecord, transition: Transition) -> ApiResult<()> {
    use WorkspaceState as S;
    if ws.template.is_none() {
        return Err(QueueBuildError::NoTemplate(format!("{}/{}", ws.owner, ws.name)).into());
    }
    let state = ws.state();
    let allowed = match transition {
        Transition::Start => matches!(state, S::Stopped | S::Failed),
        Transition::Stop => matches!(state, S::Running | S::Failed),
        Transition::Delete => !matches!(state, S::Deleted),
    };
    if allowed {
        return Ok(());
    }
    Err(ApiError::conflict(
        format!(
            "workspace {}/{} is {}; it cannot {}",
            ws.owner,
            ws.name,
            state.as_str(),
            transition.as_str()
        ),
        match state {
            S::Running => "it is running already".to_owned(),
            S::Stopped => "it is stopped already; `myco start` it".to_owned(),
            _ => format!(
                "wait for build {} to end (`myco logs {} --build --follow`)",
                ws.latest_build.as_ref().map_or(0, |b| b.number),
                ws.name
            ),
        },
    ))
}

/// Queues a build of `ws` and wakes the provisioners.
pub(super) async fn queue(
    state: &AppState,
    ws: &WorkspaceRecord,
    transition: Transition,
    initiator: Option<mesh::Name>,
) -> ApiResult<Build> {
    check_transition(ws, transition)?;
    let store = state.store.clone();
    let id = ws.id.clone();
    let build =
        blocking(move || Ok(store.queue_build(&id, transition, initiator, Timestamp::now())?))
            .await?;
    state.builds.queued();
    tracing::info!(owner = %ws.owner, workspace = %ws.name, build = build.number, transition = transition.as_str(), "build queued");
    Ok(build)
}

/// `POST /api/v1/workspaces/{owner}/{name}/builds`.
pub(super) async fn create_build(
    State(state): State<AppState>,
    caller: Caller,
    Path((owner, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<CreateBuild>,
) -> ApiResult<(StatusCode, Json<Build>)> {
    let ws = find_workspace(&state, &caller, &owner, &name).await?;
    let build = queue(
        &state,
        &ws,
        req.transition,
        Some(caller.user.username.clone()),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(build)))
}

/// `GET /api/v1/workspaces/{owner}/{name}/builds`: newest first.
pub(super) async fn list_builds(
    State(state): State<AppState>,
    caller: Caller,
    Path((owner, name)): Path<(String, String)>,
) -> ApiResult<Json<Vec<Build>>> {
    let ws = find_workspace(&state, &caller, &owner, &name).await?;
    let store = state.store.clone();
    Ok(Json(
        blocking(move || Ok(store.builds(&ws.id, BUILDS_SHOWN)?)).await?,
    ))
}

#[derive(Deserialize)]
pub(super) struct LogsQuery {
    /// Lines after this one (0: from the start).
    #[serde(default)]
    after: u64,
    /// Seconds to wait for a line when there is none yet and the build runs.
    #[serde(default)]
    wait: u64,
}

fn build_number(text: &str) -> ApiResult<u64> {
    text.parse().map_err(|_| {
        ApiError::bad_request(
            format!("bad build number {text:?} in path"),
            "builds are numbered 1, 2, ... (`myco builds WS`)",
        )
    })
}

/// `GET /api/v1/workspaces/{owner}/{name}/builds/{number}/logs?after=N&wait=S`.
pub(super) async fn build_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path((owner, name, number)): Path<(String, String, String)>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<BuildLogs>> {
    let Query(query) =
        query.map_err(|e| ApiError::bad_request("bad query string", e.body_text()))?;
    let number = build_number(&number)?;
    let ws = find_workspace(&state, &caller, &owner, &name).await?;
    // Within the request timeout, which would answer 503 otherwise.
    let wait = Duration::from_secs(query.wait)
        .min(MAX_WAIT)
        .min(state.request_timeout / 2);
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribed before each read, so output written after it wakes this request.
    let mut changes = state.store.build_changes();
    loop {
        changes.borrow_and_update();
        let store = state.store.clone();
        let id = ws.id.clone();
        let found = blocking(move || {
            Ok(store.build_logs(&id, number, query.after, LOG_LINES_PER_REQUEST)?)
        })
        .await?;
        let Some((build, lines)) = found else {
            return Err(ApiError::not_found(
                format!("build {number} of {}/{} not found", ws.owner, ws.name),
                format!("`myco builds {}` lists them", ws.name),
            ));
        };
        if !lines.is_empty() || build.status.is_done() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(BuildLogs { build, lines }));
        }
        // A closed sender (the store dropped) cannot happen while `state` holds it.
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}

/// `POST /api/v1/workspaces/{owner}/{name}/builds/{number}/cancel`: a pending build
/// ends at once; a running one when its provisioner next hears (seconds).
pub(super) async fn cancel_build(
    State(state): State<AppState>,
    caller: Caller,
    Path((owner, name, number)): Path<(String, String, String)>,
) -> ApiResult<(StatusCode, Json<Build>)> {
    let number = build_number(&number)?;
    let ws = find_workspace(&state, &caller, &owner, &name).await?;
    let store = state.store.clone();
    let id = ws.id.clone();
    let build = blocking(move || {
        store.cancel_build(&id, number, Timestamp::now())?;
        Ok(store.build(&id, number)?)
    })
    .await?
    .ok_or_else(|| ApiError::not_found(format!("build {number} not found"), ""))?;
    tracing::info!(owner = %ws.owner, workspace = %ws.name, build = number, by = %caller.user.username, "build cancel asked");
    Ok((StatusCode::ACCEPTED, Json(build)))
}

/// What `DELETE /api/v1/workspaces/...` answers for a template's workspace: its
/// delete build, which removes the workspace when it succeeds.
pub(super) async fn delete_by_build(
    state: &AppState,
    caller: &Caller,
    ws: &WorkspaceRecord,
) -> ApiResult<(StatusCode, Json<api::Build>)> {
    let build = queue(
        state,
        ws,
        Transition::Delete,
        Some(caller.user.username.clone()),
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(build)))
}

/// `PUT /api/v1/workspaces/{owner}/{name}/schedule`: the TTL ("manual": none), an
/// extension of a running workspace's deadline, the auto-start schedule ("manual":
/// none). Answers the schedule as it now is.
pub(super) async fn set_schedule(
    State(state): State<AppState>,
    caller: Caller,
    Path((owner, name)): Path<(String, String)>,
    ApiJson(change): ApiJson<api::ScheduleChange>,
) -> ApiResult<Json<api::WorkspaceSchedule>> {
    let ws = find_workspace(&state, &caller, &owner, &name).await?;
    if ws.template.is_none() {
        return Err(QueueBuildError::NoTemplate(format!("{}/{}", ws.owner, ws.name)).into());
    }
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let bad = |e: String, detail: &str| ApiError::bad_request(e, detail.to_owned());
    let ttl = match change.ttl.as_deref() {
        None => None,
        Some("manual") => Some(None),
        Some(t) => {
            let d = api::parse_duration("stop after", t)
                .map_err(|e| bad(e.to_string(), "or \"manual\" for no auto-stop"))?;
            if d.is_zero() {
                return Err(bad(
                    "stop after 0s would stop it at once".into(),
                    "use `myco stop`",
                ));
            }
            Some(Some(d))
        }
    };
    let extend = change
        .extend
        .as_deref()
        .map(|t| api::parse_duration("extend", t).map_err(|e| bad(e.to_string(), "")))
        .transpose()?;
    if extend.is_some() && ws.state() != WorkspaceState::Running {
        return Err(ApiError::conflict(
            format!(
                "workspace {}/{} is {}; only a running one has a deadline to extend",
                ws.owner,
                ws.name,
                ws.state().as_str()
            ),
            "",
        ));
    }
    let autostart = match change.autostart.as_deref() {
        None => None,
        Some("manual") => Some(None),
        Some(text) => Some(Some(
            crate::schedule::Autostart::parse(text).map_err(|e| bad(e.to_string(), ""))?,
        )),
    };
    let now = Timestamp::now();
    let store = state.store.clone();
    let id = ws.id.clone();
    let updated = blocking(move || {
        let change: crate::store::WorkspaceChange = Box::new(move |w| {
            let running = w.state() == WorkspaceState::Running;
            if let Some(ttl) = ttl {
                w.ttl_ms = ttl.map(ms);
                // A running workspace's deadline follows at once.
                if running {
                    w.deadline = ttl.map(|d| now.saturating_add(d));
                }
            }
            if let Some(d) = extend
                && running
            {
                w.deadline = Some(now.saturating_add(d));
            }
            if let Some(a) = autostart {
                w.next_start = a.as_ref().and_then(|a| a.next_after(now));
                w.autostart = a.map(|a| a.as_str().to_owned());
            }
        });
        store.update_workspaces(vec![(id.clone(), change)])?;
        Ok(store.workspace_by_id(&id)?)
    })
    .await?
    .ok_or_else(|| ApiError::not_found("the workspace is gone", ""))?;
    tracing::info!(owner = %ws.owner, workspace = %ws.name, by = %caller.user.username, "schedule changed");
    Ok(Json(super::workspaces::schedule_view(&updated)))
}
