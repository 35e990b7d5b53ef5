//! The agent's mesh server ([`MeshServer`]): accepts connections, checks each one's
//! ticket, and runs the protocol its ALPN names (port forwarding lives in `forward`).

use std::sync::Arc;
use std::time::Duration;

use iroh::Endpoint;
use iroh::endpoint::{Connection, RecvStream, SendStream};
use mesh::alpn::{self, close};
use mesh::control::{AgentHello, ClientHello, Direction, SpeedtestRequest, SpeedtestResult};
use mesh::{Timestamp, frame, ticket};

use tracing::Instrument;

use crate::WelcomeRx;
use crate::sessions::SessionKind;
use crate::stats::MeshActivity;

/// How long a client has to present its ticket.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bulk data is written in chunks of this size.
const CHUNK: usize = 256 * 1024;
/// The longest speedtest the agent will run.
const MAX_SPEEDTEST: Duration = Duration::from_secs(120);

/// The agent's mesh server: owns the accept loop and, through it, one task per
/// connection (which owns that connection's streams). Modelled on iroh's `Router`:
/// dropping it aborts everything; [`MeshServer::shutdown`] stops it in order.
#[must_use = "dropping a MeshServer aborts its accept loop and every connection it serves"]
pub(crate) struct MeshServer {
    endpoint: Endpoint,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    accept_loop: crate::AbortOnDrop<()>,
}

impl MeshServer {
    /// Starts accepting connections on `endpoint`.
    pub(crate) fn spawn(
        endpoint: Endpoint,
        welcome: WelcomeRx,
        ssh: Arc<russh::server::Config>,
        activity: Arc<MeshActivity>,
    ) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let accept_loop = crate::AbortOnDrop(tokio::spawn(accept_loop(
            endpoint.clone(),
            stopped,
            welcome,
            ssh,
            activity,
        )));
        Self {
            endpoint,
            stop: Some(stop),
            accept_loop,
        }
    }

    /// Stops accepting, closes the endpoint (which closes every connection and waits
    /// for peers to acknowledge), and waits for every connection's task to end.
    ///
    /// # Cancel safety
    /// Dropping the future (a timeout) drops the server, which aborts the tasks that
    /// had not ended yet.
    pub(crate) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let (_, ended) = tokio::join!(self.endpoint.close(), &mut self.accept_loop.0);
        if let Err(e) = ended
            && e.is_panic()
        {
            tracing::warn!("the mesh accept loop panicked: {e}");
        }
    }
}

/// Accepts connections until told to stop or the endpoint closes, then waits for the
/// connections' tasks, which it owns: aborting it aborts them.
async fn accept_loop(
    endpoint: Endpoint,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    welcome: WelcomeRx,
    ssh: Arc<russh::server::Config>,
    activity: Arc<MeshActivity>,
) {
    let bound = Arc::new(endpoint.bound_sockets());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
            Some(ended) = connections.join_next() => {
                log_panic(ended);
                continue;
            }
            _ = &mut stop => break,
        };
        let welcome = welcome.clone();
        let ssh = ssh.clone();
        let activity = activity.clone();
        let me = endpoint.id();
        let bound = bound.clone();
        connections.spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("incoming connection failed: {e}");
                    return;
                }
            };
            let span = tracing::info_span!("conn", peer = %conn.remote_id().fmt_short());
            if let Err(e) = handle(conn, me, bound, welcome, ssh, activity)
                .instrument(span)
                .await
            {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    // The endpoint is closing, which ends every connection and so every task.
    while let Some(ended) = connections.join_next().await {
        log_panic(ended);
    }
}

fn log_panic(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended
        && e.is_panic()
    {
        tracing::warn!("a mesh connection's task panicked: {e}");
    }
}

/// Why a mesh connection ended with an error; logged, since the client has been told
/// already (a refusal closes the connection with its reason) or is gone.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnd {
    /// The client's first stream never came.
    #[error(transparent)]
    Accept(#[from] iroh::endpoint::ConnectionError),
    /// The connection was refused (no ticket, a bad one, revoked access, an unknown
    /// protocol); the reason was sent to the client.
    #[error("{0}")]
    Refused(String),
    /// The agent's hello could not be written.
    #[error(transparent)]
    Hello(frame::FrameError),
    /// The SSH session failed.
    #[error(transparent)]
    Ssh(#[from] russh::Error),
    /// The SSH connection was closed for idling past `--ssh-idle-timeout`.
    #[error("{0}")]
    SshIdle(String),
    /// A ping stream failed.
    #[error(transparent)]
    Ping(#[from] iroh::endpoint::WriteError),
    /// A speedtest failed.
    #[error(transparent)]
    Speedtest(#[from] SpeedtestError),
    /// A forwarding session failed.
    #[error(transparent)]
    Forward(#[from] crate::forward::ServeError),
}

/// Why a speedtest ended with an error.
#[derive(Debug, thiserror::Error)]
enum SpeedtestError {
    /// The request or the upload's result frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    /// Sending the download's data failed.
    #[error(transparent)]
    Write(#[from] iroh::endpoint::WriteError),
    /// The stream was gone when the agent finished it.
    #[error(transparent)]
    Finish(#[from] iroh::endpoint::ClosedStream),
    /// Receiving the upload's data failed.
    #[error(transparent)]
    Read(#[from] iroh::endpoint::ReadError),
}

async fn handle(
    conn: Connection,
    me: iroh::EndpointId,
    bound: Arc<Vec<std::net::SocketAddr>>,
    welcome: WelcomeRx,
    ssh: Arc<russh::server::Config>,
    activity: Arc<MeshActivity>,
) -> Result<(), ConnectionEnd> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let hello: ClientHello = tokio::time::timeout(HELLO_TIMEOUT, frame::read(&mut recv))
        .await
        .map_err(|_| refuse(&conn, close::PROTOCOL, "no ticket presented in time"))?
        .map_err(|e| refuse(&conn, close::PROTOCOL, &format!("bad hello: {e}")))?;
    let known = welcome.borrow().clone();
    let Some(known) = known else {
        return Err(refuse(
            &conn,
            close::TICKET_REFUSED,
            "the agent has not reached its coordinator yet, so it cannot check tickets; try again shortly",
        ));
    };
    let me = ticket::AgentIdentity {
        endpoint: me,
        workspace_id: known.workspace_id.clone(),
        agent_id: known.agent_id.clone(),
    };
    let claims = ticket::verify(
        &hello.ticket,
        &known.coordinator_key,
        conn.remote_id(),
        &me,
        Timestamp::now(),
    )
    .map_err(|e| refuse(&conn, close::TICKET_REFUSED, &e.to_string()))?;
    tracing::info!(user = %claims.user, alpn = %String::from_utf8_lossy(conn.alpn()), "connection accepted");
    // Only connections with a valid ticket count in the stats.
    activity.track(&conn, &claims).map_err(|_| {
        refuse(
            &conn,
            close::REVOKED,
            "the coordinator revoked the access this ticket was issued under; log in again",
        )
    })?;
    frame::write(
        &mut send,
        &AgentHello {
            agent: known.agent.clone(),
            endpoint_id: me.endpoint,
        },
    )
    .await
    .map_err(ConnectionEnd::Hello)?;
    match conn.alpn() {
        a if a == alpn::PING => Ok(echo(send, recv).await?),
        a if a == alpn::SPEEDTEST => Ok(speedtest(send, recv).await?),
        a if a == alpn::SSH => {
            let env = crate::ssh::SessionEnv::from_target(&known.agent);
            let idle_timeout = ssh.inactivity_timeout;
            let account = crate::account::Account::lookup().await;
            let session = russh::server::run_stream(
                ssh,
                tokio::io::join(recv, send),
                crate::ssh::SshConnection::new(
                    env,
                    crate::ssh::Peer {
                        conn: conn.clone(),
                        bound,
                    },
                    activity.sessions.clone(),
                    account,
                ),
            )
            .await?;
            match session.await {
                // The client prints the reason instead of a bare "ended".
                Err(russh::Error::InactivityTimeout) => {
                    let reason = format!(
                        "the agent closed the SSH connection after {} without traffic (its --ssh-idle-timeout)",
                        humantime::format_duration(idle_timeout.unwrap_or_default())
                    );
                    tracing::info!("SSH connection closed: idle");
                    conn.close(close::IDLE.into(), reason.as_bytes());
                    Err(ConnectionEnd::SshIdle(reason))
                }
                ended => Ok(ended?),
            }
        }
        a if a == alpn::FORWARD => {
            let _session = activity.sessions.open(SessionKind::PortForward);
            Ok(crate::forward::serve(conn.clone(), send, recv).await?)
        }
        other => Err(refuse(
            &conn,
            close::PROTOCOL,
            &format!("unknown protocol {}", String::from_utf8_lossy(other)),
        )),
    }
}

/// Closes the connection with a reason the client prints, and returns it for the log.
fn refuse(conn: &Connection, code: u32, reason: &str) -> ConnectionEnd {
    tracing::info!(reason, "connection refused");
    conn.close(code.into(), reason.as_bytes());
    ConnectionEnd::Refused(reason.to_owned())
}

/// Ping: echo every 16-byte probe until the client finishes its stream.
async fn echo(
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), iroh::endpoint::WriteError> {
    let mut buf = [0u8; 16];
    loop {
        match recv.read_exact(&mut buf).await {
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
        send.write_all(&buf).await?;
    }
}

async fn speedtest(mut send: SendStream, mut recv: RecvStream) -> Result<(), SpeedtestError> {
    let req: SpeedtestRequest = frame::read(&mut recv).await?;
    let duration = Duration::from_millis(req.duration_ms).min(MAX_SPEEDTEST);
    match req.direction {
        Direction::Down => {
            // One shared buffer handed to QUIC by reference count: no copy per write.
            let chunk = bytes::Bytes::from(vec![0u8; CHUNK]);
            let deadline = tokio::time::Instant::now() + duration;
            while tokio::time::Instant::now() < deadline {
                send.write_chunk(chunk.clone()).await?;
            }
            send.finish()?;
            // Wait until the client has read everything before the connection goes.
            let _ = send.stopped().await;
            Ok(())
        }
        Direction::Up => {
            let start = tokio::time::Instant::now();
            let mut bytes = 0u64;
            loop {
                // Chunks come straight from QUIC's buffers, without a copy.
                match recv.read_chunk(CHUNK).await {
                    Ok(Some(c)) => bytes += c.len() as u64,
                    Ok(None) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            let elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            frame::write(&mut send, &SpeedtestResult { bytes, elapsed_ms }).await?;
            send.finish()?;
            let _ = send.stopped().await;
            Ok(())
        }
    }
}
