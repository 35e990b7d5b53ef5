//! The process's stdin and stdout/stderr on threads of their own, with plain blocking
//! I/O. tokio's stdio hops to the blocking pool for every read and write (a measurable
//! cost in bulk transfers), and a pending tokio stdin read keeps the process alive at
//! exit.

use std::io::{Read, Write};

use bytes::Bytes;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
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

/// What the session reads its input from.
pub enum Input {
    /// Chunks from [`stdin_chunks`]'s thread.
    Thread(mpsc::Receiver<Option<Bytes>>),
    /// A terminal read on the runtime's own thread (see [`Input::stdin`]).
    Terminal(AsyncFd<std::fs::File>),
}

impl Input {
    /// Stdin: a terminal is read on the runtime's thread, so a keystroke reaches the
    /// session without waking another thread first (one thread wake-up less on every
    /// keystroke's round trip); anything else gets [`stdin_chunks`]'s thread, as a pipe
    /// or file may not be pollable. The terminal is opened again by name, so the
    /// non-blocking mode is set on a file description of our own and never on the one
    /// we share with the shell that started us.
    pub fn stdin() -> Self {
        let stdin = std::io::stdin();
        if std::io::IsTerminal::is_terminal(&stdin)
            && let Ok(name) = nix::unistd::ttyname(&stdin)
        {
            use std::os::unix::fs::OpenOptionsExt;
            let flags = nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY;
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(flags.bits())
                .open(&name)
                .and_then(register);
            match opened {
                Ok(fd) => return Self::Terminal(fd),
                Err(e) => tracing::debug!("cannot open {} again: {e}", name.display()),
            }
        }
        Self::Thread(stdin_chunks())
    }

    /// The next chunk; `None` at end of input (or a read error).
    pub async fn recv(&mut self) -> Option<Bytes> {
        match self {
            Self::Thread(rx) => rx.recv().await.flatten(),
            Self::Terminal(fd) => {
                let mut buf = [0u8; 4096];
                loop {
                    let mut ready = fd.readable().await.ok()?;
                    match ready.try_io(|f| f.get_ref().read(&mut buf)) {
                        Ok(Ok(0) | Err(_)) => return None,
                        Ok(Ok(n)) => return Some(Bytes::copy_from_slice(&buf[..n])),
                        Err(_would_block) => {}
                    }
                }
            }
        }
    }
}

/// Registers the terminal with the runtime. tokio deprecated the safe constructor
/// because a type's `as_raw_fd` could change under it (tokio#8587); a `File` owns one
/// descriptor for its whole life, so the reason does not apply, and the alternative is
/// `unsafe`, which the workspace forbids.
#[allow(deprecated)]
fn register(file: std::fs::File) -> std::io::Result<AsyncFd<std::fs::File>> {
    AsyncFd::with_interest(file, Interest::READABLE)
}

/// Which output a chunk goes to.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Writes `data` to stdout or stderr from the caller's thread, at once.
pub fn write_now(stream: Stream, data: &[u8]) -> std::io::Result<()> {
    let mut w: Box<dyn Write> = match stream {
        Stream::Stdout => Box::new(std::io::stdout().lock()),
        Stream::Stderr => Box::new(std::io::stderr().lock()),
    };
    w.write_all(data)?;
    w.flush()
}

/// Stdout and stderr written in order by a thread of their own (bulk data: the
/// runtime never waits for a slow reader).
pub struct Output {
    tx: Option<mpsc::Sender<(Stream, Bytes)>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Output {
    /// Writes from a thread of its own.
    pub fn threaded() -> Self {
        let (tx, mut rx) = mpsc::channel::<(Stream, Bytes)>(8);
        let thread = std::thread::spawn(move || {
            while let Some((stream, data)) = rx.blocking_recv() {
                // Locked per chunk, never across the wait: the runtime's thread writes
                // log lines to stderr, and would block for good on a lock held here
                // while this thread waits for the runtime.
                write_now(stream, &data)?;
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
