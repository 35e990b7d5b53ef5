//! The agent's SSH server (russh), served over a mesh stream after the ticket check:
//! the mesh is the authentication boundary, so SSH itself asks for nothing.
//!
//! It runs commands (`exec`) and shells through `$SHELL`, on a terminal when the client
//! asks for one (TERM, size, window changes), with the client's environment requests,
//! stdin/stdout/stderr, EOF both ways and the exit status, local forwarding
//! (`direct-tcpip`, `ssh -L`), remote forwarding (`tcpip-forward`, `ssh -R`), agent
//! forwarding (`ssh -A`: a socket in a private temp dir named by `SSH_AUTH_SOCK`),
//! signals to the command, exit-signal, and the SFTP subsystem (`sftp`, `scp`).
//!
//! A connection is held to limits (see [`MAX_CHANNELS`] and the consts beside it):
//! what is over one is refused as sshd refuses it (a channel with "resource
//! shortage", a global or channel request with failure) and logged as a warning.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, ssh_key::LineEnding};
use russh::server::{Auth, Handle, Msg, Session};
use russh::{Channel, ChannelId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::mpsc;

use crate::AbortOnDrop;
use crate::account::Account;
use crate::sessions::{self, SessionCounts, SessionGuard, SessionKind};

/// File name of the forwarded agent's socket, inside its private temp dir.
const AGENT_SOCKET: &str = "agent.sock";

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

/// Whether remote forwards may listen beyond loopback: set once by [`crate::run`]
/// from `--ssh-gateway-ports`. A process-wide setting (like sshd_config's) until the
/// mesh server hands it to each [`SshSession`].
static GATEWAY_PORTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets remote forwards listen where the client asks (OpenSSH's `GatewayPorts
/// clientspecified`) or only on loopback (`GatewayPorts no`, the default).
pub(crate) fn set_gateway_ports(on: bool) {
    GATEWAY_PORTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Where a remote forward listens for the address the client asked for: loopback
/// unless `gateway_ports` (as sshd's `GatewayPorts no`, so `ssh -R 0.0.0.0:8080:...`
/// cannot open a port of the workspace to its network), IPv6 loopback for an IPv6
/// address. With `gateway_ports`, `""` and `*` mean every IPv4 interface and other
/// addresses are taken as asked.
fn remote_bind_host(asked: &str, gateway_ports: bool) -> String {
    let ip: Option<std::net::IpAddr> = asked.trim_matches(['[', ']']).parse().ok();
    if gateway_ports {
        return match asked {
            "" | "*" => "0.0.0.0".into(),
            "localhost" => "127.0.0.1".into(),
            _ => ip.map_or_else(|| asked.to_owned(), |ip| ip.to_string()),
        };
    }
    match ip {
        Some(ip) if ip.is_loopback() => ip.to_string(),
        Some(std::net::IpAddr::V6(_)) => "::1".into(),
        _ => "127.0.0.1".into(),
    }
}

/// Why an `env` request is refused.
#[derive(Debug, PartialEq, Eq)]
enum EnvRefused {
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
fn check_env(name: &str, value: &str, already: usize) -> Result<(), EnvRefused> {
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
struct ChannelCount(Arc<std::sync::atomic::AtomicUsize>);

impl ChannelCount {
    /// A slot for one more channel, or None when [`MAX_CHANNELS`] are open.
    fn take(&self) -> Option<ChannelSlot> {
        use std::sync::atomic::Ordering;
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
pub(crate) struct ChannelSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The refusal sent for a channel over [`MAX_CHANNELS`]; OpenSSH's client prints it.
fn too_many_channels() -> russh::ChannelOpenFailure {
    russh::ChannelOpenFailure::Other {
        // RFC 4254's SSH_OPEN_RESOURCE_SHORTAGE, with our reason.
        code: 4,
        reason: format!("the agent allows {MAX_CHANNELS} open channels per SSH connection"),
    }
}

/// File name of the host key in the agent's data dir.
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// Loads the agent's SSH host key, or creates it (OpenSSH format, mode 0600).
///
/// # Errors
/// The key file exists but cannot be read or parsed, or cannot be written.
pub fn load_or_create_host_key(dir: &Path) -> Result<PrivateKey, String> {
    let path = dir.join(HOST_KEY_FILE);
    if path.exists() {
        return PrivateKey::read_openssh_file(&path)
            .map_err(|e| format!("cannot read SSH host key {}: {e}", path.display()));
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no randomness for an SSH host key: {e}"))?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| format!("cannot encode SSH host key: {e}"))?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot write SSH host key {}: {e}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .map_err(|e| format!("cannot write SSH host key {}: {e}", path.display()))?;
    Ok(key)
}

/// The server configuration: our host key, no authentication beyond the ticket, and
/// the bulk settings measured in bench/ssh.sh (BENCHMARKS.md): a large window so a
/// round trip never stalls a transfer, and AES-GCM first (AES-NI does it in hardware,
/// cheaper than ChaCha20-Poly1305, which OpenSSH's client still picks first for itself).
///
/// `idle_timeout` closes a connection with no SSH traffic either way for that long;
/// None never does. russh's own default is 10 minutes, which cut off a terminal left
/// idle (OpenSSH's sshd has no such limit). A client that is gone is noticed by the
/// mesh connection instead: its keep-alives stop, and QUIC's idle timeout ends it, and
/// with it the SSH session and its commands.
pub fn config(
    host_key: PrivateKey,
    idle_timeout: Option<std::time::Duration>,
) -> Arc<russh::server::Config> {
    Arc::new(russh::server::Config {
        keys: vec![host_key],
        inactivity_timeout: idle_timeout,
        // Nothing is ever rejected (the ticket was checked), so no delay is needed.
        auth_rejection_time: std::time::Duration::ZERO,
        auth_rejection_time_initial: Some(std::time::Duration::ZERO),
        nodelay: true,
        window_size: mesh::ssh::WINDOW,
        maximum_packet_size: mesh::ssh::MAX_PACKET,
        channel_buffer_size: mesh::ssh::CHANNEL_BUFFER,
        preferred: mesh::ssh::server_preferred(),
        ..Default::default()
    })
}

/// Environment every session gets.
#[derive(Debug, Clone)]
pub struct SessionEnv {
    pub workspace: String,
    pub agent: String,
}

impl SessionEnv {
    /// From `owner/workspace.agent`.
    pub fn from_target(target: &str) -> Self {
        let rest = target.split_once('/').map_or(target, |(_, r)| r);
        let (workspace, agent) = rest.split_once('.').unwrap_or((rest, ""));
        Self {
            workspace: workspace.to_owned(),
            agent: agent.to_owned(),
        }
    }
}

/// Where an SSH connection comes from, for OpenSSH's `SSH_CONNECTION` and `SSH_CLIENT`.
#[derive(Debug, Clone)]
pub struct Peer {
    pub conn: iroh::endpoint::Connection,
    /// The agent's own UDP sockets.
    pub bound: Arc<Vec<SocketAddr>>,
}

impl Peer {
    /// `SSH_CONNECTION` ("client_ip client_port server_ip server_port") and
    /// `SSH_CLIENT` ("client_ip client_port server_port") for the path selected when a
    /// command starts. Over the relay the client has no address here, so both are
    /// zeros, as Coder's agent always gives.
    fn ssh_connection(&self) -> (String, String) {
        let paths = self.conn.paths();
        let client = paths
            .iter()
            .find(|p| p.is_selected())
            .and_then(|p| match p.remote_addr() {
                iroh::TransportAddr::Ip(a) => Some(*a),
                _ => None,
            });
        let server = client.and_then(|c| {
            let bound = self.bound.iter().find(|b| b.is_ipv4() == c.is_ipv4())?;
            let mut server = *bound;
            if server.ip().is_unspecified() {
                // The address the kernel would answer the client from (connecting a
                // UDP socket sends nothing).
                let probe = std::net::UdpSocket::bind(SocketAddr::new(server.ip(), 0)).ok()?;
                probe.connect(c).ok()?;
                server.set_ip(probe.local_addr().ok()?.ip());
            }
            Some(server)
        });
        match (client, server) {
            (Some(c), Some(s)) => (
                format!("{} {} {} {}", c.ip(), c.port(), s.ip(), s.port()),
                format!("{} {} {}", c.ip(), c.port(), s.port()),
            ),
            _ => ("0.0.0.0 0 0.0.0.0 0".into(), "0.0.0.0 0 0".into()),
        }
    }
}

/// A terminal the client asked for on a channel.
#[derive(Debug, Clone)]
struct PtyRequest {
    term: String,
    size: pty_process::Size,
}

fn size(cols: u32, rows: u32) -> pty_process::Size {
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
enum Input {
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

/// A channel running a command.
struct Running {
    input: mpsc::Sender<Input>,
    /// Set for a terminal (see [`DirectPty`]).
    direct: Option<DirectPty>,
    /// The command's process group (its pid), for signals.
    pgid: Option<i32>,
    /// Set once the command (its shell) has exited and been reaped.
    exited: Arc<std::sync::atomic::AtomicBool>,
    /// Counted in the stats while it runs.
    session: SessionGuard,
    /// How much more client input to look at for the session's kind.
    sniff_left: usize,
    /// The tasks feeding and reading the command; aborting them drops (kills) it.
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

/// A Unix socket the agent listens on for the client (`ssh -R /path:...`): the
/// listener stops and the socket file goes when the forward is cancelled or the SSH
/// connection ends.
struct UnixForward {
    _listener: AbortOnDrop<()>,
    path: PathBuf,
}

impl Drop for UnixForward {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A socket path from the client: a relative one is taken from the home directory,
/// where a session starts.
fn socket_path(home: Option<&Path>, path: &str) -> PathBuf {
    match home {
        Some(home) => home.join(path),
        None => PathBuf::from(path),
    }
}

/// A forwarded connection the client asked for (`ssh -L`): connected outside the
/// session loop, so a target that never answers stalls no other channel; the channel
/// is accepted once it is connected, refused if it cannot be.
fn open_direct<S, F>(
    channel: Channel<Msg>,
    reply: russh::server::ChannelOpenHandle,
    target: String,
    slot: ChannelSlot,
    connect: F,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    F: std::future::Future<Output = std::io::Result<S>> + Send + 'static,
{
    tokio::spawn(async move {
        let _slot = slot;
        match connect.await {
            Ok(mut sock) => {
                reply.accept().await;
                let mut stream = channel.into_stream();
                if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut sock).await {
                    tracing::debug!(%target, "forwarded connection ended: {e}");
                }
            }
            Err(e) => {
                tracing::info!(%target, "cannot open forwarded connection: {e}");
                reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            }
        }
    });
}

/// A connection to a remote forward's listener (`ssh -R`), sent back to the client
/// on the channel `open` asks it for.
fn send_back<S, F>(mut sock: S, open: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: std::future::Future<Output = Result<Channel<Msg>, russh::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        match open.await {
            Ok(channel) => {
                let mut stream = channel.into_stream();
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut sock).await;
            }
            Err(e) => tracing::debug!("client refused a forwarded connection: {e}"),
        }
    });
}

/// One SSH connection.
pub struct SshSession {
    base_env: SessionEnv,
    peer: Peer,
    /// The account every command runs as, read when the connection started, as sshd
    /// does ([`crate::account`] says why).
    account: Account,
    sessions: Arc<SessionCounts>,
    /// The client's open channels, against [`MAX_CHANNELS`].
    open: ChannelCount,
    /// Per session channel not yet running anything: its place in `open`, handed to
    /// what serves the channel once it runs a command or a subsystem.
    slots: HashMap<ChannelId, ChannelSlot>,
    /// Per channel: environment the client asked for.
    env: HashMap<ChannelId, Vec<(String, String)>>,
    /// Channels whose `env` requests were refused, so only the first refusal of each
    /// is logged as a warning.
    env_refused: std::collections::HashSet<ChannelId>,
    /// Per channel: a requested terminal.
    pty_requests: HashMap<ChannelId, PtyRequest>,
    /// Per channel: the running command. Dropped with the channel or the connection,
    /// which ends the command.
    running: HashMap<ChannelId, Running>,
    /// Remote forwards (`ssh -R`): (address, port) -> the listener's task. Like the
    /// fields below, they last as long as the SSH connection that asked for them.
    forwards: HashMap<(String, u32), AbortOnDrop<()>>,
    /// Remote forwards of Unix sockets (`ssh -R /path:...`), by the path asked for.
    unix_forwards: HashMap<String, UnixForward>,
    /// Session channels not yet running anything; a subsystem takes its channel.
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// Agent forwarding, once asked for: the socket's private dir and its listener.
    agent: Option<(tempfile::TempDir, AbortOnDrop<()>)>,
}

impl SshSession {
    pub(crate) fn new(
        base_env: SessionEnv,
        peer: Peer,
        sessions: Arc<SessionCounts>,
        account: Account,
    ) -> Self {
        Self {
            base_env,
            peer,
            account,
            sessions,
            open: ChannelCount::default(),
            slots: HashMap::new(),
            env: HashMap::new(),
            env_refused: std::collections::HashSet::new(),
            pty_requests: HashMap::new(),
            running: HashMap::new(),
            forwards: HashMap::new(),
            unix_forwards: HashMap::new(),
            channels: HashMap::new(),
            agent: None,
        }
    }

    /// Whether one more remote forward fits under [`MAX_REMOTE_FORWARDS`]; logs the
    /// refusal when not. A forward asked for again (same address and port, or path)
    /// replaces the old one, but is counted as new: a client has no reason to.
    fn may_add_remote_forward(&self, asked: &str) -> bool {
        let held = self.forwards.len() + self.unix_forwards.len();
        if held < MAX_REMOTE_FORWARDS {
            return true;
        }
        tracing::warn!(
            asked,
            limit = MAX_REMOTE_FORWARDS,
            "refused a remote forward (ssh -R): this SSH connection holds the most allowed"
        );
        false
    }

    /// The forwarded agent's socket, if the client asked for agent forwarding.
    fn agent_socket(&self) -> Option<PathBuf> {
        self.agent
            .as_ref()
            .map(|(dir, _)| dir.path().join(AGENT_SOCKET))
    }

    /// `ssh -A`: listen on a socket in a new private dir and carry each connection to
    /// the client's agent over an `auth-agent@openssh.com` channel.
    fn forward_agent(&mut self, handle: Handle) -> std::io::Result<()> {
        if self.agent.is_some() {
            return Ok(());
        }
        // TempDir is created 0700, so only this user reaches the socket.
        let dir = tempfile::Builder::new().prefix("myco-ssh-").tempdir()?;
        let listener = tokio::net::UnixListener::bind(dir.path().join(AGENT_SOCKET))?;
        let task = tokio::spawn(async move {
            while let Ok((mut local, _)) = listener.accept().await {
                let handle = handle.clone();
                tokio::spawn(async move {
                    match handle.channel_open_agent().await {
                        Ok(channel) => {
                            let mut stream = channel.into_stream();
                            let _ = tokio::io::copy_bidirectional(&mut stream, &mut local).await;
                        }
                        Err(e) => tracing::debug!("client refused an agent channel: {e}"),
                    }
                });
            }
        });
        self.agent = Some((dir, AbortOnDrop(task)));
        Ok(())
    }

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
    ) -> Result<(), String> {
        let (pty, pts) = pty_process::open().map_err(|e| e.to_string())?;
        pty.resize(req.size).map_err(|e| e.to_string())?;
        let mut command = pty_process::Command::from(cmd).env("TERM", &req.term);
        if let Ok(tty) = nix::unistd::ttyname(&pts) {
            command = command.env("SSH_TTY", tty);
        }
        let mut child = command.spawn(pts).map_err(|e| e.to_string())?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        let direct = DirectPty {
            fd: std::os::fd::AsFd::as_fd(&pty)
                .try_clone_to_owned()
                .map_err(|e| e.to_string())?,
            queued: Arc::default(),
        };
        let queued = direct.queued.clone();
        let (read, mut write) = pty.into_split();
        let (tx, mut rx) = mpsc::channel(INPUT_QUEUE);
        let feeder = tokio::spawn(async move {
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
        let reader = tokio::spawn(async move {
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
            report(status, &handle, channel).await;
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
                tasks: [feeder.abort_handle(), reader.abort_handle()],
            },
        );
        Ok(())
    }

    fn spawn(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        handle: Handle,
    ) -> Result<(), String> {
        // The channel now runs a command; its data arrives through `Handler::data`.
        self.channels.remove(&channel);
        let kind = sessions::classify(
            command.as_deref(),
            self.env.get(&channel).map_or(&[], Vec::as_slice),
        );
        let session = self.sessions.open(kind);
        let mut cmd = self.command(channel, command.as_deref());
        if let Some(req) = self.pty_requests.remove(&channel) {
            return self.spawn_pty(channel, cmd, req, handle, session);
        }
        // Its own process group, so a signal reaches the whole pipeline, as with sshd.
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let feeder = tokio::spawn(feed(stdin, rx));
        let exited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reaped = exited.clone();
        let slot = self.slots.remove(&channel);
        let reader = tokio::spawn(async move {
            let _slot = slot;
            let out = pump(stdout, handle.clone(), channel, None);
            let err = pump(stderr, handle.clone(), channel, Some(1));
            let _ = tokio::join!(out, err);
            let status = child.wait().await;
            reaped.store(true, std::sync::atomic::Ordering::Release);
            report(status, &handle, channel).await;
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
                tasks: [feeder.abort_handle(), reader.abort_handle()],
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

    /// Hands client input to the channel's command without waiting for it to be read.
    async fn input(&mut self, channel: ChannelId, input: Input) {
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
async fn report(
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

/// The SSH name of a signal number (RFC 4254 6.10), or `Custom` with its Linux name.
fn sig_name(signal: i32) -> russh::Sig {
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

/// Copies a child's output into the channel (stdout, or extended data `ext`).
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

impl russh::server::Handler for SshSession {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = self.open.take() else {
            tracing::warn!(
                limit = MAX_CHANNELS,
                "refused a session channel: too many channels open on this SSH connection"
            );
            reply.reject(too_many_channels()).await;
            return Ok(());
        };
        self.slots.insert(channel.id(), slot);
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        self.slots.remove(&channel);
        // Ends the command if it still runs (the client went away first).
        self.running.remove(&channel);
        self.env.remove(&channel);
        self.env_refused.remove(&channel);
        self.pty_requests.remove(&channel);
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, self.channels.remove(&channel)) {
            ("sftp", Some(ch)) => {
                // Where a shell of the same account starts.
                let home = self.account.home.clone().unwrap_or_else(|| "/".into());
                crate::sftp::serve(ch, session.handle(), home, self.slots.remove(&channel));
                session.channel_success(channel)
            }
            (name, _) => {
                tracing::info!(name, "refused an unknown subsystem");
                session.channel_failure(channel)
            }
        }
    }

    /// russh answers the request with success or failure from the result.
    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        match self.forward_agent(session.handle()) {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::warn!("cannot forward the SSH agent: {e}");
                Ok(false)
            }
        }
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: russh::Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Not once the command has exited (as sshd): its group id may be reused.
        let pgid = self
            .running
            .get(&channel)
            .filter(|r| !r.exited.load(std::sync::atomic::Ordering::Acquire))
            .and_then(|r| r.pgid);
        let (Some(pgid), Some(sig)) = (pgid, signal_of(&signal)) else {
            return Ok(());
        };
        // The command's whole process group: `a | b` or `cd x && make` all get it.
        if let Err(e) = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig) {
            tracing::debug!(pgid, "cannot signal the command: {e}");
        }
        Ok(())
    }

    /// `ssh -L`: the agent opens the TCP connection and pipes it through the channel.
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = self.open.take() else {
            tracing::warn!(
                limit = MAX_CHANNELS,
                target = %format!("{host_to_connect}:{port_to_connect}"),
                "refused a forwarded connection (ssh -L): too many channels open on this SSH connection"
            );
            reply.reject(too_many_channels()).await;
            return Ok(());
        };
        let Ok(port) = u16::try_from(port_to_connect) else {
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        let host = host_to_connect.to_owned();
        let target = format!("{host}:{port}");
        open_direct(channel, reply, target, slot, async move {
            mesh::splice::connect(&host, port).await
        });
        Ok(())
    }

    /// `ssh -R`: listen in the workspace and send each connection back to the client.
    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Ok(wanted) = u16::try_from(*port) else {
            return Ok(false);
        };
        if !self.may_add_remote_forward(&format!("{address}:{wanted}")) {
            return Ok(false);
        }
        let gateway_ports = GATEWAY_PORTS.load(std::sync::atomic::Ordering::Relaxed);
        let bind_host = remote_bind_host(address, gateway_ports);
        if bind_host != remote_bind_host(address, true) {
            tracing::info!(
                address,
                bind = %bind_host,
                "a remote forward asked for a non-loopback address; listening on loopback (the agent's --ssh-gateway-ports is off)"
            );
        }
        let listener = match tokio::net::TcpListener::bind((bind_host.as_str(), wanted)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::info!(
                    address,
                    port = wanted,
                    "cannot listen for a remote forward: {e}"
                );
                return Ok(false);
            }
        };
        let bound = listener.local_addr().map(|a| a.port()).unwrap_or(wanted);
        // Port 0 asks us to pick; the client learns which from the reply.
        *port = u32::from(bound);
        let handle = session.handle();
        let connected_address = address.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let handle = handle.clone();
                let connected_address = connected_address.clone();
                send_back(tcp, async move {
                    handle
                        .channel_open_forwarded_tcpip(
                            connected_address,
                            u32::from(bound),
                            peer.ip().to_string(),
                            u32::from(peer.port()),
                        )
                        .await
                });
            }
        });
        self.forwards
            .insert((address.to_owned(), u32::from(bound)), AbortOnDrop(task));
        Ok(true)
    }

    /// `ssh -L ...:/path`: the agent connects to a Unix socket in the workspace (a
    /// Docker or GPG agent socket) and pipes it through the channel.
    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let path = self::socket_path(self.account.home.as_deref(), socket_path);
        let target = path.display().to_string();
        let Some(slot) = self.open.take() else {
            tracing::warn!(
                limit = MAX_CHANNELS,
                %target,
                "refused a forwarded connection (ssh -L): too many channels open on this SSH connection"
            );
            reply.reject(too_many_channels()).await;
            return Ok(());
        };
        open_direct(
            channel,
            reply,
            target,
            slot,
            tokio::net::UnixStream::connect(path),
        );
        Ok(())
    }

    /// `ssh -R /path:...`: listen on a Unix socket in the workspace (for a forwarded
    /// GPG agent, say) and send each connection back to the client. As with sshd's
    /// default (`StreamLocalBindUnlink no`), a path that exists is refused.
    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if !self.may_add_remote_forward(socket_path) {
            return Ok(false);
        }
        let path = self::socket_path(self.account.home.as_deref(), socket_path);
        let listener = match tokio::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing::info!(path = %path.display(), "cannot listen for a remote forward: {e}");
                return Ok(false);
            }
        };
        let handle = session.handle();
        let asked = socket_path.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let handle = handle.clone();
                let asked = asked.clone();
                send_back(sock, async move {
                    handle.channel_open_forwarded_streamlocal(asked).await
                });
            }
        });
        self.unix_forwards.insert(
            socket_path.to_owned(),
            UnixForward {
                _listener: AbortOnDrop(task),
                path,
            },
        );
        Ok(true)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.unix_forwards.remove(socket_path).is_some())
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // Dropping the listener's task stops it.
        Ok(self.forwards.remove(&(address.to_owned(), port)).is_some())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let vars = self.env.entry(channel).or_default();
        if let Err(why) = check_env(name, value, vars.len()) {
            // The first refusal of a channel is a warning; a client sending thousands
            // must not flood the log.
            if self.env_refused.insert(channel) {
                tracing::warn!(
                    name = %name.chars().take(64).collect::<String>(),
                    limit = MAX_ENV_VARS,
                    "refused an environment variable: {why} (further refusals on this channel are not logged)"
                );
            }
            return session.channel_failure(channel);
        }
        vars.push((name.to_owned(), value.to_owned()));
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        match self.spawn(channel, Some(command), session.handle()) {
            Ok(()) => session.channel_success(channel),
            Err(e) => {
                tracing::warn!("cannot start command: {e}");
                session.channel_failure(channel)
            }
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.spawn(channel, None, session.handle()) {
            Ok(()) => session.channel_success(channel),
            Err(e) => {
                tracing::warn!("cannot start shell: {e}");
                session.channel_failure(channel)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.pty_requests.insert(
            channel,
            PtyRequest {
                term: term.to_owned(),
                size: size(col_width, row_height),
            },
        );
        session.channel_success(channel)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.input(channel, Input::Resize(size(col_width, row_height)))
            .await;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.sniff_input(channel, data);
        let mut data = data;
        if let Some(direct) = self.running.get(&channel).and_then(|r| r.direct.as_ref()) {
            data = direct.write(data);
            if data.is_empty() {
                return Ok(());
            }
            direct
                .queued
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        self.input(channel, Input::Data(bytes::Bytes::copy_from_slice(data)))
            .await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.input(channel, Input::Eof).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_forwards_bind_loopback_unless_gateway_ports() {
        for asked in ["", "*", "0.0.0.0", "192.0.2.7", "localhost", "example.com"] {
            assert_eq!(remote_bind_host(asked, false), "127.0.0.1", "{asked:?}");
        }
        for asked in ["::", "[::]", "2001:db8::1"] {
            assert_eq!(remote_bind_host(asked, false), "::1", "{asked:?}");
        }
        // Loopback as asked: there is nothing to narrow.
        assert_eq!(remote_bind_host("127.0.0.2", false), "127.0.0.2");
        assert_eq!(remote_bind_host("::1", false), "::1");

        assert_eq!(remote_bind_host("", true), "0.0.0.0");
        assert_eq!(remote_bind_host("*", true), "0.0.0.0");
        assert_eq!(remote_bind_host("localhost", true), "127.0.0.1");
        assert_eq!(remote_bind_host("192.0.2.7", true), "192.0.2.7");
        assert_eq!(remote_bind_host("[::]", true), "::");
        assert_eq!(remote_bind_host("example.com", true), "example.com");
    }

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
