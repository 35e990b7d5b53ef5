//! The process's stdin and stdout/stderr without tokio's stdio, which hops to the
//! blocking pool for every read and write (a measurable cost in bulk transfers) and
//! whose pending stdin read keeps the process alive at exit. A terminal or pipe is
//! opened again non-blocking and polled on the runtime's own thread (no thread wake-up
//! per keystroke or packet); anything else is read or written with plain blocking I/O
//! on a thread of its own. A pipe is read straight into the buffer that goes on to
//! the QUIC stream, without a copy (BENCHMARKS.md, "The IDE path").

use std::io::{Read, Write};

use bytes::{Bytes, BytesMut};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

/// Bytes [`stdin_chunks`]'s thread reads at a time.
const CHUNK: usize = 256 * 1024;
/// Room made for each read of a stdin pipe (a Linux pipe holds 64 KiB unless resized).
const PIPE_READ: usize = 64 * 1024;
/// The size of the buffer a stdin pipe's reads share: each read's bytes go on to the
/// QUIC stream, which keeps them until the agent has them, so reads fill a fresh
/// buffer whenever the last one's bytes are still in flight.
const PIPE_BUFFER: usize = 1024 * 1024;

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
    /// A terminal read on the runtime's own thread (see [`Input::stdin`]), into a
    /// buffer of the size of a read.
    Polled(AsyncFd<std::fs::File>, Box<[u8]>),
    /// A pipe read on the runtime's own thread straight into the buffer it is sent
    /// from.
    Pipe(pipe::Receiver, BytesMut),
}

impl Input {
    /// Stdin: a terminal or a pipe is read on the runtime's thread, so a keystroke (or
    /// OpenSSH's packet, behind a ProxyCommand) reaches the session without waking
    /// another thread first (one thread wake-up less on every keystroke's round trip);
    /// anything else gets [`stdin_chunks`]'s thread, as a file may not be pollable.
    /// Either is opened again (a terminal by name, a pipe through /proc), so the
    /// non-blocking mode is set on a file description of our own and never on the one
    /// we share with the shell or the OpenSSH client that started us.
    pub fn stdin() -> Self {
        let stdin = std::io::stdin();
        if std::io::IsTerminal::is_terminal(&stdin)
            && let Ok(name) = nix::unistd::ttyname(&stdin)
        {
            match open_again(&name) {
                Ok(fd) => return Self::Polled(fd, vec![0; 4096].into()),
                Err(e) => tracing::debug!("cannot open {} again: {e}", name.display()),
            }
        } else if is_pipe(&stdin) {
            match std::fs::File::open("/proc/self/fd/0").and_then(pipe::Receiver::from_file) {
                Ok(rx) => return Self::Pipe(rx, BytesMut::with_capacity(PIPE_BUFFER)),
                Err(e) => tracing::debug!("cannot open the stdin pipe again: {e}"),
            }
        }
        Self::Thread(stdin_chunks())
    }

    /// The next chunk; `None` at end of input (or a read error).
    ///
    /// # Cancel safety
    /// Cancel safe (it is a `select!` branch of `myco ssh`'s loop): it awaits only
    /// readiness or a channel, and reads without awaiting, so no input is lost.
    pub async fn recv(&mut self) -> Option<Bytes> {
        match self {
            Self::Thread(rx) => rx.recv().await.flatten(),
            Self::Polled(fd, buf) => loop {
                let mut ready = fd.readable().await.ok()?;
                match ready.try_io(|f| f.get_ref().read(buf)) {
                    Ok(Ok(0) | Err(_)) => return None,
                    Ok(Ok(n)) => return Some(Bytes::copy_from_slice(&buf[..n])),
                    Err(_would_block) => {}
                }
            },
            Self::Pipe(rx, buf) => loop {
                rx.readable().await.ok()?;
                buf.reserve(PIPE_READ);
                match rx.try_read_buf(buf) {
                    Ok(0) => return None,
                    Ok(_) => return Some(buf.split().freeze()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return None,
                }
            },
        }
    }
}

fn is_pipe(fd: impl std::os::fd::AsFd) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|st| {
        nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
            == nix::sys::stat::SFlag::S_IFIFO
    })
}

/// Opens a terminal again for reading, non-blocking, and registers it with the runtime.
fn open_again(path: &std::path::Path) -> std::io::Result<AsyncFd<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)?;
    register(file, Interest::READABLE)
}

/// Registers a terminal with the runtime. tokio deprecated the safe
/// constructor because a type's `as_raw_fd` could change under it (tokio#8587); a
/// `File` owns one descriptor for its whole life, so the reason does not apply, and
/// the alternative is `unsafe`, which the workspace forbids.
#[allow(deprecated)]
fn register(file: std::fs::File, interest: Interest) -> std::io::Result<AsyncFd<std::fs::File>> {
    AsyncFd::with_interest(file, interest)
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
/// runtime never waits for a slow reader), or stdout written on the runtime's thread
/// when it is a pipe (see [`Output::stdout`]).
pub enum Output {
    Threaded {
        tx: Option<mpsc::Sender<(Stream, Bytes)>>,
        thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    },
    /// Stdout as a pipe, written on the runtime's thread.
    Pipe(pipe::Sender),
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
        Self::Threaded {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// For stdout only (`myco ssh --stdio`): a pipe is opened again non-blocking (as
    /// [`Input::stdin`] does) and written on the runtime's thread, so a packet for
    /// OpenSSH wakes no other thread on its way; anything else gets a thread.
    pub fn stdout() -> Self {
        if is_pipe(std::io::stdout()) {
            let again = std::fs::OpenOptions::new()
                .write(true)
                .open("/proc/self/fd/1");
            match again.and_then(pipe::Sender::from_file) {
                Ok(tx) => return Self::Pipe(tx),
                Err(e) => tracing::debug!("cannot open the stdout pipe again: {e}"),
            }
        }
        Self::threaded()
    }

    /// Writes or queues `data`. Once the writer has stopped, fails with the error that
    /// stopped it (a full disk is not a closed pipe).
    ///
    /// # Cancel safety
    /// Not cancel safe: a pipe may have taken part of `data` when the future is dropped.
    pub async fn write(&mut self, stream: Stream, data: Bytes) -> std::io::Result<()> {
        let (tx, thread) = match self {
            // `--stdio` writes nothing to stderr; anything that did would go out at once.
            Self::Pipe(_) if matches!(stream, Stream::Stderr) => return write_now(stream, &data),
            Self::Pipe(tx) => {
                let mut rest = &data[..];
                while !rest.is_empty() {
                    tx.writable().await?;
                    match tx.try_write(rest) {
                        Ok(n) => rest = &rest[n..],
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                return Ok(());
            }
            Self::Threaded { tx, thread } => (tx, thread),
        };
        let sent = match tx {
            Some(tx) => tx.send((stream, data)).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        let thread = thread.take();
        *tx = None;
        match thread {
            Some(t) => match tokio::task::spawn_blocking(move || t.join()).await {
                Ok(Ok(Err(e))) => Err(e),
                _ => Err(std::io::Error::other("the output thread stopped")),
            },
            None => Err(std::io::Error::other("the output thread stopped")),
        }
    }

    /// Waits until everything queued is written.
    ///
    /// # Cancel safety
    /// Dropping the future leaves the output thread to finish on its own.
    pub async fn finish(self) -> std::io::Result<()> {
        let Self::Threaded { tx, thread } = self else {
            return Ok(());
        };
        drop(tx);
        let Some(thread) = thread else {
            return Ok(());
        };
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(r)) => r,
            _ => Err(std::io::Error::other("the output thread failed")),
        }
    }
}
