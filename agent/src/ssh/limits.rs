//! What one SSH connection may hold (channels, remote forwards, environment
//! variables), and the checks that refuse what is over a limit.
//!
//! Over a limit the request is refused as sshd refuses it (a channel with "resource
//! shortage" and a sentence OpenSSH prints, a request with failure) and the agent logs
//! a warning (an env refusal once per channel). A channel's place is held by whatever
//! serves it (the command's reader task, the forwarded connection's task, the SFTP
//! loop) and given back when that ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Channels a client may have open at once on one SSH connection (sessions,
/// `direct-tcpip` and `direct-streamlocal`): each holds tasks and buffers, a session
/// a process too, so one connection cannot exhaust the workspace. Far above what
/// real use opens (sshd's `MaxSessions` stops at 10 sessions; a browser behind
/// `ssh -L` or `-D` opens a few dozen connections at most).
pub(crate) const MAX_CHANNELS: usize = 64;
/// Remote forwards (`tcpip-forward` and `streamlocal-forward`, `ssh -R`) one SSH
/// connection may hold: each is a listener in the workspace, open until the
/// connection ends.
pub(crate) const MAX_REMOTE_FORWARDS: usize = 32;
/// Environment entries a channel may set (`SendEnv`, `SetEnv`); sshd refuses past
/// 128 as well. Each is kept until the command starts.
pub(crate) const MAX_ENV_VARS: usize = 128;
/// The longest environment variable name a client may set, in bytes.
pub(crate) const MAX_ENV_NAME: usize = 256;
/// The longest environment variable value a client may set, in bytes: room for a
/// long `PATH` or a token, while 128 of them stay within a few MiB per channel.
pub(crate) const MAX_ENV_VALUE: usize = 16 * 1024;

/// Why an `env` request is refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum EnvRefused {
    /// The channel has [`MAX_ENV_VARS`] already.
    TooMany,
    /// The name is empty, longer than [`MAX_ENV_NAME`], or holds `=` or NUL.
    BadName,
    /// The value is longer than [`MAX_ENV_VALUE`] or holds NUL.
    BadValue,
}

impl std::fmt::Display for EnvRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::TooMany => "the channel has set the most environment variables allowed",
            Self::BadName => "the name is empty, too long, or holds '=' or NUL",
            Self::BadValue => "the value is too long or holds NUL",
        })
    }
}

/// Checks one `env` request against what the channel has set already.
pub(super) fn check_env(name: &str, value: &str, already: usize) -> Result<(), EnvRefused> {
    if already >= MAX_ENV_VARS {
        return Err(EnvRefused::TooMany);
    }
    if name.is_empty() || name.len() > MAX_ENV_NAME || name.contains(['=', '\0']) {
        return Err(EnvRefused::BadName);
    }
    if value.len() > MAX_ENV_VALUE || value.contains('\0') {
        return Err(EnvRefused::BadValue);
    }
    Ok(())
}

/// The channels open on one connection, counted against [`MAX_CHANNELS`].
#[derive(Default, Clone)]
pub(super) struct ChannelCount(Arc<AtomicUsize>);

impl ChannelCount {
    /// A slot for one more channel, or None when [`MAX_CHANNELS`] are open.
    pub(super) fn take(&self) -> Option<ChannelSlot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CHANNELS).then_some(n + 1)
            })
            .ok()
            .map(|_| ChannelSlot(self.0.clone()))
    }
}

/// One open channel's place in its connection's [`ChannelCount`], given back when
/// dropped: it goes with whatever serves the channel (the command's reader task, the
/// forwarded connection's task, the SFTP server), which ends when the channel does.
pub(crate) struct ChannelSlot(Arc<AtomicUsize>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The refusal sent for a channel over [`MAX_CHANNELS`]; OpenSSH's client prints it.
pub(super) fn too_many_channels() -> russh::ChannelOpenFailure {
    russh::ChannelOpenFailure::Other {
        // RFC 4254's SSH_OPEN_RESOURCE_SHORTAGE, with our reason.
        code: 4,
        reason: format!("the agent allows {MAX_CHANNELS} open channels per SSH connection"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_requests_are_bounded_in_count_and_size() {
        assert_eq!(check_env("LANG", "C.UTF-8", 0), Ok(()));
        assert_eq!(check_env("LANG", "C", MAX_ENV_VARS - 1), Ok(()));
        assert_eq!(
            check_env("LANG", "C", MAX_ENV_VARS),
            Err(EnvRefused::TooMany)
        );
        let long_name = "N".repeat(MAX_ENV_NAME + 1);
        for name in ["", "A=B", "A\0B", long_name.as_str()] {
            assert_eq!(
                check_env(name, "v", 0),
                Err(EnvRefused::BadName),
                "{name:?}"
            );
        }
        assert_eq!(check_env(&"N".repeat(MAX_ENV_NAME), "v", 0), Ok(()));
        assert_eq!(check_env("V", &"v".repeat(MAX_ENV_VALUE), 0), Ok(()));
        assert_eq!(
            check_env("V", &"v".repeat(MAX_ENV_VALUE + 1), 0),
            Err(EnvRefused::BadValue)
        );
        assert_eq!(check_env("V", "a\0b", 0), Err(EnvRefused::BadValue));
    }

    #[test]
    fn channel_slots_stop_at_the_limit_and_come_back_when_dropped() {
        let count = ChannelCount::default();
        let mut slots: Vec<ChannelSlot> = (0..MAX_CHANNELS)
            .map(|_| count.take().expect("within the limit"))
            .collect();
        assert!(count.take().is_none());
        slots.pop();
        assert!(count.take().is_some());
    }
}
