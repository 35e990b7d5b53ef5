//! Workspaces: creating, listing and deleting them (with their agents' tokens and
//! state), and what their agents record in them (endpoint, SSH host key, token).
//! Workspace records are written only through [`WorkspacesMut`] (an invariant of the
//! store, stated in its module doc).

use mesh::Name;
use redb::{ReadableDatabase, ReadableTable};

use super::lifecycle;
use super::tables::CheckQuotaError;
use super::tables::{
    AGENT_CONNECTIONS, AGENT_ENDPOINTS, AGENT_LOGS, AGENT_REPORTS, CHANGES, TOKENS,
    WORKSPACE_NAMES, WORKSPACES, WORKSPACES_CHANGED, check_quota, decode, encode, name_key,
};
use super::{QuotaReached, Store, StoreError, TokenRecord, WorkspaceRecord, store_failure};

/// Why [`Store::create_workspace`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateWorkspaceError {
    /// The owner has a workspace of this name (`owner/name`).
    #[error("workspace {0} already exists")]
    Exists(String),
    /// The owner holds as many workspaces as their quota allows.
    #[error(transparent)]
    Quota(QuotaReached),
    /// The workspace's first build (from its template) could not be queued.
    #[error(transparent)]
    Build(#[from] lifecycle::QueueBuildError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CheckQuotaError> for CreateWorkspaceError {
    fn from(e: CheckQuotaError) -> Self {
        match e {
            CheckQuotaError::Reached(q) => Self::Quota(q),
            CheckQuotaError::Store(e) => Self::Store(e),
        }
    }
}

/// Why [`Store::rotate_agent_token`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RotateAgentTokenError {
    /// No workspace of this `owner/name`.
    #[error("workspace {0} not found")]
    WorkspaceNotFound(String),
    /// The workspace (`owner/name`) has no agent of this name.
    #[error("agent {agent} of workspace {workspace} not found")]
    AgentNotFound { agent: Name, workspace: String },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why [`Store::claim_agent_endpoint`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimEndpointError {
    /// No workspace has this id: it was deleted while its agent was connected.
    #[error("workspace {0} not found")]
    WorkspaceNotFound(String),
    /// The workspace has no agent of this id.
    #[error("agent {0} not found")]
    AgentNotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why [`Store::set_agent_host_key`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SetHostKeyError {
    /// No workspace has this id: it was deleted while its agent was connected.
    #[error("workspace {0} not found")]
    WorkspaceNotFound(String),
    /// The workspace has no agent of this id.
    #[error("agent {0} not found")]
    AgentNotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

store_failure!(
    CreateWorkspaceError,
    RotateAgentTokenError,
    ClaimEndpointError,
    SetHostKeyError
);

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

/// The `workspaces` table opened in a write transaction: the only way its records are
/// written. The first insert or remove counts the transaction in `changes`.
pub(super) struct WorkspacesMut<'t> {
    txn: &'t redb::WriteTransaction,
    table: redb::Table<'t, &'static str, &'static [u8]>,
    counted: bool,
}

impl<'t> WorkspacesMut<'t> {
    pub(super) fn open(txn: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            txn,
            table: txn.open_table(WORKSPACES)?,
            counted: false,
        })
    }

    pub(super) fn get(&self, id: &str) -> Result<Option<WorkspaceRecord>, StoreError> {
        self.table
            .get(id)?
            .map(|v| decode("workspaces", id, v.value()))
            .transpose()
    }

    pub(super) fn insert(&mut self, record: &WorkspaceRecord) -> Result<(), StoreError> {
        self.count()?;
        self.table
            .insert(record.id.as_str(), encode(record).as_slice())?;
        Ok(())
    }

    /// Removes a record and returns it.
    pub(super) fn remove(&mut self, id: &str) -> Result<Option<WorkspaceRecord>, StoreError> {
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
pub(super) fn workspace_changes(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    Ok(txn
        .open_table(CHANGES)?
        .get(WORKSPACES_CHANGED)?
        .map_or(0, |v| v.value()))
}

impl Store {
    /// Creates a workspace and its agents' tokens in one transaction; refused when
    /// the owner holds `max_workspaces` already.
    pub fn create_workspace(
        &self,
        ws: &WorkspaceRecord,
        agent_tokens: &[TokenRecord],
        max_workspaces: Option<usize>,
    ) -> Result<(), CreateWorkspaceError> {
        let txn = self.db.begin_write()?;
        {
            let mut names = txn.open_table(WORKSPACE_NAMES)?;
            let key = name_key(&ws.owner, &ws.name);
            if names.get(key.as_str())?.is_some() {
                return Err(CreateWorkspaceError::Exists(key));
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

    pub(super) fn workspaces_in(
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
    pub(super) fn delete_workspace_in(
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
    pub(super) fn commit_deletion(
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
    ) -> Result<EndpointClaim, ClaimEndpointError> {
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
                return Err(ClaimEndpointError::WorkspaceNotFound(
                    workspace_id.to_owned(),
                ));
            };
            let agent = ws
                .agents
                .iter_mut()
                .find(|a| a.id == agent_id)
                .ok_or_else(|| ClaimEndpointError::AgentNotFound(agent_id.to_owned()))?;
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
    ) -> Result<bool, SetHostKeyError> {
        let txn = self.db.begin_write()?;
        let changed = {
            let mut workspaces = WorkspacesMut::open(&txn)?;
            let Some(mut ws) = workspaces.get(workspace_id)? else {
                return Err(SetHostKeyError::WorkspaceNotFound(workspace_id.to_owned()));
            };
            let agent = ws
                .agents
                .iter_mut()
                .find(|a| a.id == agent_id)
                .ok_or_else(|| SetHostKeyError::AgentNotFound(agent_id.to_owned()))?;
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

    /// Replaces an agent's token: the old one stops working in the same transaction
    /// that stores the new one.
    pub fn rotate_agent_token(
        &self,
        owner: &Name,
        workspace: &Name,
        agent: &Name,
        new_token: &TokenRecord,
    ) -> Result<(), RotateAgentTokenError> {
        let txn = self.db.begin_write()?;
        {
            let names = txn.open_table(WORKSPACE_NAMES)?;
            let key = name_key(owner, workspace);
            let id = names
                .get(key.as_str())?
                .map(|v| v.value().to_owned())
                .ok_or_else(|| RotateAgentTokenError::WorkspaceNotFound(key.clone()))?;
            let mut workspaces = WorkspacesMut::open(&txn)?;
            let mut ws = workspaces
                .get(id.as_str())?
                .ok_or_else(|| RotateAgentTokenError::WorkspaceNotFound(key.clone()))?;
            let rec = ws
                .agents
                .iter_mut()
                .find(|a| &a.name == agent)
                .ok_or_else(|| RotateAgentTokenError::AgentNotFound {
                    agent: agent.clone(),
                    workspace: key.clone(),
                })?;
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
    use crate::store::fixtures::{agent_token, name, ws};

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
            Err(CreateWorkspaceError::Exists(_))
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
}
