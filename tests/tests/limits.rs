//! Limits on what anyone can send the coordinator, each exceeded against the real
//! binary: slow and piled-up HTTP connections, a relay client that never finishes
//! its handshake, and an agent whose reports break the bounds. Well-behaved callers
//! beside them keep working.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mesh::control::{AgentMessage, CoordinatorMessage};
use mesh::control_channel::{ControlClient, Received, RecvError};
use tests::TestEnv;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest, http};

fn server_addr(env: &TestEnv) -> SocketAddr {
    env.url.trim_start_matches("http://").parse().unwrap()
}

/// A connection from `src` that sends part of a request's headers and then nothing.
fn slow_client(server: SocketAddr, src: &str) -> TcpStream {
    let mut s = connect_from(server, src);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s
}

/// A TCP connection to `server` from the loopback address `src` (std cannot bind
/// before connecting; tokio's `TcpSocket` can).
fn connect_from(server: SocketAddr, src: &str) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        sock.connect(server).await.unwrap().into_std().unwrap()
    })
}

/// Whether a plain `GET /healthz` from `src` is answered 200.
fn healthz_from(server: SocketAddr, src: &str) -> bool {
    let mut s = connect_from(server, src);
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200")
}

#[test]
fn slow_clients_cannot_hold_the_listener() {
    let env = TestEnv::start_with(&[
        "--max-connections-per-ip",
        "4",
        "--header-read-timeout",
        "2s",
    ]);
    let server = server_addr(&env);
    // Four connections that never finish their headers take 127.0.0.1's share...
    let mut slow: Vec<TcpStream> = (0..4).map(|_| slow_client(server, "127.0.0.1")).collect();
    tests::eventually(
        "a fifth connection from the same address is refused",
        || !healthz_from(server, "127.0.0.1"),
    );
    // ...but not the listener: another address is served meanwhile.
    assert!(healthz_from(server, "127.0.0.2"));
    // The server closes them once the header timeout passes, and the address is
    // served again.
    for s in &mut slow {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            !String::from_utf8_lossy(&buf).contains("200 OK"),
            "a request with unfinished headers was answered"
        );
    }
    tests::eventually("127.0.0.1 is served again", || {
        healthz_from(server, "127.0.0.1")
    });
    // The operator sees the refusals.
    env.bootstrap("admin");
    let page = env
        .http()
        .get("/metrics", Some(&env.token_of("admin")))
        .body;
    let refused = page
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("myco_http_refused_connections_total "))
        .unwrap_or_else(|| panic!("no refused counter: {page}"));
    assert!(refused.trim().parse::<u64>().unwrap() >= 1, "{refused}");
}

#[test]
fn a_relay_client_that_never_shakes_hands_is_dropped() {
    let env = TestEnv::start();
    let server = server_addr(&env);
    let mut s = connect_from(server, "127.0.0.1");
    s.set_nonblocking(false).unwrap();
    // A valid WebSocket upgrade to the relay, then silence.
    s.write_all(
        b"GET /relay HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Protocol: iroh-relay-v2\r\n\r\n",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = Vec::new();
    let started = std::time::Instant::now();
    // Read until the server hangs up; it must, well before our 60 s read timeout.
    let r = s.read_to_end(&mut buf);
    assert!(
        r.is_ok(),
        "the relay never dropped the silent client: {r:?}"
    );
    let head = String::from_utf8_lossy(&buf);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    eprintln!("silent relay client dropped after {:?}", started.elapsed());
}

async fn agent_channel(env: &TestEnv, token: &str) -> (ControlClient, CoordinatorMessage) {
    let mut ws = mesh::control_channel::connect(&env.url, token, None)
        .await
        .unwrap();
    let Ok(Received::Message(first)) = ws.recv().await else {
        panic!("no welcome")
    };
    (ws, first)
}

#[test]
fn reports_out_of_bounds_are_refused_and_nothing_else_is_lost() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let long_line = "x".repeat(mesh::limits::LOG_LINE_MAX + 1);
    rt.block_on(async {
        let (mut ws, _welcome) = agent_channel(&env, &token).await;
        let line = |text: &str| mesh::api::LogLine {
            at: mesh::Timestamp::now(),
            source: mesh::api::LogSource::Startup,
            text: text.into(),
        };
        for bad in [
            // A line over the agent's own cut.
            AgentMessage::Logs {
                lines: vec![line(&long_line)],
            },
            // More lines than one batch holds.
            AgentMessage::Logs {
                lines: vec![line("x"); mesh::limits::LOG_BATCH_LINES + 1],
            },
            // A metadata key the manifest does not declare.
            AgentMessage::Metadata {
                items: vec![mesh::api::MetadataValue {
                    key: mesh::Name::new("injected").unwrap(),
                    value: "v".into(),
                    error: None,
                    collected_at: mesh::Timestamp::now(),
                }],
            },
            // A host key that would add a second line to known_hosts.
            AgentMessage::HostKey {
                openssh: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n* ssh-ed25519 AAAA".into(),
            },
        ] {
            ws.send(&bad).await.unwrap();
        }
        // A good line after them is kept.
        ws.send(&AgentMessage::Logs {
            lines: vec![line("the good line")],
        })
        .await
        .unwrap();
        // Wait until the flush made it visible, with the channel still open.
        let mut lines = String::new();
        for _ in 0..600 {
            let out = env.run("alice", &["logs", "dev"]);
            lines = out.stdout;
            if lines.contains("the good line") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(lines.contains("the good line"), "{lines}");
        assert!(!lines.contains(&long_line[..100]), "an oversized line was kept");
        let shown = env.run("alice", &["show", "dev", "-o", "json"]).ok().json();
        assert!(shown["agents"][0]["ssh_host_key"].is_null(), "{shown:#}");
        assert!(
            shown["agents"][0]["metadata"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{shown:#}"
        );
        // The channel is still open: it was refused reports, not closed.
        ws.send(&AgentMessage::Heartbeat).await.unwrap();
    });
}

#[test]
fn an_agent_flooding_its_channel_is_cut_off() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reason = rt.block_on(async {
        let (mut ws, _) = agent_channel(&env, &token).await;
        for _ in 0..2000 {
            if ws.send(&AgentMessage::Heartbeat).await.is_err() {
                break;
            }
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(30), ws.recv())
                .await
                .expect("the flood was never cut off")
            {
                Ok(Received::Closed(Some(reason))) => break reason,
                Ok(Received::Message(_)) | Err(RecvError::Decode(_)) => {}
                other => panic!("closed without a reason: {other:?}"),
            }
        }
    });
    assert!(reason.contains("messages a second"), "{reason}");
}

/// A client of the API whose connections come from the loopback address `src`.
fn api_from(src: &str) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .local_address(src.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A login attempt from `client`; returns the status, `Retry-After` and the JSON body.
fn login(
    client: &reqwest::blocking::Client,
    env: &TestEnv,
    username: &str,
    password: &str,
) -> (u16, Option<u64>, serde_json::Value) {
    let resp = client
        .post(format!("{}/api/v1/users/login", env.url))
        .json(&serde_json::json!({"username": username, "password": password}))
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (status, retry, resp.json().unwrap())
}

#[test]
fn login_floods_get_429_with_retry_after_and_the_rest_keeps_working() {
    let (env, _agent) =
        TestEnv::alice_and_bob_with(&["--login-rate-per-ip", "5", "--login-rate-per-user", "3"]);
    // One address guessing at many users: five tries, then 429 with a wait.
    let flooder = api_from("127.0.0.2");
    let answers: Vec<_> = (0..20)
        .map(|n| login(&flooder, &env, &format!("user{n}"), "guess-guess-guess"))
        .collect();
    assert!(answers[..5].iter().all(|a| a.0 == 401), "{answers:?}");
    let limited: Vec<_> = answers[5..].iter().filter(|a| a.0 == 429).collect();
    assert!(limited.len() >= 14, "{answers:?}");
    for (_, retry, body) in &limited {
        assert!(retry.unwrap() >= 1, "{answers:?}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("too many login attempts from your address"),
            "{body}"
        );
    }
    // Many addresses guessing at one user: three tries (bob's own login when he was
    // added was the first), then 429 from anywhere...
    for n in 0..2 {
        let (status, ..) = login(
            &api_from(&format!("127.0.1.{n}")),
            &env,
            "bob",
            "wrong-password",
        );
        assert_eq!(status, 401);
    }
    let (status, retry, body) = login(&api_from("127.0.1.9"), &env, "bob", "wrong-password");
    assert_eq!(status, 429, "{body}");
    assert!(retry.is_some());
    assert!(
        body["message"].as_str().unwrap().contains("for user bob"),
        "{body}"
    );
    // ...while another user logs in from another address, the API answers and the
    // agent stays connected, all during a flood from many addresses at once (each
    // within its own budget, so every guess costs an argon2 check).
    let flood: Vec<_> = (0..8)
        .map(|t| {
            let url = env.url.clone();
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for a in 0..5 {
                    let client = api_from(&format!("127.0.3.{}", t * 5 + a));
                    for n in 0..5 {
                        let status = client
                            .post(format!("{url}/api/v1/users/login"))
                            .json(&serde_json::json!({
                                "username": format!("u{t}x{a}x{n}"),
                                "password": "guess-guess-guess",
                            }))
                            .send()
                            .unwrap()
                            .status()
                            .as_u16();
                        statuses.push(status);
                    }
                }
                statuses
            })
        })
        .collect();
    let (status, _, body) = login(&api_from("127.0.2.1"), &env, "alice", tests::PASSWORD);
    assert_eq!(status, 200, "{body}");
    env.run("alice", &["ls"]).ok();
    assert_eq!(
        env.wait_agent_status("alice", "dev", "connected")["status"],
        "connected"
    );
    for t in flood {
        for status in t.join().unwrap() {
            // Wrong passwords, or told to wait when the hashing threads are all busy.
            assert!(status == 401 || status == 429, "{status}");
        }
    }
    assert_eq!(
        env.wait_agent_status("alice", "dev", "connected")["status"],
        "connected"
    );
}

#[test]
fn quotas_refuse_one_more_with_a_clear_error() {
    let env = TestEnv::start_with(&[
        "--max-workspaces-per-user",
        "2",
        "--max-agents-per-workspace",
        "2",
        "--max-api-tokens-per-user",
        "2",
    ]);
    env.bootstrap("admin");
    env.add_user("admin", "alice");
    env.create_workspace("alice", "one");
    env.create_workspace("alice", "two");
    let err = env.run("alice", &["create", "three"]).fails();
    assert!(
        err.contains("alice holds 2 workspaces, the most allowed"),
        "{err}"
    );
    // Admins are exempt from the workspace count.
    for ws in ["a", "b", "c"] {
        env.create_workspace("admin", ws);
    }
    // Room again after a delete.
    env.run("alice", &["delete", "two", "--yes"]).ok();
    env.create_workspace("alice", "three");

    let spec = env.dir().join("three-agents.json");
    std::fs::write(
        &spec,
        r#"{"agents": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}"#,
    )
    .unwrap();
    let err = env
        .run(
            "admin",
            &["create", "big", "--from", spec.to_str().unwrap()],
        )
        .fails();
    assert!(err.contains("too many agents (3)"), "{err}");

    env.run("alice", &["tokens", "create", "t1"]).ok();
    env.run("alice", &["tokens", "create", "t2"]).ok();
    let err = env.run("alice", &["tokens", "create", "t3"]).fails();
    assert!(
        err.contains("alice holds 2 API tokens, the most allowed"),
        "{err}"
    );
    // Another user's quota is their own.
    env.run("admin", &["tokens", "create", "t1"]).ok();
}

#[test]
fn the_first_user_off_loopback_needs_the_setup_code() {
    // Listening on every interface: whoever reaches it first must not become admin.
    let env = TestEnv::start_in(None, "0.0.0.0", &["--access-url", "http://127.0.0.1:9"]);
    let code = env.setup_code();
    // Reached over loopback here, so the password may go in clear (tls.rs tests
    // the refusal beyond it).
    let url = env.url.replace("0.0.0.0", "127.0.0.1");
    let first = |extra: &[&str]| {
        let mut args = vec![
            "login",
            url.as_str(),
            "--first-user",
            "--username",
            "root",
            "--password-stdin",
        ];
        args.extend_from_slice(extra);
        env.run_with_input("root", &args, &format!("{}\n", tests::PASSWORD))
    };
    let err = first(&[]).fails();
    assert!(err.contains("--setup-code"), "{err}");
    let err = first(&["--setup-code", "0000-0000-0000-0000-0000"]).fails();
    assert!(err.contains("wrong setup code"), "{err}");
    // The raw API says the same, as JSON.
    let reply = env.http().post_json(
        "/api/v1/users/first",
        None,
        &serde_json::json!({"username": "root", "password": tests::PASSWORD}),
    );
    assert!(reply.error(403).contains("needs the setup code"));
    first(&["--setup-code", &code]).ok();
    env.run("root", &["whoami"]).ok();
}

#[test]
fn a_request_that_trickles_its_body_is_answered_503() {
    let env = TestEnv::start_with(&["--request-timeout", "1s"]);
    env.bootstrap("alice");
    let token = env.token_of("alice");
    let mut s = TcpStream::connect(server_addr(&env)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // Headers in full, then a body that never comes.
    write!(
        s,
        "POST /api/v1/workspaces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\""
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("the request took longer than 1s"), "{text}");
    // Nothing was created, and the API is fine.
    let shown = env.run("alice", &["ls", "-o", "json"]).ok().json();
    assert_eq!(shown.as_array().map_or(0, Vec::len), 0, "{shown}");
}

#[test]
fn a_relay_frame_over_the_limit_ends_that_client_only() {
    let (env, _agent) = TestEnv::with_agent();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ended = rt.block_on(async {
        let mut req = format!("{}/relay", env.url.replace("http://", "ws://"))
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            "iroh-relay-v2".parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        // iroh-relay's frame limit is 1 MiB: twice that in one message.
        let _ = ws.send(Message::Binary(vec![0u8; 2 << 20].into())).await;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                Err(_) => return "still open after 30 s".to_owned(),
                Ok(None) | Ok(Some(Err(_))) => return String::new(),
                Ok(Some(Ok(Message::Close(f)))) => {
                    return f.map(|f| f.reason.to_string()).unwrap_or_default();
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    });
    assert_ne!(ended, "still open after 30 s");
    // The relay serves everyone else as before.
    let out = env
        .run("alice", &["ping", "dev", "-n", "2", "--relay-only"])
        .ok();
    assert!(out.stdout.contains("relay"), "{}", out.stdout);
}

#[test]
fn a_relay_client_is_held_to_its_byte_rate() {
    // 1 MiB/s per relay client, with a burst of one frame (1 MiB).
    let env = TestEnv::start_with(&["--relay-client-rate", "1"]);
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let _agent = env.start_agent(&token);
    env.wait_agent_connected("alice", "dev");
    for dir in ["up", "down"] {
        let r = env
            .run(
                "alice",
                &[
                    "speedtest",
                    "dev",
                    "-t",
                    "3s",
                    "--relay-only",
                    "--direction",
                    dir,
                    "-o",
                    "json",
                ],
            )
            .ok()
            .json();
        let bytes = r["total_bytes"].as_u64().unwrap();
        let seconds = r["seconds"].as_f64().unwrap();
        // At most the burst (1 MiB) plus 1 MiB a second, with two more of slack for
        // what QUIC buffers at the start and the end; unlimited, loopback carries
        // hundreds of MiB in that time.
        let bound = ((seconds + 3.0) * f64::from(1 << 20)) as u64;
        assert!(bytes > 0, "{r:#}");
        assert!(
            bytes <= bound,
            "{dir}: {bytes} bytes relayed in {seconds} s (bound {bound}): {r:#}"
        );
    }
}
