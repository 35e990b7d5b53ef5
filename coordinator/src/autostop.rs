//! The schedule ticker: every [`TICK`], one snapshot of the workspaces and their
//! agents' state, each template's workspace judged against one `now`
//! ([`crate::schedule::judge`]), then in batches: deadlines moved by activity
//! (one write transaction), auto-stop and auto-start builds queued. It also keeps
//! the workspaces-by-state gauge of `/metrics`.

use std::collections::HashMap;
use std::time::Duration;

use mesh::Timestamp;
use mesh::api::{AgentStatus, Transition, WorkspaceState};

use crate::api::AppState;
use crate::schedule::{Action, Autostart, Schedule, judge};
use crate::status::{ConnectionTimes, agent_status};
use crate::store::{Snapshot, WorkspaceRecord};
use crate::tasks::TaskGroup;

/// How often workspaces are judged.
pub(crate) const TICK: Duration = Duration::from_secs(2);

/// Starts the ticker; it runs until the returned group is dropped or shut down.
pub(crate) fn spawn(state: AppState) -> TaskGroup {
    let mut tasks = TaskGroup::new("the schedule ticker");
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = once(&state).await {
                tracing::warn!("cannot judge workspace schedules: {e}");
            }
        }
    });
    tasks
}

/// Whether any agent of `ws` is connected and reports an open session.
fn in_use(ws: &WorkspaceRecord, snap: &Snapshot, state: &AppState, now: Timestamp) -> bool {
    ws.agents.iter().any(|a| {
        let conn = snap.connections.get(&a.id).copied().unwrap_or_default();
        let times = ConnectionTimes::from_stored(a.created_at, &conn);
        if agent_status(&times, &state.policy, now) != AgentStatus::Connected {
            return false;
        }
        snap.reports
            .get(&a.id)
            .and_then(|r| r.stats.as_ref())
            .is_some_and(|s| {
                s.session_count_ssh
                    + s.session_count_vscode
                    + s.session_count_jetbrains
                    + s.session_count_port_forward
                    > 0
            })
    })
}

/// What one tick decided.
#[derive(Debug, Default)]
pub(crate) struct Decisions {
    pub bumps: Vec<(String, Timestamp)>,
    pub stops: Vec<String>,
    pub starts: Vec<String>,
    pub by_state: HashMap<WorkspaceState, u64>,
}

/// Judges every workspace of `snap` at `now`.
pub(crate) fn decide(
    snap: &Snapshot,
    now: Timestamp,
    in_use: impl Fn(&WorkspaceRecord) -> bool,
) -> Decisions {
    let mut d = Decisions::default();
    for ws in &snap.workspaces {
        *d.by_state.entry(ws.state()).or_default() += 1;
        if ws.template.is_none() {
            continue;
        }
        let schedule = Schedule {
            state: ws.state(),
            deadline: ws.deadline,
            activity_bump: ws
                .activity_bump_ms
                .map_or(mesh::api::DEFAULT_ACTIVITY_BUMP, Duration::from_millis),
            next_start: ws.next_start,
        };
        // Activity only matters to a running workspace with a deadline.
        let active =
            schedule.state == WorkspaceState::Running && schedule.deadline.is_some() && in_use(ws);
        match judge(&schedule, active, now) {
            Action::Nothing => {}
            Action::Bump(t) => d.bumps.push((ws.id.clone(), t)),
            Action::Stop => d.stops.push(ws.id.clone()),
            Action::Start => d.starts.push(ws.id.clone()),
        }
    }
    d
}

async fn once(state: &AppState) -> Result<(), crate::error::ApiError> {
    let store = state.store.clone();
    let snap = crate::api::blocking(move || Ok(store.snapshot(None)?)).await?;
    let now = Timestamp::now();
    let d = decide(&snap, now, |ws| in_use(ws, &snap, state, now));
    state.metrics.workspaces_by_state(&d.by_state);
    let (bumps, stops, starts) = (d.bumps, d.stops, d.starts);
    if bumps.is_empty() && stops.is_empty() && starts.is_empty() {
        return Ok(());
    }
    let store = state.store.clone();
    let (stopped, started) = crate::api::blocking(move || {
        let changes = bumps
            .into_iter()
            .map(|(id, t)| {
                let change: crate::store::WorkspaceChange = Box::new(move |ws| {
                    // Only later, and only while it still runs.
                    if ws.state() == WorkspaceState::Running && ws.deadline.is_some_and(|d| d < t) {
                        ws.deadline = Some(t);
                    }
                });
                (id, change)
            })
            .collect();
        store.update_workspaces(changes)?;
        let mut stopped = Vec::new();
        for id in stops {
            let due = |ws: &WorkspaceRecord| {
                ws.state() == WorkspaceState::Running && ws.deadline.is_some_and(|d| d <= now)
            };
            match store.queue_build_if(&id, Transition::Stop, now, due, |_| {}) {
                Ok(Some(b)) => stopped.push((id, b.number)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(workspace = id, "cannot stop the workspace on schedule: {e}")
                }
            }
        }
        let mut started = Vec::new();
        for id in starts {
            let due = |ws: &WorkspaceRecord| {
                matches!(ws.state(), WorkspaceState::Stopped | WorkspaceState::Failed)
                    && ws.next_start.is_some_and(|t| t <= now)
            };
            let next = |ws: &mut WorkspaceRecord| {
                ws.next_start = ws
                    .autostart
                    .as_deref()
                    .and_then(|a| Autostart::parse(a).ok())
                    .and_then(|a| a.next_after(now));
            };
            match store.queue_build_if(&id, Transition::Start, now, due, next) {
                Ok(Some(b)) => started.push((id, b.number)),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    workspace = id,
                    "cannot start the workspace on schedule: {e}"
                ),
            }
        }
        Ok((stopped, started))
    })
    .await?;
    for (id, build) in &stopped {
        tracing::info!(
            workspace = id,
            build,
            "auto-stop: the deadline passed without activity"
        );
        state.metrics.auto_stop();
    }
    for (id, build) in &started {
        tracing::info!(workspace = id, build, "auto-start: on schedule");
        state.metrics.auto_start();
    }
    if !stopped.is_empty() || !started.is_empty() {
        state.builds.queued();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AgentRecord, AgentReports, StoredConnection};
    use mesh::Name;
    use mesh::api::{Build, BuildStatus, TemplateRef};

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    /// `n` running template workspaces, one agent each, deadlines spread over the
    /// next hour; every tenth in use.
    fn snapshot(n: usize, now: Timestamp) -> Snapshot {
        let mut snap = Snapshot::default();
        for i in 0..n {
            let id = format!("w{i}");
            let agent = format!("a{i}");
            snap.workspaces.push(WorkspaceRecord {
                id: id.clone(),
                owner: Name::new("alice").unwrap_or_else(|e| panic!("{e}")),
                name: Name::new(&format!("ws{i}")).unwrap_or_else(|e| panic!("{e}")),
                created_at: at(1),
                agents: vec![AgentRecord {
                    id: agent.clone(),
                    name: Name::new("main").unwrap_or_else(|e| panic!("{e}")),
                    created_at: at(1),
                    token_id: format!("t{i}"),
                    apps: vec![],
                    startup_script: None,
                    shutdown_script: None,
                    metadata: vec![],
                    ssh_host_key: None,
                    endpoint_id: None,
                }],
                template: Some(TemplateRef {
                    name: Name::new("process").unwrap_or_else(|e| panic!("{e}")),
                    version: 1,
                }),
                latest_build: Some(Build {
                    number: 1,
                    transition: Transition::Start,
                    status: BuildStatus::Succeeded,
                    reason: None,
                    template_version: 1,
                    initiator: None,
                    provisioner: None,
                    created_at: at(1),
                    started_at: Some(at(1)),
                    ended_at: Some(at(2)),
                }),
                ttl_ms: Some(3_600_000),
                activity_bump_ms: Some(3_600_000),
                deadline: Some(
                    now.saturating_add(Duration::from_millis((i as u64 * 360) % 3_600_000)),
                ),
                autostart: None,
                next_start: None,
            });
            snap.connections
                .insert(agent.clone(), StoredConnection::default());
            snap.reports.insert(agent, AgentReports::default());
        }
        snap
    }

    #[test]
    fn one_tick_stops_what_is_due_and_bumps_what_is_used() {
        let now = at(10_000_000);
        let mut snap = snapshot(4, now);
        snap.workspaces[0].deadline = Some(at(9_000_000));
        snap.workspaces[1].deadline = Some(at(9_000_000));
        let d = decide(&snap, now, |ws| ws.id == "w1");
        assert_eq!(d.stops, ["w0"]);
        assert_eq!(d.bumps, [("w1".to_owned(), at(10_000_000 + 3_600_000))]);
        assert_eq!(d.by_state.get(&WorkspaceState::Running), Some(&4));
    }

    /// `bench/lifecycle.sh` runs this: the cost of one tick's judging of 10,000
    /// workspaces, against reading them (what every tick and every scrape does).
    #[test]
    #[ignore = "a benchmark; bench/lifecycle.sh runs it"]
    fn bench_judging_ten_thousand_workspaces() {
        const N: usize = 10_000;
        const ROUNDS: u32 = 50;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = crate::store::Store::open(&dir.path().join("store.redb"))
            .unwrap_or_else(|e| panic!("{e}"));
        let now = Timestamp::now();
        let snap = snapshot(N, now);
        for ws in &snap.workspaces {
            let mut plain = ws.clone();
            // Stored without a template: create_workspace would queue a build.
            plain.template = None;
            store
                .create_workspace(&plain, &[], None)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let started = std::time::Instant::now();
        for _ in 0..ROUNDS {
            std::hint::black_box(store.snapshot(None).unwrap_or_else(|e| panic!("{e}")));
        }
        let read = started.elapsed() / ROUNDS;
        let started = std::time::Instant::now();
        for _ in 0..ROUNDS {
            std::hint::black_box(decide(&snap, now, |ws| ws.id.ends_with('0')));
        }
        let judge = started.elapsed() / ROUNDS;
        println!(
            "workspaces={N} snapshot_ms={:.2} judge_ms={:.3} judge_over_snapshot={:.3} tick_cpu_share_at_2s={:.4}",
            read.as_secs_f64() * 1e3,
            judge.as_secs_f64() * 1e3,
            judge.as_secs_f64() / read.as_secs_f64(),
            (read + judge).as_secs_f64() / TICK.as_secs_f64()
        );
    }
}
