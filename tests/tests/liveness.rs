//! Agent status as the coordinator shows it, through the real binaries: a frozen agent
//! turns `disconnected` after the inactive timeout (two missed heartbeats) and
//! `connected` again when it thaws; a killed one is `disconnected` at once (its control
//! channel ended), and `connected` again when it comes back.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use tests::TestEnv;
use tests::fixtures::signal;

#[test]
fn frozen_and_killed_agents_turn_disconnected_and_come_back() {
    // Heartbeats every second: the inactive timeout is 2 s.
    let env = TestEnv::start_with(&["--heartbeat-interval", "1s"]);
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let mut agent = env.start_agent(&token);
    let connected = env.wait_agent_status("alice", "dev", "connected");
    let first = connected["first_connected_at"].clone();
    assert!(first.is_string(), "{connected:#}");
    assert!(connected["disconnected_at"].is_null(), "{connected:#}");

    // SIGSTOP: the TCP connection stays open, only the heartbeats stop.
    let pid = agent.child.id();
    signal(pid, "STOP");
    let silent = env.wait_agent_status("alice", "dev", "disconnected");
    signal(pid, "CONT");
    assert!(
        silent["disconnected_at"].is_null(),
        "judged by its silence, not by a closed channel: {silent:#}"
    );
    let back = env.wait_agent_status("alice", "dev", "connected");
    assert_eq!(back["first_connected_at"], first);

    // SIGKILL: the channel ends and the coordinator writes disconnected_at.
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let gone = env.wait_agent_status("alice", "dev", "disconnected");
    assert!(gone["disconnected_at"].is_string(), "{gone:#}");
    let ls = env.run("alice", &["ls"]).ok();
    assert!(ls.stdout.contains("disconnected"), "{ls:#?}");

    let _agent = env.start_agent(&token);
    let again = env.wait_agent_status("alice", "dev", "connected");
    assert_eq!(
        again["first_connected_at"], first,
        "the first connection is kept"
    );
    assert!(
        again["last_connected_at"].as_str() > gone["disconnected_at"].as_str(),
        "{again:#}"
    );
}

#[test]
fn an_agent_that_never_connects_times_out() {
    let env = TestEnv::start_with(&["--agent-connection-timeout", "1s"]);
    env.bootstrap("alice");
    env.create_workspace("alice", "dev");
    let agent = env.wait_agent_status("alice", "dev", "timeout");
    assert!(agent["first_connected_at"].is_null(), "{agent:#}");
}

#[test]
fn scaletest_finds_no_false_verdicts() {
    let env = TestEnv::start_with(&["--heartbeat-interval", "1s"]);
    env.bootstrap("alice");
    let out = env
        .run(
            "alice",
            &[
                "scaletest",
                "agents",
                "--count",
                "150",
                "--apps",
                "2",
                "--duration",
                "8s",
                "--scrape-interval",
                "1s",
            ],
        )
        .ok();
    let summary = out
        .stdout
        .lines()
        .find(|l| l.starts_with("summary:"))
        .unwrap_or_else(|| panic!("{out:#?}"));
    assert!(
        summary.contains(" 0 false disconnects, 0 false connects, 0 missing"),
        "{out:#?}"
    );
    // Both kinds of verdict were reached: agents judged connected, and the 15 that
    // hung up halfway judged gone.
    assert!(out.stderr.contains("15 agents hang up"), "{out:#?}");
    let ls = env.run("alice", &["ls", "-o", "json"]).ok().json();
    assert_eq!(
        ls,
        serde_json::json!([]),
        "the scaletest deletes its workspaces"
    );
}
