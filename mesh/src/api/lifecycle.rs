//! Templates, builds and workspace states on the wire: what `myco templates`,
//! `myco start|stop|restart`, `myco builds` and `myco logs --build` exchange with
//! the coordinator, and `template.toml`'s shape.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::AgentSpec;
use crate::{Name, Timestamp};

/// The file at the root of a template directory.
pub const TEMPLATE_FILE: &str = "template.toml";

/// The largest template archive (the directory as a tar file) the coordinator keeps.
pub const TEMPLATE_ARCHIVE_MAX: usize = 8 * 1024 * 1024;

/// A build's output lines kept at most; later ones are counted, not kept.
pub const BUILD_LOG_LINES_MAX: u64 = 10_000;

/// The longest build output line kept, in bytes; longer ones are cut.
pub const BUILD_LOG_LINE_MAX: usize = 4096;

/// `template.toml`: the agents, apps and scripts (as `myco create --from`), how a
/// machine is made (`[provisioner]`) and when it stops by itself (`[schedule]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// Default: one agent called `main`.
    #[serde(default)]
    pub agents: Vec<AgentSpec>,
    pub provisioner: ProvisionerSpec,
    #[serde(default)]
    pub schedule: ScheduleSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionerSpec {
    /// The command: `sh -c RUN` in the template's directory, with `MYCO_TRANSITION`
    /// and the rest in its environment.
    pub run: String,
    /// How long one build may run before it is killed and failed (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Tags a provisioner must have to run this template's builds (`myco provisioner
    /// --tag KEY=VALUE`); none: any provisioner, the coordinator's own included.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Stop a running workspace after this long without activity (e.g. "8h");
    /// none: it runs until stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Activity (SSH sessions, port forwards, app sessions) keeps the workspace up
    /// at least this long after it is seen (default 1h, or the TTL when shorter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_bump: Option<String>,
}

/// A build's default time limit.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest build time limit a template may ask for.
pub const MAX_BUILD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// The default activity bump.
pub const DEFAULT_ACTIVITY_BUMP: Duration = Duration::from_secs(3600);

/// A duration that cannot be read, as templates and flags write it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{what} {text:?} is not a duration ({reason}); write e.g. \"20s\", \"8h\"")]
pub struct DurationError {
    /// The field or flag the text was given for.
    pub what: &'static str,
    /// The text as given.
    pub text: String,
    /// Why it is not a duration; part of the message, so not a source.
    pub reason: humantime::DurationError,
}

/// A `template.toml` that cannot be kept or built from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    /// `[provisioner] run` is empty or only blanks.
    #[error("[provisioner] run is empty; give the command that makes the machine")]
    EmptyRun,
    /// A duration field (`timeout`, `ttl`, `activity_bump`) cannot be read.
    #[error(transparent)]
    Duration(#[from] DurationError),
    /// `[provisioner] timeout` is zero or longer than a build may run.
    #[error(
        "[provisioner] timeout {0:?} is out of range: between 1s and {max}",
        max = humantime::format_duration(MAX_BUILD_TIMEOUT)
    )]
    TimeoutOutOfRange(String),
    /// Two `[[agents]]` share a name.
    #[error("agent {0} is given twice")]
    DuplicateAgent(Name),
}

/// A duration as templates and flags write it ("20s", "8h", "1h 30m"), named by
/// `what` in the error.
///
/// # Errors
/// The text is not a duration; the message names `what`, the text, and an example.
pub fn parse_duration(what: &'static str, text: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(text.trim()).map_err(|reason| DurationError {
        what,
        text: text.to_owned(),
        reason,
    })
}

impl TemplateSpec {
    /// The build time limit.
    ///
    /// # Errors
    /// A bad or out-of-range `[provisioner] timeout`.
    pub fn build_timeout(&self) -> Result<Duration, SpecError> {
        let Some(t) = &self.provisioner.timeout else {
            return Ok(DEFAULT_BUILD_TIMEOUT);
        };
        let d = parse_duration("[provisioner] timeout", t)?;
        if d.is_zero() || d > MAX_BUILD_TIMEOUT {
            return Err(SpecError::TimeoutOutOfRange(t.clone()));
        }
        Ok(d)
    }

    /// The TTL, if any.
    ///
    /// # Errors
    /// A bad `[schedule] ttl`.
    pub fn ttl(&self) -> Result<Option<Duration>, DurationError> {
        self.schedule
            .ttl
            .as_deref()
            .map(|t| parse_duration("[schedule] ttl", t))
            .transpose()
    }

    /// The activity bump.
    ///
    /// # Errors
    /// A bad `[schedule] activity_bump`.
    pub fn activity_bump(&self) -> Result<Duration, DurationError> {
        self.schedule
            .activity_bump
            .as_deref()
            .map_or(Ok(DEFAULT_ACTIVITY_BUMP), |t| {
                parse_duration("[schedule] activity_bump", t)
            })
    }

    /// Every check a template must pass before it is kept.
    ///
    /// # Errors
    /// The first problem found, in words that name the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.provisioner.run.trim().is_empty() {
            return Err(SpecError::EmptyRun);
        }
        self.build_timeout()?;
        self.ttl()?;
        self.activity_bump()?;
        let mut seen = std::collections::HashSet::new();
        for a in &self.agents {
            if !seen.insert(&a.name) {
                return Err(SpecError::DuplicateAgent(a.name.clone()));
            }
        }
        Ok(())
    }
}

/// A template as the API shows it: its latest version, or the one asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub name: Name,
    pub version: u64,
    pub created_at: Timestamp,
    pub created_by: Name,
    /// SHA-256 (hex) of the template's archive.
    pub sha256: String,
    pub size_bytes: u64,
    pub spec: TemplateSpec,
    /// Workspaces made from any version of it.
    #[serde(default)]
    pub workspaces: u64,
}

/// What a workspace was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRef {
    pub name: Name,
    pub version: u64,
}

/// What a build does to the workspace's machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    Start,
    Stop,
    Delete,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Delete => "delete",
        }
    }
}

/// Where a build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    /// Queued; no provisioner has taken it yet.
    Pending,
    /// A provisioner runs it.
    Running,
    Succeeded,
    /// The command failed, timed out, or its provisioner was lost; `reason` says.
    Failed,
    Canceled,
}

impl BuildStatus {
    /// Whether the build has ended.
    pub fn is_done(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }
}

/// One build of a workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    /// 1, 2, ... per workspace.
    pub number: u64,
    pub transition: Transition,
    pub status: BuildStatus,
    /// Why it failed or was canceled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub template_version: u64,
    /// Who asked for it; `None`: the coordinator itself (auto-stop, auto-start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<Name>,
    /// The provisioner that took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioner: Option<String>,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Timestamp>,
}

/// A workspace's state: from its latest build, or `running` for one made without a
/// template (its machine is not Myco's to start or stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceState {
    Pending,
    Starting,
    #[default]
    Running,
    Stopping,
    Stopped,
    Failed,
    Deleting,
    Deleted,
}

impl WorkspaceState {
    /// Every state, in the order `/metrics` lists them.
    pub const ALL: [Self; 8] = [
        Self::Pending,
        Self::Starting,
        Self::Running,
        Self::Stopping,
        Self::Stopped,
        Self::Failed,
        Self::Deleting,
        Self::Deleted,
    ];

    /// The state a workspace is in after `build` (its latest).
    pub fn of(build: &Build) -> Self {
        use BuildStatus as S;
        use Transition as T;
        match (build.transition, build.status) {
            (T::Start, S::Pending) => Self::Pending,
            (T::Start, S::Running) => Self::Starting,
            (T::Start, S::Succeeded) => Self::Running,
            (T::Stop, S::Pending | S::Running) => Self::Stopping,
            (T::Stop, S::Succeeded) => Self::Stopped,
            (T::Delete, S::Pending | S::Running) => Self::Deleting,
            (T::Delete, S::Succeeded) => Self::Deleted,
            (_, S::Failed | S::Canceled) => Self::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
        }
    }
}

/// When a template's workspace stops and starts by itself (`myco schedule show`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceSchedule {
    /// Stops this long after its start without activity; `None`: runs until stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Activity keeps it up at least this long after it is seen.
    pub activity_bump: String,
    /// When it stops unless used before (running workspaces with a TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    /// Auto-start schedule, e.g. `Mon-Fri 09:00 Europe/Berlin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<String>,
    /// Its next occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start: Option<Timestamp>,
}

/// `PUT .../schedule`: each field given changes that part.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleChange {
    /// A duration ("8h") or "manual" (no auto-stop). A running workspace's
    /// deadline becomes now + this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// A duration: a running workspace's deadline becomes now + this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extend: Option<String>,
    /// A schedule (`Mon-Fri 09:00 Europe/Berlin`) or "manual" (no auto-start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<String>,
}

/// `POST .../builds`: run a transition.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBuild {
    pub transition: Transition,
}

/// A build's output from line `after` on (`GET .../builds/{n}/logs?after=N&wait=S`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildLogs {
    pub build: Build,
    /// The lines after `after`, each with its number (from 1).
    pub lines: Vec<BuildLogLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLogLine {
    pub seq: u64,
    pub at: Timestamp,
    pub text: String,
}

/// `POST /api/v1/provisioner-keys` (admins).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProvisionerKey {
    pub name: Name,
}

/// A provisioner key as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvisionerKeyInfo {
    pub name: Name,
    pub created_at: Timestamp,
    pub created_by: Name,
}

/// The key, shown once.
#[derive(Clone, Serialize, Deserialize)]
pub struct CreatedProvisionerKey {
    pub name: Name,
    pub key: String,
}

impl std::fmt::Debug for CreatedProvisionerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedProvisionerKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `POST /api/v1/provisioner/acquire`: a provisioner process asks for a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireJob {
    /// This process (random per run), so two processes with one key are told apart.
    pub instance: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// A job for an external provisioner: everything `provision::run` needs.
#[derive(Clone, Serialize, Deserialize)]
pub struct ProvisionerJob {
    pub workspace_id: String,
    pub workspace_name: Name,
    pub owner: Name,
    pub number: u64,
    pub transition: Transition,
    pub access_url: String,
    pub run: String,
    pub timeout_ms: u64,
    /// Each agent's name and new token (start builds).
    pub agent_tokens: Vec<(String, String)>,
    /// The template directory as a tar archive, hex.
    pub archive_hex: String,
}

impl std::fmt::Debug for ProvisionerJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisionerJob")
            .field("workspace_id", &self.workspace_id)
            .field("number", &self.number)
            .field("transition", &self.transition)
            .finish_non_exhaustive()
    }
}

/// `POST .../provisioner/jobs/{workspace}/{number}/logs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobLogs {
    pub instance: String,
    pub lines: Vec<(Timestamp, String)>,
}

/// `POST .../renew`, and `.../finish` with an outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobUpdate {
    pub instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<BuildStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to a renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Renewed {
    /// Stop the command: someone canceled the build.
    pub cancel: bool,
}

/// A batch of output lines an external provisioner may send at once.
pub const JOB_LOG_BATCH_MAX: usize = 1000;

/// Build output as one line, cut at [`BUILD_LOG_LINE_MAX`] bytes on a character
/// boundary, invalid UTF-8 replaced.
pub fn build_log_text(raw: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(raw).into_owned();
    while text.ends_with(['\n', '\r']) {
        text.pop();
    }
    if text.len() > BUILD_LOG_LINE_MAX {
        let mut cut = BUILD_LOG_LINE_MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<TemplateSpec, String> {
        let s: TemplateSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        s.validate().map(|()| s).map_err(|e| e.to_string())
    }

    #[test]
    fn templates_are_checked() {
        let ok = spec(r#"{"provisioner": {"run": "./make.sh"}, "schedule": {"ttl": "20s"}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.ttl(), Ok(Some(Duration::from_secs(20))));
        assert_eq!(ok.build_timeout(), Ok(DEFAULT_BUILD_TIMEOUT));
        let bad = spec(r#"{"provisioner": {"run": "x"}, "schedule": {"ttl": "soon"}}"#);
        assert!(bad.is_err_and(|e| e.contains("[schedule] ttl \"soon\"")));
        let bad = spec(r#"{"provisioner": {"run": "x", "timeout": "7h"}}"#);
        assert!(bad.is_err_and(|e| e.contains("out of range")));
        let bad = spec(r#"{"provisioner": {"run": "  "}}"#);
        assert!(bad.is_err_and(|e| e.contains("run is empty")));
    }

    #[test]
    fn the_state_follows_the_latest_build() {
        let mut b = Build {
            number: 1,
            transition: Transition::Start,
            status: BuildStatus::Pending,
            reason: None,
            template_version: 1,
            initiator: None,
            provisioner: None,
            created_at: Timestamp::from_unix_millis(0),
            started_at: None,
            ended_at: None,
        };
        assert_eq!(WorkspaceState::of(&b), WorkspaceState::Pending);
        b.status = BuildStatus::Running;
        assert_eq!(WorkspaceState::of(&b), WorkspaceState::Starting);
        b.status = BuildStatus::Succeeded;
        assert_eq!(WorkspaceState::of(&b), WorkspaceState::Running);
        b.transition = Transition::Stop;
        assert_eq!(WorkspaceState::of(&b), WorkspaceState::Stopped);
        b.status = BuildStatus::Failed;
        assert_eq!(WorkspaceState::of(&b), WorkspaceState::Failed);
    }

    #[test]
    fn log_lines_are_bounded() {
        assert_eq!(build_log_text(b"hi\r\n"), "hi");
        let long = "é".repeat(BUILD_LOG_LINE_MAX);
        let cut = build_log_text(long.as_bytes());
        assert!(cut.len() <= BUILD_LOG_LINE_MAX && cut.chars().all(|c| c == 'é'));
    }
}
