//! `myco port-forward WS --tcp SPEC --udp SPEC`: local TCP listeners and UDP sockets
//! whose traffic the agent carries to ports in the workspace, over one mesh connection
//! (`myco/forward/1`: one QUIC stream per TCP connection or per UDP source).
//!
//! The first stream carries the ticket handshake and then stays open, silent, as the
//! session's anchor: when this process ends it, the agent closes the connection.
//! Every forwarded TCP connection and every UDP source is a new bi stream that starts
//! with a `mesh::frame` [`ForwardRequest`] (always to `127.0.0.1`); the agent connects
//! (TCP) or binds a UDP socket `connect`ed to the target and answers a
//! [`ForwardReply`], whose error is a sentence for the user. TCP is raw bytes both
//! ways (`mesh::splice::tcp`, shared by both ends: a half-close travels as a QUIC
//! finish, a failure as a reset with code 1). UDP is each datagram as a big-endian
//! `u16` length and the payload (`frame::write_datagram`); each local UDP socket
//! keeps a map from source address to session stream and answers with
//! `send_to(source)`, and the agent has a socket per session, so the target sees one
//! peer per source. Either side ends a UDP session after [`UDP_IDLE`] without a
//! datagram either way by finishing its stream.

mod spec;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use iroh::endpoint::{Connection, ConnectionError, RecvStream, SendStream};
use mesh::control::{ForwardProtocol, ForwardReply, ForwardRequest};
use mesh::{WorkspaceRef, frame, splice};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

use crate::Globals;
use crate::dial::{self, MeshArgs};
use spec::PortForward;

/// Where the agent connects: the workspace's own loopback, as Coder does.
const REMOTE_HOST: &str = "127.0.0.1";
/// A UDP source silent for this long (both ways) loses its session; the next
/// datagram from it opens a new one. The agent keeps the same limit.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Datagrams waiting for one UDP session's stream; more are dropped, as a full
/// socket buffer would.
const UDP_QUEUE: usize = 512;

const EXAMPLES: &str = "\
Examples:
  myco port-forward dev --tcp 8080                  local 8080 -> 8080 in dev
  myco port-forward dev --tcp 5678:1234             local 5678 -> 1234 in dev
  myco port-forward dev --tcp 0.0.0.0:8080:3000     listen on every interface
  myco port-forward dev --tcp 8080,9000:3000,9090-9092 --udp 5353
  myco port-forward alice/dev.main --udp 9090-9092:9190-9192

Each SPEC is PORT, LOCAL:REMOTE or ADDR:LOCAL:REMOTE (IPv6 as [ADDR]), a range A-B
(each port to itself) or A-B:C-D (range to range), or a comma-separated list of
these. Local ports listen on 127.0.0.1 unless an ADDR is given; the agent connects
to 127.0.0.1:REMOTE in the workspace. UDP keeps one session per local source, so
stateful protocols work; a session idle for 60 s ends.

Runs until Ctrl-C or SIGTERM. If the connection to the agent is lost, it prints
why and exits non-zero (it does not redial): run it again, e.g. from a loop.";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// The agent: [OWNER/]WORKSPACE[.AGENT], or the host alias myco.WORKSPACE[.AGENT].
    #[arg(value_parser = dial::parse_target, value_name = "WORKSPACE")]
    target: WorkspaceRef,
    /// Forward TCP: PORT, LOCAL:REMOTE, ADDR:LOCAL:REMOTE, ranges A-B[:C-D], lists
    /// with commas. Repeatable.
    #[arg(
        short = 'p',
        long = "tcp",
        value_name = "SPEC",
        env = "MYCO_PORT_FORWARD_TCP"
    )]
    tcp: Vec<String>,
    /// Forward UDP, same SPEC syntax as --tcp. Repeatable.
    #[arg(long = "udp", value_name = "SPEC", env = "MYCO_PORT_FORWARD_UDP")]
    udp: Vec<String>,
    #[command(flatten)]
    mesh: MeshArgs,
}

/// A local socket ready to forward.
enum Bound {
    Tcp(TcpListener, PortForward),
    Udp(UdpSocket, PortForward),
}

/// What every forwarding task needs to know.
#[derive(Clone)]
struct Route {
    conn: Connection,
    fwd: PortForward,
    /// `127.0.0.1:5678 -> dev:1234 (tcp)`, for messages.
    label: Arc<str>,
}

pub async fn run(globals: &Globals, args: Args) -> anyhow::Result<()> {
    if args.tcp.is_empty() && args.udp.is_empty() {
        bail!("nothing to forward; give at least one --tcp or --udp SPEC, e.g. --tcp 8080");
    }
    let forwards = spec::parse_all(&args.tcp, &args.udp)?;
    // Every local port first: a port in use fails before the mesh is dialed.
    let mut bound = Vec::with_capacity(forwards.len());
    for fwd in forwards {
        bound.push(bind(fwd).await?);
    }
    let d = dial::dial(globals, &args.target, mesh::alpn::FORWARD, &args.mesh).await?;
    // `d.send`/`d.recv` stay open as the session's anchor until we return.
    // Signals are caught from here on (not during the dial, which Ctrl-C should just
    // kill), and before the first line a script may react to by signalling us.
    let (mut term, mut int) = (
        signal(SignalKind::terminate()).context("cannot catch SIGTERM")?,
        signal(SignalKind::interrupt()).context("cannot catch SIGINT")?,
    );
    let mut stdout = std::io::stdout();
    // Every forward's listener task, stopped when this returns.
    let mut serving = JoinSet::new();
    for b in bound {
        let fwd = match &b {
            Bound::Tcp(_, f) | Bound::Udp(_, f) => *f,
        };
        let label: Arc<str> = format!(
            "{} -> {}:{} ({})",
            fwd.local, args.target, fwd.remote_port, fwd.protocol
        )
        .into();
        // A closed stdout is no reason to stop forwarding.
        let _ = writeln!(stdout, "Forwarding {label}");
        let route = Route {
            conn: d.conn.clone(),
            fwd,
            label,
        };
        match b {
            Bound::Tcp(listener, _) => serving.spawn(serve_tcp(listener, route)),
            Bound::Udp(socket, _) => serving.spawn(serve_udp(socket, route)),
        };
    }
    let stopped = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    tokio::select! {
        () = stopped => {
            d.conn.close(0u32.into(), b"done");
            let _ = tokio::time::timeout(Duration::from_secs(1), d.mesh.endpoint.close()).await;
            Ok(())
        }
        e = d.conn.closed() => {
            let why = match e {
                ConnectionError::ApplicationClosed(c) if c.reason.is_empty() => {
                    "the agent closed it (it may have stopped)".to_owned()
                }
                ConnectionError::ApplicationClosed(c) => String::from_utf8_lossy(&c.reason).into_owned(),
                other => other.to_string(),
            };
            bail!(
                "lost the connection to {}: {why}; run `myco port-forward` again to reconnect",
                d.hello.agent
            )
        }
    }
}

/// Binds the local side of one forward, with an error that says what to do.
async fn bind(fwd: PortForward) -> anyhow::Result<Bound> {
    let result = match fwd.protocol {
        ForwardProtocol::Tcp => TcpListener::bind(fwd.local)
            .await
            .map(|l| Bound::Tcp(l, fwd)),
        ForwardProtocol::Udp => UdpSocket::bind(fwd.local).await.map(|s| Bound::Udp(s, fwd)),
    };
    result.map_err(|e| {
        use std::io::ErrorKind;
        let why = match e.kind() {
            ErrorKind::AddrInUse => "address already in use; pick another local port".to_owned(),
            ErrorKind::PermissionDenied => {
                "permission denied; ports below 1024 need root, pick a higher local port".to_owned()
            }
            ErrorKind::AddrNotAvailable => format!(
                "{} is not an address of this machine; listen on 127.0.0.1 or one of its addresses",
                fwd.local.ip()
            ),
            _ => e.to_string(),
        };
        anyhow::anyhow!("cannot listen on {} ({}): {why}", fwd.local, fwd.protocol)
    })
}

/// Opens a forwarding stream and has the agent connect it to the remote port.
///
/// # Errors
/// The stream could not be opened, or the agent's reason for refusing it.
async fn open(route: &Route) -> anyhow::Result<(SendStream, RecvStream)> {
    let (mut send, mut recv) = route
        .conn
        .open_bi()
        .await
        .context("cannot open a stream to the agent")?;
    frame::write(
        &mut send,
        &ForwardRequest {
            protocol: route.fwd.protocol,
            host: REMOTE_HOST.to_owned(),
            port: route.fwd.remote_port,
        },
    )
    .await
    .context("cannot send the forward request")?;
    let reply: ForwardReply = frame::read(&mut recv)
        .await
        .context("the agent did not answer the forward request")?;
    if let Some(e) = reply.error {
        bail!(e);
    }
    Ok((send, recv))
}

/// Accepts local connections; each one's task is owned here and stops with it.
async fn serve_tcp(listener: TcpListener, route: Route) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        match accepted {
            Ok((tcp, _peer)) => {
                let route = route.clone();
                connections.spawn(async move {
                    if let Err(e) = tcp_connection(tcp, &route).await {
                        eprintln!("{}: {}", route.label, mesh::error::error_chain(e.as_ref()));
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors, most likely: say so, and do not spin.
                eprintln!("{}: cannot accept a connection: {e}", route.label);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One local TCP connection: the agent connects its side, then bytes flow both ways.
/// Setup failures are reported; a connection that breaks later is the application's
/// business, as with any TCP connection.
async fn tcp_connection(tcp: TcpStream, route: &Route) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let (send, recv) = open(route).await?;
    if let Err(e) = splice::tcp(tcp, send, recv).await {
        tracing::debug!(route = %route.label, "forwarded connection broke: {e}");
    }
    Ok(())
}

/// One local UDP socket: each source address gets its own session (stream), so the
/// workspace side sees one peer per source and stateful protocols keep their state.
async fn serve_udp(socket: UdpSocket, route: Route) {
    let socket = Arc::new(socket);
    // source -> (session id, its queue); ids tell a session from its successor.
    let mut sessions: HashMap<SocketAddr, (u64, mpsc::Sender<Vec<u8>>)> = HashMap::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut next_id = 0u64;
    // Each source's session task, owned here; reaped as new ones start.
    let mut running = JoinSet::new();
    let mut buf = vec![0u8; frame::MAX_DATAGRAM];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (n, source) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP errors from earlier replies surface here; they concern
                        // one source, not the socket.
                        tracing::debug!(route = %route.label, "udp receive: {e}");
                        continue;
                    }
                };
                let mut datagram = buf[..n].to_vec();
                if let Some((_, queue)) = sessions.get(&source) {
                    match queue.try_send(datagram) {
                        Ok(()) => continue,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::debug!(route = %route.label, %source, "udp queue full, datagram dropped");
                            continue;
                        }
                        // The session just ended: this datagram opens the next one.
                        Err(mpsc::error::TrySendError::Closed(d)) => datagram = d,
                    }
                }
                let (queue, rx) = mpsc::channel(UDP_QUEUE);
                // A fresh channel has room for its first datagram.
                let _ = queue.try_send(datagram);
                next_id += 1;
                sessions.insert(source, (next_id, queue));
                let session = UdpSession {
                    route: route.clone(),
                    socket: socket.clone(),
                    source,
                };
                let ended = ended_tx.clone();
                let id = next_id;
                while running.try_join_next().is_some() {}
                running.spawn(async move {
                    if let Err(e) = session.run(rx).await {
                        eprintln!(
                            "{} from {source}: {}",
                            session.route.label,
                            mesh::error::error_chain(e.as_ref())
                        );
                    }
                    let _ = ended.send((source, id));
                });
            }
            Some((source, id)) = ended_rx.recv() => {
                if sessions.get(&source).is_some_and(|(current, _)| *current == id) {
                    sessions.remove(&source);
                }
            }
        }
    }
}

/// The datagrams of one local source, carried on their own stream.
struct UdpSession {
    route: Route,
    socket: Arc<UdpSocket>,
    source: SocketAddr,
}

impl UdpSession {
    /// Relays until the agent ends the stream or neither side has sent for [`UDP_IDLE`].
    async fn run(&self, mut queue: mpsc::Receiver<Vec<u8>>) -> anyhow::Result<()> {
        let (mut send, mut recv) = open(&self.route).await?;
        let activity = Notify::new();
        let to_agent = async {
            while let Some(d) = queue.recv().await {
                frame::write_datagram(&mut send, &d).await?;
                activity.notify_one();
            }
            anyhow::Ok(())
        };
        let from_agent = async {
            while let Some(d) = frame::read_datagram(&mut recv).await? {
                self.socket.send_to(&d, self.source).await?;
                activity.notify_one();
            }
            anyhow::Ok(())
        };
        let result = tokio::select! {
            r = to_agent => r,
            r = from_agent => r,
            () = splice::until_idle(&activity, UDP_IDLE) => Ok(()),
        };
        let _ = send.finish();
        if let Err(e) = &result {
            tracing::debug!(route = %self.route.label, source = %self.source, "udp session broke: {e:#}");
        }
        // A session that worked and then broke is UDP's business, like a lost datagram.
        Ok(())
    }
}
