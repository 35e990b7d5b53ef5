//! Acknowledged writes are durable: across a clean restart, and across `kill -9`
//! while creates are in flight.

use std::sync::{Arc, Mutex};

use serde_json::json;
use tests::TestEnv;

#[test]
fn data_survives_a_restart() {
    let mut env = TestEnv::start();
    env.bootstrap("alice");
    env.run(
        "alice",
        &["create", "dev", "--app", "web=http://localhost:8080"],
    )
    .ok();
    let token = env
        .run("alice", &["tokens", "create", "ci"])
        .ok()
        .stdout
        .trim()
        .to_owned();

    assert_eq!(env.stop(), Some(0), "SIGTERM is a clean shutdown");
    env.start_server();

    // The session, the API token, the workspace: all still there.
    let ws = env.run("alice", &["show", "dev", "-o", "json"]).ok().json();
    assert_eq!(ws["agents"][0]["apps"][0]["url"], "http://localhost:8080");
    env.run(
        "stranger",
        &["--url", &env.url, "--token", &token, "whoami"],
    )
    .ok();
    let line = env
        .run_with_input(
            "bob",
            &[
                "login",
                &env.url,
                "--first-user",
                "--username",
                "bob",
                "--password-stdin",
            ],
            "long-enough-pw\n",
        )
        .fails();
    assert!(line.contains("already has users"), "{line}");
}

#[test]
fn kill_9_during_creates_loses_no_acknowledged_workspace() {
    const ROUNDS: usize = 6;
    const WRITERS: usize = 4;
    let mut env = TestEnv::start();
    env.bootstrap("alice");
    let token = env.token_of("alice");
    let mut acknowledged: Vec<String> = Vec::new();

    for round in 0..ROUNDS {
        let acked = Arc::new(Mutex::new(Vec::<String>::new()));
        // Kill after a different number of acknowledged creates each round, while
        // every writer still has a request in flight.
        let kill_after = 3 + round * 5;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let api = env.http();
                let token = token.clone();
                let acked = acked.clone();
                std::thread::spawn(move || {
                    for i in 0.. {
                        let name = format!("r{round}-w{w}-{i}");
                        let body = json!({"name": name, "agents": [{"name": "main"}]});
                        let sent = api
                            .client
                            .post(format!("{}/api/v1/workspaces", api.base))
                            .bearer_auth(&token)
                            .json(&body)
                            .send();
                        match sent {
                            Ok(r) if r.status().as_u16() == 201 => acked.lock().unwrap().push(name),
                            Ok(r) => panic!("create failed: {}", r.status()),
                            // The server died under us: this one was never acknowledged.
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        while acked.lock().unwrap().len() < kill_after {
            std::thread::yield_now();
        }
        env.kill9();
        for w in writers {
            w.join().unwrap();
        }
        acknowledged.extend(acked.lock().unwrap().drain(..));

        // The store opens cleanly and holds every acknowledged workspace.
        env.start_server();
        let listed = env.http().get("/api/v1/workspaces", Some(&token));
        assert_eq!(listed.status, 200, "{listed:#?}");
        let names: std::collections::HashSet<&str> = listed
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["name"].as_str().unwrap())
            .collect();
        let lost: Vec<&String> = acknowledged
            .iter()
            .filter(|n| !names.contains(n.as_str()))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: lost acknowledged workspaces {lost:?}"
        );
    }
    assert!(acknowledged.len() >= ROUNDS * 3);
}
