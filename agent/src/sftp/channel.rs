//! The SSH channel as russh-sftp reads and writes it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use russh::server::{Handle, Msg};
use russh::{ChannelId, ChannelStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::ssh::ChannelSlot;

/// The channel as russh-sftp sees it. russh-sftp stops on end-of-file but retries on
/// other read errors, so a broken channel reads as end-of-file; and when russh-sftp
/// drops the stream, the exit status goes out before the channel closes.
pub(super) struct SubsystemStream {
    pub(super) inner: Option<ChannelStream<Msg>>,
    pub(super) handle: Handle,
    pub(super) id: ChannelId,
    pub(super) _slot: Option<ChannelSlot>,
}

impl Drop for SubsystemStream {
    fn drop(&mut self) {
        let (handle, id, inner) = (self.handle.clone(), self.id, self.inner.take());
        tokio::spawn(async move {
            let _ = handle.exit_status_request(id, 0).await;
            let _ = handle.eof(id).await;
            // Dropping the channel stream closes the channel, after the status.
            drop(inner);
        });
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the SFTP channel is closed")
}

impl AsyncRead for SubsystemStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match Pin::new(inner).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => {
                tracing::debug!("SFTP channel read failed: {e}");
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for SubsystemStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}
