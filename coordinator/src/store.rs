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
//! [`WorkspacesMut`], which counts every write transaction that changes one in the
//! `changes` table; a scrape reads the workspaces again only when that count moved.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh::api::{
    AgentStats, App, AppHealth, LifecycleState, LogLine, MetadataSpec, MetadataValue, Script,
};
use mesh::{Name, Timestamp};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// username -> [`UserRecord`]
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// token id -> [`TokenRecord`]
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// `owner/name` of a named API token -> token id
const TOKEN_NAMES: TableDefinition<&str, &str> = TableDefinition::new("token_names");
/// workspace id -> [`WorkspaceRecord`]
const WORKSPACES: TableDefinition<&str, &[u8]> = TableDefinition::new("workspaces");
/// `owner/name` of a workspace -> workspace id
const WORKSPACE_NAMES: TableDefinition<&str, &str> = TableDefinition::new("workspace_names");
/// agent id -> (first connected, last connected, disconnected) in Unix milliseconds,
/// 0 for never: fixed width, rewritten by every flushed heartbeat.
const AGENT_CONNECTIONS: TableDefinition<&str, (u64, u64, u64)> =
    TableDefinition::new("agent_connections");
/// agent id -> [`AgentReports`]
const AGENT_REPORTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agent_reports");
/// (agent id, sequence number) -> [`LogLine`]
const AGENT_LOGS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("agent_logs");
/// What changed, as counters: [`WORKSPACES_CHANGED`] counts the write transactions
/// that inserted or removed workspace records, so a scrape learns with one lookup
/// that none changed since it last read them all.
/// endpoint id (hex) -> agent id: one endpoint belongs to one agent.
const AGENT_ENDPOINTS: TableDefinition<&str, &str> = TableDefinition::new("agent_endpoints");
const CHANGES: TableDefinition<&str, u64> = TableDefinition::new("changes");

mod lifecycle;
pub use lifecycle::{
    ClaimedJob, JobRecord, ProvisionerKey, TemplateVersionRecord, WorkspaceChange,
};
const WORKSPACES_CHANGED: &str = "workspaces";

/// Script log lines kept per agent; older ones are dropped as new ones arrive.
pub const MAX_LOG_LINES: u64 = 10_000;

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
    /// The first user exists already.
    #[error("the first user has already been created")]
    FirstUserExists,
    /// A record with this unique name exists already.
    #[error("{0} already exists")]
    Conflict(String),
    /// The record to change does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A user to delete still owns workspaces.
    #[error("user {0} still owns workspaces")]
    OwnsWorkspaces(String),
    /// A template to delete is used by workspaces (named).
    #[error("{0}")]
    TemplateInUse(String),
    /// A workspace made without a template has no machine to start or stop.
    #[error(
        "workspace {0} was made without a template; there is no machine to start, stop or build"
    )]
    NoTemplate(String),
    /// A build of the workspace has not ended.
    #[error("{0}")]
    Busy(String),
    /// The owner already has as many of these as their quota allows.
    #[error("{what} of {owner}: the quota of {max} is reached")]
    Quota {
        what: &'static str,
        owner: String,
        max: usize,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    pub username: Name,
    /// PHC string of an argon2id hash.
    pub password_hash: String,
    pub admin: bool,
    pub created_at: Timestamp,
    /// A disabled user cannot log in, and every token of theirs is refused.
    #[serde(default)]
    pub disabled: bool,
}

/// What a token lets its bearer act as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenKind {
    /// Made by a password login; `myco logout` revokes it.
    Session { user: Name },
    /// A named API token (`myco tokens create`).
    Api { user: Name, name: Name },
    /// The token a workspace agent authenticates with.
    Agent {
        workspace_id: String,
        agent_id: String,
    },
    /// The key of an external provisioner (`myco provisioner-keys create NAME`).
    Provisioner { name: Name },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The public half of the token, its key in the store.
    pub id: String,
    /// Hex SHA-256 of the secret half. The secret itself is never stored.
    pub secret_sha256: String,
    pub kind: TokenKind,
    pub created_at: Timestamp,
    /// `None`: valid until revoked (agent tokens, which are rotated instead).
    pub expires_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: String,
    pub name: Name,
    pub created_at: Timestamp,
    /// Id of the agent's current [`TokenRecord`].
    pub token_id: String,
    pub apps: Vec<App>,
    pub startup_script: Option<Script>,
    pub shutdown_script: Option<Script>,
    #[serde(default)]
    pub metadata: Vec<MetadataSpec>,
    /// The SSH host key the agent last reported, OpenSSH format; pinned by clients.
    #[serde(default)]
    pub ssh_host_key: Option<String>,
    /// The mesh endpoint id (hex) the agent last proved it holds the key of.
    #[serde(default)]
    pub endpoint_id: Option<String>,
}

/// What [`Store::claim_agent_endpoint`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointClaim {
    /// The agent already held this endpoint id.
    Unchanged,
    /// Recorded for the agent; it held `previous` before (a new key).
    Claimed { previous: Option<String> },
    /// Another agent holds it; nothing was written.
    Taken { by_agent: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    pub id: String,
    pub owner: Name,
    pub name: Name,
    pub created_at: Timestamp,
    pub agents: Vec<AgentRecord>,
    /// What it was made from; `None`: made without a template (no builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<mesh::api::TemplateRef>,
    /// Its latest build, which its state follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_build: Option<mesh::api::Build>,
    /// Auto-stop this long (ms) after its start without activity; `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Activity keeps it up at least this long (ms) after it is seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_bump_ms: Option<u64>,
    /// When a running workspace with a TTL is stopped unless used before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    /// Auto-start schedule (`Mon-Fri 09:00 Europe/Berlin`) and its next occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start: Option<Timestamp>,
}

impl WorkspaceRecord {
    /// Its state: from its latest build; `running` without a template.
    pub fn state(&self) -> mesh::api::WorkspaceState {
        self.latest_build.as_ref().map_or(
            mesh::api::WorkspaceState::Running,
            mesh::api::WorkspaceState::of,
        )
    }
}

/// When an agent's control channels came and went; what its status is judged from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredConnection {
    pub first_connected_at: Option<Timestamp>,
    /// Refreshed by every heartbeat.
    pub last_connected_at: Option<Timestamp>,
    /// Written when a control channel ends.
    pub disconnected_at: Option<Timestamp>,
}

impl StoredConnection {
    fn to_row(self) -> (u64, u64, u64) {
        let ms = |t: Option<Timestamp>| t.map_or(0, Timestamp::unix_millis);
        (
            ms(self.first_connected_at),
            ms(self.last_connected_at),
            ms(self.disconnected_at),
        )
    }

    fn from_row((first, last, gone): (u64, u64, u64)) -> Self {
        let t = |ms: u64| (ms != 0).then(|| Timestamp::from_unix_millis(ms));
        Self {
            first_connected_at: t(first),
            last_connected_at: t(last),
            disconnected_at: t(gone),
        }
    }
}

/// What an agent last reported besides its heartbeats.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentReports {
    #[serde(default)]
    pub lifecycle_state: LifecycleState,
    #[serde(default)]
    pub lifecycle_changed_at: Option<Timestamp>,
    #[serde(default)]
    pub apps_health: BTreeMap<Name, AppHealth>,
    #[serde(default)]
    pub stats: Option<AgentStats>,
    /// By key.
    #[serde(default)]
    pub metadata: BTreeMap<Name, MetadataValue>,
    #[serde(default)]
    pub netcheck: Option<mesh::api::NetcheckResult>,
}

/// One group commit of agent state: whatever changed since the last one.
#[derive(Debug, Default)]
pub struct AgentStateBatch {
    pub connections: Vec<(String, StoredConnection)>,
    pub reports: Vec<(String, AgentReports)>,
    /// New log lines per agent, oldest first.
    pub logs: Vec<(String, Vec<LogLine>)>,
}

impl AgentStateBatch {
    pub fn is_empty(&self) -> bool {
        self.connections.is_empty() && self.reports.is_empty() && self.logs.is_empty()
    }
}

/// Workspaces and their agents' state, read in one transaction.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub workspaces: Vec<WorkspaceRecord>,
    /// By agent id; agents that never connected have no entry.
    pub connections: HashMap<String, StoredConnection>,
    /// By agent id; agents that never reported have no entry.
    pub reports: HashMap<String, AgentReports>,
}

/// What a scrape needs of a workspace: names, agents and app slugs, decoded without
/// the fields it does not (tokens, URLs, scripts), which it skips unallocated.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkspaceSummary {
    pub owner: String,
    pub name: String,
    pub agents: Vec<AgentSummary>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AgentSummary {
    pub id: String,
    pub name: String,
    pub created_at: Timestamp,
    pub apps: Vec<AppSummary>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AppSummary {
    pub slug: String,
    #[serde(default)]
    pub healthcheck: Option<serde::de::IgnoredAny>,
}

/// What a scrape needs of an agent's reports (not its metadata).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReportsSummary {
    #[serde(default)]
    pub lifecycle_state: LifecycleState,
    #[serde(default)]
    pub apps_health: BTreeMap<String, AppHealth>,
    #[serde(default)]
    pub stats: Option<AgentStats>,
}

/// One agent of a scrape: where it is in its workspace, its state, and room for what
/// the caller derives from it (`kept`), which stays with the agent from scrape to
/// scrape.
#[derive(Debug)]
pub struct ScrapeAgent<K> {
    id: Box<str>,
    pub workspace: Arc<WorkspaceSummary>,
    /// Index into `workspace.agents`.
    pub index: usize,
    /// Where its workspace is in [`ScrapeView::workspaces`].
    pub workspace_slot: usize,
    /// The agent's `created_at`, copied here so that judging every agent does not
    /// chase pointers into workspace records.
    pub created_at: Timestamp,
    pub connection: StoredConnection,
    /// Boxed: a scrape walks every agent several times, and most of them in a large
    /// store are agents that never reported.
    pub reports: Option<Box<ReportsSummary>>,
    /// The bytes `reports` was decoded from.
    report_bytes: Vec<u8>,
    /// Changes whenever the agent's workspace record or its reports change, and not
    /// when only its connection times do (every heartbeat moves those): what the
    /// caller derived from the agent at one revision holds while the revision does.
    /// Never 0.
    pub revision: u64,
    pub kept: K,
}

impl<K> ScrapeAgent<K> {
    pub fn agent(&self) -> &AgentSummary {
        &self.workspace.agents[self.index]
    }
}

/// The agents of the last scrape with the bytes their records were decoded from, kept
/// so that the next scrape decodes only records whose bytes changed and its caller can
/// keep what it derived from each agent. Only a cache: every scrape still reads every
/// row of one read transaction and compares it with what is kept here.
#[derive(Debug)]
pub struct ScrapeCache<K> {
    /// Workspace ids and record bytes, in key order, beside `workspaces`.
    workspace_rows: Vec<(Box<str>, Box<[u8]>)>,
    workspaces: Vec<Arc<WorkspaceSummary>>,
    /// Sorted by id, the order of the agent tables, so their rows are merge joined.
    agents: Vec<ScrapeAgent<K>>,
    last_revision: u64,
    /// The store's count of workspace changes when `workspaces` was read.
    workspace_changes: Option<u64>,
}

impl<K> Default for ScrapeCache<K> {
    fn default() -> Self {
        Self {
            workspace_rows: Vec::new(),
            workspaces: Vec::new(),
            agents: Vec::new(),
            last_revision: 0,
            workspace_changes: None,
        }
    }
}

/// What one scrape read: every workspace (in key order) and every agent (by id).
#[derive(Debug)]
pub struct ScrapeView<'a, K> {
    pub workspaces: &'a [Arc<WorkspaceSummary>],
    pub agents: &'a mut [ScrapeAgent<K>],
}

/// One step of a merge join of `agents` (sorted by id) with a table read in key
/// order: moves `cursor` past the agents before `id`, which have no row (`skipped` is
/// called on each), and past the agent with `id`, which it returns.
fn join_step<'a, K>(
    agents: &'a mut [ScrapeAgent<K>],
    cursor: &mut usize,
    id: &str,
    mut skipped: impl FnMut(&mut ScrapeAgent<K>),
) -> Option<&'a mut ScrapeAgent<K>> {
    loop {
        match (*agents.get(*cursor)?.id).cmp(id) {
            std::cmp::Ordering::Less => skipped(&mut agents[*cursor]),
            std::cmp::Ordering::Equal => {
                *cursor += 1;
                return agents.get_mut(*cursor - 1);
            }
            std::cmp::Ordering::Greater => return None,
        }
        *cursor += 1;
    }
}

fn next_revision(last: &mut u64) -> u64 {
    *last += 1;
    *last
}

impl<K: Default> ScrapeCache<K> {
    /// Rebuilds the agent list after workspaces came, went or changed. Agents still
    /// there keep their decoded reports and `kept`; their revision changes only if
    /// their workspace record did.
    fn relayout(&mut self) {
        let mut agents = Vec::with_capacity(self.agents.len());
        for (slot, ws) in self.workspaces.iter().enumerate() {
            for (index, a) in ws.agents.iter().enumerate() {
                agents.push(ScrapeAgent {
                    id: a.id.as_str().into(),
                    workspace: ws.clone(),
                    index,
                    workspace_slot: slot,
                    created_at: a.created_at,
                    connection: StoredConnection::default(),
                    reports: None,
                    report_bytes: Vec::new(),
                    revision: 0,
                    kept: K::default(),
                });
            }
        }
        agents.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let mut old = std::mem::take(&mut self.agents).into_iter().peekable();
        for a in &mut agents {
            while old.next_if(|o| o.id < a.id).is_some() {}
            match old.next_if(|o| o.id == a.id) {
                Some(o) => {
                    a.connection = o.connection;
                    a.reports = o.reports;
                    a.report_bytes = o.report_bytes;
                    a.kept = o.kept;
                    a.revision = if Arc::ptr_eq(&o.workspace, &a.workspace) {
                        o.revision
                    } else {
                        next_revision(&mut self.last_revision)
                    };
                }
                None => a.revision = next_revision(&mut self.last_revision),
            }
        }
        self.agents = agents;
    }
}

/// The `workspaces` table opened in a write transaction: the only way its records are
/// written. The first insert or remove counts the transaction in `changes`.
struct WorkspacesMut<'t> {
    txn: &'t redb::WriteTransaction,
    table: redb::Table<'t, &'static str, &'static [u8]>,
    counted: bool,
}

impl<'t> WorkspacesMut<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            txn,
            table: txn.open_table(WORKSPACES)?,
            counted: false,
        })
    }

    fn get(&self, id: &str) -> Result<Option<WorkspaceRecord>, StoreError> {
        self.table
            .get(id)?
            .map(|v| decode("workspaces", id, v.value()))
            .transpose()
    }

    fn insert(&mut self, record: &WorkspaceRecord) -> Result<(), StoreError> {
        self.count()?;
        self.table
            .insert(record.id.as_str(), encode(record).as_slice())?;
        Ok(())
    }

    /// Removes a record and returns it.
    fn remove(&mut self, id: &str) -> Result<Option<WorkspaceRecord>, StoreError> {
        self.count()?;
        self.table
            .remove(id)?
            .map(|v| decode("workspaces", id, v.value()))
            .transpose()
    }

    fn count(&mut self) -> Result<(), StoreError> {
        if !self.counted {
            let mut changes = self.txn.open_table(CHANGES)?;
            let n = changes.get(WORKSPACES_CHANGED)?.map_or(0, |v| v.value());
            changes.insert(WORKSPACES_CHANGED, n.wrapping_add(1))?;
            self.counted = true;
        }
        Ok(())
    }
}

/// How many write transactions changed workspace records (see [`WorkspacesMut`]).
fn workspace_changes(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    Ok(txn
        .open_table(CHANGES)?
        .get(WORKSPACES_CHANGED)?
        .map_or(0, |v| v.value()))
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

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        table,
        key: key.to_owned(),
        source,
    })
}

fn name_key(owner: &Name, name: &Name) -> String {
    format!("{owner}/{name}")
}

/// Refuses one more name of `owner` in a `name_key`-keyed table holding `max` of
/// theirs already; counted inside the write, so concurrent creates cannot pass it.
fn check_quota(
    names: &redb::Table<&str, &str>,
    what: &'static str,
    owner: &Name,
    max: Option<usize>,
) -> Result<(), StoreError> {
    let Some(max) = max else { return Ok(()) };
    let prefix = format!("{owner}/");
    let mut n = 0;
    for row in names.range(prefix.as_str()..)? {
        let (k, _) = row?;
        if !k.value().starts_with(prefix.as_str()) {
            break;
        }
        n += 1;
        if n >= max {
            return Err(StoreError::Quota {
                what,
                owner: owner.to_string(),
                max,
            });
        }
    }
    Ok(())
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
        txn.open_table(lifecycle::TEMPLATES)?;
        txn.open_table(lifecycle::TEMPLATE_VERSIONS)?;
        txn.open_table(lifecycle::TEMPLATE_ARCHIVES)?;
        txn.open_table(lifecycle::BUILDS)?;
        txn.open_table(lifecycle::BUILD_LOGS)?;
        txn.open_table(lifecycle::JOBS)?;
        txn.open_table(lifecycle::PROVISIONER_KEYS)?;
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

    pub fn has_users(&self) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(!txn.open_table(USERS)?.is_empty()?)
    }

    /// Creates the first user, only while no user exists. The check and the insert are
    /// one write transaction, so two racing bootstraps cannot both succeed.
    pub fn create_first_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut users = txn.open_table(USERS)?;
            if !users.is_empty()? {
                return Err(StoreError::FirstUserExists);
            }
            users.insert(user.username.as_str(), encode(user).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn create_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut users = txn.open_table(USERS)?;
            if users.get(user.username.as_str())?.is_some() {
                return Err(StoreError::Conflict(format!("user {}", user.username)));
            }
            users.insert(user.username.as_str(), encode(user).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn user(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let users = txn.open_table(USERS)?;
        users
            .get(username)?
            .map(|v| decode("users", username, v.value()))
            .transpose()
    }

    pub fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let users = txn.open_table(USERS)?;
        let mut out = Vec::new();
        for row in users.iter()? {
            let (k, v) = row?;
            out.push(decode("users", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Stores a token. A named API token must be unique per owner, and is refused
    /// when its owner holds `max_api_tokens` already.
    pub fn insert_token(
        &self,
        token: &TokenRecord,
        max_api_tokens: Option<usize>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut tokens = txn.open_table(TOKENS)?;
            if let TokenKind::Api { user, name } = &token.kind {
                let mut names = txn.open_table(TOKEN_NAMES)?;
                let key = name_key(user, name);
                if names.get(key.as_str())?.is_some() {
                    return Err(StoreError::Conflict(format!("token {name} of {user}")));
                }
                check_quota(&names, "API tokens", user, max_api_tokens)?;
                names.insert(key.as_str(), token.id.as_str())?;
            }
            tokens.insert(token.id.as_str(), encode(token).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let tokens = txn.open_table(TOKENS)?;
        tokens
            .get(id)?
            .map(|v| decode("tokens", id, v.value()))
            .transpose()
    }

    /// The named API tokens of `owner`, or of everyone when `None`.
    pub fn api_tokens(&self, owner: Option<&Name>) -> Result<Vec<TokenRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let names = txn.open_table(TOKEN_NAMES)?;
        let tokens = txn.open_table(TOKENS)?;
        let mut out = Vec::new();
        let prefix = owner.map(|o| format!("{o}/"));
        let rows = match &prefix {
            Some(p) => names.range(p.as_str()..)?,
            None => names.iter()?,
        };
        for row in rows {
            let (k, id) = row?;
            if let Some(p) = &prefix
                && !k.value().starts_with(p.as_str())
            {
                break;
            }
            if let Some(v) = tokens.get(id.value())? {
                out.push(decode("tokens", id.value(), v.value())?);
            }
        }
        Ok(out)
    }

    /// Deletes a token by id. Returns whether it existed.
    pub fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = {
            let mut tokens = txn.open_table(TOKENS)?;
            let old = tokens
                .remove(id)?
                .map(|v| decode::<TokenRecord>("tokens", id, v.value()))
                .transpose()?;
            if let Some(TokenRecord {
                kind: TokenKind::Api { user, name },
                ..
            }) = &old
            {
                txn.open_table(TOKEN_NAMES)?
                    .remove(name_key(user, name).as_str())?;
            }
            old.is_some()
        };
        txn.commit()?;
        Ok(existed)
    }

    /// Changes user `username` with `change`; returns the record as stored.
    pub fn update_user(
        &self,
        username: &str,
        change: impl FnOnce(&mut UserRecord),
    ) -> Result<UserRecord, StoreError> {
        let txn = self.db.begin_write()?;
        let user = {
            let mut users = txn.open_table(USERS)?;
            let mut user: UserRecord = users
                .get(username)?
                .map(|v| decode("users", username, v.value()))
                .transpose()?
                .ok_or_else(|| StoreError::NotFound(format!("user {username}")))?;
            change(&mut user);
            users.insert(username, encode(&user).as_slice())?;
            user
        };
        txn.commit()?;
        Ok(user)
    }

    /// Deletes every login session and API token of `username`; returns the ids
    /// deleted.
    pub fn delete_user_tokens(&self, username: &str) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_write()?;
        let ids = Self::remove_user_tokens(&txn, username, None, false)?;
        txn.commit()?;
        Ok(ids)
    }

    /// Like [`Store::delete_user_tokens`], login sessions only, and all but `keep`
    /// (a token id).
    pub fn delete_user_sessions(
        &self,
        username: &str,
        keep: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_write()?;
        let ids = Self::remove_user_tokens(&txn, username, keep, true)?;
        txn.commit()?;
        Ok(ids)
    }

    /// A full scan of the tokens: rare admin operations only.
    fn remove_user_tokens(
        txn: &redb::WriteTransaction,
        username: &str,
        keep: Option<&str>,
        sessions_only: bool,
    ) -> Result<Vec<String>, StoreError> {
        let mut tokens = txn.open_table(TOKENS)?;
        let mut names = txn.open_table(TOKEN_NAMES)?;
        let mut gone = Vec::new();
        for row in tokens.iter()? {
            let (k, v) = row?;
            let t: TokenRecord = decode("tokens", k.value(), v.value())?;
            let owner = match &t.kind {
                TokenKind::Session { user } => user,
                TokenKind::Api { user, .. } if !sessions_only => user,
                TokenKind::Api { .. } | TokenKind::Agent { .. } | TokenKind::Provisioner { .. } => {
                    continue;
                }
            };
            if owner.as_str() == username && Some(t.id.as_str()) != keep {
                gone.push(t);
            }
        }
        for t in &gone {
            tokens.remove(t.id.as_str())?;
            if let TokenKind::Api { user, name } = &t.kind {
                names.remove(name_key(user, name).as_str())?;
            }
        }
        Ok(gone.into_iter().map(|t| t.id).collect())
    }

    /// Deletes user `username` and all their tokens, returning the tokens' ids;
    /// refused while they own workspaces.
    pub fn delete_user(&self, username: &Name) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_write()?;
        let ids = {
            let prefix = format!("{username}/");
            let owns = txn
                .open_table(WORKSPACE_NAMES)?
                .range(prefix.as_str()..)?
                .next()
                .transpose()?
                .is_some_and(|(k, _)| k.value().starts_with(prefix.as_str()));
            if owns {
                return Err(StoreError::OwnsWorkspaces(username.to_string()));
            }
            if txn.open_table(USERS)?.remove(username.as_str())?.is_none() {
                return Err(StoreError::NotFound(format!("user {username}")));
            }
            Self::remove_user_tokens(&txn, username.as_str(), None, false)?
        };
        txn.commit()?;
        Ok(ids)
    }

    /// Deletes `owner`'s API token called `name`. Returns its id if it existed.
    pub fn delete_api_token(
        &self,
        owner: &Name,
        name: &Name,
    ) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = {
            let mut names = txn.open_table(TOKEN_NAMES)?;
            let id = names
                .remove(name_key(owner, name).as_str())?
                .map(|v| v.value().to_owned());
            if let Some(id) = &id {
                txn.open_table(TOKENS)?.remove(id.as_str())?;
            }
            id
        };
        txn.commit()?;
        Ok(existed)
    }

    /// Creates a workspace and its agents' tokens in one transaction; refused when
    /// the owner holds `max_workspaces` already.
    pub fn create_workspace(
        &self,
        ws: &WorkspaceRecord,
        agent_tokens: &[TokenRecord],
        max_workspaces: Option<usize>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut names = txn.open_table(WORKSPACE_NAMES)?;
            let key = name_key(&ws.owner, &ws.name);
            if names.get(key.as_str())?.is_some() {
                return Err(StoreError::Conflict(format!("workspace {key}")));
            }
            check_quota(&names, "workspaces", &ws.owner, max_workspaces)?;
            names.insert(key.as_str(), ws.id.as_str())?;
            let mut ws = ws.clone();
            if ws.template.is_some() {
                let (owner, at) = (ws.owner.clone(), ws.created_at);
                lifecycle::queue_in(&txn, &mut ws, mesh::api::Transition::Start, Some(owner), at)?;
            }
            WorkspacesMut::open(&txn)?.insert(&ws)?;
            let mut tokens = txn.open_table(TOKENS)?;
            for t in agent_tokens {
                tokens.insert(t.id.as_str(), encode(t).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    pub fn workspace(
        &self,
        owner: &Name,
        name: &Name,
    ) -> Result<Option<WorkspaceRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let names = txn.open_table(WORKSPACE_NAMES)?;
        let Some(id) = names.get(name_key(owner, name).as_str())? else {
            return Ok(None);
        };
        let workspaces = txn.open_table(WORKSPACES)?;
        workspaces
            .get(id.value())?
            .map(|v| decode("workspaces", id.value(), v.value()))
            .transpose()
    }

    pub fn workspace_by_id(&self, id: &str) -> Result<Option<WorkspaceRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let workspaces = txn.open_table(WORKSPACES)?;
        workspaces
            .get(id)?
            .map(|v| decode("workspaces", id, v.value()))
            .transpose()
    }

    /// Workspaces of `owner`, or all when `None`, ordered by owner then name.
    pub fn workspaces(&self, owner: Option<&Name>) -> Result<Vec<WorkspaceRecord>, StoreError> {
        Self::workspaces_in(&self.db.begin_read()?, owner)
    }

    fn workspaces_in(
        txn: &redb::ReadTransaction,
        owner: Option<&Name>,
    ) -> Result<Vec<WorkspaceRecord>, StoreError> {
        let names = txn.open_table(WORKSPACE_NAMES)?;
        let workspaces = txn.open_table(WORKSPACES)?;
        let prefix = owner.map(|o| format!("{o}/"));
        let rows = match &prefix {
            Some(p) => names.range(p.as_str()..)?,
            None => names.iter()?,
        };
        let mut out = Vec::new();
        for row in rows {
            let (k, id) = row?;
            if let Some(p) = &prefix
                && !k.value().starts_with(p.as_str())
            {
                break;
            }
            if let Some(v) = workspaces.get(id.value())? {
                out.push(decode("workspaces", id.value(), v.value())?);
            }
        }
        Ok(out)
    }

    fn deleted_agents(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        // A plain set, each update complete: a panic elsewhere cannot corrupt it.
        self.deleted_agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes a workspace and its agents' tokens at once, whatever its builds
    /// (workspaces made without a template, and an admin's forced delete). Returns
    /// the deleted record.
    pub fn delete_workspace(
        &self,
        owner: &Name,
        name: &Name,
    ) -> Result<Option<WorkspaceRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let id = {
            let names = txn.open_table(WORKSPACE_NAMES)?;
            let Some(id) = names
                .get(name_key(owner, name).as_str())?
                .map(|v| v.value().to_owned())
            else {
                return Ok(None);
            };
            id
        };
        let deleted = self.delete_workspace_in(&txn, &id)?;
        self.commit_deletion(txn, deleted.as_ref())?;
        Ok(deleted)
    }

    /// Removes workspace `id` and everything of it in `txn`; the caller commits with
    /// [`Store::commit_deletion`].
    fn delete_workspace_in(
        &self,
        txn: &redb::WriteTransaction,
        id: &str,
    ) -> Result<Option<WorkspaceRecord>, StoreError> {
        let ws = WorkspacesMut::open(txn)?.remove(id)?;
        let Some(ws) = ws else {
            return Ok(None);
        };
        txn.open_table(WORKSPACE_NAMES)?
            .remove(name_key(&ws.owner, &ws.name).as_str())?;
        let mut tokens = txn.open_table(TOKENS)?;
        let mut connections = txn.open_table(AGENT_CONNECTIONS)?;
        let mut reports = txn.open_table(AGENT_REPORTS)?;
        let mut logs = txn.open_table(AGENT_LOGS)?;
        let mut endpoints = txn.open_table(AGENT_ENDPOINTS)?;
        for agent in &ws.agents {
            if let Some(e) = &agent.endpoint_id {
                endpoints.remove(e.as_str())?;
            }
            tokens.remove(agent.token_id.as_str())?;
            connections.remove(agent.id.as_str())?;
            reports.remove(agent.id.as_str())?;
            logs.retain_in(
                (agent.id.as_str(), 0)..=(agent.id.as_str(), u64::MAX),
                |_, _| false,
            )?;
        }
        txn.open_table(lifecycle::JOBS)?.remove(id)?;
        txn.open_table(lifecycle::BUILDS)?
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        txn.open_table(lifecycle::BUILD_LOGS)?
            .retain_in((id, 0, 0)..=(id, u64::MAX, u64::MAX), |_, _| false)?;
        Ok(Some(ws))
    }

    /// Commits a transaction that deleted `deleted`, marking its agents so that no
    /// flush of their state races the delete.
    fn commit_deletion(
        &self,
        txn: redb::WriteTransaction,
        deleted: Option<&WorkspaceRecord>,
    ) -> Result<(), StoreError> {
        // Marked before the commit, under this write transaction: a flush's write
        // transaction can only begin after it, and then sees the mark.
        let ids: Vec<String> = deleted
            .iter()
            .flat_map(|w| &w.agents)
            .map(|a| a.id.clone())
            .collect();
        let mut marks = self.deleted_agents();
        marks.extend(ids.iter().cloned());
        if let Err(e) = txn.commit() {
            for id in &ids {
                marks.remove(id);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Records that agent `agent_id` of workspace `workspace_id` holds the key of
    /// `endpoint` (hex), which it proved; refuses an endpoint another agent holds. A
    /// repeat is answered from a read transaction, so reconnects write nothing.
    pub fn claim_agent_endpoint(
        &self,
        workspace_id: &str,
        agent_id: &str,
        endpoint: &str,
    ) -> Result<EndpointClaim, StoreError> {
        {
            let txn = self.db.begin_read()?;
            let owner = txn.open_table(AGENT_ENDPOINTS)?.get(endpoint)?;
            match owner.as_ref().map(|o| o.value()) {
                Some(o) if o == agent_id => return Ok(EndpointClaim::Unchanged),
                Some(o) => {
                    return Ok(EndpointClaim::Taken {
                        by_agent: o.to_owned(),
                    });
                }
                None => {}
            }
        }
        let txn = self.db.begin_write()?;
        let claim = {
            let mut endpoints = txn.open_table(AGENT_ENDPOINTS)?;
            if let Some(o) = endpoints.get(endpoint)?.map(|o| o.value().to_owned()) {
                // Another channel claimed it between the read and this write.
                if o == agent_id {
                    return Ok(EndpointClaim::Unchanged);
                }
                return Ok(EndpointClaim::Taken { by_agent: o });
            }
            let mut workspaces = WorkspacesMut::open(&txn)?;
            let Some(mut ws) = workspaces.get(workspace_id)? else {
                return Err(StoreError::NotFound(format!("workspace {workspace_id}")));
            };
            let agent = ws
                .agents
                .iter_mut()
                .find(|a| a.id == agent_id)
                .ok_or_else(|| StoreError::NotFound(format!("agent {agent_id}")))?;
            let previous = agent.endpoint_id.replace(endpoint.to_owned());
            if let Some(old) = &previous {
                endpoints.remove(old.as_str())?;
            }
            endpoints.insert(endpoint, agent_id)?;
            workspaces.insert(&ws)?;
            EndpointClaim::Claimed { previous }
        };
        txn.commit()?;
        Ok(claim)
    }

    /// Records an agent's SSH host key. Returns whether it changed.
    pub fn set_agent_host_key(
        &self,
        workspace_id: &str,
        agent_id: &str,
        key: &str,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let changed = {
            let mut workspaces = WorkspacesMut::open(&txn)?;
            let Some(mut ws) = workspaces.get(workspace_id)? else {
                return Err(StoreError::NotFound(format!("workspace {workspace_id}")));
            };
            let agent = ws
                .agents
                .iter_mut()
                .find(|a| a.id == agent_id)
                .ok_or_else(|| StoreError::NotFound(format!("agent {agent_id}")))?;
            if agent.ssh_host_key.as_deref() == Some(key) {
                false
            } else {
                agent.ssh_host_key = Some(key.to_owned());
                workspaces.insert(&ws)?;
                true
            }
        };
        txn.commit()?;
        Ok(changed)
    }

    /// Workspaces of `owner` (all when `None`) with their agents' connection times and
    /// reports, from one read transaction: three range scans, no query per agent.
    pub fn snapshot(&self, owner: Option<&Name>) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read()?;
        let workspaces = Self::workspaces_in(&txn, owner)?;
        let mut snap = Snapshot {
            workspaces,
            ..Snapshot::default()
        };
        let wanted: Option<std::collections::HashSet<&str>> = owner.map(|_| {
            snap.workspaces
                .iter()
                .flat_map(|w| w.agents.iter().map(|a| a.id.as_str()))
                .collect()
        });
        let keep = |id: &str| wanted.as_ref().is_none_or(|w| w.contains(id));
        for row in txn.open_table(AGENT_CONNECTIONS)?.iter()? {
            let (k, v) = row?;
            self.read_delay();
            if keep(k.value()) {
                snap.connections
                    .insert(k.value().to_owned(), StoredConnection::from_row(v.value()));
            }
        }
        for row in txn.open_table(AGENT_REPORTS)?.iter()? {
            let (k, v) = row?;
            self.read_delay();
            if keep(k.value()) {
                snap.reports.insert(
                    k.value().to_owned(),
                    decode("agent_reports", k.value(), v.value())?,
                );
            }
        }
        Ok(snap)
    }

    /// Connection times and reports of some agents (one workspace's), in one read
    /// transaction.
    #[allow(clippy::type_complexity)]
    pub fn agents_state(
        &self,
        agent_ids: &[String],
    ) -> Result<
        (
            HashMap<String, StoredConnection>,
            HashMap<String, AgentReports>,
        ),
        StoreError,
    > {
        let txn = self.db.begin_read()?;
        let connections = txn.open_table(AGENT_CONNECTIONS)?;
        let reports = txn.open_table(AGENT_REPORTS)?;
        let (mut c, mut r) = (HashMap::new(), HashMap::new());
        for id in agent_ids {
            if let Some(v) = connections.get(id.as_str())? {
                c.insert(id.clone(), StoredConnection::from_row(v.value()));
            }
            if let Some(v) = reports.get(id.as_str())? {
                r.insert(id.clone(), decode("agent_reports", id, v.value())?);
            }
        }
        Ok((c, r))
    }

    /// Every agent a `/metrics` scrape judges, from one read transaction: the count of
    /// workspace changes, the workspaces (only when that count moved since the last
    /// scrape), connection times and reports, each table in one range scan, no query
    /// per agent. Agents come sorted by id, the order of the agent tables, so their
    /// rows are joined in one pass each. `cache` holds the last scrape's agents:
    /// records whose bytes did not change are not decoded again, and each agent's
    /// `revision` says whether anything but its connection times changed since.
    ///
    /// # Errors
    /// The store could not be read or a record decoded; `cache` is then emptied, so
    /// the next scrape starts afresh rather than from a mix of two snapshots.
    pub fn scrape<'c, K: Default>(
        &self,
        cache: &'c mut ScrapeCache<K>,
    ) -> Result<ScrapeView<'c, K>, StoreError> {
        if let Err(e) = self.scrape_into(cache) {
            *cache = ScrapeCache::default();
            return Err(e);
        }
        Ok(ScrapeView {
            workspaces: &cache.workspaces,
            agents: &mut cache.agents,
        })
    }

    fn scrape_into<K: Default>(&self, cache: &mut ScrapeCache<K>) -> Result<(), StoreError> {
        let txn = self.db.begin_read()?;
        let changes = workspace_changes(&txn)?;
        if cache.workspace_changes != Some(changes) {
            self.scrape_workspaces(&txn, cache)?;
            cache.workspace_changes = Some(changes);
        }
        self.scrape_agent_state(&txn, cache)
    }

    /// Reads every workspace record, merged with the last scrape's by id (both in key
    /// order); rebuilds the agent list if any came, went or changed.
    fn scrape_workspaces<K: Default>(
        &self,
        txn: &redb::ReadTransaction,
        cache: &mut ScrapeCache<K>,
    ) -> Result<(), StoreError> {
        let old_rows = std::mem::take(&mut cache.workspace_rows);
        let old_workspaces = std::mem::take(&mut cache.workspaces);
        let mut old = old_rows.into_iter().zip(old_workspaces).peekable();
        let mut relayout = false;
        for row in txn.open_table(WORKSPACES)?.iter()? {
            let (k, v) = row?;
            self.read_delay();
            let (id, bytes) = (k.value(), v.value());
            while old.next_if(|((old_id, _), _)| &**old_id < id).is_some() {
                relayout = true; // deleted
            }
            let (row, ws) = match old.next_if(|((old_id, _), _)| &**old_id == id) {
                Some(((old_id, old_bytes), ws)) if *old_bytes == *bytes => {
                    ((old_id, old_bytes), ws)
                }
                _ => {
                    relayout = true;
                    let ws = Arc::new(decode("workspaces", id, bytes)?);
                    ((id.into(), bytes.into()), ws)
                }
            };
            cache.workspace_rows.push(row);
            cache.workspaces.push(ws);
        }
        relayout |= old.next().is_some();
        if relayout {
            cache.relayout();
        }
        Ok(())
    }

    /// Connection times and reports of every agent, merge joined with the agent list.
    fn scrape_agent_state<K>(
        &self,
        txn: &redb::ReadTransaction,
        cache: &mut ScrapeCache<K>,
    ) -> Result<(), StoreError> {
        // Merge joins: both sides ascend by agent id. Rows of deleted agents are
        // skipped; agents without a row have no state.
        let ScrapeCache {
            agents,
            last_revision,
            ..
        } = cache;
        let mut cursor = 0;
        for row in txn.open_table(AGENT_CONNECTIONS)?.iter()? {
            let (k, v) = row?;
            self.read_delay();
            let skipped = |a: &mut ScrapeAgent<K>| a.connection = StoredConnection::default();
            if let Some(a) = join_step(agents, &mut cursor, k.value(), skipped) {
                a.connection = StoredConnection::from_row(v.value());
            }
        }
        for a in &mut agents[cursor..] {
            a.connection = StoredConnection::default();
        }

        let forget = |a: &mut ScrapeAgent<K>, last: &mut u64| {
            if a.reports.take().is_some() {
                a.report_bytes.clear();
                a.revision = next_revision(last);
            }
        };
        let mut cursor = 0;
        for row in txn.open_table(AGENT_REPORTS)?.iter()? {
            let (k, v) = row?;
            self.read_delay();
            let (id, bytes) = (k.value(), v.value());
            let skipped = |a: &mut ScrapeAgent<K>| forget(a, last_revision);
            if let Some(a) = join_step(agents, &mut cursor, id, skipped)
                && (a.reports.is_none() || a.report_bytes != bytes)
            {
                a.reports = Some(Box::new(decode("agent_reports", id, bytes)?));
                a.report_bytes.clear();
                a.report_bytes.extend_from_slice(bytes);
                a.revision = next_revision(last_revision);
            }
        }
        for a in &mut agents[cursor..] {
            forget(a, last_revision);
        }
        Ok(())
    }

    /// One agent's connection times and reports, as the ledger starts from when the
    /// agent connects.
    pub fn agent_state(
        &self,
        agent_id: &str,
    ) -> Result<(StoredConnection, AgentReports), StoreError> {
        let txn = self.db.begin_read()?;
        let conn = txn
            .open_table(AGENT_CONNECTIONS)?
            .get(agent_id)?
            .map(|v| StoredConnection::from_row(v.value()))
            .unwrap_or_default();
        let reports = txn
            .open_table(AGENT_REPORTS)?
            .get(agent_id)?
            .map(|v| decode("agent_reports", agent_id, v.value()))
            .transpose()?
            .unwrap_or_default();
        Ok((conn, reports))
    }

    /// Writes one group commit of agent state in one transaction. Log lines get the
    /// next sequence numbers of their agent; beyond [`MAX_LOG_LINES`] the oldest go.
    pub fn write_agent_state(&self, batch: &AgentStateBatch) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let deleted = self.deleted_agents();
            let live = |id: &String| !deleted.contains(id);
            let mut connections = txn.open_table(AGENT_CONNECTIONS)?;
            for (id, c) in batch.connections.iter().filter(|(id, _)| live(id)) {
                connections.insert(id.as_str(), c.to_row())?;
            }
            let mut reports = txn.open_table(AGENT_REPORTS)?;
            for (id, r) in batch.reports.iter().filter(|(id, _)| live(id)) {
                reports.insert(id.as_str(), encode(r).as_slice())?;
            }
            let mut logs = txn.open_table(AGENT_LOGS)?;
            for (id, lines) in batch.logs.iter().filter(|(id, _)| live(id)) {
                let range = (id.as_str(), 0)..=(id.as_str(), u64::MAX);
                let (first, next) = {
                    let mut rows = logs.range(range.clone())?;
                    let first = rows.next().transpose()?.map(|(k, _)| k.value().1);
                    let last = rows.next_back().transpose()?.map(|(k, _)| k.value().1);
                    (first, last.or(first).map_or(0, |l| l + 1))
                };
                for (i, line) in (next..).zip(lines) {
                    logs.insert((id.as_str(), i), encode(line).as_slice())?;
                }
                let end = next + lines.len() as u64;
                let keep_from = end.saturating_sub(MAX_LOG_LINES);
                if first.unwrap_or(next) < keep_from {
                    logs.retain_in((id.as_str(), 0)..(id.as_str(), keep_from), |_, _| false)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// An agent's script log lines, oldest first; at most the last `limit`.
    pub fn agent_logs(&self, agent_id: &str, limit: usize) -> Result<Vec<LogLine>, StoreError> {
        let txn = self.db.begin_read()?;
        let logs = txn.open_table(AGENT_LOGS)?;
        let mut out = Vec::new();
        for row in logs.range((agent_id, 0)..=(agent_id, u64::MAX))?.rev() {
            if out.len() == limit {
                break;
            }
            let (k, v) = row?;
            out.push(decode("agent_logs", &k.value().1.to_string(), v.value())?);
        }
        out.reverse();
        Ok(out)
    }

    /// Replaces an agent's token: the old one stops working in the same transaction
    /// that stores the new one.
    pub fn rotate_agent_token(
        &self,
        owner: &Name,
        workspace: &Name,
        agent: &Name,
        new_token: &TokenRecord,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let names = txn.open_table(WORKSPACE_NAMES)?;
            let key = name_key(owner, workspace);
            let id = names
                .get(key.as_str())?
                .map(|v| v.value().to_owned())
                .ok_or_else(|| StoreError::NotFound(format!("workspace {key}")))?;
            let mut workspaces = WorkspacesMut::open(&txn)?;
            let mut ws = workspaces
                .get(id.as_str())?
                .ok_or_else(|| StoreError::NotFound(format!("workspace {key}")))?;
            let rec = ws
                .agents
                .iter_mut()
                .find(|a| &a.name == agent)
                .ok_or_else(|| StoreError::NotFound(format!("agent {agent} of workspace {key}")))?;
            let mut tokens = txn.open_table(TOKENS)?;
            tokens.remove(rec.token_id.as_str())?;
            tokens.insert(new_token.id.as_str(), encode(new_token).as_slice())?;
            rec.token_id = new_token.id.clone();
            workspaces.insert(&ws)?;
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn user(n: &str) -> UserRecord {
        UserRecord {
            username: name(n),
            password_hash: "x".into(),
            admin: false,
            created_at: Timestamp::from_unix_millis(1),
            disabled: false,
        }
    }

    fn ws(owner: &str, n: &str, id: &str) -> WorkspaceRecord {
        WorkspaceRecord {
            template: None,
            latest_build: None,
            ttl_ms: None,
            activity_bump_ms: None,
            deadline: None,
            autostart: None,
            next_start: None,
            id: id.into(),
            owner: name(owner),
            name: name(n),
            created_at: Timestamp::from_unix_millis(1),
            agents: vec![AgentRecord {
                id: format!("{id}-a"),
                name: name("main"),
                created_at: Timestamp::from_unix_millis(1),
                token_id: format!("{id}-t"),
                apps: vec![],
                startup_script: None,
                shutdown_script: None,
                metadata: vec![],
                ssh_host_key: None,
                endpoint_id: None,
            }],
        }
    }

    fn agent_token(id: &str) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            secret_sha256: "00".into(),
            kind: TokenKind::Agent {
                workspace_id: "w".into(),
                agent_id: "a".into(),
            },
            created_at: Timestamp::from_unix_millis(1),
            expires_at: None,
        }
    }

    #[test]
    fn an_endpoint_belongs_to_one_agent_until_its_workspace_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store
            .create_workspace(&ws("alice", "a", "1"), &[agent_token("1-t")], None)
            .unwrap();
        store
            .create_workspace(&ws("bob", "b", "2"), &[agent_token("2-t")], None)
            .unwrap();
        assert_eq!(
            store.claim_agent_endpoint("1", "1-a", "e1").unwrap(),
            EndpointClaim::Claimed { previous: None }
        );
        assert_eq!(
            store.claim_agent_endpoint("1", "1-a", "e1").unwrap(),
            EndpointClaim::Unchanged
        );
        // Bob's agent announcing alice's endpoint is refused, and nothing changes.
        assert_eq!(
            store.claim_agent_endpoint("2", "2-a", "e1").unwrap(),
            EndpointClaim::Taken {
                by_agent: "1-a".into()
            }
        );
        // Alice's agent with a new key frees the old one.
        assert_eq!(
            store.claim_agent_endpoint("1", "1-a", "e2").unwrap(),
            EndpointClaim::Claimed {
                previous: Some("e1".into())
            }
        );
        assert_eq!(
            store.claim_agent_endpoint("2", "2-a", "e1").unwrap(),
            EndpointClaim::Claimed { previous: None }
        );
        // A deleted workspace's endpoint is free again.
        store.delete_workspace(&name("alice"), &name("a")).unwrap();
        assert_eq!(
            store.claim_agent_endpoint("2", "2-a", "e2").unwrap(),
            EndpointClaim::Claimed {
                previous: Some("e1".into())
            }
        );
    }

    #[test]
    fn no_rows_are_written_for_agents_of_a_deleted_workspace() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store
            .create_workspace(&ws("alice", "a", "1"), &[agent_token("1-t")], None)
            .unwrap();
        let conn = StoredConnection {
            first_connected_at: Some(Timestamp::from_unix_millis(5)),
            last_connected_at: Some(Timestamp::from_unix_millis(5)),
            disconnected_at: None,
        };
        let batch = AgentStateBatch {
            connections: vec![("1-a".into(), conn)],
            ..AgentStateBatch::default()
        };
        store.write_agent_state(&batch).unwrap();
        assert!(
            store
                .agent_state("1-a")
                .unwrap()
                .0
                .last_connected_at
                .is_some()
        );
        store.delete_workspace(&name("alice"), &name("a")).unwrap();
        // A flush that took its batch before the delete writes after it.
        store.write_agent_state(&batch).unwrap();
        assert_eq!(
            store.agent_state("1-a").unwrap().0,
            StoredConnection::default()
        );
    }

    #[test]
    fn first_user_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        assert!(!store.has_users().unwrap());
        store.create_first_user(&user("alice")).unwrap();
        assert!(matches!(
            store.create_first_user(&user("bob")),
            Err(StoreError::FirstUserExists)
        ));
        assert!(matches!(
            store.create_user(&user("alice")),
            Err(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn workspaces_by_owner_and_prefix_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        // "al" is a prefix of "alice": listing al's workspaces must not include alice's.
        store
            .create_workspace(&ws("al", "x", "1"), &[agent_token("1-t")], None)
            .unwrap();
        store
            .create_workspace(&ws("alice", "y", "2"), &[agent_token("2-t")], None)
            .unwrap();
        store
            .create_workspace(&ws("bob", "z", "3"), &[agent_token("3-t")], None)
            .unwrap();
        let al: Vec<_> = store.workspaces(Some(&name("al"))).unwrap();
        assert_eq!(al.len(), 1);
        assert_eq!(al[0].name.as_str(), "x");
        assert_eq!(store.workspaces(None).unwrap().len(), 3);
        assert!(matches!(
            store.create_workspace(&ws("al", "x", "4"), &[], None),
            Err(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn delete_workspace_removes_agent_tokens_and_rotation_replaces_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store
            .create_workspace(&ws("bob", "z", "3"), &[agent_token("3-t")], None)
            .unwrap();
        store
            .rotate_agent_token(&name("bob"), &name("z"), &name("main"), &agent_token("new"))
            .unwrap();
        assert!(store.token("3-t").unwrap().is_none());
        assert!(store.token("new").unwrap().is_some());
        assert!(
            store
                .delete_workspace(&name("bob"), &name("z"))
                .unwrap()
                .is_some()
        );
        assert!(store.token("new").unwrap().is_none());
        assert!(
            store
                .delete_workspace(&name("bob"), &name("z"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn every_write_of_a_workspace_record_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let changes = || workspace_changes(&store.db.begin_read().unwrap()).unwrap();
        assert_eq!(changes(), 0);
        store
            .create_workspace(&ws("bob", "z", "3"), &[agent_token("3-t")], None)
            .unwrap();
        assert_eq!(changes(), 1);
        assert!(
            store
                .set_agent_host_key("3", "3-a", "ssh-ed25519 A")
                .unwrap()
        );
        assert_eq!(changes(), 2);
        assert!(
            !store
                .set_agent_host_key("3", "3-a", "ssh-ed25519 A")
                .unwrap()
        );
        assert_eq!(changes(), 2, "nothing was written");
        store
            .rotate_agent_token(&name("bob"), &name("z"), &name("main"), &agent_token("new"))
            .unwrap();
        assert_eq!(changes(), 3);
        assert!(
            store
                .delete_workspace(&name("bob"), &name("z"))
                .unwrap()
                .is_some()
        );
        assert_eq!(changes(), 4);
    }

    #[test]
    fn second_open_reports_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _first = Store::open(&path).unwrap();
        assert!(matches!(Store::open(&path), Err(StoreError::InUse(_))));
    }
}
