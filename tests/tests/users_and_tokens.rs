//! Bootstrap, login, logout, users and API tokens through the real CLI and API.

use std::os::unix::fs::PermissionsExt;

use tests::{PASSWORD, TestEnv};

#[test]
fn bootstrap_login_whoami_logout() {
    let env = TestEnv::start();

    // No user yet: a plain login says how to create the first one.
    let line = env
        .run_with_input(
            "alice",
            &["login", &env.url, "--username", "alice", "--password-stdin"],
            "pw\n",
        )
        .fails();
    assert!(line.contains("--first-user"), "{line}");

    env.bootstrap("alice");
    let me = env.run("alice", &["whoami", "-o", "json"]).ok().json();
    assert_eq!(me["username"], "alice");
    assert_eq!(me["admin"], true);
    let mode = std::fs::metadata(env.config_dir("alice").join("session.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "session file must be private");

    // The first user exists now: bootstrap is closed, through the CLI and the API.
    let line = env
        .run_with_input(
            "mallory",
            &[
                "login",
                &env.url,
                "--first-user",
                "--username",
                "mallory",
                "--password-stdin",
            ],
            &format!("{PASSWORD}\n"),
        )
        .fails();
    assert!(line.contains("already has users"), "{line}");
    env.http()
        .post_json(
            "/api/v1/users/first",
            None,
            &serde_json::json!({"username": "mallory", "password": PASSWORD}),
        )
        .error(409);

    // A wrong password is refused with 401 and one line from the CLI.
    let line = env
        .run_with_input(
            "alice2",
            &["login", &env.url, "--username", "alice", "--password-stdin"],
            "nope-nope-nope\n",
        )
        .fails();
    assert!(line.contains("wrong username or password"), "{line}");
    env.http()
        .post_json(
            "/api/v1/users/login",
            None,
            &serde_json::json!({"username": "nobody", "password": PASSWORD}),
        )
        .error(401);

    // Logout revokes the session on the server, not only locally.
    let token = env.token_of("alice");
    env.run("alice", &["logout"]).ok();
    env.http().get("/api/v1/users/me", Some(&token)).error(401);
    let line = env.run("alice", &["whoami"]).fails();
    assert!(line.contains("not logged in"), "{line}");
}

#[test]
fn admins_create_users_and_others_may_not() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    env.add_user("alice", "bob");
    let users = env.run("alice", &["users", "ls", "-o", "json"]).ok().json();
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob"]);

    let line = env
        .run_with_input(
            "bob",
            &["users", "create", "carol", "--password-stdin"],
            &format!("{PASSWORD}\n"),
        )
        .fails();
    assert!(line.contains("only admins"), "{line}");
    let line = env.run("bob", &["users", "ls"]).fails();
    assert!(line.contains("only admins"), "{line}");

    let line = env
        .run_with_input(
            "alice",
            &["users", "create", "bob", "--password-stdin"],
            &format!("{PASSWORD}\n"),
        )
        .fails();
    assert!(line.contains("already exists"), "{line}");
    let line = env
        .run_with_input(
            "alice",
            &["users", "create", "carol", "--password-stdin"],
            "short\n",
        )
        .fails();
    assert!(line.contains("password is too short"), "{line}");
}

#[test]
fn api_tokens_work_until_revoked() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let out = env
        .run("alice", &["tokens", "create", "ci", "--lifetime", "1d"])
        .ok();
    let token = out.stdout.trim().to_owned();
    assert!(token.starts_with("myco_"), "{out:#?}");

    // The token works on its own, from a user with no session at all.
    let me = env
        .run(
            "stranger",
            &["--url", &env.url, "--token", &token, "whoami", "-o", "json"],
        )
        .ok()
        .json();
    assert_eq!(me["username"], "alice");

    // Listing never shows the secret.
    let ls = env.run("alice", &["tokens", "ls", "-o", "json"]).ok();
    assert!(!ls.stdout.contains(&token[token.len() - 32..]), "{ls:#?}");
    assert_eq!(ls.json()[0]["name"], "ci");

    let line = env.run("alice", &["tokens", "create", "ci"]).fails();
    assert!(line.contains("already exists"), "{line}");

    env.run("alice", &["tokens", "rm", "ci"]).ok();
    let line = env
        .run(
            "stranger",
            &["--url", &env.url, "--token", &token, "whoami"],
        )
        .fails();
    assert!(line.contains("invalid API token"), "{line}");
    env.http().get("/api/v1/users/me", Some(&token)).error(401);
    let line = env.run("alice", &["tokens", "rm", "ci"]).fails();
    assert!(line.contains("not found"), "{line}");
}

#[test]
fn expired_tokens_are_refused() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let token = env
        .run("alice", &["tokens", "create", "short", "--lifetime", "1s"])
        .ok()
        .stdout
        .trim()
        .to_owned();
    // Expiry is wall-clock time: poll until it passes (bounded), no fixed sleep.
    let reply = tests::fixtures::poll_for(
        std::time::Duration::from_secs(20),
        std::time::Duration::from_millis(100),
        "the token expires",
        || {
            let reply = env.http().get("/api/v1/users/me", Some(&token));
            assert!(reply.status == 401 || reply.status == 200, "{reply:#?}");
            if reply.status == 401 {
                Ok(reply)
            } else {
                Err("still accepted".into())
            }
        },
    );
    assert!(reply.error(401).contains("expired"), "{reply:#?}");
}
