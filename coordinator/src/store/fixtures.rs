//! Records the store's unit tests build on.

use mesh::{Name, Timestamp};

use super::{AgentRecord, TokenKind, TokenRecord, UserRecord, WorkspaceRecord};

pub(super) fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

pub(super) fn user(n: &str) -> UserRecord {
    UserRecord {
        username: name(n),
        password_hash: "x".into(),
        admin: false,
        created_at: Timestamp::from_unix_millis(1),
        disabled: false,
    }
}

pub(super) fn ws(owner: &str, n: &str, id: &str) -> WorkspaceRecord {
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

pub(super) fn agent_token(id: &str) -> TokenRecord {
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
