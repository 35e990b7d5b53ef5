//! The coordinator's own provisioners (`--provisioners N`, the embedded default):
//! N workers that claim queued builds from the store, run them with
//! [`crate::provision::run`] and record how they ended; and the reaper, which fails
//! a build whose provisioner stopped renewing its lease.
//!
//! A build the coordinator was running when it was killed is failed, with the
//! reason, when it starts again ([`recover`]): its shell died with it (parent-death
//! signal), what that started is killed then (found by the build's tag in its
//! environment), and running it again blindly could repeat half of it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh::Timestamp;
use mesh::api::{BuildStatus, Transition};
use tokio::sync::{Notify, mpsc, watch};

use crate::api::AppState;
use crate::provision::{self, BuildInput, Outcome};
use crate::store::{ClaimedJob, FinishBuildError, Store, TokenKind};
use crate::tasks::TaskGroup;

/// The name the coordinator's own provisioners claim jobs under.
pub(crate) const OWN: &str = "coordinator";

/// How long a claim lasts without renewal, and how often it is renewed.
pub(crate) const LEASE: Duration = Duration::from_secs(30);
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// How often an idle worker looks for work without being woken.
const IDLE_POLL: Duration = Duration::from_secs(2);

/// Output lines are written to the store in batches, at least this often.
const LOG_FLUSH: Duration = Duration::from_millis(200);

/// Wakes idle workers when a build is queued.
#[derive(Debug, Clone, Default)]
pub(crate) struct BuildQueue(Arc<Notify>);

impl BuildQueue {
    pub(crate) fn queued(&self) {
        self.0.notify_waiters();
    }

    /// Resolves at the next [`BuildQueue::queued`] after this call.
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.notified()
    }
}

/// A start build's new agent tokens (the old ones stop working), for the machine it
/// makes: each agent's name and token. Other builds get none.
///
/// # Cancel safety
/// Not cancel safe. Called from the provisioners' acquire handler, under the request
/// deadline: dropped after the store replaced the tokens, the new ones are lost (the
/// build cannot hand them to its machine) and the old agents' channels stay open.
pub(crate) async fn start_tokens(
    state: &AppState,
    claimed: &ClaimedJob,
) -> Result<Vec<(String, String)>, crate::error::ApiError> {
    if claimed.job.transition != Transition::Start {
        return Ok(Vec::new());
    }
    let now = Timestamp::now();
    let mut records = Vec::new();
    let mut tokens = Vec::new();
    for a in &claimed.workspace.agents {
        let issued = crate::auth::issue_token(
            TokenKind::Agent {
                workspace_id: claimed.job.workspace_id.clone(),
                agent_id: a.id.clone(),
            },
            now,
            None,
        );
        records.push((a.id.clone(), issued.record));
        tokens.push((a.name.to_string(), issued.text));
    }
    let store = state.store.clone();
    let id = claimed.job.workspace_id.clone();
    crate::api::blocking(move || Ok(store.replace_agent_tokens(&id, &records)?)).await?;
    let ids: Vec<String> = claimed
        .workspace
        .agents
        .iter()
        .map(|a| a.id.clone())
        .collect();
    crate::api::close_agents(
        state,
        &ids,
        "the workspace is starting again with new tokens",
    );
    Ok(tokens)
}

/// Ends build `number` of `ws_id` held by `by`; false when it is not theirs. A
/// failure is counted; a successful delete takes the workspace's agents off the
/// mesh.
///
/// # Cancel safety
/// Not cancel safe. Called from the provisioners' finish handler, under the request
/// deadline: dropped after the store recorded the end, the failure is not counted
/// and a deleted workspace's agents are not told to close (they are refused at their
/// next connection, their tokens being gone).
pub(crate) async fn finish(
    state: &AppState,
    ws_id: &str,
    number: u64,
    by: &str,
    status: BuildStatus,
    reason: Option<String>,
) -> Result<bool, crate::error::ApiError> {
    let store = state.store.clone();
    let (id, b) = (ws_id.to_owned(), by.to_owned());
    let r = reason.clone();
    let (ended, deleted) = crate::api::blocking(move || {
        Ok(store.finish_build(&id, number, Some(&b), status, r, Timestamp::now())?)
    })
    .await?;
    if !ended {
        return Ok(false);
    }
    tracing::info!(workspace = ws_id, build = number, provisioner = by, status = ?status, reason = reason.as_deref().unwrap_or(""), "build ended");
    if status == BuildStatus::Failed {
        state.metrics.build_failed();
    }
    if let Some(deleted) = deleted {
        let ids: Vec<String> = deleted.agents.iter().map(|a| a.id.clone()).collect();
        state.ledger.forget(&ids);
        crate::api::close_agents(state, &ids, "the workspace was deleted");
    }
    Ok(true)
}

/// Fails the builds the coordinator's own provisioners held when it stopped.
pub(crate) fn recover(store: &Store) -> Result<usize, FinishBuildError> {
    let now = Timestamp::now();
    let mut failed = 0;
    for job in store.jobs()? {
        if job.claimed_by.as_deref() == Some(OWN) {
            // Its shell died with the coordinator; what it started may not have.
            let killed = provision::kill_leftovers(&job.workspace_id, job.number);
            if killed > 0 {
                tracing::warn!(
                    build = job.number,
                    processes = killed,
                    "killed what an interrupted build left running"
                );
            }
            let (done, _) = store.finish_build(
                &job.workspace_id,
                job.number,
                Some(OWN),
                BuildStatus::Failed,
                Some(
                    "the coordinator stopped while this build ran (its command was killed); \
                     run it again"
                        .into(),
                ),
                now,
            )?;
            failed += usize::from(done);
        }
    }
    Ok(failed)
}

/// Starts `n` workers and the reaper; they run until the returned group is dropped
/// or shut down.
pub(crate) fn spawn(state: AppState, n: usize, data_dir: PathBuf) -> TaskGroup {
    let mut tasks = TaskGroup::new("the build workers");
    for i in 0..n {
        let state = state.clone();
        let dir = data_dir.clone();
        tasks.spawn(async move { worker(i, state, dir).await });
    }
    tasks.spawn(reaper(state));
    tasks
}

async fn worker(i: usize, state: AppState, data_dir: PathBuf) {
    let queue = state.builds.clone();
    loop {
        let woken = queue.0.notified();
        let store = state.store.clone();
        let claimed = crate::api::blocking(move || {
            let now = Timestamp::now();
            Ok(store.claim_job(OWN, &BTreeMap::new(), now, now.saturating_add(LEASE))?)
        })
        .await;
        match claimed {
            Ok(Some(job)) => {
                tracing::info!(worker = i, workspace = %job.workspace.name, build = job.job.number, transition = job.job.transition.as_str(), "build started");
                run_claimed(&state, job, &data_dir).await;
            }
            Ok(None) => {
                let _ = tokio::time::timeout(IDLE_POLL, woken).await;
            }
            Err(e) => {
                tracing::error!(worker = i, "cannot look for builds: {}", e);
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }
}

async fn run_claimed(state: &AppState, claimed: ClaimedJob, data_dir: &std::path::Path) {
    // A start gets new agent tokens, handed to the machine it makes.
    let agent_tokens = start_tokens(state, &claimed).await;
    let ClaimedJob {
        job,
        workspace,
        spec,
        archive,
    } = claimed;
    let ws_id = job.workspace_id.clone();
    let number = job.number;
    let agent_tokens = match agent_tokens {
        Ok(t) => t,
        Err(e) => {
            let why = format!("cannot issue agent tokens: {e}");
            let _ = finish(state, &ws_id, number, OWN, BuildStatus::Failed, Some(why)).await;
            return;
        }
    };
    let timeout = spec
        .build_timeout()
        .unwrap_or(mesh::api::DEFAULT_BUILD_TIMEOUT);
    let root = data_dir.join("provisioner");
    let input = BuildInput {
        transition: job.transition,
        workspace_id: ws_id.clone(),
        workspace_name: workspace.name.to_string(),
        owner: workspace.owner.to_string(),
        number,
        access_url: state.access_url.clone(),
        agent_tokens,
        archive,
        run: spec.provisioner.run.clone(),
        timeout,
        work_dir: root.join("builds").join(format!("{ws_id}-{number}")),
        state_dir: root.join("state").join(&ws_id),
    };
    let state_dir = input.state_dir.clone();
    let (line_tx, line_rx) = mpsc::channel(1024);
    let (cancel_tx, cancel_rx) = watch::channel(false);
    // The log writer and the lease renewer go with this build: aborted if the worker
    // is, and the writer drained before the build is finished.
    let mut helpers = TaskGroup::new("a build's log writer and lease renewer");
    helpers.spawn(write_logs(
        state.store.clone(),
        ws_id.clone(),
        number,
        line_rx,
    ));
    let renewer = helpers.spawn(renew(state.store.clone(), ws_id.clone(), number, cancel_tx));
    let outcome = provision::run(input, line_tx, cancel_rx).await;
    renewer.abort();
    helpers.join_all().await;
    let (status, reason) = match outcome {
        Outcome::Succeeded => (BuildStatus::Succeeded, None),
        Outcome::Failed(why) => (BuildStatus::Failed, Some(why)),
        Outcome::Canceled => (BuildStatus::Canceled, Some("canceled".to_owned())),
    };
    // A deleted machine's state goes before the build is recorded as ended: whoever
    // waits for the workspace to be deleted then finds nothing of it left.
    if job.transition == Transition::Delete && status == BuildStatus::Succeeded {
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(state_dir)).await;
    }
    if let Err(e) = finish(state, &ws_id, number, OWN, status, reason).await {
        tracing::error!(build = number, "cannot record how the build ended: {e}");
    }
}

/// Writes output lines to the store in batches until the sender is gone.
async fn write_logs(
    store: Arc<Store>,
    ws_id: String,
    number: u64,
    mut rx: mpsc::Receiver<(Timestamp, String)>,
) {
    let mut batch = Vec::new();
    loop {
        let more = tokio::select! {
            line = rx.recv() => match line {
                Some(l) => { batch.push(l); true }
                None => false,
            },
            () = tokio::time::sleep(LOG_FLUSH), if !batch.is_empty() => true,
        };
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        if !batch.is_empty() && (!more || batch.len() >= 64 || rx.is_empty()) {
            let lines = std::mem::take(&mut batch);
            let store = store.clone();
            let id = ws_id.clone();
            if let Err(e) =
                crate::api::blocking(move || Ok(store.append_build_logs(&id, number, &lines)?))
                    .await
            {
                tracing::warn!(build = number, "cannot keep build output: {}", e);
            }
        }
        if !more {
            return;
        }
    }
}

/// Renews the build's lease until aborted; a cancel request, or a lease lost to
/// the reaper, stops the command.
async fn renew(store: Arc<Store>, ws_id: String, number: u64, cancel: watch::Sender<bool>) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let store = store.clone();
        let id = ws_id.clone();
        let renewed = crate::api::blocking(move || {
            let until = Timestamp::now().saturating_add(LEASE);
            Ok(store.renew_job(&id, number, OWN, until)?)
        })
        .await;
        match renewed {
            Ok(Some(false)) => {}
            Ok(Some(true)) | Ok(None) => {
                let _ = cancel.send(true);
                return;
            }
            Err(e) => tracing::warn!(build = number, "cannot renew the build's lease: {}", e),
        }
    }
}

/// Fails builds whose provisioner has not renewed its lease in time.
async fn reaper(state: AppState) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let store = state.store.clone();
        let result = crate::api::blocking(move || {
            let now = Timestamp::now();
            let mut failed = 0usize;
            for job in store.jobs()? {
                if let (Some(by), Some(until)) = (&job.claimed_by, job.lease_until)
                    && until < now
                {
                    let (done, _) = store.finish_build(
                        &job.workspace_id,
                        job.number,
                        Some(by),
                        BuildStatus::Failed,
                        Some(format!(
                            "provisioner {by} stopped answering (no lease renewal for {}s); run it again",
                            LEASE.as_secs()
                        )),
                        now,
                    )?;
                    failed += usize::from(done);
                }
            }
            Ok(failed)
        })
        .await;
        match result {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(
                    builds = n,
                    "failed builds whose provisioner stopped answering"
                );
                for _ in 0..n {
                    state.metrics.build_failed();
                }
            }
            Err(e) => tracing::warn!("cannot check build leases: {}", e),
        }
    }
}
