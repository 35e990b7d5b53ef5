//! The mesh end to end: real coordinator, real agent, real `myco ping`/`speedtest`.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use tests::TestEnv;

fn relay_stats(env: &TestEnv, admin: &str) -> serde_json::Value {
    let r = env
        .http()
        .get("/api/v1/debug/relay", Some(&env.token_of(admin)));
    assert_eq!(r.status, 200, "{r:#?}");
    r.body
}

fn relay_bytes(env: &TestEnv, admin: &str) -> u64 {
    let r = relay_stats(env, admin);
    r["bytes_recv"].as_u64().unwrap() + r["bytes_sent"].as_u64().unwrap()
}

#[test]
fn agents_learn_their_address_by_quic_address_discovery() {
    let (env, _agent) = TestEnv::with_agent();
    // The agent's net report probes QAD over QUIC, pinned to the coordinator's
    // self-signed certificate; a failed TLS check would leave the counter at zero.
    wait_for_qad(&env);
    let cert = std::fs::read_to_string(env.data_dir().join("relay-tls.crt")).unwrap();
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
}

fn wait_for_qad(env: &TestEnv) {
    tests::eventually("a QAD probe reaches the coordinator", || {
        relay_stats(env, "alice")["qad_connections"]
            .as_u64()
            .unwrap()
            > 0
    });
}

#[test]
fn an_operator_certificate_is_served_and_pinned() {
    // Any valid pair will do as "the operator's": take one a first coordinator made.
    let (first, _agent) = TestEnv::with_agent();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("op.crt");
    let key = dir.path().join("op.key");
    std::fs::copy(first.data_dir().join("relay-tls.crt"), &cert).unwrap();
    std::fs::copy(first.data_dir().join("relay-tls.key"), &key).unwrap();

    let mut env = TestEnv::start_with(&[
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
    ]);
    // The listener speaks https with it too; the self-signed certificate is its own CA.
    assert!(env.url.starts_with("https://"), "{}", env.url);
    env.client_env.push((
        "MYCO_CA_CERT_FILE".into(),
        cert.to_str().unwrap().to_owned(),
    ));
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let _agent2 = env.start_agent(&token);
    env.wait_agent_connected("alice", "dev");
    wait_for_qad(&env);
    assert!(
        !env.data_dir().join("relay-tls.crt").exists(),
        "no self-signed certificate is made when the operator gives one"
    );
    env.run("alice", &["ping", "dev", "-n", "1"]).ok();
}

#[test]
fn ping_goes_direct_and_relay_only_goes_through_the_relay() {
    let (env, _agent) = TestEnv::with_agent();

    let out = env
        .run("alice", &["ping", "dev", "-n", "3", "-i", "50ms"])
        .ok();
    let pongs: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("pong from alice/dev.main"))
        .collect();
    assert_eq!(pongs.len(), 3, "{out:#?}");
    assert!(
        pongs.iter().all(|l| l.contains("via direct 127.0.0.1:")),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains("connection: direct 127.0.0.1:"),
        "{out:#?}"
    );

    let before = relay_bytes(&env, "alice");
    let out = env
        .run(
            "alice",
            &["ping", "dev", "-n", "5", "-i", "20ms", "--relay-only"],
        )
        .ok();
    let pongs: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("pong from"))
        .collect();
    assert_eq!(pongs.len(), 5, "{out:#?}");
    assert!(
        pongs
            .iter()
            .all(|l| l.contains(&format!("via relay {}/", env.url))),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains("not direct: --relay-only was given"),
        "{out:#?}"
    );
    let after = relay_bytes(&env, "alice");
    // Five 16-byte probes and their echoes, QUIC-framed, plus the handshake: the relay
    // must have carried at least the probes both ways.
    assert!(
        after >= before + 2 * 5 * 16,
        "relay carried {before} -> {after} bytes"
    );
}

#[test]
fn relay_path_upgrades_to_direct() {
    let (env, _agent) = TestEnv::with_agent();
    let out = env
        .run(
            "alice",
            &["ping", "dev", "-n", "20", "-i", "100ms", "--relay-first"],
        )
        .ok();
    // The dial went to the relay only; hole punching then found the direct path
    // (within milliseconds on loopback, often before the first pong).
    assert!(out.stdout.contains("connection: direct"), "{out:#?}");
    assert!(
        out.stdout.contains("path changes: relay -> direct"),
        "{out:#?}"
    );
}

#[test]
fn speedtest_both_ways() {
    let (env, _agent) = TestEnv::with_agent();
    for dir in ["down", "up"] {
        let r = env
            .run(
                "alice",
                &[
                    "speedtest",
                    "dev",
                    "--direction",
                    dir,
                    "-t",
                    "1s",
                    "--interval",
                    "250ms",
                    "-o",
                    "json",
                ],
            )
            .ok()
            .json();
        assert_eq!(r["direction"], dir);
        assert!(r["total_bytes"].as_u64().unwrap() > 0, "{r:#}");
        assert!(r["intervals"].as_array().unwrap().len() >= 2, "{r:#}");
        assert!(r["path"].as_str().unwrap().starts_with("direct"), "{r:#}");
    }
    let r = env
        .run(
            "alice",
            &["speedtest", "dev", "-t", "1s", "--relay-only", "-o", "json"],
        )
        .ok()
        .json();
    assert!(r["path"].as_str().unwrap().starts_with("relay"), "{r:#}");
    assert!(r["total_bytes"].as_u64().unwrap() > 0, "{r:#}");
}

#[test]
fn a_connect_may_wait_for_an_agent_that_is_not_up_yet() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let alice = env.token_of("alice");
    let client = iroh::SecretKey::generate();
    let body = |wait: u64| serde_json::json!({ "client_id": client.public(), "wait": wait });
    // Without a wait (or 0), no agent is a 409 at once.
    env.http()
        .post_json("/api/v1/workspaces/me/dev/connect", Some(&alice), &body(0))
        .error(409);
    // With one, the answer comes when the agent is up. The request goes out first;
    // the agent starts a second later.
    let asked = std::thread::scope(|s| {
        let asking = s.spawn(|| {
            env.http().post_json(
                "/api/v1/workspaces/me/dev/connect",
                Some(&alice),
                // Far beyond the coordinator's bound, which it applies.
                &body(u64::MAX),
            )
        });
        std::thread::sleep(std::time::Duration::from_secs(1));
        let agent = env.start_agent(&token);
        (asking.join().unwrap(), agent)
    });
    let (reply, _agent) = asked;
    assert_eq!(reply.status, 200, "{reply:#?}");
    assert!(reply.body["ticket"].is_string(), "{reply:#?}");
    // With the host key the agent reported as it came up (SSH needs it).
    assert!(reply.body["ssh_host_key"].is_string(), "{reply:#?}");
}

#[test]
fn other_users_and_missing_agents_are_refused() {
    let env = TestEnv::start();
    env.bootstrap("admin");
    env.add_user("admin", "alice");
    env.add_user("admin", "bob");
    let token = env.create_workspace("alice", "dev");

    let line = env.run("alice", &["ping", "dev", "-n", "1"]).fails();
    assert!(
        line.contains("agent alice/dev.main is not connected"),
        "{line}"
    );

    let _agent = env.start_agent(&token);
    env.wait_agent_connected("alice", "dev");
    let line = env.run("bob", &["ping", "alice/dev", "-n", "1"]).fails();
    assert!(line.contains("workspace alice/dev not found"), "{line}");
    env.run("alice", &["ping", "dev", "-n", "1"]).ok();
}

#[test]
fn agent_with_a_bad_token_exits_with_a_clear_error() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    env.run("alice", &["rotate-agent-token", "dev"]).ok();
    let mut agent = env.start_agent(&token);
    let status = agent.child.wait().unwrap();
    assert!(!status.success());
    let log = agent.log();
    assert!(log.contains("refused the agent token"), "{log}");
}

#[test]
fn agent_reconnects_after_the_coordinator_restarts() {
    let mut env = TestEnv::start();
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let _agent = env.start_agent(&token);
    let before = env.wait_agent_connected("alice", "dev");
    env.kill9();
    env.start_server();
    let after = env.wait_agent_connected("alice", "dev");
    assert_eq!(
        before["connection"]["endpoint_id"],
        after["connection"]["endpoint_id"]
    );
    env.run("alice", &["ping", "dev", "-n", "2", "-i", "50ms"])
        .ok();
}

#[test]
fn agent_goes_away_when_it_stops() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let agent = env.start_agent(&token);
    env.wait_agent_connected("alice", "dev");
    drop(agent);
    env.wait_agent_gone("alice", "dev");
}

#[test]
fn established_sessions_survive_the_coordinator_going_down() {
    let (mut env, _agent) = TestEnv::with_agent();

    // A ping session: kill the coordinator after the first pong; all pongs still come.
    let mut ping = env
        .cmd("alice", &["ping", "dev", "-n", "15", "-i", "100ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(ping.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("via direct"), "{first}");
    env.kill9();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = ping.wait().unwrap();
    let pongs = rest.iter().filter(|l| l.starts_with("pong")).count() + 1;
    assert!(status.success(), "{rest:#?}");
    assert_eq!(pongs, 15, "{rest:#?}");

    // A speedtest session likewise.
    env.start_server();
    env.wait_agent_connected("alice", "dev");
    let mut st = env
        .cmd(
            "alice",
            &["speedtest", "dev", "-t", "2s", "--interval", "200ms"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(st.stdout.take().unwrap()).lines();
    let header = lines.next().unwrap().unwrap();
    assert!(header.contains("via direct"), "{header}");
    let first_interval = lines.next().unwrap().unwrap();
    assert!(first_interval.contains("Mbits/sec"), "{first_interval}");
    env.kill9();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let out = st.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{rest:#?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rest.iter().any(|l| l.starts_with("total:")), "{rest:#?}");
}
