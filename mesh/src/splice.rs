//! Port forwarding's moving parts, the same on both ends: a TCP connection's bytes over
//! a QUIC stream and back, and the idle watch that ends a UDP session.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use iroh::endpoint::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Read buffers start this small, so a quiet connection holds little memory...
const MIN_ROOM: usize = 16 * 1024;
/// ...and grow to this once a read fills one: bulk transfers then move in big reads
/// and writes (64 KiB gave ~20% less throughput than this on loopback).
const CHUNK: usize = 256 * 1024;

/// How long a forwarded connection's target may take to answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to a forwarding target (`ssh -L`, `ssh -R`) within [`CONNECT_TIMEOUT`],
/// with Nagle off: interactive protocols want each write sent now.
///
/// # Errors
/// The connect's own error, or `TimedOut` when the target did not answer in time.
pub async fn connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Stream error code (reset or stop) meaning "the TCP connection on this side failed":
/// the peer then drops its TCP side instead of ending it cleanly.
pub const TCP_FAILED: u32 = 1;

/// Copies `tcp` to `send` and `recv` to `tcp` until both directions have ended. The end
/// of one direction is passed on as a half-close (QUIC finish, TCP shutdown), so
/// protocols that half-close keep working.
///
/// # Errors
/// The first failure of either direction; the QUIC stream is then reset and stopped
/// with [`TCP_FAILED`], so the other end does not mistake it for a clean end.
///
/// # Cancel safety
/// Dropping the future drops both ends: the QUIC stream is finished, not reset.
pub async fn tcp(tcp: TcpStream, mut send: SendStream, mut recv: RecvStream) -> io::Result<()> {
    let (mut rd, mut wr) = tcp.into_split();
    let up = async {
        let mut buf = BytesMut::new();
        let mut size = MIN_ROOM;
        loop {
            if buf.capacity() < MIN_ROOM {
                // The old buffer lives on in the chunks QUIC still holds.
                buf.reserve(size);
            }
            let room = buf.capacity();
            let n = rd.read_buf(&mut buf).await?;
            if n == 0 {
                break;
            }
            if n == room {
                size = CHUNK;
            }
            // Only a reference-counted view of the buffer goes to QUIC.
            send.write_chunk(buf.split().freeze()).await?;
        }
        send.finish().map_err(io::Error::other)
    };
    let down = async {
        // Copied, not `read_chunk`: QUIC hands out about a packet (~1.2 KB) per chunk,
        // and a TCP write per packet halved throughput here; one copy into a large
        // buffer makes one write of many packets.
        let mut buf = vec![0u8; MIN_ROOM];
        while let Some(n) = recv.read(&mut buf).await? {
            wr.write_all(&buf[..n]).await?;
            if n == buf.len() {
                buf.resize(CHUNK, 0);
            }
        }
        wr.shutdown().await
    };
    let result = tokio::try_join!(up, down).map(|_| ());
    if result.is_err() {
        let _ = send.reset(VarInt::from_u32(TCP_FAILED));
        let _ = recv.stop(VarInt::from_u32(TCP_FAILED));
    }
    result
}

/// Resolves once `activity` has not been notified for `limit`. Each datagram relayed
/// either way calls [`Notify::notify_one`]; a notification that comes while nobody
/// waits is kept, so none is lost.
///
/// # Cancel safety
/// Cancel safe.
pub async fn until_idle(activity: &Notify, limit: Duration) {
    while tokio::time::timeout(limit, activity.notified())
        .await
        .is_ok()
    {}
}
