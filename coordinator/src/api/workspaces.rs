//! Workspaces: list, create (validated), show, delete; an agent's token rotation and
//! its script logs; `workspace_view`, how a stored workspace and its agents' state are shown.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use mesh::api::{self, AgentToken, CreateWorkspace, CreatedWorkspace, RotatedAgentToken};
use mesh::{Name, Timestamp};
use serde::Deserialize;

use super::callers::Caller;
use super::{AppState, agent_named, blocking, find_workspace, path_name};
use crate::auth;
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::registry::MeshRegistry;
use crate::status::{ConnectionTimes, StatusPolicy, agent_status};
use crate::store::{AgentRecord, AgentReports, StoredConnection, TokenKind, WorkspaceRecord};

/// Apps of one agent.
const MAX_APPS: usize = 64;

/// How many log lines `GET .../logs` returns at most.
const LOG_LINES_SHOWN: usize = 10_000;

/// What a workspace listing judges agents with: their stored state, the live
/// registry, the status policy and one `now` for all of them.
struct ViewContext<'a> {
    connections: &'a HashMap<String, StoredConnection>,
    reports: &'a HashMap<String, AgentReports>,
    registry: &'a MeshRegistry,
    policy: &'a StatusPolicy,
    now: Timestamp,
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
        state: w.state(),
        template: w.template.clone(),
        latest_build: w.latest_build.clone(),
        schedule: w.template.as_ref().map(|_| schedule_view(w)),
    }
}

fn ms_text(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

/// A template's workspace's schedule as the API shows it.
pub(super) fn schedule_view(w: &WorkspaceRecord) -> api::WorkspaceSchedule {
    api::WorkspaceSchedule {
        ttl: w.ttl_ms.map(ms_text),
        activity_bump: ms_text(w.activity_bump_ms.unwrap_or_else(|| {
            u64::try_from(api::DEFAULT_ACTIVITY_BUMP.as_millis()).unwrap_or(u64::MAX)
        })),
        deadline: w.deadline,
        autostart: w.autostart.clone(),
        next_start: w.next_start,
    }
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    /// Admins only: every user's workspaces.
    #[serde(default)]
    all: bool,
}

pub(super) async fn list_workspaces(
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

fn validate_workspace(spec: &CreateWorkspace, max_agents: usize) -> ApiResult<()> {
    validate_agents(&spec.agents, max_agents)
}

/// The checks every workspace's agents pass, from a request or a template.
pub(super) fn validate_agents(agents: &[api::AgentSpec], max_agents: usize) -> ApiResult<()> {
    if agents.is_empty() {
        return Err(ApiError::bad_request(
            "a workspace needs at least one agent",
            "add an agent, e.g. {\"name\": \"main\"}",
        ));
    }
    if agents.len() > max_agents {
        return Err(ApiError::forbidden(
            format!("too many agents ({})", agents.len()),
            format!(
                "a workspace holds at most {max_agents} (the operator's quota, `myco server --max-agents-per-workspace`)"
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for agent in agents {
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

pub(super) async fn create_workspace(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(mut spec): ApiJson<CreateWorkspace>,
) -> ApiResult<(StatusCode, Json<CreatedWorkspace>)> {
    let template = match spec.template.take() {
        Some(name) => {
            if !spec.agents.is_empty() {
                return Err(ApiError::bad_request(
                    "a workspace made from a template gets its agents from the template",
                    "leave out --agent, --app and --from with --template",
                ));
            }
            let store = state.store.clone();
            let n = name.clone();
            let rec = blocking(move || Ok(store.template(&n, None)?))
                .await?
                .ok_or_else(|| {
                    ApiError::not_found(
                        format!("template {name} not found"),
                        "list them with `myco templates ls`",
                    )
                })?;
            spec.agents = if rec.spec.agents.is_empty() {
                vec![api::AgentSpec {
                    name: Name::new("main").map_err(|e| ApiError::internal("", e.to_string()))?,
                    apps: Vec::new(),
                    startup_script: None,
                    shutdown_script: None,
                    metadata: Vec::new(),
                }]
            } else {
                rec.spec.agents.clone()
            };
            let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            let ttl = match spec.ttl.as_deref() {
                Some("manual") => None,
                Some(text) => Some(api::parse_duration("--ttl", text).map_err(|e| {
                    ApiError::bad_request(e.to_string(), "or \"manual\" for no auto-stop")
                })?),
                None => rec.spec.ttl().unwrap_or(None),
            };
            let bump = rec
                .spec
                .activity_bump()
                .unwrap_or(api::DEFAULT_ACTIVITY_BUMP);
            Some((
                api::TemplateRef {
                    name,
                    version: rec.version,
                },
                ttl.map(ms),
                ms(bump),
            ))
        }
        None => {
            if spec.ttl.is_some() {
                return Err(ApiError::bad_request(
                    "a TTL needs a template",
                    "a workspace made without a template has no machine to stop",
                ));
            }
            None
        }
    };
    let (template, ttl_ms, activity_bump_ms) = match template {
        Some((t, ttl, bump)) => (Some(t), ttl, Some(bump)),
        None => (None, None, None),
    };
    validate_workspace(&spec, state.quotas.agents_per_workspace)?;
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
            endpoint_id: None,
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
        template,
        latest_build: None,
        ttl_ms,
        activity_bump_ms,
        deadline: None,
        autostart: None,
        next_start: None,
    };
    let store = state.store.clone();
    let max = (!caller.user.admin).then_some(state.quotas.workspaces_per_user);
    let ws = blocking(move || {
        store.create_workspace(&ws, &tokens, max)?;
        Ok(ws)
    })
    .await?;
    tracing::info!(owner = %ws.owner, workspace = %ws.name, "workspace created");
    // A template's workspace: its start build was queued with it; its provisioner
    // gets the agents' tokens, so none is shown.
    let (ws, shown) = if ws.template.is_some() {
        state.builds.queued();
        let store = state.store.clone();
        let id = ws.id.clone();
        let stored = blocking(move || Ok(store.workspace_by_id(&id)?)).await?;
        (stored.unwrap_or(ws), Vec::new())
    } else {
        (ws, shown)
    };
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

pub(super) async fn get_workspace(
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

#[derive(Deserialize)]
pub(super) struct DeleteQuery {
    /// Remove the record without running the template's delete build (whose
    /// machine, if any, is left for the operator).
    #[serde(default)]
    orphan: bool,
}

/// `DELETE /api/v1/workspaces/{owner}/{name}`: at once for a workspace made without a
/// template (204); for a template's, its delete build is queued (202, the build),
/// and the workspace goes when that succeeds; `?orphan=true` removes it at once.
pub(super) async fn delete_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path((owner, name)): Path<(String, String)>,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let Query(query) =
        query.map_err(|e| ApiError::bad_request("bad query string", e.body_text()))?;
    let ws = find_workspace(&state, &caller, &owner, &name).await?;
    if ws.template.is_some() && !query.orphan {
        return Ok(super::builds::delete_by_build(&state, &caller, &ws)
            .await?
            .into_response());
    }
    let store = state.store.clone();
    let (o, n) = (ws.owner.clone(), ws.name.clone());
    let deleted = blocking(move || Ok(store.delete_workspace(&o, &n)?)).await?;
    let agent_ids: Vec<String> = deleted
        .iter()
        .flat_map(|w| &w.agents)
        .map(|a| a.id.clone())
        .collect();
    state.ledger.forget(&agent_ids);
    super::close_agents(&state, &agent_ids, "the workspace was deleted");
    tracing::info!(owner = %ws.owner, workspace = %ws.name, by = %caller.user.username, "workspace deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn rotate_agent_token(
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
    super::close_agents(
        &state,
        std::slice::from_ref(&rec.id),
        "the agent token was rotated; restart the agent with the new one",
    );
    tracing::info!(owner = %ws.owner, workspace = %ws.name, agent = %agent, "agent token rotated");
    Ok(Json(RotatedAgentToken {
        agent_token: AgentToken {
            agent,
            token: issued.text,
        },
        access_url: state.access_url.clone(),
    }))
}

/// `GET /api/v1/workspaces/{owner}/{name}/agents/{agent}/logs`: the agent's startup
/// and shutdown script output, oldest first.
pub(super) async fn agent_logs(
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
