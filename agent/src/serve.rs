//! The agent's mesh server: accepts connections, checks each one's ticket, and runs
//! the protocol its ALPN names (port forwarding lives in `forward`).

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

pub async fn accept_loop(
    endpoint: Endpoint,
    welcome: WelcomeRx,
    ssh: Arc<russh::server::Config>,
    activity: Arc<MeshActivity>,
) {
    let bound = Arc::new(endpoint.bound_sockets());
    while let Some(incoming) = endpoint.accept().await {
        let welcome = welcome.clone();
        let ssh = ssh.clone();
        let activity = activity.clone();
        let me = endpoint.id();
        let bound = bound.clone();
        tokio::spawn(async move {
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
}

async fn handle(
    conn: Connection,
    me: iroh::EndpointId,
    bound: Arc<Vec<std::net::SocketAddr>>,
    welcome: WelcomeRx,
    ssh: Arc<russh::server::Config>,
    activity: Arc<MeshActivity>,
) -> Result<(), String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
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
    .map_err(|e| e.to_string())?;
    match conn.alpn() {
        a if a == alpn::PING => echo(send, recv).await,
        a if a == alpn::SPEEDTEST => speedtest(send, recv).await,
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
            .await
            .map_err(|e| e.to_string())?;
            match session.await {
                // The client prints the reason instead of a bare "ended".
                Err(russh::Error::InactivityTimeout) => {
                    let reason = format!(
                        "the agent closed the SSH connection after {} without traffic (its --ssh-idle-timeout)",
                        humantime::format_duration(idle_timeout.unwrap_or_default())
                    );
                    tracing::info!("SSH connection closed: idle");
                    conn.close(close::IDLE.into(), reason.as_bytes());
                    Err(reason)
                }
                ended => ended.map_err(|e| e.to_string()),
            }
        }
        a if a == alpn::FORWARD => {
            let _session = activity.sessions.open(SessionKind::PortForward);
            crate::forward::serve(conn.clone(), send, recv).await
        }
        other => Err(refuse(
            &conn,
            close::PROTOCOL,
            &format!("unknown protocol {}", String::from_utf8_lossy(other)),
        )),
    }
}

/// Closes the connection with a reason the client prints, and returns it for the log.
fn refuse(conn: &Connection, code: u32, reason: &str) -> String {
    tracing::info!(reason, "connection refused");
    conn.close(code.into(), reason.as_bytes());
    reason.to_owned()
}

/// Ping: echo every 16-byte probe until the client finishes its stream.
async fn echo(mut send: SendStream, mut recv: RecvStream) -> Result<(), String> {
    let mut buf = [0u8; 16];
    loop {
        match recv.read_exact(&mut buf).await {
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
        send.write_all(&buf).await.map_err(|e| e.to_string())?;
    }
}

async fn speedtest(mut send: SendStream, mut recv: RecvStream) -> Result<(), String> {
    let req: SpeedtestRequest = frame::read(&mut recv).await.map_err(|e| e.to_string())?;
    let duration = Duration::from_millis(req.duration_ms).min(MAX_SPEEDTEST);
    match req.direction {
        Direction::Down => {
            // One shared buffer handed to QUIC by reference count: no copy per write.
            let chunk = bytes::Bytes::from(vec![0u8; CHUNK]);
            let deadline = tokio::time::Instant::now() + duration;
            while tokio::time::Instant::now() < deadline {
                send.write_chunk(chunk.clone())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            send.finish().map_err(|e| e.to_string())?;
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
                    Err(e) => return Err(e.to_string()),
                }
            }
            let elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            frame::write(&mut send, &SpeedtestResult { bytes, elapsed_ms })
                .await
                .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let _ = send.stopped().await;
            Ok(())
        }
    }
}
