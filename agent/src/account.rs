//! The account the agent runs as, read from the password database when an SSH
//! connection starts and when a workspace script starts, as sshd reads it at login:
//! the login shell every session and script runs through, and the variables a login
//! sets (`USER`, `LOGNAME`, `HOME`, `SHELL`). A container seldom sets `$SHELL` or
//! `$USER` for its entrypoint, so the agent's own environment alone would give a bash
//! user `/bin/sh` and no `$USER`.
//!
//! Why per connection and not once at agent start: sshd reads the entry once per
//! connection (at authentication) and every session of that connection uses it, so a
//! `chsh` in the workspace (a dotfiles installer switching to zsh) applies to the
//! next connection. Reading it once at agent start would keep the old shell until the
//! workspace restarts. The lookup (`getpwuid`, which may go through NSS to LDAP or
//! sssd, and a `stat` of the shell) runs on the blocking pool ([`Account::lookup`]),
//! never on the agent's only runtime thread.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Variables of the agent's own environment no session or workspace script inherits:
/// credentials of the agent, and an SSH agent that was not forwarded.
pub(crate) const PRIVATE_ENV: &[&str] = &[
    "MYCO_AGENT_TOKEN",
    "MYCO_AGENT_URL",
    "MYCO_TOKEN",
    "SSH_AUTH_SOCK",
];

#[derive(Debug, Clone)]
pub(crate) struct Account {
    pub name: String,
    /// The agent's `$HOME` when it has one (a workspace may point it elsewhere), else
    /// the password database's.
    pub home: Option<PathBuf>,
    pub shell: String,
}

impl Account {
    /// [`Self::current`] on the blocking pool. Should that task fail (a panic, or the
    /// runtime shutting down), the account is taken from the agent's environment.
    ///
    /// # Cancel safety
    /// Dropping the future leaves the lookup to finish on the blocking pool unseen.
    pub(crate) async fn lookup() -> Self {
        match tokio::task::spawn_blocking(Self::current).await {
            Ok(account) => account,
            Err(e) => {
                tracing::warn!("cannot read the password database: {e}");
                Self::from_entry(nix::unistd::getuid(), None)
            }
        }
    }

    /// The account from the password database. Blocks (NSS): call it through
    /// [`Self::lookup`] on a runtime thread.
    pub(crate) fn current() -> Self {
        let uid = nix::unistd::getuid();
        Self::from_entry(uid, nix::unistd::User::from_uid(uid).ok().flatten())
    }

    fn from_entry(uid: nix::unistd::Uid, entry: Option<nix::unistd::User>) -> Self {
        // The database's shell first (as sshd), unless it is no shell to run
        // ("nologin", or missing from this image); then `$SHELL`; then `/bin/sh`.
        let shell = entry
            .as_ref()
            .map(|u| u.shell.clone())
            .filter(|s| usable_shell(s))
            .and_then(|s| s.into_os_string().into_string().ok())
            .or_else(|| non_empty_var("SHELL"))
            .unwrap_or_else(|| "/bin/sh".into());
        let name = entry
            .as_ref()
            .map(|u| u.name.clone())
            .or_else(|| non_empty_var("USER"))
            .unwrap_or_else(|| uid.to_string());
        let home = non_empty_var("HOME")
            .map(PathBuf::from)
            .or_else(|| entry.map(|u| u.dir));
        Self { name, home, shell }
    }

    /// The account's shell with `args`, in its home dir, with a login's variables
    /// set and [`PRIVATE_ENV`] removed.
    pub(crate) fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.shell);
        cmd.args(args);
        if let Some(home) = &self.home {
            cmd.current_dir(home).env("HOME", home);
        }
        for name in PRIVATE_ENV {
            cmd.env_remove(name);
        }
        cmd.env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("SHELL", &self.shell);
        cmd
    }
}

fn non_empty_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// An executable file that is not a stub refusing logins.
fn usable_shell(path: &Path) -> bool {
    let stub = matches!(
        path.file_name().and_then(|n| n.to_str()),
        Some("nologin" | "false")
    );
    !stub
        && path.is_absolute()
        && std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stub_or_missing_shell_is_not_run() {
        assert!(usable_shell(Path::new("/bin/sh")));
        assert!(!usable_shell(Path::new("/usr/sbin/nologin")));
        assert!(!usable_shell(Path::new("/bin/false")));
        assert!(!usable_shell(Path::new("/no/such/shell")));
        assert!(!usable_shell(Path::new("sh")));
        // A directory, or a file without an execute bit.
        assert!(!usable_shell(Path::new("/")));
        assert!(!usable_shell(Path::new("/etc/passwd")));
    }

    #[test]
    fn the_current_account_has_a_runnable_shell_and_a_name() {
        let account = Account::current();
        assert!(!account.name.is_empty());
        assert!(Path::new(&account.shell).is_absolute(), "{account:?}");
    }

    #[tokio::test]
    async fn a_lookup_off_the_runtime_thread_finds_the_same_account() {
        let looked_up = Account::lookup().await;
        let current = Account::current();
        assert_eq!(
            (looked_up.name, looked_up.home, looked_up.shell),
            (current.name, current.home, current.shell)
        );
    }
}
