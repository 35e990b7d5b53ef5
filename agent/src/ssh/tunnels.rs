//! Forwarding over an SSH connection: local (`direct-tcpip` and
//! `direct-streamlocal@openssh.com`, `ssh -L`), remote (`tcpip-forward` and
//! `streamlocal-forward@openssh.com`, `ssh -R`) and the client's agent (`ssh -A`).
//!
//! Unix sockets are forwarded both ways like TCP ports (`direct-streamlocal`,
//! `streamlocal-forward@openssh.com`; a relative path starts at the home directory, an
//! existing path is refused as with sshd's `StreamLocalBindUnlink no`, and the agent
//! removes its socket when the forward or the connection ends). Agent forwarding
//! (`auth-agent-req@openssh.com`) makes one listening socket per SSH connection in a
//! new 0700 temp dir, named by `SSH_AUTH_SOCK` in the sessions that follow; each
//! connection to it is an `auth-agent@openssh.com` channel back to the client.
//!
//! Remote forwards listen on loopback (127.0.0.1, or ::1 for an IPv6 address) whatever
//! address the client names, as sshd's `GatewayPorts no`, so `ssh -R 0.0.0.0:8080:...`
//! does not open the workspace's port to its network; `myco agent --ssh-gateway-ports`
//! lets the client choose (`clientspecified`; `*` or `""` is every IPv4 interface).

use std::path::{Path, PathBuf};

use russh::Channel;
use russh::server::{Handle, Msg};
use tokio::io::{AsyncRead, AsyncWrite};

use super::SshConnection;
use super::limits::{ChannelSlot, MAX_CHANNELS, MAX_REMOTE_FORWARDS, too_many_channels};
use super::tasks::{ConnectionTasks, TaskGuard, TaskSpawner};

/// File name of the forwarded agent's socket, inside its private temp dir.
const AGENT_SOCKET: &str = "agent.sock";

/// Whether remote forwards may listen beyond loopback: set once by [`crate::run`]
/// from `--ssh-gateway-ports`. A process-wide setting (like sshd_config's) until the
/// mesh server hands it to each [`SshConnection`].
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

/// A Unix socket the agent listens on for the client (`ssh -R /path:...`): the
/// listener stops and the socket file goes when the forward is cancelled or the SSH
/// connection ends.
pub(super) struct UnixForward {
    _listener: TaskGuard,
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
/// is accepted once it is connected, refused if it cannot be. The connection's `tasks`
/// own it.
fn open_direct<S, F>(
    tasks: &ConnectionTasks,
    channel: Channel<Msg>,
    reply: russh::server::ChannelOpenHandle,
    target: String,
    slot: ChannelSlot,
    connect: F,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    F: std::future::Future<Output = std::io::Result<S>> + Send + 'static,
{
    tasks.spawn(async move {
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
/// on the channel `open` asks it for, as one of the connection's tasks.
fn send_back<S, F>(tasks: &TaskSpawner, mut sock: S, open: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: std::future::Future<Output = Result<Channel<Msg>, russh::Error>> + Send + 'static,
{
    tasks.spawn(async move {
        match open.await {
            Ok(channel) => {
                let mut stream = channel.into_stream();
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut sock).await;
            }
            Err(e) => tracing::debug!("client refused a forwarded connection: {e}"),
        }
    });
}

impl SshConnection {
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
    pub(super) fn agent_socket(&self) -> Option<PathBuf> {
        self.agent
            .as_ref()
            .map(|(dir, _)| dir.path().join(AGENT_SOCKET))
    }

    /// `ssh -A`: listen on a socket in a new private dir and carry each connection to
    /// the client's agent over an `auth-agent@openssh.com` channel.
    pub(super) fn forward_agent(&mut self, handle: Handle) -> std::io::Result<()> {
        if self.agent.is_some() {
            return Ok(());
        }
        // TempDir is created 0700, so only this user reaches the socket.
        let dir = tempfile::Builder::new().prefix("myco-ssh-").tempdir()?;
        let listener = tokio::net::UnixListener::bind(dir.path().join(AGENT_SOCKET))?;
        let spawner = self.tasks.spawner();
        let task = self.tasks.spawn(async move {
            while let Ok((mut local, _)) = listener.accept().await {
                let handle = handle.clone();
                // The connection's, not the listener's: an agent channel in use
                // outlives nothing but the connection.
                spawner.spawn(async move {
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
        self.agent = Some((dir, TaskGuard(task)));
        Ok(())
    }

    /// `ssh -L`: the agent opens the TCP connection and pipes it through the channel.
    pub(super) async fn open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        reply: russh::server::ChannelOpenHandle,
    ) {
        let Some(slot) = self.open.take() else {
            tracing::warn!(
                limit = MAX_CHANNELS,
                target = %format!("{host_to_connect}:{port_to_connect}"),
                "refused a forwarded connection (ssh -L): too many channels open on this SSH connection"
            );
            reply.reject(too_many_channels()).await;
            return;
        };
        let Ok(port) = u16::try_from(port_to_connect) else {
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return;
        };
        let host = host_to_connect.to_owned();
        let target = format!("{host}:{port}");
        open_direct(&self.tasks, channel, reply, target, slot, async move {
            mesh::splice::connect(&host, port).await
        });
    }

    /// `ssh -L ...:/path`: the agent connects to a Unix socket in the workspace (a
    /// Docker or GPG agent socket) and pipes it through the channel.
    pub(super) async fn open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: russh::server::ChannelOpenHandle,
    ) {
        let path = self::socket_path(self.account.home.as_deref(), socket_path);
        let target = path.display().to_string();
        let Some(slot) = self.open.take() else {
            tracing::warn!(
                limit = MAX_CHANNELS,
                %target,
                "refused a forwarded connection (ssh -L): too many channels open on this SSH connection"
            );
            reply.reject(too_many_channels()).await;
            return;
        };
        open_direct(
            &self.tasks,
            channel,
            reply,
            target,
            slot,
            tokio::net::UnixStream::connect(path),
        );
    }

    /// `ssh -R`: listen in the workspace and send each connection back to the client.
    /// Returns whether it listens; `port` 0 asks us to pick, and is set to the port
    /// picked.
    pub(super) async fn listen_tcpip(
        &mut self,
        address: &str,
        port: &mut u32,
        handle: Handle,
    ) -> bool {
        let Ok(wanted) = u16::try_from(*port) else {
            return false;
        };
        if !self.may_add_remote_forward(&format!("{address}:{wanted}")) {
            return false;
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
                return false;
            }
        };
        let bound = listener.local_addr().map(|a| a.port()).unwrap_or(wanted);
        // Port 0 asks us to pick; the client learns which from the reply.
        *port = u32::from(bound);
        let connected_address = address.to_owned();
        // Each connection is the SSH connection's task, not the listener's: cancelling
        // the forward stops the listening only, as with sshd.
        let spawner = self.tasks.spawner();
        let task = self.tasks.spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let handle = handle.clone();
                let connected_address = connected_address.clone();
                send_back(&spawner, tcp, async move {
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
            .insert((address.to_owned(), u32::from(bound)), TaskGuard(task));
        true
    }

    /// `ssh -R /path:...`: listen on a Unix socket in the workspace (for a forwarded
    /// GPG agent, say) and send each connection back to the client. As with sshd's
    /// default (`StreamLocalBindUnlink no`), a path that exists is refused.
    pub(super) fn listen_streamlocal(&mut self, socket_path: &str, handle: Handle) -> bool {
        if !self.may_add_remote_forward(socket_path) {
            return false;
        }
        let path = self::socket_path(self.account.home.as_deref(), socket_path);
        let listener = match tokio::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing::info!(path = %path.display(), "cannot listen for a remote forward: {e}");
                return false;
            }
        };
        let asked = socket_path.to_owned();
        let spawner = self.tasks.spawner();
        let task = self.tasks.spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let handle = handle.clone();
                let asked = asked.clone();
                send_back(&spawner, sock, async move {
                    handle.channel_open_forwarded_streamlocal(asked).await
                });
            }
        });
        self.unix_forwards.insert(
            socket_path.to_owned(),
            UnixForward {
                _listener: TaskGuard(task),
                path,
            },
        );
        true
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
}
