//! What the agent reports, as the coordinator shows it, through the real binaries:
//! startup scripts that fail or time out (lifecycle and `myco logs`), the shutdown
//! script on SIGTERM, app health against a real HTTP server going up and down,
//! metadata items, and stats of live SSH and port-forward sessions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test] fns

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::Duration;

use serde_json::Value;
use tests::fixtures::{poll_for, signal};
use tests::{TestEnv, eventually, free_port};

/// Creates workspace `name` for alice from a TOML spec; returns its agent's token.
fn create_from(env: &TestEnv, name: &str, spec: &str) -> String {
    let path = env.config_dir("alice").join(format!("{name}.toml"));
    std::fs::write(&path, spec).unwrap();
    let created = env
        .run(
            "alice",
            &[
                "create",
                name,
                "--from",
                path.to_str().unwrap(),
                "-o",
                "json",
            ],
        )
        .ok()
        .json();
    created["agent_tokens"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The workspace's first agent as `myco show -o json` has it.
fn agent_of(env: &TestEnv, ws: &str) -> Value {
    env.run("alice", &["show", ws, "-o", "json"]).ok().json()["agents"][0].clone()
}

/// Waits (bounded) until the agent of `ws` satisfies `done`; returns it.
fn wait_agent(env: &TestEnv, ws: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    env.await_agent("alice", ws, what, done)
}

/// `myco logs WS -o json` as (source, text) pairs.
fn logs(env: &TestEnv, ws: &str) -> Vec<(String, String)> {
    let lines = env.run("alice", &["logs", ws, "-o", "json"]).ok().json();
    lines
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["source"].as_str().unwrap().to_owned(),
                l["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn has_line(lines: &[(String, String)], source: &str, text: &str) -> bool {
    lines.iter().any(|(s, t)| s == source && t == text)
}

#[test]
fn failing_and_timed_out_startup_scripts_show_in_the_lifecycle_and_logs() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let fails = create_from(
        &env,
        "fails",
        r#"
[[agents]]
name = "main"
startup_script = { run = "echo hello from startup; echo to stderr >&2; exit 3", timeout = 60 }
shutdown_script = { run = "echo goodbye from shutdown" }
"#,
    );
    let slow = create_from(
        &env,
        "slow",
        r#"
[[agents]]
name = "main"
startup_script = { run = "echo waiting; sleep 600", timeout = 1 }
"#,
    );
    let mut fails_agent = env.start_agent(&fails);
    let _slow_agent = env.start_agent(&slow);

    let agent = wait_agent(&env, "fails", "the failing script shows", |a| {
        a["lifecycle_state"] == "start_error"
    });
    assert!(agent["lifecycle_changed_at"].is_string(), "{agent:#}");
    // Logs are flushed with the lifecycle, but stored apart: wait for them too.
    let mut lines = Vec::new();
    eventually("the failing script's output shows", || {
        lines = logs(&env, "fails");
        has_line(
            &lines,
            "startup",
            "myco: the startup script failed: exit status 3",
        )
    });
    assert!(
        has_line(&lines, "startup", "hello from startup"),
        "{lines:#?}"
    );
    assert!(has_line(&lines, "startup", "to stderr"), "{lines:#?}");
    let text = env.run("alice", &["logs", "fails"]).ok().stdout;
    assert!(text.contains("startup  hello from startup"), "{text}");
    let show = env.run("alice", &["show", "fails"]).ok().stdout;
    assert!(show.contains("lifecycle: start_error"), "{show}");

    wait_agent(&env, "slow", "the slow script times out", |a| {
        a["lifecycle_state"] == "start_timeout"
    });
    eventually("the slow script's output shows", || {
        let lines = logs(&env, "slow");
        has_line(&lines, "startup", "waiting")
            && has_line(
                &lines,
                "startup",
                "myco: the startup script failed: timed out after 1 s and was killed",
            )
    });

    // SIGTERM: the shutdown script runs and its outcome reaches the coordinator
    // before the agent exits.
    signal(fails_agent.child.id(), "TERM");
    let status = fails_agent.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", fails_agent.log());
    wait_agent(&env, "fails", "the agent is off", |a| {
        a["lifecycle_state"] == "off"
    });
    eventually("the shutdown script's output shows", || {
        has_line(&logs(&env, "fails"), "shutdown", "goodbye from shutdown")
    });
}

#[test]
fn a_second_sigterm_cuts_the_shutdown_script_short() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("script.pid");
    let token = create_from(
        &env,
        "slowstop",
        &format!(
            r#"
[[agents]]
name = "main"
shutdown_script = {{ run = "echo saving; echo $$ > {}; exec sleep 600", timeout = 900 }}
"#,
            pid_file.display()
        ),
    );
    let mut agent = env.start_agent(&token);
    wait_agent(&env, "slowstop", "the agent is ready", |a| {
        a["lifecycle_state"] == "ready"
    });

    signal(agent.child.id(), "TERM");
    let mut script_pid = String::new();
    eventually("the shutdown script runs", || {
        script_pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
        !script_pid.trim().is_empty()
    });
    let script_proc = std::path::PathBuf::from(format!("/proc/{}", script_pid.trim()));
    assert!(script_proc.exists(), "{}", agent.log());
    wait_agent(&env, "slowstop", "the agent is shutting down", |a| {
        a["lifecycle_state"] == "shutting_down"
    });

    // The script would run for 10 minutes; the second SIGTERM ends it and the agent.
    signal(agent.child.id(), "TERM");
    let mut status = None;
    eventually("the agent exits", || {
        status = agent.child.try_wait().unwrap();
        status.is_some()
    });
    let status = status.unwrap();
    assert!(status.success(), "{status}: {}", agent.log());
    eventually("the script's process is gone", || !script_proc.exists());
    wait_agent(&env, "slowstop", "the cut shows in the lifecycle", |a| {
        a["lifecycle_state"] == "shutdown_error"
    });
    let lines = logs(&env, "slowstop");
    assert!(has_line(&lines, "shutdown", "saving"), "{lines:#?}");
    assert!(
        has_line(
            &lines,
            "shutdown",
            "myco: the shutdown script failed: cut short: the agent was told to stop again"
        ),
        "{lines:#?}"
    );
}

/// An HTTP app on loopback answering every request with the status it is set to,
/// until closed.
struct TestApp {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    closed: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestApp {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let closed = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (status, closed) = (status.clone(), closed.clone());
            move || {
                for conn in listener.incoming() {
                    if closed.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut conn) = conn else { continue };
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let code = status.load(Ordering::SeqCst);
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {code} Test\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                }
            }
        });
        Self {
            addr,
            status,
            closed,
            thread: Some(thread),
        }
    }

    fn answer(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }

    /// Stops listening: connections are refused from now on.
    fn close(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which sees the flag and drops the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

#[test]
fn app_health_follows_a_real_http_server_up_and_down() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let mut app = TestApp::start();
    let addr = app.addr;
    let token = create_from(
        &env,
        "dev",
        &format!(
            r#"
[[agents]]
name = "main"
[[agents.apps]]
slug = "web"
url = "http://{addr}/"
healthcheck = {{ url = "http://{addr}/healthz", interval = 1, threshold = 2 }}
[[agents.apps]]
slug = "docs"
url = "http://{addr}/docs"
"#
        ),
    );
    let _agent = env.start_agent(&token);
    let health = |want: &'static str| {
        wait_agent(&env, "dev", &format!("web is {want}"), |a| {
            a["apps_health"]["web"] == want
        })
    };
    let agent = health("healthy");
    assert_eq!(agent["apps_health"]["docs"], "disabled", "{agent:#}");
    let show = env.run("alice", &["show", "dev"]).ok().stdout;
    assert!(show.contains("app web"), "{show}");
    assert!(show.contains("healthy"), "{show}");

    app.answer(503);
    health("unhealthy");
    // Any answer below 500 counts as up.
    app.answer(404);
    health("healthy");
    app.close();
    health("unhealthy");
}

#[test]
fn metadata_items_show_their_values_and_errors() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let token = create_from(
        &env,
        "dev",
        r#"
[[agents]]
name = "main"
[[agents.metadata]]
key = "greeting"
script = "echo '  hello metadata  '"
interval = 1
[[agents.metadata]]
key = "broken"
script = "echo partial; echo disk on fire >&2; exit 4"
interval = 1
"#,
    );
    let _agent = env.start_agent(&token);
    let agent = wait_agent(&env, "dev", "both items show", |a| {
        a["metadata"].as_array().is_some_and(|m| m.len() == 2)
    });
    let item = |key: &str| {
        agent["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["key"] == key)
            .unwrap_or_else(|| panic!("no {key}: {agent:#}"))
            .clone()
    };
    let greeting = item("greeting");
    assert_eq!(greeting["value"], "hello metadata", "{agent:#}");
    assert!(greeting["error"].is_null(), "{agent:#}");
    let broken = item("broken");
    assert_eq!(broken["value"], "partial", "{agent:#}");
    assert_eq!(broken["error"], "exit status 4: disk on fire", "{agent:#}");
    let show = env.run("alice", &["show", "dev"]).ok().stdout;
    assert!(show.contains("greeting: hello metadata"), "{show}");
    assert!(
        show.contains("broken: partial (error: exit status 4: disk on fire)"),
        "{show}"
    );
}

/// A background `myco` process of alice's, all of them from her one config dir: each
/// process dials with a key of its own (they once shared one and broke each other's
/// connections to the agent).
struct Background {
    child: Child,
    stderr: std::path::PathBuf,
}

impl Background {
    fn spawn(env: &TestEnv, name: &str, args: &[&str]) -> Self {
        let stderr = env.config_dir("alice").join(format!("stderr-{name}"));
        let child = env
            .cmd("alice", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self { child, stderr }
    }

    /// Whether it still runs, and what it said, for failure messages.
    fn describe(&mut self) -> String {
        let state = match self.child.try_wait() {
            Ok(None) => "running".to_owned(),
            Ok(Some(status)) => format!("exited: {status}"),
            Err(e) => format!("unknown: {e}"),
        };
        let said = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("{state}; stderr: {said}")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stat(agent: &Value, name: &str) -> u64 {
    agent["stats"][name].as_u64().unwrap_or(0)
}

/// Waits (bounded) until the agent's stats satisfy `done`; a failure shows what the
/// background processes said.
fn wait_stats(
    env: &TestEnv,
    procs: &mut [&mut Background],
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    poll_for(
        Duration::from_secs(60),
        Duration::from_millis(50),
        what,
        || {
            let agent = agent_of(env, "dev");
            if done(&agent) {
                return Ok(agent);
            }
            let said: Vec<String> = procs.iter_mut().map(|p| p.describe()).collect();
            Err(format!("{:#}\nprocesses: {said:#?}", agent["stats"]))
        },
    )
}

#[test]
fn stats_count_connections_and_sessions_by_kind() {
    // Stats come every heartbeat: every second here.
    let env = TestEnv::start_with(&["--heartbeat-interval", "1s"]);
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let _agent = env.start_agent(&token);
    env.wait_agent_connected("alice", "dev");

    // Each session ends when its input does: `read` returns at EOF.
    let mut ssh = Background::spawn(&env, "ssh", &["ssh", "dev", "--", "read", "line"]);
    wait_stats(&env, &mut [&mut ssh], "the SSH session is counted", |a| {
        stat(a, "session_count_ssh") == 1
    });
    // VS Code's server gives itself away in its command line.
    let mut vscode = Background::spawn(
        &env,
        "vscode",
        &[
            "ssh",
            "dev",
            "--",
            "read line # ~/.vscode-server/bin/x/code-server",
        ],
    );
    wait_stats(
        &env,
        &mut [&mut vscode],
        "the VS Code session is counted",
        |a| stat(a, "session_count_vscode") == 1,
    );
    let port = free_port().to_string();
    let mut forward = Background::spawn(
        &env,
        "forward",
        &["port-forward", "dev", "--tcp", &format!("{port}:{port}")],
    );
    let busy = wait_stats(
        &env,
        &mut [&mut ssh, &mut vscode, &mut forward],
        "every session is counted",
        |a| {
            stat(a, "session_count_ssh") == 1
                && stat(a, "session_count_vscode") == 1
                && stat(a, "session_count_port_forward") == 1
                && stat(a, "connection_count") == 3
                && a["stats"]["relay_latencies"][0]["preferred"] == true
        },
    );
    let stats = &busy["stats"];
    assert_eq!(stats["session_count_jetbrains"], 0, "{stats:#}");
    assert_eq!(
        stat(&busy, "connections_direct") + stat(&busy, "connections_relayed"),
        3,
        "{stats:#}"
    );
    assert!(
        stat(&busy, "rx_bytes") > 0 && stat(&busy, "tx_bytes") > 0,
        "{stats:#}"
    );
    assert!(
        stats["connection_median_latency_ms"].as_f64().unwrap() > 0.0,
        "{stats:#}"
    );
    let relay = &stats["relay_latencies"][0];
    assert_eq!(relay["relay_url"], format!("{}/", env.url), "{stats:#}");
    let show = env.run("alice", &["show", "dev"]).ok().stdout;
    assert!(
        show.contains("1 ssh, 1 vscode, 0 jetbrains, 1 port-forward"),
        "{show}"
    );

    // End of input ends the SSH sessions; port-forward stops on SIGTERM (after its
    // dial, which the counted session shows is done).
    drop(ssh.child.stdin.take());
    drop(vscode.child.stdin.take());
    signal(forward.child.id(), "TERM");
    for p in [&mut ssh, &mut vscode, &mut forward] {
        let _ = p.child.wait();
    }
    let idle = wait_stats(
        &env,
        &mut [&mut ssh, &mut vscode, &mut forward],
        "the sessions are gone",
        |a| {
            stat(a, "connection_count") == 0
                && stat(a, "session_count_ssh") == 0
                && stat(a, "session_count_vscode") == 0
                && stat(a, "session_count_port_forward") == 0
        },
    );
    // Traffic is counted since the agent started, closed connections included.
    assert!(
        stat(&idle, "rx_bytes") >= stat(&busy, "rx_bytes"),
        "{idle:#}"
    );
    assert!(
        stat(&idle, "tx_bytes") >= stat(&busy, "tx_bytes"),
        "{idle:#}"
    );
}
