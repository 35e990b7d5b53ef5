//! What agents report (connection times, lifecycle, app health, stats, metadata,
//! script logs), in tables of its own keyed by agent id, written in batches by the
//! ledger's group commit ([`Store::write_agent_state`]), so heartbeats never rewrite
//! workspace records; and [`Store::snapshot`], which reads workspaces and all of that
//! in one read transaction.

use std::collections::{BTreeMap, HashMap};

use mesh::api::{AgentStats, AppHealth, LifecycleState, LogLine, MetadataValue};
use mesh::{Name, Timestamp};
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use super::tables::{AGENT_CONNECTIONS, AGENT_LOGS, AGENT_REPORTS, decode, encode};
use super::{Store, StoreError, WorkspaceRecord};

/// Script log lines kept per agent; older ones are dropped as new ones arrive.
pub const MAX_LOG_LINES: u64 = 10_000;

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
    pub(super) fn to_row(self) -> (u64, u64, u64) {
        let ms = |t: Option<Timestamp>| t.map_or(0, Timestamp::unix_millis);
        (
            ms(self.first_connected_at),
            ms(self.last_connected_at),
            ms(self.disconnected_at),
        )
    }

    pub(super) fn from_row((first, last, gone): (u64, u64, u64)) -> Self {
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

impl Store {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::{agent_token, name, ws};

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
}
