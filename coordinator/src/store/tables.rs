//! The store's redb tables (besides the build tables of `lifecycle`), and how records
//! are written in them: JSON, with name-index tables keyed `owner/name`.

use mesh::Name;
use redb::{ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use super::{QuotaReached, StoreError};

/// username -> [`UserRecord`](super::UserRecord)
pub(super) const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// token id -> [`TokenRecord`](super::TokenRecord)
pub(super) const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// `owner/name` of a named API token -> token id
pub(super) const TOKEN_NAMES: TableDefinition<&str, &str> = TableDefinition::new("token_names");
/// workspace id -> [`WorkspaceRecord`](super::WorkspaceRecord)
pub(super) const WORKSPACES: TableDefinition<&str, &[u8]> = TableDefinition::new("workspaces");
/// `owner/name` of a workspace -> workspace id
pub(super) const WORKSPACE_NAMES: TableDefinition<&str, &str> =
    TableDefinition::new("workspace_names");
/// agent id -> (first connected, last connected, disconnected) in Unix milliseconds,
/// 0 for never: fixed width, rewritten by every flushed heartbeat.
pub(super) const AGENT_CONNECTIONS: TableDefinition<&str, (u64, u64, u64)> =
    TableDefinition::new("agent_connections");
/// agent id -> [`AgentReports`](super::AgentReports)
pub(super) const AGENT_REPORTS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("agent_reports");
/// (agent id, sequence number) -> [`LogLine`](mesh::api::LogLine)
pub(super) const AGENT_LOGS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("agent_logs");
/// endpoint id (hex) -> agent id: one endpoint belongs to one agent.
pub(super) const AGENT_ENDPOINTS: TableDefinition<&str, &str> =
    TableDefinition::new("agent_endpoints");
/// What changed, as counters: [`WORKSPACES_CHANGED`] counts the write transactions
/// that inserted or removed workspace records, so a scrape learns with one lookup
/// that none changed since it last read them all.
pub(super) const CHANGES: TableDefinition<&str, u64> = TableDefinition::new("changes");
/// The key in [`CHANGES`] of the count of write transactions that changed workspace
/// records (see [`super::workspaces::WorkspacesMut`]).
pub(super) const WORKSPACES_CHANGED: &str = "workspaces";

pub(super) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

pub(super) fn decode<T: DeserializeOwned>(
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

/// Why [`check_quota`] refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum CheckQuotaError {
    /// The owner holds `max` already.
    #[error(transparent)]
    Reached(QuotaReached),
    /// Reading the names failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
super::store_failure!(CheckQuotaError);

pub(super) fn name_key(owner: &Name, name: &Name) -> String {
    format!("{owner}/{name}")
}

/// Refuses one more name of `owner` in a `name_key`-keyed table holding `max` of
/// theirs already; counted inside the write, so concurrent creates cannot pass it.
pub(super) fn check_quota(
    names: &redb::Table<&str, &str>,
    what: &'static str,
    owner: &Name,
    max: Option<usize>,
) -> Result<(), CheckQuotaError> {
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
            return Err(CheckQuotaError::Reached(QuotaReached {
                what,
                owner: owner.clone(),
                max,
            }));
        }
    }
    Ok(())
}
