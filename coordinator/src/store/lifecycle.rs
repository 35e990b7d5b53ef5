//! Builds and the build queue in the store. A workspace made from a
//! template carries its latest build ([`WorkspaceRecord::latest_build`]), from
//! which its state follows; the history is in `builds`, the output in
//! `build_logs`, and a build not yet ended has a job in `jobs` (one per workspace,
//! so a workspace's builds run one after another) that a provisioner claims.

use std::collections::BTreeMap;

use mesh::api::{Build, BuildStatus, TemplateRef, TemplateSpec, Transition};
use mesh::{Name, Timestamp};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::tables::{TOKENS, decode, encode};
use super::templates::{TEMPLATE_ARCHIVES, TEMPLATE_VERSIONS, TemplateVersionRecord};
use super::workspaces::WorkspacesMut;
use super::{Store, StoreError, TokenRecord, WorkspaceRecord, store_failure};

/// Why a build could not be queued ([`Store::queue_build`], [`Store::queue_build_if`],
/// a template workspace's first build).
#[derive(Debug, thiserror::Error)]
pub enum QueueBuildError {
    /// The workspace (`owner/name`) was made without a template: no machine to build.
    #[error(
        "workspace {0} was made without a template; there is no machine to start, stop or build"
    )]
    NoTemplate(String),
    /// A build of the workspace has not ended.
    #[error("build {number} ({transition}) of {workspace} has not ended; wait for it or cancel it")]
    Busy {
        number: u64,
        transition: &'static str,
        /// `owner/name`.
        workspace: String,
    },
    /// No workspace has this id.
    #[error("workspace {0} not found")]
    WorkspaceNotFound(String),
    /// The template version the workspace uses is not stored.
    #[error("template {0} not found")]
    TemplateNotFound(Name),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why [`Store::cancel_build`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CancelBuildError {
    /// The workspace has no build of this number that has not ended.
    #[error("a build {0} that has not ended not found")]
    NotRunning(u64),
    /// The pending build could not be ended.
    #[error(transparent)]
    Finish(#[from] FinishBuildError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why [`Store::claim_job`] failed: a record the job points at is gone.
#[derive(Debug, thiserror::Error)]
pub enum ClaimJobError {
    /// The job's workspace (by id).
    #[error("workspace {0} not found")]
    WorkspaceNotFound(String),
    /// The job's build record.
    #[error("build {0} not found")]
    BuildNotFound(u64),
    /// The template version the job builds.
    #[error("template {0} not found")]
    TemplateNotFound(Name),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why [`Store::replace_agent_tokens`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceAgentTokensError {
    /// No workspace has this id.
    #[error("workspace {0} not found")]
    WorkspaceNotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why [`Store::finish_build`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FinishBuildError {
    /// The job's build record is gone.
    #[error("build {0} not found")]
    BuildNotFound(u64),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

store_failure!(
    ClaimJobError,
    ReplaceAgentTokensError,
    FinishBuildError,
    QueueBuildError,
    CancelBuildError
);

/// (workspace id, build number) -> [`Build`].
pub(super) const BUILDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("builds");
/// (workspace id, build number, line number) -> [`StoredLogLine`].
pub(super) const BUILD_LOGS: TableDefinition<(&str, u64, u64), &[u8]> =
    TableDefinition::new("build_logs");
/// Workspace id -> [`JobRecord`]: the build not yet ended.
pub(super) const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");

/// A change to one workspace record, applied in a write transaction.
pub type WorkspaceChange = Box<dyn FnOnce(&mut WorkspaceRecord) + Send>;

/// A build waiting for a provisioner or run by one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub workspace_id: String,
    pub number: u64,
    pub transition: Transition,
    pub template: TemplateRef,
    /// Tags the provisioner must have.
    pub tags: BTreeMap<String, String>,
    pub created_at: Timestamp,
    /// The provisioner running it, once claimed.
    pub claimed_by: Option<String>,
    /// A claimed job whose provisioner has not renewed its lease by then is failed.
    pub lease_until: Option<Timestamp>,
    /// Someone asked to cancel it while it ran; the provisioner learns it when it
    /// renews its lease.
    #[serde(default)]
    pub cancel: bool,
}

/// A job a provisioner has claimed, with what it needs to run it.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub job: JobRecord,
    pub workspace: WorkspaceRecord,
    pub spec: TemplateSpec,
    pub archive: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredLogLine {
    at: Timestamp,
    text: String,
}

/// The job of a workspace in `table` (read or write).
fn read_job(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    workspace_id: &str,
) -> Result<Option<JobRecord>, StoreError> {
    table
        .get(workspace_id)?
        .map(|v| decode("jobs", workspace_id, v.value()))
        .transpose()
}

fn job_matches(job: &JobRecord, tags: &BTreeMap<String, String>) -> bool {
    job.tags.iter().all(|(k, v)| tags.get(k) == Some(v))
}

impl Store {
    /// Queues a build of workspace `workspace_id`; refused while one has not ended.
    pub fn queue_build(
        &self,
        workspace_id: &str,
        transition: Transition,
        initiator: Option<Name>,
        now: Timestamp,
    ) -> Result<Build, QueueBuildError> {
        let txn = self.db.begin_write()?;
        let build = {
            let mut workspaces = WorkspacesMut::open(&txn)?;
            let mut ws = workspaces
                .get(workspace_id)?
                .ok_or_else(|| QueueBuildError::WorkspaceNotFound(workspace_id.to_owned()))?;
            let build = queue_in(&txn, &mut ws, transition, initiator, now)?;
            workspaces.insert(&ws)?;
            build
        };
        txn.commit()?;
        Ok(build)
    }

    /// Queues a build as [`Store::queue_build`] does, by the coordinator itself,
    /// if `guard` still holds for the stored workspace (`Ok(None)` when not);
    /// `update` changes it in the same transaction (an auto-start moves its next
    /// start).
    pub fn queue_build_if(
        &self,
        workspace_id: &str,
        transition: Transition,
        now: Timestamp,
        guard: impl FnOnce(&WorkspaceRecord) -> bool,
        update: impl FnOnce(&mut WorkspaceRecord),
    ) -> Result<Option<Build>, QueueBuildError> {
        let txn = self.db.begin_write()?;
        let build = {
            let mut workspaces = WorkspacesMut::open(&txn)?;
            let Some(mut ws) = workspaces.get(workspace_id)? else {
                return Ok(None);
            };
            if !guard(&ws) {
                return Ok(None);
            }
            let build = queue_in(&txn, &mut ws, transition, None, now)?;
            update(&mut ws);
            workspaces.insert(&ws)?;
            build
        };
        txn.commit()?;
        Ok(Some(build))
    }

    /// Changes workspaces' schedules in one transaction: each `(id, change)` is
    /// applied to the stored record, if it is still there.
    pub fn update_workspaces(
        &self,
        changes: Vec<(String, WorkspaceChange)>,
    ) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut workspaces = WorkspacesMut::open(&txn)?;
            for (id, change) in changes {
                if let Some(mut ws) = workspaces.get(&id)? {
                    change(&mut ws);
                    workspaces.insert(&ws)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The builds of a workspace, newest first, at most `limit`.
    pub fn builds(&self, workspace_id: &str, limit: usize) -> Result<Vec<Build>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BUILDS)?;
        let mut out = Vec::new();
        for row in table
            .range((workspace_id, 0)..=(workspace_id, u64::MAX))?
            .rev()
            .take(limit)
        {
            let (_, v) = row?;
            out.push(decode("builds", workspace_id, v.value())?);
        }
        Ok(out)
    }

    /// Build `number` of a workspace.
    pub fn build(&self, workspace_id: &str, number: u64) -> Result<Option<Build>, StoreError> {
        let txn = self.db.begin_read()?;
        txn.open_table(BUILDS)?
            .get((workspace_id, number))?
            .map(|v| decode("builds", workspace_id, v.value()))
            .transpose()
    }

    /// Output lines of a build after line `after`, at most `limit`, with the build.
    pub fn build_logs(
        &self,
        workspace_id: &str,
        number: u64,
        after: u64,
        limit: usize,
    ) -> Result<Option<(Build, Vec<mesh::api::BuildLogLine>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let Some(build) = txn
            .open_table(BUILDS)?
            .get((workspace_id, number))?
            .map(|v| decode::<Build>("builds", workspace_id, v.value()))
            .transpose()?
        else {
            return Ok(None);
        };
        let logs = txn.open_table(BUILD_LOGS)?;
        let mut lines = Vec::new();
        for row in logs
            .range(
                (workspace_id, number, after.saturating_add(1))..=(workspace_id, number, u64::MAX),
            )?
            .take(limit)
        {
            let (k, v) = row?;
            let line: StoredLogLine = decode("build_logs", workspace_id, v.value())?;
            lines.push(mesh::api::BuildLogLine {
                seq: k.value().2,
                at: line.at,
                text: line.text,
            });
        }
        Ok(Some((build, lines)))
    }

    /// Appends output lines to a build, numbered on from the last; beyond
    /// [`mesh::api::BUILD_LOG_LINES_MAX`] only a last line saying so is kept.
    pub fn append_build_logs(
        &self,
        workspace_id: &str,
        number: u64,
        lines: &[(Timestamp, String)],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut logs = txn.open_table(BUILD_LOGS)?;
            let last = logs
                .range((workspace_id, number, 0)..=(workspace_id, number, u64::MAX))?
                .next_back()
                .transpose()?
                .map_or(0, |(k, _)| k.value().2);
            let max = mesh::api::BUILD_LOG_LINES_MAX;
            let mut seq = last;
            for (at, text) in lines {
                if seq > max {
                    break;
                }
                seq += 1;
                let text = if seq > max {
                    format!("(output cut: a build keeps {max} lines)")
                } else {
                    text.clone()
                };
                logs.insert(
                    (workspace_id, number, seq),
                    encode(&StoredLogLine { at: *at, text }).as_slice(),
                )?;
            }
        }
        txn.commit()?;
        self.build_changed();
        Ok(())
    }

    /// Claims the oldest unclaimed job whose tags `tags` has, for provisioner `by`,
    /// until `lease_until`; marks its build running.
    pub fn claim_job(
        &self,
        by: &str,
        tags: &BTreeMap<String, String>,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Option<ClaimedJob>, ClaimJobError> {
        // Looked for in a read transaction: an idle provisioner polling writes nothing.
        {
            let txn = self.db.begin_read()?;
            let jobs = txn.open_table(JOBS)?;
            let mut any = false;
            for row in jobs.iter()? {
                let (k, v) = row?;
                let job: JobRecord = decode("jobs", k.value(), v.value())?;
                if job.claimed_by.is_none() && job_matches(&job, tags) {
                    any = true;
                    break;
                }
            }
            if !any {
                return Ok(None);
            }
        }
        let txn = self.db.begin_write()?;
        let claimed = {
            let mut jobs = txn.open_table(JOBS)?;
            let mut best: Option<JobRecord> = None;
            for row in jobs.iter()? {
                let (k, v) = row?;
                let job: JobRecord = decode("jobs", k.value(), v.value())?;
                if job.claimed_by.is_none()
                    && job_matches(&job, tags)
                    && best.as_ref().is_none_or(|b| job.created_at < b.created_at)
                {
                    best = Some(job);
                }
            }
            let Some(mut job) = best else {
                return Ok(None);
            };
            job.claimed_by = Some(by.to_owned());
            job.lease_until = Some(lease_until);
            jobs.insert(job.workspace_id.as_str(), encode(&job).as_slice())?;
            let mut workspaces = WorkspacesMut::open(&txn)?;
            let mut ws = workspaces
                .get(&job.workspace_id)?
                .ok_or_else(|| ClaimJobError::WorkspaceNotFound(job.workspace_id.clone()))?;
            let mut builds = txn.open_table(BUILDS)?;
            let key = (job.workspace_id.as_str(), job.number);
            let mut build: Build = builds
                .get(key)?
                .map(|v| decode("builds", &job.workspace_id, v.value()))
                .transpose()?
                .ok_or(ClaimJobError::BuildNotFound(job.number))?;
            build.status = BuildStatus::Running;
            build.started_at = Some(now);
            build.provisioner = Some(by.to_owned());
            builds.insert(key, encode(&build).as_slice())?;
            ws.latest_build = Some(build);
            workspaces.insert(&ws)?;
            let name = job.template.name.as_str();
            let spec: TemplateVersionRecord = txn
                .open_table(TEMPLATE_VERSIONS)?
                .get((name, job.template.version))?
                .map(|v| decode("template_versions", name, v.value()))
                .transpose()?
                .ok_or_else(|| ClaimJobError::TemplateNotFound(job.template.name.clone()))?;
            let archive = txn
                .open_table(TEMPLATE_ARCHIVES)?
                .get((name, job.template.version))?
                .map(|v| v.value().to_vec())
                .unwrap_or_default();
            ClaimedJob {
                job,
                workspace: ws,
                spec: spec.spec,
                archive,
            }
        };
        txn.commit()?;
        Ok(Some(claimed))
    }

    /// Renews a claimed job's lease; returns whether it was asked to cancel, or
    /// `None` when the job is no longer this provisioner's (failed by the reaper,
    /// or the workspace is gone).
    pub fn renew_job(
        &self,
        workspace_id: &str,
        number: u64,
        by: &str,
        lease_until: Timestamp,
    ) -> Result<Option<bool>, StoreError> {
        let txn = self.db.begin_write()?;
        let cancel = {
            let mut jobs = txn.open_table(JOBS)?;
            let Some(mut job) = read_job(&jobs, workspace_id)? else {
                return Ok(None);
            };
            if job.number != number || job.claimed_by.as_deref() != Some(by) {
                return Ok(None);
            }
            job.lease_until = Some(lease_until);
            jobs.insert(workspace_id, encode(&job).as_slice())?;
            job.cancel
        };
        txn.commit()?;
        Ok(Some(cancel))
    }

    /// Gives the agents of a workspace whose start build runs new tokens (the old
    /// ones stop working): the provisioner hands them to the machine it makes.
    pub fn replace_agent_tokens(
        &self,
        workspace_id: &str,
        tokens: &[(String, TokenRecord)],
    ) -> Result<(), ReplaceAgentTokensError> {
        let txn = self.db.begin_write()?;
        {
            let mut workspaces = WorkspacesMut::open(&txn)?;
            let mut ws = workspaces.get(workspace_id)?.ok_or_else(|| {
                ReplaceAgentTokensError::WorkspaceNotFound(workspace_id.to_owned())
            })?;
            let mut table = txn.open_table(TOKENS)?;
            for (agent_id, record) in tokens {
                if let Some(a) = ws.agents.iter_mut().find(|a| &a.id == agent_id) {
                    table.remove(a.token_id.as_str())?;
                    table.insert(record.id.as_str(), encode(record).as_slice())?;
                    a.token_id = record.id.clone();
                }
            }
            workspaces.insert(&ws)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Ends build `number` of a workspace with `status`; a delete that succeeded
    /// deletes the workspace (returned, for its agents to be closed). A job that
    /// is not `by`'s (`None`: anyone's) is left alone: `Ok(None)` and false.
    pub fn finish_build(
        &self,
        workspace_id: &str,
        number: u64,
        by: Option<&str>,
        status: BuildStatus,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<(bool, Option<WorkspaceRecord>), FinishBuildError> {
        let txn = self.db.begin_write()?;
        let deleted = {
            let mut jobs = txn.open_table(JOBS)?;
            let Some(job) = read_job(&jobs, workspace_id)? else {
                return Ok((false, None));
            };
            if job.number != number || by.is_some_and(|b| job.claimed_by.as_deref() != Some(b)) {
                return Ok((false, None));
            }
            jobs.remove(workspace_id)?;
            drop(jobs);
            let mut builds = txn.open_table(BUILDS)?;
            let mut build: Build = builds
                .get((workspace_id, number))?
                .map(|v| decode("builds", workspace_id, v.value()))
                .transpose()?
                .ok_or(FinishBuildError::BuildNotFound(number))?;
            build.status = status;
            build.reason = reason;
            build.ended_at = Some(now);
            builds.insert((workspace_id, number), encode(&build).as_slice())?;
            drop(builds);
            if build.transition == Transition::Delete && status == BuildStatus::Succeeded {
                let ws = self.delete_workspace_in(&txn, workspace_id)?;
                Some(ws)
            } else {
                let mut workspaces = WorkspacesMut::open(&txn)?;
                if let Some(mut ws) = workspaces.get(workspace_id)? {
                    // A started machine gets its deadline; anything else has none.
                    ws.deadline = if build.transition == Transition::Start
                        && status == BuildStatus::Succeeded
                    {
                        crate::schedule::deadline_after_start(
                            now,
                            ws.ttl_ms.map(std::time::Duration::from_millis),
                        )
                    } else {
                        None
                    };
                    ws.latest_build = Some(build);
                    workspaces.insert(&ws)?;
                }
                None
            }
        };
        let deleted = deleted.flatten();
        self.commit_deletion(txn, deleted.as_ref())?;
        self.build_changed();
        Ok((true, deleted))
    }

    /// A receiver that sees a change after every commit that adds build output or
    /// ends a build (any workspace's: a waiter reads again what it follows).
    pub fn build_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.build_changes.subscribe()
    }

    fn build_changed(&self) {
        self.build_changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Cancels build `number`: a pending one at once (true), a running one when its
    /// provisioner next renews its lease (false).
    pub fn cancel_build(
        &self,
        workspace_id: &str,
        number: u64,
        now: Timestamp,
    ) -> Result<bool, CancelBuildError> {
        let job = self.job(workspace_id)?;
        let Some(job) = job.filter(|j| j.number == number) else {
            return Err(CancelBuildError::NotRunning(number));
        };
        if job.claimed_by.is_none() {
            let (done, _) = self.finish_build(
                workspace_id,
                number,
                None,
                BuildStatus::Canceled,
                Some("canceled before a provisioner took it".into()),
                now,
            )?;
            return Ok(done);
        }
        let txn = self.db.begin_write()?;
        {
            let mut jobs = txn.open_table(JOBS)?;
            let job = read_job(&jobs, workspace_id)?;
            if let Some(mut j) = job
                && j.number == number
            {
                j.cancel = true;
                jobs.insert(workspace_id, encode(&j).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(false)
    }

    /// A workspace's job, if a build of it has not ended.
    pub fn job(&self, workspace_id: &str) -> Result<Option<JobRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        read_job(&txn.open_table(JOBS)?, workspace_id)
    }

    /// Every job not yet ended.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let jobs = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in jobs.iter()? {
            let (k, v) = row?;
            out.push(decode("jobs", k.value(), v.value())?);
        }
        Ok(out)
    }
}

/// Queues a build of `ws` in `txn`: its record, its job, and `ws.latest_build` (the
/// caller writes `ws`).
pub(super) fn queue_in(
    txn: &redb::WriteTransaction,
    ws: &mut WorkspaceRecord,
    transition: Transition,
    initiator: Option<Name>,
    now: Timestamp,
) -> Result<Build, QueueBuildError> {
    let Some(template) = ws.template.clone() else {
        return Err(QueueBuildError::NoTemplate(format!(
            "{}/{}",
            ws.owner, ws.name
        )));
    };
    let mut jobs = txn.open_table(JOBS)?;
    if let Some(job) = read_job(&jobs, &ws.id)? {
        return Err(QueueBuildError::Busy {
            number: job.number,
            transition: job.transition.as_str(),
            workspace: format!("{}/{}", ws.owner, ws.name),
        });
    }
    let spec: TemplateVersionRecord = txn
        .open_table(TEMPLATE_VERSIONS)?
        .get((template.name.as_str(), template.version))?
        .map(|v| decode("template_versions", template.name.as_str(), v.value()))
        .transpose()?
        .ok_or_else(|| QueueBuildError::TemplateNotFound(template.name.clone()))?;
    let number = ws.latest_build.as_ref().map_or(0, |b| b.number) + 1;
    let build = Build {
        number,
        transition,
        status: BuildStatus::Pending,
        reason: None,
        template_version: template.version,
        initiator,
        provisioner: None,
        created_at: now,
        started_at: None,
        ended_at: None,
    };
    txn.open_table(BUILDS)?
        .insert((ws.id.as_str(), number), encode(&build).as_slice())?;
    let job = JobRecord {
        workspace_id: ws.id.clone(),
        number,
        transition,
        template,
        tags: spec.spec.provisioner.tags,
        created_at: now,
        claimed_by: None,
        lease_until: None,
        cancel: false,
    };
    jobs.insert(ws.id.as_str(), encode(&job).as_slice())?;
    ws.latest_build = Some(build.clone());
    Ok(build)
}
