//! Framing on mesh streams: a 4-byte big-endian length, then that many bytes of JSON.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frames larger than this are refused: they are control messages, not data.
pub const MAX_FRAME: u32 = 64 * 1024;

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
}
