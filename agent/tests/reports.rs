//! The agent against a fake coordinator on loopback: what it reports on the control
//! channel (lifecycle, script output, app health, metadata, stats), in which order,
//! and again on a new channel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use mesh::Name;
use mesh::api::{App, AppHealth, HealthCheck, MetadataSpec, Script};
use mesh::control::{AgentMessage, CoordinatorMessage, Manifest};
use mesh::control_channel::{ControlServer, Received};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on every wait for the agent, so a broken agent fails the test instead of
/// hanging it.
const PATIENCE: Duration = Duration::from_secs(60);

/// An HTTP server answering 200 to everything: the app's health check and the
/// relay's `/ping`.
async fn http_ok() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    addr
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn manifest(
    http: std::net::SocketAddr,
    startup: Option<Script>,
    shutdown: Option<Script>,
) -> Manifest {
    Manifest {
        apps: vec![
            App {
                slug: name("web"),
                url: format!("http://{http}/"),
                healthcheck: Some(HealthCheck {
                    url: format!("http://{http}/health"),
                    interval: 1,
                    threshold: 1,
                }),
            },
            App {
                slug: name("docs"),
                url: format!("http://{http}/docs"),
                healthcheck: None,
            },
        ],
        startup_script: startup,
        shutdown_script: shutdown,
        metadata: vec![MetadataSpec {
            key: name("answer"),
            display_name: None,
            script: "echo 42".into(),
            interval: 1,
            timeout: 10,
        }],
    }
}

fn script(run: &str, timeout: u64) -> Option<Script> {
    Some(Script {
        run: run.into(),
        timeout,
    })
}

/// An agent run by a test; aborted when dropped.
struct RunningAgent {
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), agent::AgentError>>>,
}

impl RunningAgent {
    /// What SIGTERM does.
    fn stop(&mut self) {
        let _ = self.stop.take().expect("stopped twice").send(());
    }

    /// Waits for the agent to stop on its own, and for it to stop cleanly.
    async fn stopped(mut self, what: &str) {
        let task = self.task.take().unwrap();
        tokio::time::timeout(PATIENCE, task)
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .unwrap()
            .unwrap();
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The coordinator's side of the control channel, as far as the agent can tell.
struct FakeCoordinator {
    listener: TcpListener,
    welcome: CoordinatorMessage,
}

impl FakeCoordinator {
    async fn start(http: std::net::SocketAddr, manifest: Manifest) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let welcome = CoordinatorMessage::Welcome {
            coordinator_key: iroh::SecretKey::from_bytes(&[7; 32]).public(),
            workspace_id: "ws-id".into(),
            agent_id: "agent-id".into(),
            challenge: mesh::sign::new_challenge(),
            relay_quic_signature: None,
            // Nothing speaks the relay protocol there, but it answers `/ping`.
            relay_url: format!("http://{http}/").parse().unwrap(),
            agent: "alice/dev.main".into(),
            heartbeat_interval_ms: 1000,
            relay_quic: None,
            manifest,
        };
        Self { listener, welcome }
    }

    /// Starts an agent (in this process) against this coordinator, in a data dir of
    /// its own.
    fn run_agent(&self) -> RunningAgent {
        let dir = tempfile::tempdir().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stop_signal = async {
            // Only `RunningAgent::stop` stops it; dropping the sender does not.
            if stopped.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let config = self.config(dir.path());
        let task = tokio::spawn(agent::run(config, stop_signal, std::future::pending()));
        RunningAgent {
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn config(&self, data_dir: &std::path::Path) -> agent::AgentConfig {
        agent::AgentConfig {
            netcheck_min_interval: std::time::Duration::from_secs(30),
            url: format!("http://{}", self.listener.local_addr().unwrap()),
            token: "myco_test_token".into(),
            data_dir: data_dir.to_owned(),
            bind_addr: Some("127.0.0.1:0".parse().unwrap()),
            portmapper: false,
            ssh_idle_timeout: None,
            coordinator_key: None,
            ssh_gateway_ports: false,
        }
    }

    async fn accept(&self) -> Channel {
        let (tcp, _) = tokio::time::timeout(PATIENCE, self.listener.accept())
            .await
            .expect("the agent never connected")
            .unwrap();
        let mut ws = mesh::control_channel::accept(tcp).await.unwrap();
        ws.send(&self.welcome).await.unwrap();
        Channel {
            ws,
            seen: Seen::default(),
        }
    }
}

/// What one channel carried so far.
#[derive(Debug, Default)]
struct Seen {
    /// Lifecycle changes and log lines in the order they came.
    events: Vec<String>,
    apps: BTreeMap<String, AppHealth>,
    metadata: BTreeMap<String, String>,
    stats: Vec<mesh::api::AgentStats>,
}

impl Seen {
    fn has(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event)
    }

    fn position(&self, event: &str) -> usize {
        self.events
            .iter()
            .position(|e| e == event)
            .unwrap_or_else(|| panic!("{event:?} never came: {:#?}", self.events))
    }
}

struct Channel {
    ws: ControlServer<TcpStream>,
    seen: Seen,
}

impl Channel {
    /// Reads messages until `done` holds of what came.
    async fn until(&mut self, what: &str, done: impl Fn(&Seen) -> bool) {
        let read = async {
            while !done(&self.seen) {
                let msg = match self.ws.recv().await {
                    Ok(Received::Message(msg)) => msg,
                    other => panic!(
                        "the channel ended ({other:?}) before {what}: {:#?}",
                        self.seen
                    ),
                };
                let seen = &mut self.seen;
                match msg {
                    AgentMessage::Lifecycle { state, .. } => {
                        seen.events.push(format!("lifecycle {state}"));
                    }
                    AgentMessage::Logs { lines } => {
                        seen.events.extend(lines.into_iter().map(|l| l.text));
                    }
                    AgentMessage::AppHealth { changes } => {
                        for c in changes {
                            seen.apps.insert(c.slug.to_string(), c.health);
                        }
                    }
                    AgentMessage::Metadata { items } => {
                        for i in items {
                            seen.metadata.insert(i.key.to_string(), i.value);
                        }
                    }
                    AgentMessage::Stats { stats } => seen.stats.push(stats),
                    AgentMessage::Addr { .. }
                    | AgentMessage::Heartbeat
                    | AgentMessage::HostKey { .. }
                    | AgentMessage::Netcheck { .. } => {}
                }
            }
        };
        if tokio::time::timeout(PATIENCE, read).await.is_err() {
            panic!("timed out waiting until {what}: {:#?}", self.seen);
        }
    }
}

#[tokio::test]
async fn startup_failure_health_metadata_stats_and_shutdown_are_reported() {
    let http = http_ok().await;
    let coordinator = FakeCoordinator::start(
        http,
        manifest(
            http,
            script("echo starting up; echo oops >&2; exit 3", 60),
            script("echo bye", 60),
        ),
    )
    .await;
    let mut agent = coordinator.run_agent();
    let mut ch = coordinator.accept().await;
    ch.until(
        "the startup script failed and everything was reported",
        |s| {
            s.has("lifecycle start_error")
                && s.apps.get("web") == Some(&AppHealth::Healthy)
                && s.metadata.get("answer").map(String::as_str) == Some("42")
                && !s.stats.is_empty()
        },
    )
    .await;
    let seen = &ch.seen;
    // The script's output comes before the state it led to.
    let starting = seen.position("lifecycle starting");
    let failed = seen.position("lifecycle start_error");
    for line in [
        "starting up",
        "oops",
        "myco: the startup script failed: exit status 3",
    ] {
        let at = seen.position(line);
        assert!(starting < at && at < failed, "{:#?}", seen.events);
    }
    assert_eq!(seen.apps.get("docs"), Some(&AppHealth::Disabled));
    let stats = &seen.stats[0];
    assert_eq!(stats.connection_count, 0);
    assert_eq!(stats.relay_latencies.len(), 1, "{stats:?}");
    assert_eq!(
        stats.relay_latencies[0].relay_url,
        format!("http://{http}/")
    );

    // SIGTERM: the shutdown script runs while the channel stays up, and its outcome
    // is sent before the agent exits.
    agent.stop();
    ch.until("the agent is off", |s| s.has("lifecycle off"))
        .await;
    let seen = &ch.seen;
    let shutting_down = seen.position("lifecycle shutting_down");
    let bye = seen.position("bye");
    assert!(failed < shutting_down && shutting_down < bye && bye < seen.position("lifecycle off"));
    agent
        .stopped("the agent did not stop after its shutdown script")
        .await;
}

#[tokio::test]
async fn a_new_channel_gets_the_current_state_again() {
    let http = http_ok().await;
    let coordinator = FakeCoordinator::start(http, manifest(http, None, None)).await;
    let _agent = coordinator.run_agent();
    let mut ch = coordinator.accept().await;
    ch.until("ready, healthy, with metadata", |s| {
        s.has("lifecycle ready")
            && s.apps.get("web") == Some(&AppHealth::Healthy)
            && s.metadata.contains_key("answer")
    })
    .await;
    // The coordinator restarts: the agent reconnects and says it all again, though
    // nothing changed.
    drop(ch);
    let mut ch = coordinator.accept().await;
    ch.until("the state came again", |s| {
        s.has("lifecycle ready")
            && s.apps.len() == 2
            && s.metadata.get("answer").map(String::as_str) == Some("42")
    })
    .await;
    assert_eq!(ch.seen.apps.get("web"), Some(&AppHealth::Healthy));
    assert_eq!(ch.seen.apps.get("docs"), Some(&AppHealth::Disabled));
    // Only the current state: the startup transitions are not replayed.
    assert!(!ch.seen.has("lifecycle starting"), "{:#?}", ch.seen.events);
}

#[tokio::test]
async fn a_startup_script_past_its_timeout_is_killed() {
    let http = http_ok().await;
    let coordinator = FakeCoordinator::start(
        http,
        manifest(http, script("echo before; sleep 600", 1), None),
    )
    .await;
    let _agent = coordinator.run_agent();
    let mut ch = coordinator.accept().await;
    ch.until("the startup script timed out", |s| {
        s.has("lifecycle start_timeout")
    })
    .await;
    let seen = &ch.seen;
    assert!(seen.position("before") < seen.position("lifecycle start_timeout"));
    seen.position("myco: the startup script failed: timed out after 1 s and was killed");
    assert!(!seen.has("lifecycle ready") && !seen.has("lifecycle start_error"));
}

#[tokio::test]
async fn stopping_during_the_startup_script_kills_it_and_shuts_down() {
    let http = http_ok().await;
    let coordinator = FakeCoordinator::start(
        http,
        manifest(
            http,
            script("echo $$; sleep 600", 600),
            script("echo bye", 60),
        ),
    )
    .await;
    let mut agent = coordinator.run_agent();
    let mut ch = coordinator.accept().await;
    ch.until("the startup script runs", |s| {
        s.has("lifecycle starting") && s.events.iter().any(|e| e.parse::<i32>().is_ok())
    })
    .await;
    let pid: i32 = ch.seen.events.iter().find_map(|e| e.parse().ok()).unwrap();
    agent.stop();
    ch.until("the agent is off", |s| s.has("lifecycle off"))
        .await;
    assert!(!ch.seen.has("lifecycle ready"));
    agent.stopped("the agent did not stop").await;
    // The script's shell is gone (or a zombie waiting for its adopter to reap it).
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let gone = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        };
        if gone {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
