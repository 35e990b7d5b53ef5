//! Open sessions by kind, for the agent's stats: SSH sessions by what drives them
//! (a person, VS Code Remote-SSH, JetBrains Gateway) and port-forwarding connections.
//!
//! As in Coder's agent, a client can name the kind itself through a variable it sends
//! (`SetEnv MYCO_SSH_SESSION_TYPE=vscode` in its SSH config; Coder's is
//! `CODER_SSH_SESSION_TYPE`). Otherwise the command gives it away: VS Code runs its
//! server from `~/.vscode-server`, JetBrains its `remote-dev-server` from
//! `~/.cache/JetBrains`. VS Code's Remote-SSH also runs a bare shell and writes its
//! script to the shell's input, so the first input of a session without a terminal
//! is looked at too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The variable a client sets to name its session's kind; never passed on to the
/// command.
pub(crate) const SESSION_TYPE_ENV: &str = "MYCO_SSH_SESSION_TYPE";

/// How much of a session's first input is looked at for the kind.
pub(crate) const SNIFF_BYTES: usize = 64 * 1024;

/// Substrings (lower case) of what VS Code's and JetBrains' remote tools run.
const VSCODE_MARKERS: &[&str] = &[
    "vscode-server",
    "code-server",
    "vscode-remote",
    "vscode-cli",
];
const JETBRAINS_MARKERS: &[&str] = &["jetbrains", "remote-dev-server", "idea.vendor.name"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionKind {
    Ssh,
    Vscode,
    Jetbrains,
    PortForward,
}

impl SessionKind {
    fn index(self) -> usize {
        match self {
            Self::Ssh => 0,
            Self::Vscode => 1,
            Self::Jetbrains => 2,
            Self::PortForward => 3,
        }
    }
}

/// The kind of an SSH session running `command` (`None`: a shell) with the
/// environment the client asked for.
pub(crate) fn classify(command: Option<&str>, env: &[(String, String)]) -> SessionKind {
    if let Some((_, value)) = env.iter().rev().find(|(name, _)| name == SESSION_TYPE_ENV) {
        match value.to_ascii_lowercase().as_str() {
            "vscode" => return SessionKind::Vscode,
            "jetbrains" => return SessionKind::Jetbrains,
            "ssh" => return SessionKind::Ssh,
            // Unknown names (other editors) are judged like any session.
            _ => {}
        }
    }
    command
        .into_iter()
        .chain(env.iter().map(|(_, value)| value.as_str()))
        .find_map(sniff)
        .unwrap_or(SessionKind::Ssh)
}

/// The kind a command line or a script reveals, if any.
pub(crate) fn sniff(text: &str) -> Option<SessionKind> {
    let text = text.to_ascii_lowercase();
    let has = |markers: &[&str]| markers.iter().any(|m| text.contains(m));
    if has(VSCODE_MARKERS) {
        Some(SessionKind::Vscode)
    } else if has(JETBRAINS_MARKERS) {
        Some(SessionKind::Jetbrains)
    } else {
        None
    }
}

/// How many sessions of each kind are open.
#[derive(Debug, Default)]
pub(crate) struct SessionCounts([AtomicU64; 4]);

impl SessionCounts {
    /// Counts a new session until the guard is dropped.
    pub(crate) fn open(self: &Arc<Self>, kind: SessionKind) -> SessionGuard {
        self.0[kind.index()].fetch_add(1, Ordering::Relaxed);
        SessionGuard {
            counts: self.clone(),
            kind,
        }
    }

    pub(crate) fn get(&self, kind: SessionKind) -> u64 {
        self.0[kind.index()].load(Ordering::Relaxed)
    }
}

/// One open session, counted under its kind while it lives.
#[derive(Debug)]
pub(crate) struct SessionGuard {
    counts: Arc<SessionCounts>,
    kind: SessionKind,
}

impl SessionGuard {
    pub(crate) fn kind(&self) -> SessionKind {
        self.kind
    }

    /// The session turned out to be of another kind.
    pub(crate) fn set_kind(&mut self, kind: SessionKind) {
        if kind != self.kind {
            self.counts.0[kind.index()].fetch_add(1, Ordering::Relaxed);
            self.counts.0[self.kind.index()].fetch_sub(1, Ordering::Relaxed);
            self.kind = kind;
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.counts.0[self.kind.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn commands_give_the_kind_away() {
        use SessionKind::*;
        assert_eq!(classify(None, &[]), Ssh);
        assert_eq!(classify(Some("ls -la"), &[]), Ssh);
        assert_eq!(
            classify(
                Some("~/.vscode-server/bin/abc/bin/code-server --start-server --port=0"),
                &[]
            ),
            Vscode
        );
        assert_eq!(
            classify(
                Some("/home/u/.cache/JetBrains/RemoteDev/dist/x/bin/remote-dev-server.sh run"),
                &[]
            ),
            Jetbrains
        );
        assert_eq!(
            classify(Some("java -Didea.vendor.name=JetBrains"), &[]),
            Jetbrains
        );
        // The environment the client sent counts too.
        assert_eq!(
            classify(
                Some("sh"),
                &env(&[("VSCODE_AGENT_FOLDER", "/home/u/.vscode-server")])
            ),
            Vscode
        );
    }

    #[test]
    fn the_session_type_variable_wins() {
        use SessionKind::*;
        assert_eq!(
            classify(None, &env(&[(SESSION_TYPE_ENV, "vscode")])),
            Vscode
        );
        assert_eq!(
            classify(None, &env(&[(SESSION_TYPE_ENV, "JetBrains")])),
            Jetbrains
        );
        assert_eq!(
            classify(Some("code-server"), &env(&[(SESSION_TYPE_ENV, "ssh")])),
            Ssh
        );
        // The last one sent counts; unknown names fall back to the command.
        assert_eq!(
            classify(
                None,
                &env(&[
                    (SESSION_TYPE_ENV, "vscode"),
                    (SESSION_TYPE_ENV, "jetbrains")
                ])
            ),
            Jetbrains
        );
        assert_eq!(
            classify(
                Some("remote-dev-server"),
                &env(&[(SESSION_TYPE_ENV, "cursor")])
            ),
            Jetbrains
        );
    }

    #[test]
    fn guards_count_while_they_live() {
        let counts = Arc::new(SessionCounts::default());
        let a = counts.open(SessionKind::Ssh);
        let mut b = counts.open(SessionKind::Ssh);
        let c = counts.open(SessionKind::PortForward);
        assert_eq!(counts.get(SessionKind::Ssh), 2);
        b.set_kind(SessionKind::Vscode);
        assert_eq!(b.kind(), SessionKind::Vscode);
        assert_eq!(counts.get(SessionKind::Ssh), 1);
        assert_eq!(counts.get(SessionKind::Vscode), 1);
        drop((a, b, c));
        for kind in [
            SessionKind::Ssh,
            SessionKind::Vscode,
            SessionKind::Jetbrains,
            SessionKind::PortForward,
        ] {
            assert_eq!(counts.get(kind), 0);
        }
    }
}
