//! What the store holds of users, tokens, workspaces and their agents: the records
//! as written (JSON) in `users`, `tokens` and `workspaces`.

use mesh::api::{App, MetadataSpec, Script};
use mesh::{Name, Timestamp};
use serde::{Deserialize, Serialize};

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
