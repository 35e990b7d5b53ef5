//! Port forwarding (`myco/forward/1`): after the ticket handshake the client keeps its
//! first stream open as the session's anchor and opens one more stream per forwarded
//! TCP connection or UDP source. Each starts with a [`ForwardRequest`]; the agent
//! connects (or binds a UDP socket) in the workspace, answers a [`ForwardReply`], and
//! relays until either side ends.
//!
//! The agent connects wherever it is asked, as for SSH's `direct-tcpip`: the ticket
//! already proved the user owns this workspace, and the workspace's network is theirs.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use iroh::endpoint::{ClosedStream, Connection, ConnectionError, RecvStream, SendStream, VarInt};
use mesh::control::{ForwardProtocol, ForwardReply, ForwardRequest};
use mesh::{frame, splice};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tracing::Instrument;

/// How long a new stream has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A UDP session with no datagram either way for this long ends. The client expires
/// its sessions after the same time; whichever side ends first finishes the stream.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Streams a client may have open at once: each is a TCP connection or a UDP source,
/// and a browser opens dozens (noq's default is 100).
const MAX_STREAMS: u32 = 4096;

/// Why a forwarding connection ended before the client ended its anchor stream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    /// The connection failed or was closed while waiting for the next stream.
    #[error(transparent)]
    Accept(#[from] ConnectionError),
}

/// Why the agent's answer to a forward request could not be sent.
#[derive(Debug, thiserror::Error)]
enum ReplyError {
    /// The reply frame could not be written.
    #[error(transparent)]
    Write(#[from] frame::FrameError),
    /// The stream was already gone when the agent finished it after a refusal.
    #[error(transparent)]
    Finish(#[from] ClosedStream),
}

/// Why a forwarded TCP connection or UDP session ended with an error.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    /// The reply (acceptance or refusal) could not be sent.
    #[error(transparent)]
    Reply(#[from] ReplyError),
    /// Relaying bytes between the stream and the TCP connection failed.
    #[error(transparent)]
    Splice(std::io::Error),
    /// The client's datagrams could not be read, or one could not be written back.
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    /// The UDP socket failed to send to or receive from the target.
    #[error(transparent)]
    Socket(std::io::Error),
}

/// Serves one forwarding connection until the client ends its anchor stream or the
/// connection goes.
pub(crate) async fn serve(
    conn: Connection,
    anchor_send: SendStream,
    mut anchor: RecvStream,
) -> Result<(), ServeError> {
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(MAX_STREAMS));
    // The client sends nothing more on the anchor; its end is the end of the session.
    let anchor_ended = async { while let Ok(Some(_)) = anchor.read_chunk(1024).await {} };
    tokio::pin!(anchor_ended);
    // The forwarded streams are this connection's: they end with it.
    let mut streams = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => {
                let (send, recv) = accepted?;
                streams.spawn(stream(send, recv).in_current_span());
            }
            Some(ended) = streams.join_next() => {
                if let Err(e) = ended && e.is_panic() {
                    tracing::warn!("a forwarded stream's task panicked: {e}");
                }
            }
            () = &mut anchor_ended => {
                drop(anchor_send);
                conn.close(0u32.into(), b"done");
                return Ok(());
            }
        }
    }
}

/// One forwarded TCP connection or UDP session.
async fn stream(send: SendStream, mut recv: RecvStream) {
    let req: ForwardRequest =
        match tokio::time::timeout(REQUEST_TIMEOUT, frame::read(&mut recv)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::debug!("bad forward request: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("no forward request in time");
                return;
            }
        };
    let span = tracing::debug_span!(
        "forward",
        protocol = %req.protocol,
        target = %format!("{}:{}", req.host, req.port)
    );
    async move {
        let result = match req.protocol {
            ForwardProtocol::Tcp => tcp(&req, send, recv).await,
            ForwardProtocol::Udp => udp(&req, send, recv).await,
        };
        match result {
            Ok(()) => tracing::debug!("forward ended"),
            Err(e) => tracing::debug!("forward ended: {e}"),
        }
    }
    .instrument(span)
    .await;
}

/// Tells the client why this stream cannot be forwarded, and ends it.
async fn refuse(send: &mut SendStream, why: String) -> Result<(), ReplyError> {
    tracing::debug!(why, "forward refused");
    frame::write(send, &ForwardReply { error: Some(why) }).await?;
    Ok(send.finish()?)
}

async fn accept(send: &mut SendStream) -> Result<(), ReplyError> {
    Ok(frame::write(send, &ForwardReply { error: None }).await?)
}

/// Connects to `host:port` and relays bytes until both sides have ended.
async fn tcp(
    req: &ForwardRequest,
    mut send: SendStream,
    recv: RecvStream,
) -> Result<(), StreamError> {
    let target = format!("{}:{}", req.host, req.port);
    let tcp = match splice::connect(&req.host, req.port).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return refuse(
                &mut send,
                format!("nothing listens on {target} in the workspace (connection refused)"),
            )
            .await
            .map_err(StreamError::from);
        }
        Err(e) if e.kind() != std::io::ErrorKind::TimedOut => {
            return refuse(
                &mut send,
                format!("cannot connect to {target} from the workspace: {e}"),
            )
            .await
            .map_err(StreamError::from);
        }
        Err(_) => {
            return refuse(
                &mut send,
                format!(
                    "{target} did not answer within {}s in the workspace",
                    splice::CONNECT_TIMEOUT.as_secs()
                ),
            )
            .await
            .map_err(StreamError::from);
        }
    };
    accept(&mut send).await?;
    splice::tcp(tcp, send, recv)
        .await
        .map_err(StreamError::Splice)
}

/// Binds a UDP socket connected to `host:port` and relays datagrams until the client
/// ends the stream or the session has been idle for [`UDP_IDLE`].
async fn udp(
    req: &ForwardRequest,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), StreamError> {
    let (send, recv) = (&mut send, &mut recv);
    let target = format!("{}:{}", req.host, req.port);
    let addr = match tokio::net::lookup_host((req.host.as_str(), req.port))
        .await
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(a) => a,
        None => {
            return Ok(refuse(send, format!("cannot resolve {target} in the workspace")).await?);
        }
    };
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // One socket per client source, so the target sees each source as its own peer.
    let socket = match UdpSocket::bind(local).await {
        Ok(s) => s,
        Err(e) => {
            return Ok(refuse(
                send,
                format!("cannot open a UDP socket in the workspace: {e}"),
            )
            .await?);
        }
    };
    if let Err(e) = socket.connect(addr).await {
        return Ok(refuse(
            send,
            format!("cannot send to {target} from the workspace: {e}"),
        )
        .await?);
    }
    accept(send).await?;
    let activity = Notify::new();
    let to_target = async {
        while let Some(d) = frame::read_datagram(recv).await? {
            match socket.send(&d).await {
                Ok(_) => {}
                // An earlier datagram met a closed port; UDP servers come and go.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(StreamError::Socket(e)),
            }
            activity.notify_one();
        }
        Ok(())
    };
    let from_target = async {
        let mut buf = vec![0u8; frame::MAX_DATAGRAM];
        loop {
            match socket.recv(&mut buf).await {
                Ok(n) => {
                    frame::write_datagram(send, &buf[..n]).await?;
                    activity.notify_one();
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err::<(), _>(StreamError::Socket(e)),
            }
        }
    };
    let result = tokio::select! {
        r = to_target => r,
        r = from_target => r,
        () = splice::until_idle(&activity, UDP_IDLE) => Ok(()),
    };
    let _ = send.finish();
    result
}
