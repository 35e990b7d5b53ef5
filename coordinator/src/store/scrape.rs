//! What a `/metrics` scrape reads of the store: every agent with its workspace's
//! names and apps, its connection times and reports, from one read transaction, and
//! a [`ScrapeCache`] of the last scrape so that records whose bytes did not change are
//! not decoded again.

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh::Timestamp;
use mesh::api::{AgentStats, AppHealth, LifecycleState};
use redb::{ReadableDatabase, ReadableTable};
use serde::Deserialize;

use super::tables::{AGENT_CONNECTIONS, AGENT_REPORTS, WORKSPACES, decode};
use super::workspaces::workspace_changes;
use super::{Store, StoreError, StoredConnection};

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

impl Store {
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
}
