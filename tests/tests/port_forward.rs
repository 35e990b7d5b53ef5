//! `myco port-forward` end to end: TCP (HTTP with keep-alive, concurrency and a
//! multi-megabyte body) and UDP (per-source sessions) through a real agent, and the
//! errors a user can run into.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tests::fixtures::{http_server, read_message};
use tests::{TestEnv, free_port};

/// A running `myco port-forward`; killed when dropped.
struct Forward {
    child: Child,
    stderr: std::thread::JoinHandle<String>,
}

impl Forward {
    /// Starts `myco port-forward ARGS` as `user` and waits until it has printed one
    /// "Forwarding" line per forward it was asked for.
    fn start(env: &TestEnv, user: &str, args: &[&str], forwards: usize) -> Self {
        let mut child = env
            .cmd(user, &[&["port-forward"], args].concat())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        for _ in 0..forwards {
            // Bounded: a forward that never comes up fails the test instead of hanging it.
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => assert!(line.starts_with("Forwarding "), "{line}"),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("port-forward never came up: {}", stderr.join().unwrap());
                }
            }
        }
        Self { child, stderr }
    }

    /// SIGTERM, as Ctrl-C would; returns the exit code and everything on stderr.
    fn stop(mut self) -> (Option<i32>, String) {
        tests::fixtures::signal(self.child.id(), "TERM");
        self.wait()
    }

    fn wait(&mut self) -> (Option<i32>, String) {
        let code = self.child.wait().unwrap().code();
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        (code, stderr.join().unwrap())
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A keep-alive HTTP client connection through the forward.
struct HttpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl HttpClient {
    fn connect(port: u16) -> Self {
        let conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Self {
            reader: BufReader::new(conn.try_clone().unwrap()),
            writer: conn,
        }
    }

    fn request(&mut self, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
        write!(
            self.writer,
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        self.writer.write_all(body).unwrap();
        let response = read_message(&mut self.reader).expect("a response");
        assert_eq!(response.head, "HTTP/1.1 200 OK");
        response.body
    }
}

#[test]
fn tcp_forward_carries_http() {
    let (env, _agent) = TestEnv::with_agent();
    let remote = http_server();
    let local = free_port();
    let spec = format!("{local}:{remote}");
    let fwd = Forward::start(&env, "alice", &["dev", "--tcp", &spec], 1);

    // Several requests on one kept-alive connection.
    let mut client = HttpClient::connect(local);
    for _ in 0..3 {
        assert_eq!(
            client.request("GET", "/hello", b""),
            b"hello from the workspace"
        );
    }

    // Concurrent connections, each its own stream, each with its own answers.
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = HttpClient::connect(local);
                for j in 0..5u8 {
                    let body = vec![i.wrapping_mul(31).wrapping_add(j); 1000 + usize::from(i)];
                    assert_eq!(c.request("POST", "/echo", &body), body);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // A few megabytes up and back on the first connection.
    let big: Vec<u8> = (0..6_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    assert!(client.request("POST", "/echo", &big) == big);

    let (code, stderr) = fwd.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr, "");
}

#[test]
fn tcp_forward_to_a_closed_port_says_so_and_keeps_running() {
    let (env, _agent) = TestEnv::with_agent();
    let nothing = free_port();
    let remote = http_server();
    let (a, b) = (free_port(), free_port());
    let spec = format!("{a}:{nothing},{b}:{remote}");
    let fwd = Forward::start(&env, "alice", &["dev", "--tcp", &spec], 2);

    // The agent finds nothing listening: the local connection is closed.
    let mut conn = TcpStream::connect(("127.0.0.1", a)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(conn.read(&mut buf).unwrap(), 0);
    // The other forward still works.
    assert_eq!(
        HttpClient::connect(b).request("GET", "/hello", b""),
        b"hello from the workspace"
    );

    let (code, stderr) = fwd.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "127.0.0.1:{a} -> dev:{nothing} (tcp): nothing listens on 127.0.0.1:{nothing} \
             in the workspace (connection refused)"
        )
    );
}

/// A UDP server that answers `pong:N:PAYLOAD`, N counting datagrams per source: a
/// source sharing another's session would see the other's count.
fn udp_server() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut counts: HashMap<SocketAddr, u32> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return;
            };
            let count = counts.entry(from).or_default();
            *count += 1;
            let mut reply = format!("pong:{count}:").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from);
        }
    });
    port
}

fn udp_client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Bounded: a lost datagram fails the test instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

fn exchange(socket: &UdpSocket, port: u16, payload: &[u8]) -> Vec<u8> {
    socket.send_to(payload, ("127.0.0.1", port)).unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, from) = socket.recv_from(&mut buf).unwrap();
    assert_eq!(from.port(), port, "the reply comes from the forwarded port");
    buf.truncate(n);
    buf
}

#[test]
fn udp_forward_keeps_a_session_per_source() {
    let (env, _agent) = TestEnv::with_agent();
    let remote = udp_server();
    let local = free_port();
    let spec = format!("{local}:{remote}");
    // The SSH host alias works as a target too.
    let fwd = Forward::start(&env, "alice", &["myco.dev.main", "--udp", &spec], 1);

    let (a, b) = (udp_client(), udp_client());
    assert_eq!(exchange(&a, local, b"a"), b"pong:1:a");
    assert_eq!(exchange(&b, local, b"b"), b"pong:1:b");
    assert_eq!(exchange(&a, local, b"a"), b"pong:2:a");
    assert_eq!(exchange(&a, local, b"a"), b"pong:3:a");
    assert_eq!(exchange(&b, local, b"b"), b"pong:2:b");

    // Datagram boundaries hold, up to large ones.
    let big = vec![b'x'; 60_000];
    let reply = exchange(&b, local, &big);
    assert!(reply.strip_prefix(b"pong:3:") == Some(&big[..]));
    assert_eq!(exchange(&b, local, b""), b"pong:4:");

    let (code, stderr) = fwd.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr, "");
}

#[test]
fn bad_specs_and_busy_ports_fail_in_one_line() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    env.create_workspace("alice", "dev");

    for (args, want) in [
        (
            &["--tcp", "0"][..],
            "myco: bad --tcp spec \"0\": port 0 cannot be forwarded",
        ),
        (
            &["--tcp", "8080", "--udp", "9090-9092:80"],
            "myco: bad --udp spec \"9090-9092:80\": \"9090-9092\" has 3 ports but \"80\" has 1",
        ),
        (
            &["--tcp", "http"],
            "myco: bad --tcp spec \"http\": \"http\" is not a port",
        ),
        (
            &["--tcp", "8080,8080:3000"],
            "myco: bad --tcp spec \"8080,8080:3000\": local 127.0.0.1:8080 is forwarded twice",
        ),
        (
            &[],
            "myco: nothing to forward; give at least one --tcp or --udp",
        ),
    ] {
        let line = env
            .run("alice", &[&["port-forward", "dev"], args].concat())
            .fails();
        assert!(line.starts_with(want), "{line}");
    }

    // Ports in use fail before anything is dialed (the workspace has no agent).
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let line = env
        .run(
            "alice",
            &["port-forward", "dev", "--tcp", &format!("{port}:80")],
        )
        .fails();
    assert_eq!(
        line,
        format!(
            "myco: cannot listen on 127.0.0.1:{port} (tcp): address already in use; \
             pick another local port"
        )
    );
    let busy = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let line = env
        .run("alice", &["port-forward", "dev", "--udp", &port])
        .fails();
    assert_eq!(
        line,
        format!(
            "myco: cannot listen on 127.0.0.1:{port} (udp): address already in use; \
             pick another local port"
        )
    );
}

#[test]
fn other_users_are_refused() {
    let (env, _agent) = TestEnv::alice_and_bob();

    let port = free_port().to_string();
    let line = env
        .run("bob", &["port-forward", "alice/dev", "--tcp", &port])
        .fails();
    assert!(line.contains("workspace alice/dev not found"), "{line}");
}

#[test]
fn losing_the_agent_ends_the_forward_with_a_reason() {
    let (env, mut agent) = TestEnv::with_agent();
    let local = free_port().to_string();
    let mut fwd = Forward::start(&env, "alice", &["dev", "--tcp", &local], 1);
    // A graceful stop closes the agent's connections, so the client hears of it at once.
    tests::fixtures::signal(agent.child.id(), "TERM");
    agent.child.wait().unwrap();
    let (code, stderr) = fwd.wait();
    assert_eq!(code, Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("myco: lost the connection to alice/dev.main: "),
        "{stderr}"
    );
}
