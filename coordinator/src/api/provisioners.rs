//! External provisioners (`myco provisioner`), which run builds where the cloud
//! credentials live: admins make their keys; a provisioner process acquires a job
//! whose tags it has (waiting a while for one), sends its output, renews its lease,
//! and says how it ended. A job is held by one process (key name and instance), so
//! it runs once; one whose provisioner stops renewing is failed by the reaper.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mesh::Timestamp;
use mesh::api::{self, JOB_LOG_BATCH_MAX};

use super::callers::{Caller, ProvisionerCaller};
use super::{AppState, blocking, path_name};
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::store::{ProvisionerKey, TokenKind};

/// How long an acquire waits for a job before answering 204.
const ACQUIRE_WAIT: Duration = Duration::from_secs(10);

/// The name a process claims jobs under.
fn holder(caller: &ProvisionerCaller, instance: &str) -> ApiResult<String> {
    if instance.is_empty()
        || instance.len() > 64
        || !instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ApiError::bad_request(
            "bad provisioner instance",
            "1-64 characters of a-z, A-Z, 0-9 and -",
        ));
    }
    Ok(format!("{}/{instance}", caller.name))
}

/// `POST /api/v1/provisioner-keys` (admins): the key, shown once.
pub(super) async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<api::CreateProvisionerKey>,
) -> ApiResult<(StatusCode, Json<api::CreatedProvisionerKey>)> {
    caller.require_admin()?;
    let now = Timestamp::now();
    let issued = crate::auth::issue_token(
        TokenKind::Provisioner {
            name: req.name.clone(),
        },
        now,
        None,
    );
    let key = ProvisionerKey {
        name: req.name.clone(),
        token_id: issued.record.id.clone(),
        created_at: now,
        created_by: caller.user.username.clone(),
    };
    let store = state.store.clone();
    let record = issued.record;
    blocking(move || Ok(store.create_provisioner_key(&key, &record)?)).await?;
    tracing::info!(name = %req.name, by = %caller.user.username, "provisioner key created");
    Ok((
        StatusCode::CREATED,
        Json(api::CreatedProvisionerKey {
            name: req.name,
            key: issued.text,
        }),
    ))
}

/// `GET /api/v1/provisioner-keys` (admins).
pub(super) async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<api::ProvisionerKeyInfo>>> {
    caller.require_admin()?;
    let store = state.store.clone();
    let keys = blocking(move || Ok(store.provisioner_keys()?)).await?;
    Ok(Json(
        keys.into_iter()
            .map(|k| api::ProvisionerKeyInfo {
                name: k.name,
                created_at: k.created_at,
                created_by: k.created_by,
            })
            .collect(),
    ))
}

/// `DELETE /api/v1/provisioner-keys/{name}` (admins).
pub(super) async fn delete_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let name = path_name("provisioner key name", &name)?;
    let store = state.store.clone();
    let n = name.clone();
    if blocking(move || Ok(store.delete_provisioner_key(&n)?)).await? {
        tracing::info!(name = %name, "provisioner key deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            format!("provisioner key {name} not found"),
            "list them with `myco provisioner-keys ls`",
        ))
    }
}

/// `POST /api/v1/provisioner/acquire`: a job (200), or none within a few seconds
/// (204).
pub(super) async fn acquire(
    State(state): State<AppState>,
    caller: ProvisionerCaller,
    ApiJson(req): ApiJson<api::AcquireJob>,
) -> ApiResult<Response> {
    let by = holder(&caller, &req.instance)?;
    // Within the request timeout, which would answer 503 otherwise.
    let deadline = tokio::time::Instant::now() + ACQUIRE_WAIT.min(state.request_timeout / 2);
    loop {
        let woken = state.builds.notified();
        let store = state.store.clone();
        let (b, tags) = (by.clone(), req.tags.clone());
        let claimed = blocking(move || {
            let now = Timestamp::now();
            Ok(store.claim_job(&b, &tags, now, now.saturating_add(crate::builds::LEASE))?)
        })
        .await?;
        if let Some(job) = claimed {
            let tokens = crate::builds::start_tokens(&state, &job).await?;
            let spec = &job.spec;
            tracing::info!(provisioner = by, workspace = %job.workspace.name, build = job.job.number, "build taken by an external provisioner");
            return Ok(Json(api::ProvisionerJob {
                workspace_id: job.job.workspace_id.clone(),
                workspace_name: job.workspace.name.clone(),
                owner: job.workspace.owner.clone(),
                number: job.job.number,
                transition: job.job.transition,
                access_url: state.access_url.clone(),
                run: spec.provisioner.run.clone(),
                timeout_ms: u64::try_from(
                    spec.build_timeout()
                        .unwrap_or(api::DEFAULT_BUILD_TIMEOUT)
                        .as_millis(),
                )
                .unwrap_or(u64::MAX),
                agent_tokens: tokens,
                archive_hex: hex::encode(&job.archive),
            })
            .into_response());
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let _ = tokio::time::timeout(left.min(Duration::from_secs(2)), woken).await;
    }
}

fn number(text: &str) -> ApiResult<u64> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("bad build number {text:?}"), ""))
}

fn lost(ws: &str, n: u64) -> ApiError {
    ApiError::conflict(
        format!("build {n} of workspace {ws} is not this provisioner's"),
        "it ended, was failed when its lease ran out, or its workspace is gone; stop running it",
    )
}

/// `POST /api/v1/provisioner/jobs/{workspace}/{number}/logs`.
pub(super) async fn job_logs(
    State(state): State<AppState>,
    caller: ProvisionerCaller,
    Path((ws, n)): Path<(String, String)>,
    ApiJson(req): ApiJson<api::JobLogs>,
) -> ApiResult<StatusCode> {
    let by = holder(&caller, &req.instance)?;
    let n = number(&n)?;
    if req.lines.len() > JOB_LOG_BATCH_MAX {
        return Err(ApiError::bad_request(
            format!("{} lines in one batch", req.lines.len()),
            format!("send at most {JOB_LOG_BATCH_MAX}"),
        ));
    }
    let store = state.store.clone();
    let lines: Vec<(Timestamp, String)> = req
        .lines
        .into_iter()
        .map(|(at, text)| (at, api::build_log_text(text.as_bytes())))
        .collect();
    let ws2 = ws.clone();
    let held = blocking(move || {
        // Only the holder writes its build's output.
        let held = store
            .job(&ws2)?
            .is_some_and(|j| j.number == n && j.claimed_by.as_deref() == Some(&by));
        if held {
            store.append_build_logs(&ws2, n, &lines)?;
        }
        Ok(held)
    })
    .await?;
    if held {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(lost(&ws, n))
    }
}

/// `POST /api/v1/provisioner/jobs/{workspace}/{number}/renew`.
pub(super) async fn renew(
    State(state): State<AppState>,
    caller: ProvisionerCaller,
    Path((ws, n)): Path<(String, String)>,
    ApiJson(req): ApiJson<api::JobUpdate>,
) -> ApiResult<Json<api::Renewed>> {
    let by = holder(&caller, &req.instance)?;
    let n = number(&n)?;
    let store = state.store.clone();
    let ws2 = ws.clone();
    let renewed = blocking(move || {
        let until = Timestamp::now().saturating_add(crate::builds::LEASE);
        Ok(store.renew_job(&ws2, n, &by, until)?)
    })
    .await?;
    match renewed {
        Some(cancel) => Ok(Json(api::Renewed { cancel })),
        None => Err(lost(&ws, n)),
    }
}

/// `POST /api/v1/provisioner/jobs/{workspace}/{number}/finish`.
pub(super) async fn finish(
    State(state): State<AppState>,
    caller: ProvisionerCaller,
    Path((ws, n)): Path<(String, String)>,
    ApiJson(req): ApiJson<api::JobUpdate>,
) -> ApiResult<StatusCode> {
    let by = holder(&caller, &req.instance)?;
    let n = number(&n)?;
    let status = match req.status {
        Some(s) if s.is_done() => s,
        _ => {
            return Err(ApiError::bad_request(
                "a finished build needs its status",
                "succeeded, failed or canceled",
            ));
        }
    };
    let reason = req.reason.map(|r| api::build_log_text(r.as_bytes()));
    let ended = crate::builds::finish(&state, &ws, n, &by, status, reason).await?;
    if ended {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(lost(&ws, n))
    }
}
