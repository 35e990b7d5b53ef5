//! The coordinator's store: one redb file in the data dir.
//!
//! Architecture Invariant: this is the only module that opens redb. Every write is one
//! redb transaction committed with `Durability::Immediate` (redb's default), so a write
//! the API acknowledged survives a `kill -9` of the server.
//!
//! Records are JSON in redb tables keyed by id, with name-index tables beside them.
//! Agents live inside their workspace record, so a single pass over `workspaces`
//! yields every agent and app (no query per agent).
//!
//! What agents report (connection times, lifecycle, app health, stats, metadata, script
//! logs) lives in tables of its own keyed by agent id, written in batches by the
//! ledger's group commit ([`Store::write_agent_state`]), so heartbeats never rewrite
//! workspace records. [`Store::snapshot`] reads workspaces and all of that in one read
//! transaction.
//!
//! Architecture Invariant: workspace records are written only through
//! `workspaces::WorkspacesMut`, which counts every write transaction that changes one
//! in the `changes` table; a scrape reads the workspaces again only when that count
//! moved.
//!
//! One module per kind of thing held, each with its part of [`Store`]'s methods:
//! `tables` (the tables, how records are encoded in them, the name index and quota
//! check), `records` (users, tokens, workspaces and their agents), `accounts` (users
//! and tokens), `workspaces`, `agent_state` (what agents report), `scrape` (what
//! `/metrics` reads), `templates` (templates and provisioner keys) and `lifecycle`
//! (builds and the build queue).
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `users` | username | `UserRecord` (JSON) |
//! | `tokens` | token id | `TokenRecord`: kind (session, api, agent), secret hash, expiry |
//! | `token_names` | `owner/name` | token id of a named API token |
//! | `workspaces` | workspace id | `WorkspaceRecord` with its agents and their apps inline |
//! | `workspace_names` | `owner/name` | workspace id |
//! | `agent_connections` | agent id | (first connected, last connected, disconnected) in unix ms, 0 for never: fixed width |
//! | `agent_reports` | agent id | `AgentReports`: lifecycle, apps' health, stats, metadata (JSON) |
//! | `agent_logs` | (agent id, sequence) | `LogLine` of a startup or shutdown script; the last 10 000 per agent are kept |
//! | `templates` | template name | latest version number |
//! | `template_versions` | (name, version) | `TemplateVersionRecord`: its `template.toml`, who pushed it, sha256 |
//! | `template_archives` | (name, version) | the template directory as a tar archive (at most 8 MiB) |
//! | `builds` | (workspace id, number) | `Build`: transition, status, reason, times, provisioner |
//! | `build_logs` | (workspace id, number, line) | a line of the build's output; the first 10 000 kept per build |
//! | `jobs` | workspace id | `JobRecord`: the build not yet ended, who claimed it, its lease |
//! | `changes` | counter name | `u64`; `workspaces` counts the write transactions that changed workspace records |
//!
//! Deleting a workspace deletes its agents' rows in the same transaction.
//!
//! An operation that can be refused returns its own error enum (`CreateUserError`,
//! `QueueBuildError`, ...), a doc line per variant and a `Store` variant for
//! [`StoreError`]: redb failing or a record unreadable. `api` maps each variant to its
//! status and message.

mod accounts;
mod agent_state;
#[cfg(test)]
mod fixtures;
mod lifecycle;
mod records;
mod scrape;
mod tables;
mod templates;
mod workspaces;

use std::path::Path;
use std::time::Duration;

use mesh::Name;
use redb::Database;

use tables::{
    AGENT_CONNECTIONS, AGENT_ENDPOINTS, AGENT_LOGS, AGENT_REPORTS, CHANGES, TOKEN_NAMES, TOKENS,
    USERS, WORKSPACE_NAMES, WORKSPACES,
};

pub use accounts::{
    CreateFirstUserError, CreateUserError, DeleteUserError, InsertTokenError, UpdateUserError,
};
pub use agent_state::{AgentReports, AgentStateBatch, MAX_LOG_LINES, Snapshot, StoredConnection};
pub use lifecycle::{
    CancelBuildError, ClaimJobError, ClaimedJob, FinishBuildError, JobRecord, QueueBuildError,
    ReplaceAgentTokensError, WorkspaceChange,
};
pub use records::{AgentRecord, TokenKind, TokenRecord, UserRecord, WorkspaceRecord};
pub use scrape::{
    AgentSummary, AppSummary, ReportsSummary, ScrapeAgent, ScrapeCache, ScrapeView,
    WorkspaceSummary,
};
pub use templates::{
    CreateProvisionerKeyError, DeleteTemplateError, ProvisionerKey, TemplateVersionRecord,
};
pub use workspaces::{
    ClaimEndpointError, CreateWorkspaceError, EndpointClaim, RotateAgentTokenError, SetHostKeyError,
};

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (usually another `myco server`) holds the database file.
    #[error(
        "the store {0} is in use by another process; stop the other myco server or pick another --data-dir"
    )]
    InUse(String),
    /// The store file could not be created, or made private to its owner (0600).
    #[error("cannot make the store {0} private to its owner (mode 0600): {1}")]
    Private(String, #[source] std::io::Error),
    /// redb failed: I/O, corruption it detected, or a transaction error.
    #[error("store failure: {0}")]
    Database(#[from] redb::Error),
    /// A record could not be decoded; the file was written by an incompatible version.
    #[error("store record {table}/{key} is unreadable: {source}")]
    Corrupt {
        table: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Database(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// An operation's own error enum takes redb's errors as its `Store` variant, so `?`
/// works inside the operation as it does for [`StoreError`].
macro_rules! store_failure {
    ($($e:ty),*) => {$(
        impl From<redb::Error> for $e {
            fn from(e: redb::Error) -> Self {
                Self::Store(e.into())
            }
        }
        impl From<redb::TransactionError> for $e {
            fn from(e: redb::TransactionError) -> Self {
                Self::Store(e.into())
            }
        }
        impl From<redb::TableError> for $e {
            fn from(e: redb::TableError) -> Self {
                Self::Store(e.into())
            }
        }
        impl From<redb::StorageError> for $e {
            fn from(e: redb::StorageError) -> Self {
                Self::Store(e.into())
            }
        }
        impl From<redb::CommitError> for $e {
            fn from(e: redb::CommitError) -> Self {
                Self::Store(e.into())
            }
        }
    )*};
}
pub(crate) use store_failure;

/// The owner already holds as many of these as their quota allows.
#[derive(Debug, thiserror::Error)]
#[error("{what} of {owner}: the quota of {max} is reached")]
pub struct QuotaReached {
    /// What is counted: "workspaces", "API tokens".
    pub what: &'static str,
    pub owner: Name,
    pub max: usize,
}

/// The coordinator's database.
pub struct Store {
    db: Database,
    /// Agents whose workspace was deleted since the store opened: the ledger's
    /// flushes write no rows for them, even one that raced the delete. Agent ids are
    /// random and never reused, and agents of deleted workspaces cannot reconnect.
    deleted_agents: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Test hook: every record a snapshot reads takes this long, as on a slow disk.
    read_delay: Option<Duration>,
    /// Bumped after every commit that adds build output or ends a build, so that
    /// followers of a build's output wake instead of polling.
    build_changes: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store file and makes sure every table exists.
    ///
    /// # Errors
    /// [`StoreError::InUse`] when another process holds the file; [`StoreError::Database`]
    /// when redb cannot open or repair it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // redb would create the file 0666 less the umask: made (or narrowed) 0600 first.
        match mesh::identity::private_file(path) {
            Ok(None) => {}
            Ok(Some(old)) => tracing::warn!(
                path = %path.display(),
                "the store was open to other users (mode {old:o}); narrowed it to owner only"
            ),
            Err(e) => return Err(StoreError::Private(path.display().to_string(), e)),
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::InUse(path.display().to_string())
            }
            other => StoreError::Database(other.into()),
        })?;
        let txn = db.begin_write()?;
        txn.open_table(USERS)?;
        txn.open_table(TOKENS)?;
        txn.open_table(TOKEN_NAMES)?;
        txn.open_table(WORKSPACES)?;
        txn.open_table(WORKSPACE_NAMES)?;
        txn.open_table(AGENT_CONNECTIONS)?;
        txn.open_table(AGENT_REPORTS)?;
        txn.open_table(AGENT_LOGS)?;
        txn.open_table(AGENT_ENDPOINTS)?;
        txn.open_table(CHANGES)?;
        txn.open_table(templates::TEMPLATES)?;
        txn.open_table(templates::TEMPLATE_VERSIONS)?;
        txn.open_table(templates::TEMPLATE_ARCHIVES)?;
        txn.open_table(lifecycle::BUILDS)?;
        txn.open_table(lifecycle::BUILD_LOGS)?;
        txn.open_table(lifecycle::JOBS)?;
        txn.open_table(templates::PROVISIONER_KEYS)?;
        txn.commit()?;
        Ok(Self {
            db,
            deleted_agents: Default::default(),
            read_delay: None,
            build_changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Makes every record a snapshot reads take `delay` (tests of slow stores).
    #[cfg(test)]
    pub fn slow_reads(&mut self, delay: Duration) {
        self.read_delay = Some(delay);
    }

    fn read_delay(&self) {
        if let Some(d) = self.read_delay {
            std::thread::sleep(d);
        }
    }

    fn deleted_agents(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        // A plain set, each update complete: a panic elsewhere cannot corrupt it.
        self.deleted_agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_reports_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _first = Store::open(&path).unwrap();
        assert!(matches!(Store::open(&path), Err(StoreError::InUse(_))));
    }
}
