//! The process's stdin and stdout/stderr on threads of their own, with plain blocking
//! I/O. tokio's stdio hops to the blocking pool for every read and write (a measurable
//! cost in bulk transfers), and a pending tokio stdin read keeps the process alive at
//! exit.

use std::io::{Read, Write};

use bytes::Bytes;
use tokio::sync::mpsc;

/// Bytes read from stdin at a time.
const CHUNK: usize = 256 * 1024;

/// Chunks of stdin as they arrive; `None` is end of input (or a read error).
pub fn stdin_chunks() -> mpsc::Receiver<Option<Bytes>> {
    let (tx, rx) = mpsc::channel(8);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if tx
                        .blocking_send(Some(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Which output a chunk goes to.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Stdout and stderr written in order, by a thread of their own (bulk data: the
/// runtime never waits for a slow reader) or directly (a terminal: keystroke echoes
/// skip a thread hop; a terminal takes small writes at once).
pub struct Output {
    tx: Option<mpsc::Sender<(Stream, Bytes)>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Output {
    /// Writes from the caller's thread.
    pub fn direct() -> Self {
        Self {
            tx: None,
            thread: None,
        }
    }

    /// Writes from a thread of its own.
    pub fn threaded() -> Self {
        let (tx, mut rx) = mpsc::channel::<(Stream, Bytes)>(8);
        let thread = std::thread::spawn(move || {
            while let Some((stream, data)) = rx.blocking_recv() {
                // Locked per chunk, never across the wait: the runtime's thread writes
                // log lines to stderr, and would block for good on a lock held here
                // while this thread waits for the runtime.
                let mut w: Box<dyn Write> = match stream {
                    Stream::Stdout => Box::new(std::io::stdout().lock()),
                    Stream::Stderr => Box::new(std::io::stderr().lock()),
                };
                w.write_all(&data)?;
                w.flush()?;
            }
            Ok(())
        });
        Self {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Writes or queues `data`. Once the writer has stopped, fails with the error that
    /// stopped it (a full disk is not a closed pipe).
    pub async fn write(&mut self, stream: Stream, data: Bytes) -> std::io::Result<()> {
        if self.thread.is_none() {
            let mut w: Box<dyn Write> = match stream {
                Stream::Stdout => Box::new(std::io::stdout().lock()),
                Stream::Stderr => Box::new(std::io::stderr().lock()),
            };
            w.write_all(&data)?;
            return w.flush();
        }
        let sent = match &self.tx {
            Some(tx) => tx.send((stream, data)).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        let thread = self.thread.take();
        self.tx = None;
        match thread {
            Some(t) => match tokio::task::spawn_blocking(move || t.join()).await {
                Ok(Ok(Err(e))) => Err(e),
                _ => Err(std::io::Error::other("the output thread stopped")),
            },
            None => Err(std::io::Error::other("the output thread stopped")),
        }
    }

    /// Waits until everything queued is written.
    pub async fn finish(mut self) -> std::io::Result<()> {
        self.tx = None;
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(r)) => r,
            _ => Err(std::io::Error::other("the output thread failed")),
        }
    }
}
