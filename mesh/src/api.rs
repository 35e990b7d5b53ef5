//! Request and response bodies of the coordinator's HTTP API (`/api/v1/...`).
//!
//! The coordinator serializes these and the CLI deserializes them, so both sides
//! always agree on the shape.

use serde::{Deserialize, Serialize};

use crate::{Name, Timestamp};

mod lifecycle;
pub use lifecycle::*;

/// Every API error body: what went wrong, and detail on why or what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(default)]
    pub detail: String,
}

/// `GET /api/v1/buildinfo`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildInfo {
    pub version: String,
}

/// `GET /api/v1/users/first`: whether the first user has been created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FirstUserStatus {
    pub exists: bool,
    /// Creating the first user needs the one-time setup code `myco server` printed
    /// (its listener is not on loopback).
    #[serde(default)]
    pub setup_code_required: bool,
}

/// A username and a password, as sent to `POST /api/v1/users/first` and
/// `POST /api/v1/users/login`.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub username: Name,
    pub password: String,
    /// For the first user only: the one-time code `myco server` printed, when it
    /// asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_code: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A new session token, returned once by login and first-user creation.
#[derive(Clone, Serialize, Deserialize)]
pub struct Session {
    pub user: User,
    pub token: String,
    pub expires_at: Timestamp,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user", &self.user)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub username: Name,
    pub admin: bool,
    pub created_at: Timestamp,
    /// A disabled user cannot log in and their tokens are refused.
    #[serde(default)]
    pub disabled: bool,
}

/// `PUT /api/v1/users/{name}/password`: a new password; the old one is needed when
/// users change their own.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangePassword {
    pub password: String,
    #[serde(default)]
    pub old_password: Option<String>,
}

impl std::fmt::Debug for ChangePassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangePassword").finish_non_exhaustive()
    }
}

/// Answer of `POST /api/v1/users/{name}/revoke` and the other calls that revoke a
/// user's sessions and tokens: how many were revoked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Revoked {
    pub tokens: usize,
}

/// `POST /api/v1/users` (admins only).
#[derive(Clone, Serialize, Deserialize)]
pub struct CreateUser {
    pub username: Name,
    pub password: String,
    #[serde(default)]
    pub admin: bool,
}

impl std::fmt::Debug for CreateUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateUser")
            .field("username", &self.username)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

/// `POST /api/v1/tokens`: a named API token of the caller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateToken {
    pub name: Name,
    /// Lifetime in seconds; the server's default (30 days) when absent.
    #[serde(default)]
    pub lifetime_seconds: Option<u64>,
}

/// A named API token as listed: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: Name,
    pub owner: Name,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
}

/// A token just created; `token` is shown this once and stored only as a hash.
#[derive(Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    pub info: TokenInfo,
    pub token: String,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// A health check the agent runs against an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub url: String,
    /// Seconds between checks.
    #[serde(default = "default_interval")]
    pub interval: u64,
    /// Consecutive failures before the app is unhealthy.
    #[serde(default = "default_threshold")]
    pub threshold: u32,
}

fn default_interval() -> u64 {
    10
}

fn default_threshold() -> u32 {
    3
}

/// An app an agent exposes, e.g. a web IDE on a local port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    pub slug: Name,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthCheck>,
}

/// A script the agent runs at start or at shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// Run with `$SHELL -c`.
    pub run: String,
    /// Seconds before the script is considered timed out.
    #[serde(default = "default_script_timeout")]
    pub timeout: u64,
}

fn default_script_timeout() -> u64 {
    300
}

/// A metadata item: a script the agent runs every `interval` seconds, whose output
/// (capped at [`METADATA_VALUE_MAX`] bytes) `myco show` displays under `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataSpec {
    pub key: Name,
    /// Shown instead of the key when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Run with `$SHELL -c`.
    pub script: String,
    /// Seconds between runs.
    #[serde(default = "default_interval")]
    pub interval: u64,
    /// Seconds before a run is killed and reported as timed out.
    #[serde(default = "default_metadata_timeout")]
    pub timeout: u64,
}

fn default_metadata_timeout() -> u64 {
    5
}

/// Longest metadata value kept, in bytes; longer output is cut at a character boundary.
pub const METADATA_VALUE_MAX: usize = 4096;

/// One agent of a workspace to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    pub name: Name,
    #[serde(default)]
    pub apps: Vec<App>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_script: Option<Script>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_script: Option<Script>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<MetadataSpec>,
}

/// Where an agent is in its life, driven by its startup and shutdown scripts
/// (Coder's states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleState {
    /// Known to the coordinator, never reported by the agent.
    #[default]
    Created,
    /// The startup script runs.
    Starting,
    /// The startup script outran its timeout (and was killed).
    StartTimeout,
    /// The startup script exited non-zero.
    StartError,
    /// Started (no startup script, or it exited 0).
    Ready,
    /// The shutdown script runs.
    ShuttingDown,
    ShutdownTimeout,
    ShutdownError,
    /// Shut down.
    Off,
}

impl LifecycleState {
    pub const ALL: [LifecycleState; 9] = [
        Self::Created,
        Self::Starting,
        Self::StartTimeout,
        Self::StartError,
        Self::Ready,
        Self::ShuttingDown,
        Self::ShutdownTimeout,
        Self::ShutdownError,
        Self::Off,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::StartTimeout => "start_timeout",
            Self::StartError => "start_error",
            Self::Ready => "ready",
            Self::ShuttingDown => "shutting_down",
            Self::ShutdownTimeout => "shutdown_timeout",
            Self::ShutdownError => "shutdown_error",
            Self::Off => "off",
        }
    }
}

impl std::fmt::Display for LifecycleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An app's health as its agent's checks see it (Coder's states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppHealth {
    /// The app has no health check.
    #[default]
    Disabled,
    /// Checked, but neither a success nor `threshold` failures yet.
    Initializing,
    /// The last check succeeded (any HTTP response below 500).
    Healthy,
    /// `threshold` consecutive checks failed.
    Unhealthy,
}

impl AppHealth {
    pub const ALL: [AppHealth; 4] = [
        Self::Disabled,
        Self::Initializing,
        Self::Healthy,
        Self::Unhealthy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Initializing => "initializing",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }
}

impl std::fmt::Display for AppHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an agent reports about its mesh traffic and sessions, sent every stats
/// interval; counters are totals since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Bytes received and sent on mesh connections from clients.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Mesh connections from clients open now.
    pub connection_count: u64,
    /// Of those, how many run over a direct path and how many through the relay.
    #[serde(default)]
    pub connections_direct: u64,
    #[serde(default)]
    pub connections_relayed: u64,
    /// Median round trip of the open connections, milliseconds; 0 without any.
    pub connection_median_latency_ms: f64,
    /// Open sessions by kind.
    pub session_count_ssh: u64,
    pub session_count_vscode: u64,
    pub session_count_jetbrains: u64,
    pub session_count_port_forward: u64,
    /// Round trip to each relay the agent knows.
    #[serde(default)]
    pub relay_latencies: Vec<RelayLatency>,
}

/// An agent's round trip to one relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayLatency {
    pub relay_url: String,
    pub latency_ms: f64,
    /// The agent's home relay.
    pub preferred: bool,
}

/// The last result of one metadata item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataValue {
    pub key: Name,
    /// The script's output, trimmed and capped at [`METADATA_VALUE_MAX`] bytes.
    pub value: String,
    /// Why the last run failed (non-zero exit, timeout), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub collected_at: Timestamp,
}

/// Which script a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogSource {
    Startup,
    Shutdown,
}

/// One line of a startup or shutdown script's output (stdout and stderr interleaved
/// as they came).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub at: Timestamp,
    pub source: LogSource,
    pub text: String,
}

/// `POST /api/v1/workspaces`, and the shape of `myco create --from FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkspace {
    pub name: Name,
    /// Empty with a template, which gives the agents.
    #[serde(default)]
    pub agents: Vec<AgentSpec>,
    /// Made from this template's latest version: its machine is built by a start
    /// build at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Name>,
    /// With a template: its TTL instead of the template's ("manual": none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// An agent as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub name: Name,
    pub created_at: Timestamp,
    pub apps: Vec<App>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_script: Option<Script>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_script: Option<Script>,
    /// The agent's SSH host key as it last reported it (`ssh-ed25519 AAAA...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_host_key: Option<String>,
    /// Present while the agent holds a control channel to the coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<AgentConnection>,
    /// `connecting`, `connected`, `disconnected` or `timeout`, judged at the listing's
    /// one `now`.
    pub status: AgentStatus,
    #[serde(default)]
    pub lifecycle_state: LifecycleState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle_changed_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_connected_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_connected_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnected_at: Option<Timestamp>,
    /// Each app's health by slug, as the agent last reported it.
    #[serde(default)]
    pub apps_health: std::collections::BTreeMap<Name, AppHealth>,
    /// The agent's last stats report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<AgentStats>,
    /// The last result of each metadata item.
    #[serde(default)]
    pub metadata: Vec<MetadataValue>,
    /// The agent's last network check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netcheck: Option<NetcheckResult>,
}

/// A network check and when it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetcheckResult {
    pub checked_at: Timestamp,
    /// Why it ran: `start` or `network change`.
    pub reason: String,
    pub report: netcheck::Report,
}

/// Answer of `GET /api/v1/netcheck`: what `myco netcheck` probes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetcheckTargets {
    pub relay_url: iroh::RelayUrl,
    #[serde(default)]
    pub relay_quic: Option<crate::control::RelayQuic>,
}

/// What the coordinator says about an agent's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Never connected, still within the connection timeout (or none is set).
    #[default]
    Connecting,
    /// Connected, and heard from within the inactive timeout.
    Connected,
    /// Its control channel ended, or it has been silent longer than the inactive timeout.
    Disconnected,
    /// Never connected within the connection timeout.
    Timeout,
}

impl AgentStatus {
    pub const ALL: [AgentStatus; 4] = [
        Self::Connecting,
        Self::Connected,
        Self::Disconnected,
        Self::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::Timeout => "timeout",
        }
    }
}

impl std::fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connected agent's place on the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConnection {
    pub connected_at: Timestamp,
    /// Empty until the agent published its address.
    #[serde(default)]
    pub endpoint_id: String,
    #[serde(default)]
    pub relay_url: Option<String>,
    #[serde(default)]
    pub direct_addrs: Vec<String>,
}

/// `GET /api/v1/debug/relay` (admins): the relay's traffic counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayStats {
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub packets_sent: u64,
    pub packets_recv: u64,
    pub accepts: u64,
    pub disconnects: u64,
    /// QUIC address discovery connections served.
    pub qad_connections: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workspace {
    pub id: String,
    pub owner: Name,
    pub name: Name,
    pub created_at: Timestamp,
    pub agents: Vec<Agent>,
    /// From its latest build; `running` for a workspace made without a template.
    #[serde(default)]
    pub state: WorkspaceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_build: Option<Build>,
    /// A template's workspace: when it stops and starts by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<WorkspaceSchedule>,
}

/// An agent's token, shown once when the workspace is created or the token rotated.
#[derive(Clone, Serialize, Deserialize)]
pub struct AgentToken {
    pub agent: Name,
    pub token: String,
}

impl std::fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentToken")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// Answer to `POST /api/v1/workspaces`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedWorkspace {
    pub workspace: Workspace,
    pub agent_tokens: Vec<AgentToken>,
    /// The URL agents should be started with (the coordinator's access URL).
    pub access_url: String,
}

/// Answer to `POST /api/v1/workspaces/{owner}/{name}/agents/{agent}/token`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotatedAgentToken {
    pub agent_token: AgentToken,
    pub access_url: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = Credentials {
            username: Name::new("alice").unwrap(),
            password: "hunter2".into(),
            setup_code: Some("s3cret".into()),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{c:?}").contains("s3cret"));
        let t = AgentToken {
            agent: Name::new("main").unwrap(),
            token: "myco_secret".into(),
        };
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn workspace_spec_rejects_unknown_fields() {
        let err =
            serde_json::from_str::<CreateWorkspace>(r#"{"name":"dev","agents":[],"agnets":[]}"#)
                .unwrap_err();
        assert!(err.to_string().contains("agnets"), "{err}");
    }
}
