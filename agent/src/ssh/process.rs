//! Commands and shells on an SSH channel: the process (on a terminal when the client
//! asked for one), the tasks that feed its stdin and send its output, and its exit
//! status or exit signal.
//!
//! Sessions exec through `$SHELL -c`, shells are login shells, a PTY is opened when
//! asked. `$SHELL` is the account's login shell from the password database, read when
//! each SSH connection (and each script) starts, as sshd reads it at login, off the
//! runtime thread (a container seldom gives its entrypoint `$SHELL` or `$USER`); the
//! agent's own `$SHELL` only when that entry names no shell that can run (`nologin`,
//! `false`, missing), then `/bin/sh`. Every command gets a login's `USER`, `LOGNAME`,
//! `HOME` (the agent's when set) and `SHELL`, and OpenSSH's `SSH_CONNECTION` and
//! `SSH_CLIENT` (the direct path's UDP addresses when the command starts; zeros over
//! the relay, where the client has no address, as Coder's agent always gives), and a
//! terminal's `SSH_TTY`; what the agent itself inherited of these is replaced, so shell
//! prompts and tools that look for an SSH login find one. Sessions never inherit the
//! agent's credentials (`MYCO_AGENT_TOKEN`, `MYCO_TOKEN`) or an `SSH_AUTH_SOCK` that
//! was not forwarded.
//!
//! Client data for a running command goes through a per-channel queue to a task that
//! writes the command's stdin or terminal (a terminal is written straight from the
//! session loop while nothing is queued for it: `DirectPty`), so the session loop never
//! waits on a command (it would otherwise stop taking the client's window adjusts, and
//! a command whose output waits on a full client window would hang the session for
//! good; a test pins this).
//!
//! Commands run in their own process group, and signals go to the group. A channel that
//! closes first, or a connection that drops, hangs up its command while it runs: SIGHUP
//! to its whole group (the shell itself is killed), so a pipeline's or a compound
//! command's children go too, unless they ignore SIGHUP (`nohup`); what a command that
//! has exited left in the background stays, as with sshd. A terminal session ends when
//! its shell exits (after a short drain, so a background job holding the terminal does
//! not keep it). A command killed by a signal is reported as exit-signal (OpenSSH's
//! client then exits 255; `myco ssh` exits 128+N).

use std::process::Stdio;
use std::sync::Arc;

use russh::ChannelId;
use russh::server::Handle;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::mpsc;

use super::SshConnection;
use super::signals::sig_name;
use crate::sessions::{self, SessionGuard, SessionKind};

/// A terminal the client asked for on a channel.
#[derive(Debug, Clone)]
pub(super) struct PtyRequest {
    pub(super) term: String,
    pub(super) size: pty_process::Size,
}

/// A terminal size from the client's columns and rows, each at least 1.
pub(super) fn size(cols: u32, rows: u32) -> pty_process::Size {
    pty_process::Size::new(
        u16::try_from(rows).unwrap_or(u16::MAX).max(1),
        u16::try_from(cols).unwrap_or(u16::MAX).max(1),
    )
}

/// Client data queued per channel for the command's stdin or terminal: about 256 MiB
/// of 64 KiB packets. The session loop hands data over without waiting for the
/// command (a command that stops reading while its output waits on a full client
/// window would otherwise stall the loop, and with it the window adjust that frees it).
const INPUT_QUEUE: usize = 4096;
/// How long a terminal's output is drained after its shell exits, when background
/// jobs keep the terminal open.
const PTY_DRAIN: std::time::Duration = std::time::Duration::from_millis(200);

/// What the session loop passes to a running command's input task.
pub(super) enum Input {
    Data(bytes::Bytes),
    Resize(pty_process::Size),
    Eof,
}

/// A terminal written to straight from the session loop while nothing is queued for
/// it: a keystroke reaches the shell without waiting for the input task's turn, which
/// comes only after the session loop has gone round again (about 20 µs of every
/// keystroke's echo on the agent, bench/ssh.sh).
struct DirectPty {
    /// The terminal's master side (non-blocking, like the input task's).
    fd: std::os::fd::OwnedFd,
    /// Data items handed to the input task and not yet written; the loop writes
    /// directly only at 0, so data is never reordered.
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

impl DirectPty {
    /// Writes what the terminal takes at once; returns the rest (empty when all went).
    fn write<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        use std::sync::atomic::Ordering;
        if self.queued.load(Ordering::Acquire) != 0 {
            return data;
        }
        let mut rest = data;
        while !rest.is_empty() {
            match nix::unistd::write(&self.fd, rest) {
                Ok(n) => rest = &rest[n..],
                Err(nix::errno::Errno::EINTR) => {}
                // Full (EAGAIN), or gone: the input task queues it, or finds out.
                Err(_) => break,
            }
        }
        rest
    }
}

/// Why a command (or shell) could not start without a terminal.
#[derive(Debug, thiserror::Error)]
pub(super) enum SpawnError {
    /// The process could not be started.
    #[error("{0}")]
    Spawn(std::io::Error),
    /// The client asked for a terminal, and it failed there.
    #[error(transparent)]
    Pty(#[from] SpawnPtyError),
}

/// Why a command (or shell) could not start on a terminal.
#[derive(Debug, thiserror::Error)]
pub(super) enum SpawnPtyError {
    /// No terminal could be opened.
    #[error("{0}")]
    Open(pty_process::Error),
    /// The terminal could not be given the client's size.
    #[error("{0}")]
    Resize(pty_process::Error),
    /// The process could not be started on the terminal.
    #[error("{0}")]
    Spawn(pty_process::Error),
    /// The terminal could not be opened a second time for writes from the session loop.
    #[error("{0}")]
    Dup(std::io::Error),
}

/// A channel running a command.
pub(super) struct Running {
    input: mpsc::Sender<Input>,
    /// Set for a terminal (see [`DirectPty`]).
    direct: Option<DirectPty>,
    /// The command's process group (its pid), for signals.
    pub(super) pgid: Option<i32>,
    /// Set once the command (its shell) has exited and been reaped.
    pub(super) exited: Arc<std::sync::atomic::AtomicBool>,
    /// Counted in the stats while it runs.
    session: SessionGuard,
    /// How much more client input to look at for the session's kind.
    sniff_left: usize,
    /// The tasks feeding and reading the command (in the connection's
    /// [`super::tasks::ConnectionTasks`]); aborting them drops (kills) it.
    tasks: [tokio::task::AbortHandle; 2],
}

impl Drop for Running {
    fn drop(&mut self) {
        // A command still running when its channel or connection goes gets SIGHUP, as
        // from a terminal that hangs up: its whole group, where `kill_on_drop` reaches
        // only the shell and a pipeline or a compound command's children lived on.
        // Not once it has exited, so what it left running in the background stays,
        // as with sshd; and its group id cannot have been reused while it runs.
        if let Some(pgid) = self.pgid
            && !self.exited.load(std::sync::atomic::Ordering::Acquire)
            && let Err(e) = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGHUP,
            )
        {
            tracing::debug!(pgid, "cannot hang up the command: {e}");
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl SshConnection {
    /// `$SHELL -c COMMAND` (or a login shell) in the home dir, with the client's
    /// environment requests (but the session kind, which is ours) and the MYCO_*
    /// variables.
    fn command(&mut self, channel: ChannelId, command: Option<&str>) -> tokio::process::Command {
        let mut cmd = self.account.command(&match command {
            Some(c) => vec!["-c", c],
            None => vec!["-l"],
        });
        // A terminal's own is set where it is opened.
        cmd.env_remove("SSH_TTY");
        if let Some(sock) = self.agent_socket() {
            cmd.env("SSH_AUTH_SOCK", sock);
        }
        let env = self.env.remove(&channel).unwrap_or_default();
        let (connection, client) = self.peer.ssh_connection();
        cmd.envs(
            env.into_iter()
                .filter(|(name, _)| name != sessions::SESSION_TYPE_ENV),
        )
        .env("SSH_CONNECTION", connection)
        .env("SSH_CLIENT", client)
        .env("MYCO", "true")
        .env("MYCO_WORKSPACE_NAME", &self.base_env.workspace)
        .env("MYCO_AGENT_NAME", &self.base_env.agent)
        .kill_on_drop(true);
        cmd
    }

    /// Runs the command on a new terminal. The session ends when the shell exits
    /// (after a short drain, so background jobs holding the terminal do not keep it).
    fn spawn_pty(
        &mut self,
        channel: ChannelId,
        cmd: tokio::process::Command,
        req: PtyRequest,
        handle: Handle,
        session: SessionGuard,
    ) -> Result<(), SpawnPtyError> {
        let (pty, pts) = pty_process::open().map_err(SpawnPtyError::Open)?;
        pty.resize(req.size).map_err(SpawnPtyError::Resize)?;
        let mut command = pty_process::Command::from(cmd).env("TERM", &req.term);
        if let Ok(tty) = nix::unistd::ttyname(&pts) {
            command = command.env("SSH_TTY", tty);
        }
        let mut child = command.spawn(pts).map_err(SpawnPtyError::Spawn)?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        let direct = DirectPty {
            fd: std::os::fd::AsFd::as_fd(&pty)
                .try_clone_to_owned()
                .map_err(SpawnPtyError::Dup)?,
            queued: Arc::default(),
        };
        let queued = direct.queued.clone();
        let (read, mut write) = pty.into_split();
        let (tx, mut rx) = mpsc::channel(INPUT_QUEUE);
        let feeder = self.tasks.spawn(async move {
            while let Some(input) = rx.recv().await {
                match input {
                    Input::Data(d) => {
                        let written = write.write_all(&d).await;
                        queued.fetch_sub(1, std::sync::atomic::Ordering::Release);
                        if written.is_err() {
                            return;
                        }
                    }
                    Input::Resize(size) => {
                        if let Err(e) = write.resize(size) {
                            tracing::debug!("cannot resize the terminal: {e}");
                        }
                    }
                    // A terminal has no end of input; ^D is data.
                    Input::Eof => {}
                }
            }
        });
        let exited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reaped = exited.clone();
        let slot = self.slots.remove(&channel);
        let reader = self.tasks.spawn(async move {
            let _slot = slot;
            // The terminal reads EIO once the shell and everything it started are gone.
            let out = pump(Some(read), handle.clone(), channel, None);
            tokio::pin!(out);
            let status = tokio::select! {
                () = &mut out => child.wait().await,
                status = child.wait() => {
                    reaped.store(true, std::sync::atomic::Ordering::Release);
                    let _ = tokio::time::timeout(PTY_DRAIN, &mut out).await;
                    status
                }
            };
            reaped.store(true, std::sync::atomic::Ordering::Release);
            send_exit_status(status, &handle, channel).await;
        });
        self.running.insert(
            channel,
            Running {
                input: tx,
                direct: Some(direct),
                pgid,
                exited,
                session,
                // What is typed on a terminal is a person's, not a tool's script.
                sniff_left: 0,
                tasks: [feeder, reader],
            },
        );
        Ok(())
    }

    pub(super) fn spawn(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        handle: Handle,
    ) -> Result<(), SpawnError> {
        // The channel now runs a command; its data arrives through `Handler::data`.
        self.channels.remove(&channel);
        let kind = sessions::classify(
            command.as_deref(),
            self.env.get(&channel).map_or(&[], Vec::as_slice),
        );
        let session = self.sessions.open(kind);
        let mut cmd = self.command(channel, command.as_deref());
        if let Some(req) = self.pty_requests.remove(&channel) {
            return Ok(self.spawn_pty(channel, cmd, req, handle, session)?);
        }
        // Its own process group, so a signal reaches the whole pipeline, as with sshd.
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(SpawnError::Spawn)?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let feeder = self.tasks.spawn(feed(stdin, rx));
        let exited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reaped = exited.clone();
        let slot = self.slots.remove(&channel);
        let reader = self.tasks.spawn(async move {
            let _slot = slot;
            let out = pump(stdout, handle.clone(), channel, None);
            let err = pump(stderr, handle.clone(), channel, Some(1));
            let _ = tokio::join!(out, err);
            let status = child.wait().await;
            reaped.store(true, std::sync::atomic::Ordering::Release);
            send_exit_status(status, &handle, channel).await;
        });
        let sniff_left = match session.kind() {
            SessionKind::Ssh => sessions::SNIFF_BYTES,
            _ => 0,
        };
        self.running.insert(
            channel,
            Running {
                input: tx,
                direct: None,
                pgid,
                exited,
                session,
                sniff_left,
                tasks: [feeder, reader],
            },
        );
        Ok(())
    }

    /// VS Code's Remote-SSH runs a bare shell and writes its script to it: the first
    /// input of a session without a terminal may tell what drives it.
    fn sniff_input(&mut self, channel: ChannelId, data: &[u8]) {
        let Some(r) = self.running.get_mut(&channel) else {
            return;
        };
        if r.sniff_left == 0 {
            return;
        }
        let n = data.len().min(r.sniff_left);
        r.sniff_left -= n;
        if let Some(kind) = sessions::sniff(&String::from_utf8_lossy(&data[..n])) {
            r.session.set_kind(kind);
            r.sniff_left = 0;
        }
    }

    /// Client data for the command on `channel`: straight to its terminal while nothing
    /// is queued for it, else handed to its input task.
    pub(super) async fn client_data(&mut self, channel: ChannelId, data: &[u8]) {
        self.sniff_input(channel, data);
        let mut data = data;
        if let Some(direct) = self.running.get(&channel).and_then(|r| r.direct.as_ref()) {
            data = direct.write(data);
            if data.is_empty() {
                return;
            }
            direct
                .queued
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        self.input(channel, Input::Data(bytes::Bytes::copy_from_slice(data)))
            .await;
    }

    /// Hands client input to the channel's command without waiting for it to be read.
    pub(super) async fn input(&mut self, channel: ChannelId, input: Input) {
        if let Some(r) = self.running.get(&channel)
            && r.input.send(input).await.is_err()
        {
            // The command stopped reading its input; the rest is dropped.
            tracing::debug!("input for a finished command dropped");
        }
    }
}

/// Writes client data into a command's stdin until the client's EOF (or the command
/// closes its stdin); dropping stdin is how EOF reaches the command.
async fn feed(stdin: Option<ChildStdin>, mut rx: mpsc::Receiver<Input>) {
    let Some(mut stdin) = stdin else { return };
    while let Some(input) = rx.recv().await {
        match input {
            Input::Data(d) => {
                if stdin.write_all(&d).await.is_err() {
                    return;
                }
            }
            Input::Eof => return,
            Input::Resize(_) => {}
        }
    }
}

/// Reports the command's exit status (or the signal that killed it) and closes the
/// channel.
async fn send_exit_status(
    status: std::io::Result<std::process::ExitStatus>,
    handle: &Handle,
    channel: ChannelId,
) {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => {
                let _ = handle
                    .exit_status_request(channel, u32::try_from(code).unwrap_or(255))
                    .await;
            }
            (None, Some(signal)) => {
                let _ = handle
                    .exit_signal_request(
                        channel,
                        sig_name(signal),
                        status.core_dumped(),
                        String::new(),
                        String::new(),
                    )
                    .await;
            }
            (None, None) => {
                let _ = handle.exit_status_request(channel, 255).await;
            }
        },
        Err(e) => {
            tracing::warn!("cannot wait for the command: {e}");
            let _ = handle.exit_status_request(channel, 255).await;
        }
    }
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

/// Copies a child's output into the channel (stdout, or extended data `ext`).
///
/// # Cancel safety
/// Not cancel safe: output read but not yet sent is lost when it is dropped. A
/// terminal's reader polls it by reference in `select!` and under [`PTY_DRAIN`]'s
/// timeout, so it is dropped only when the drain is over, when what is left is given up.
async fn pump<R: AsyncRead + Unpin>(
    out: Option<R>,
    handle: Handle,
    channel: ChannelId,
    ext: Option<u32>,
) {
    let Some(mut out) = out else { return };
    // Reads land in a large shared buffer whose filled part is handed on without a
    // copy; a new buffer is taken only when little room is left.
    let mut buf = bytes::BytesMut::new();
    loop {
        if buf.capacity() < 16 * 1024 {
            buf.reserve(mesh::ssh::READ_CHUNK);
        }
        match out.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let data = buf.split().freeze();
        let sent = match ext {
            None => handle.data(channel, data).await.is_ok(),
            Some(code) => handle.extended_data(channel, code, data).await.is_ok(),
        };
        if !sent {
            return;
        }
    }
}
