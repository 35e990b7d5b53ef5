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
//! A connection is held to limits (see [`limits`]): what is over one is refused as
//! sshd refuses it (a channel with "resource shortage", a global or channel request
//! with failure) and logged as a warning.
//!
//! The handler here hands each request to the module that holds its topic: `process`
//! (commands, terminals, exit status), `signals`, `tunnels` (forwarding), `host_key`,
//! `limits`, and `tasks`, the tasks a connection owns.
//!
//! Idle connections: russh's server closes a connection after 10 minutes without SSH
//! traffic by default, which cut off terminals left idle; OpenSSH's sshd has no such
//! limit, and neither has the agent unless `--ssh-idle-timeout` sets one (then the
//! agent closes the mesh connection with code `IDLE` and a reason, which `myco ssh`
//! prints, and `myco ssh --stdio` writes to the stderr OpenSSH shows). A stopping agent
//! closes its connections the same way, with code `SHUTDOWN` and "the agent is shutting
//! down", after its shutdown script and before its endpoint closes. A client that is
//! gone is noticed below SSH: iroh's QUIC keep-alives stop being answered and the
//! connection's idle timeout ends it, the SSH session with it, and its commands.

mod host_key;
mod limits;
mod process;
mod signals;
mod tasks;
mod tunnels;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use russh::keys::PrivateKey;
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelId};

use crate::account::Account;
use crate::sessions::SessionCounts;

pub use host_key::{HostKeyError, load_or_create_host_key};
pub(crate) use limits::ChannelSlot;
pub(crate) use tunnels::set_gateway_ports;

use limits::{ChannelCount, MAX_CHANNELS, MAX_ENV_VARS, check_env, too_many_channels};
use process::{Input, PtyRequest, Running, size};
use tasks::{ConnectionTasks, TaskGuard};
use tunnels::UnixForward;

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

/// One SSH connection: russh's handler for it, which holds everything the connection
/// runs (its commands, forwards and SFTP sessions, in [`tasks`]) and is dropped, ending
/// them, when russh's session loop ends.
pub struct SshConnection {
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
    forwards: HashMap<(String, u32), TaskGuard>,
    /// Remote forwards of Unix sockets (`ssh -R /path:...`), by the path asked for.
    unix_forwards: HashMap<String, UnixForward>,
    /// Session channels not yet running anything; a subsystem takes its channel.
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// Agent forwarding, once asked for: the socket's private dir and its listener.
    agent: Option<(tempfile::TempDir, TaskGuard)>,
    /// Every task serving this connection: commands' input and output, forwarded
    /// connections and their listeners, the SFTP session. Last, so it is dropped
    /// (aborting them) after `running` has hung up the commands still running.
    tasks: ConnectionTasks,
}

impl SshConnection {
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
            tasks: ConnectionTasks::default(),
        }
    }
}

impl russh::server::Handler for SshConnection {
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
                let sftp =
                    crate::sftp::serve(ch, session.handle(), home, self.slots.remove(&channel));
                self.tasks.spawn(sftp);
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
        self.signal_command(channel, &signal);
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
        self.open_direct_tcpip(channel, host_to_connect, port_to_connect, reply)
            .await;
        Ok(())
    }

    /// `ssh -R`: listen in the workspace and send each connection back to the client.
    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.listen_tcpip(address, port, session.handle()).await)
    }

    /// `ssh -L ...:/path`: the agent connects to a Unix socket in the workspace.
    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.open_direct_streamlocal(channel, socket_path, reply)
            .await;
        Ok(())
    }

    /// `ssh -R /path:...`: listen on a Unix socket in the workspace.
    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.listen_streamlocal(socket_path, session.handle()))
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
        self.client_data(channel, data).await;
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
