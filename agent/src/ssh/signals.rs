//! Signals between SSH and the command: a client's `signal` request to the command's
//! process group, and the signal that killed a command as SSH's exit-signal name.

use russh::ChannelId;

use super::SshConnection;

impl SshConnection {
    /// Sends the signal the client named to the command on `channel`, if it still runs.
    pub(super) fn signal_command(&self, channel: ChannelId, signal: &russh::Sig) {
        // Not once the command has exited (as sshd): its group id may be reused.
        let pgid = self
            .running
            .get(&channel)
            .filter(|r| !r.exited.load(std::sync::atomic::Ordering::Acquire))
            .and_then(|r| r.pgid);
        let (Some(pgid), Some(sig)) = (pgid, signal_of(signal)) else {
            return;
        };
        // The command's whole process group: `a | b` or `cd x && make` all get it.
        if let Err(e) = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig) {
            tracing::debug!(pgid, "cannot signal the command: {e}");
        }
    }
}

/// The SSH name of a signal number (RFC 4254 6.10), or `Custom` with its Linux name.
pub(super) fn sig_name(signal: i32) -> russh::Sig {
    use nix::sys::signal::Signal;
    match Signal::try_from(signal) {
        Ok(Signal::SIGABRT) => russh::Sig::ABRT,
        Ok(Signal::SIGALRM) => russh::Sig::ALRM,
        Ok(Signal::SIGFPE) => russh::Sig::FPE,
        Ok(Signal::SIGHUP) => russh::Sig::HUP,
        Ok(Signal::SIGILL) => russh::Sig::ILL,
        Ok(Signal::SIGINT) => russh::Sig::INT,
        Ok(Signal::SIGKILL) => russh::Sig::KILL,
        Ok(Signal::SIGPIPE) => russh::Sig::PIPE,
        Ok(Signal::SIGQUIT) => russh::Sig::QUIT,
        Ok(Signal::SIGSEGV) => russh::Sig::SEGV,
        Ok(Signal::SIGTERM) => russh::Sig::TERM,
        Ok(Signal::SIGUSR1) => russh::Sig::USR1,
        Ok(other) => russh::Sig::Custom(other.as_str().trim_start_matches("SIG").to_owned()),
        Err(_) => russh::Sig::Custom(signal.to_string()),
    }
}

/// The signal an SSH signal name asks for.
fn signal_of(sig: &russh::Sig) -> Option<nix::sys::signal::Signal> {
    use nix::sys::signal::Signal;
    Some(match sig {
        russh::Sig::ABRT => Signal::SIGABRT,
        russh::Sig::ALRM => Signal::SIGALRM,
        russh::Sig::FPE => Signal::SIGFPE,
        russh::Sig::HUP => Signal::SIGHUP,
        russh::Sig::ILL => Signal::SIGILL,
        russh::Sig::INT => Signal::SIGINT,
        russh::Sig::KILL => Signal::SIGKILL,
        russh::Sig::PIPE => Signal::SIGPIPE,
        russh::Sig::QUIT => Signal::SIGQUIT,
        russh::Sig::SEGV => Signal::SIGSEGV,
        russh::Sig::TERM => Signal::SIGTERM,
        russh::Sig::USR1 => Signal::SIGUSR1,
        russh::Sig::Custom(name) => format!("SIG{name}").parse().ok()?,
    })
}
