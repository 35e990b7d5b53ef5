//! Small stand-ins the end-to-end tests share: a dev server in the workspace (HTTP,
//! TCP echo), signals sent the way a user's `kill` sends them, and one bounded poll
//! for state that changes outside the test.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

/// What an HTTP stand-in answers to every `GET`.
pub const GREETING: &str = "hello from the workspace";

/// Polls `probe` every `every` until it returns `Ok`, and returns that; after `bound`
/// fails the test with `what` and the last `Err` (which says what was seen instead).
/// For state that changes outside the test (an agent connecting, a token expiring),
/// where no event can be awaited.
#[track_caller]
pub fn poll_for<T>(
    bound: Duration,
    every: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + bound;
    loop {
        let seen = match probe() {
            Ok(done) => return done,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {bound:?} waiting until {what}: {seen}"
        );
        std::thread::sleep(every);
    }
}

/// Sends `signal` (`TERM`, `HUP`, `STOP`, ...) to `pid` with `kill(1)`, as a user or a
/// service manager would.
#[track_caller]
pub fn signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{signal} {pid}");
}

/// One HTTP/1.1 message as [`read_message`] reads it.
#[derive(Debug)]
pub struct HttpMessage {
    /// The request or status line, without its line end.
    pub head: String,
    /// The body, by content-length.
    pub body: Vec<u8>,
    /// The sender asked to close the connection after it (`connection: close`).
    pub close: bool,
}

/// Reads one HTTP message (request or response). `None` at a clean end of the
/// connection.
pub fn read_message(r: &mut impl BufRead) -> Option<HttpMessage> {
    let mut head = String::new();
    if r.read_line(&mut head).ok()? == 0 {
        return None;
    }
    let mut len = 0usize;
    let mut close = false;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.trim().eq_ignore_ascii_case("close");
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some(HttpMessage {
        head: head.trim_end().to_owned(),
        body,
        close,
    })
}

/// An HTTP/1.1 server on loopback standing in for a dev server in the workspace (or
/// on the laptop): `POST /echo` answers the body, any other request [`GREETING`].
/// Connections are kept alive unless the request asks `connection: close`.
/// Returns its port.
pub fn http_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut writer = conn;
                while let Some(request) = read_message(&mut reader) {
                    let reply = if request.head.starts_with("POST /echo ") {
                        request.body
                    } else {
                        GREETING.as_bytes().to_vec()
                    };
                    let close = if request.close {
                        "connection: close\r\n"
                    } else {
                        ""
                    };
                    let ok = write!(
                        writer,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{close}\r\n",
                        reply.len()
                    )
                    .and_then(|()| writer.write_all(&reply));
                    if ok.is_err() || request.close {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A TCP server on loopback that echoes every connection's bytes back, standing in
/// for a long-lived service (a database) in the workspace. Returns its port.
pub fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut back = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut conn, &mut back);
            });
        }
    });
    port
}

/// A child process killed (and reaped) when this is dropped, even when the test
/// panics first, so a hung process does not outlive its test.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
