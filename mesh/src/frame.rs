//! Framing on mesh streams: a 4-byte big-endian length, then that many bytes of JSON;
//! and UDP datagrams on port-forwarding streams: a 2-byte big-endian length, then the
//! payload.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frames larger than this are refused: they are control messages, not data.
pub const MAX_FRAME: u32 = 64 * 1024;

/// The largest datagram payload the 2-byte length can carry; more than any UDP
/// datagram over IPv4 holds (65,507 bytes).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended mid-frame.
    #[error("stream failed: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix is over [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    /// The payload is not the JSON message expected.
    #[error("unexpected message: {0}")]
    Json(#[from] serde_json::Error),
    /// A datagram is over [`MAX_DATAGRAM`].
    #[error("datagram of {0} bytes is over the {MAX_DATAGRAM}-byte limit")]
    DatagramTooLarge(usize),
}

/// Writes one frame (and flushes).
///
/// # Cancel safety
/// Not cancel safe: a cancelled write may leave half a frame on the stream.
pub async fn write<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(u32::MAX))?;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame.
///
/// # Cancel safety
/// Not cancel safe: a cancelled read may consume part of a frame.
pub async fn read<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// Writes one datagram: its length as a big-endian `u16`, then the payload.
///
/// # Cancel safety
/// Not cancel safe: a cancelled write may leave half a datagram on the stream.
pub async fn write_datagram<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> Result<(), FrameError> {
    let len =
        u16::try_from(payload.len()).map_err(|_| FrameError::DatagramTooLarge(payload.len()))?;
    // One write, so the length and the payload leave in the same QUIC frame.
    let mut buf = Vec::with_capacity(2 + payload.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one datagram; `None` when the stream ended cleanly between datagrams.
///
/// # Cancel safety
/// Not cancel safe: a cancelled read may consume part of a datagram.
pub async fn read_datagram<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 2];
    let mut got = 0;
    while got < len.len() {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        got += n;
    }
    let mut payload = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut payload).await?;
    Ok(Some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        write(&mut a, &serde_json::json!({"x": 1})).await.unwrap();
        let v: serde_json::Value = read(&mut b).await.unwrap();
        assert_eq!(v["x"], 1);

        a.write_all(&(MAX_FRAME + 1).to_be_bytes()).await.unwrap();
        assert!(matches!(
            read::<_, serde_json::Value>(&mut b).await,
            Err(FrameError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn datagrams_keep_their_boundaries() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let big = vec![7u8; MAX_DATAGRAM];
        for d in [&b"one"[..], b"", &big] {
            write_datagram(&mut a, d).await.unwrap();
        }
        assert!(matches!(
            write_datagram(&mut a, &vec![0u8; MAX_DATAGRAM + 1]).await,
            Err(FrameError::DatagramTooLarge(_))
        ));
        drop(a);
        assert_eq!(read_datagram(&mut b).await.unwrap().unwrap(), b"one");
        assert_eq!(read_datagram(&mut b).await.unwrap().unwrap(), b"");
        assert_eq!(read_datagram(&mut b).await.unwrap().unwrap(), big);
        assert!(read_datagram(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_datagram_cut_short_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 5, b'a']).await.unwrap();
        drop(a);
        assert!(matches!(
            read_datagram(&mut b).await,
            Err(FrameError::Io(_))
        ));
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0]).await.unwrap();
        drop(a);
        assert!(matches!(
            read_datagram(&mut b).await,
            Err(FrameError::Io(_))
        ));
    }
}
