//! `/metrics` through a real Prometheus (Debian's package): it scrapes the
//! coordinator's `--prometheus-address` and its HTTP API returns the connected agent's
//! series. `promtool check metrics` accepts the classic text output, and on the API
//! listener `/metrics` is for admins only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tests::fixtures::poll_for;
use tests::{TestEnv, free_port};

/// A running Prometheus; killed when dropped.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_prometheus(dir: &Path, target: &str, port: u16) -> Prometheus {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: myco\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus is installed (.ci/test installs Debian's package)");
    Prometheus(child)
}

/// Result vector of an instant query, or empty while Prometheus is not ready.
fn query(client: &reqwest::blocking::Client, port: u16, q: &str) -> Vec<serde_json::Value> {
    let Ok(resp) = client
        .get(format!("http://127.0.0.1:{port}/api/v1/query"))
        .query(&[("query", q)])
        .send()
    else {
        return Vec::new();
    };
    let Ok(v) = resp.json::<serde_json::Value>() else {
        return Vec::new();
    };
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[test]
fn prometheus_scrapes_the_connected_agent() {
    let metrics_port = free_port();
    let env = TestEnv::start_with(&[
        "--heartbeat-interval",
        "1s",
        "--prometheus-address",
        &format!("127.0.0.1:{metrics_port}"),
    ]);
    env.bootstrap("alice");
    let created = env
        .run(
            "alice",
            &[
                "create",
                "dev",
                "--app",
                "web=http://127.0.0.1:9/",
                "-o",
                "json",
            ],
        )
        .ok()
        .json();
    let token = created["agent_tokens"][0]["token"].as_str().unwrap();
    let _agent = env.start_agent(token);
    env.wait_agent_status("alice", "dev", "connected");

    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let body = client
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .unwrap();
    assert_eq!(
        body.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let body = body.text().unwrap();
    assert!(
        body.contains(r#"myco_agents_connections{agent_name="main",username="alice",workspace_name="dev",status="connected""#),
        "{body}"
    );
    assert!(
        body.contains(r#"myco_agents_apps{agent_name="main",username="alice",workspace_name="dev",app_name="web",health="disabled"} 1"#),
        "{body}"
    );
    assert!(body.contains("myco_coordinator_heartbeats_total"), "{body}");

    // promtool lints the classic text format.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    let _prom = start_prometheus(dir.path(), &format!("127.0.0.1:{metrics_port}"), prom_port);
    let series = poll_for(
        Duration::from_secs(90),
        Duration::from_millis(250),
        "Prometheus returns the agent's series",
        || {
            let r = query(
                &client,
                prom_port,
                r#"myco_agents_connections{workspace_name="dev",status="connected"}"#,
            );
            if r.is_empty() {
                Err(format!(
                    "nothing yet; its log:\n{}",
                    std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
                ))
            } else {
                Ok(r)
            }
        },
    );
    let m = &series[0]["metric"];
    assert_eq!(m["agent_name"], "main");
    assert_eq!(m["username"], "alice");
    assert_eq!(m["job"], "myco");
    assert_eq!(series[0]["value"][1], "1");
    // The coordinator's own counters are stored too.
    let hb = query(&client, prom_port, "myco_coordinator_heartbeats_total");
    assert_eq!(hb.len(), 1, "{hb:?}");
}

#[test]
fn metrics_on_the_api_listener_are_for_admins() {
    let env = TestEnv::start();
    env.bootstrap("admin");
    env.add_user("admin", "bob");
    let client = reqwest::blocking::Client::new();
    let get = |token: Option<String>| {
        let mut req = client.get(format!("{}/metrics", env.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().unwrap()
    };
    let anonymous = get(None);
    assert_eq!(anonymous.status(), 401);
    let body: serde_json::Value = anonymous.json().unwrap();
    assert!(body["message"].is_string(), "{body}");
    assert_eq!(get(Some(env.token_of("bob"))).status(), 403);
    let admin = get(Some(env.token_of("admin")));
    assert_eq!(admin.status(), 200);
    let text = admin.text().unwrap();
    assert!(
        text.contains("myco_http_requests_total{method=\"GET\",route=\"/metrics\",code=\"401\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("myco_agents_collection_seconds_count"),
        "{text}"
    );
}
