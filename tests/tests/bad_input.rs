//! Every kind of bad input gets a JSON error with the right status from the API and
//! one readable line from the CLI, and changes nothing.

use serde_json::json;
use tests::{PASSWORD, TestEnv};

#[test]
fn raw_api_errors_are_json_with_the_right_status() {
    let env = TestEnv::start();
    env.bootstrap("admin");
    env.add_user("admin", "bob");
    let admin = env.token_of("admin");
    let bob = env.token_of("bob");
    let api = env.http();
    api.post_json(
        "/api/v1/workspaces",
        Some(&admin),
        &json!({"name": "dev", "agents": [{"name": "main"}]}),
    );

    // Malformed JSON, wrong shapes and invalid values: 400.
    let r = api.request(
        "POST",
        "/api/v1/workspaces",
        Some(&bob),
        Some(("application/json", b"{\"name\": ".to_vec())),
    );
    assert!(r.error(400).contains("not valid JSON"));
    api.post_json(
        "/api/v1/workspaces",
        Some(&bob),
        &json!({"name": 5, "agents": []}),
    )
    .error(400);
    let m = api
        .post_json(
            "/api/v1/workspaces",
            Some(&bob),
            &json!({"name": "Bad_Name", "agents": [{"name": "main"}]}),
        )
        .error(400);
    assert!(m.contains("not valid JSON"), "{m}");
    let m = api
        .post_json(
            "/api/v1/workspaces",
            Some(&bob),
            &json!({"name": "ok", "agents": []}),
        )
        .error(400);
    assert!(m.contains("at least one agent"), "{m}");
    let m = api
        .post_json(
            "/api/v1/workspaces",
            Some(&bob),
            &json!({"name": "ok", "agents": [{"name": "a"}, {"name": "a"}]}),
        )
        .error(400);
    assert!(m.contains("used twice"), "{m}");
    api.get("/api/v1/workspaces/bob/Bad_Name", Some(&bob))
        .error(400);
    api.get("/api/v1/workspaces?all=maybe", Some(&admin))
        .error(400);

    // Not JSON at all: 415.
    api.request(
        "POST",
        "/api/v1/workspaces",
        Some(&bob),
        Some(("text/plain", b"hi".to_vec())),
    )
    .error(415);

    // Missing, malformed, unknown tokens: 401.
    api.get("/api/v1/workspaces", None).error(401);
    api.get("/api/v1/workspaces", Some("not-a-token"))
        .error(401);
    api.get(
        "/api/v1/workspaces",
        Some("myco_0011223344556677_00112233445566778899aabbccddeeff"),
    )
    .error(401);
    let mut forged = bob.clone();
    forged.replace_range(forged.len() - 4.., "0000");
    api.get("/api/v1/workspaces", Some(&forged)).error(401);
    let r = api
        .client
        .get(format!("{}/api/v1/workspaces", env.url))
        .header("authorization", "Basic Ym9iOmJvYg==")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // Another user's workspace: 404. Admin-only: 403.
    api.get("/api/v1/workspaces/admin/dev", Some(&bob))
        .error(404);
    api.get("/api/v1/users", Some(&bob)).error(403);
    api.get("/api/v1/workspaces?all=true", Some(&bob))
        .error(403);
    api.post_json(
        "/api/v1/users",
        Some(&bob),
        &json!({"username": "eve", "password": PASSWORD}),
    )
    .error(403);

    // Duplicates: 409.
    api.post_json(
        "/api/v1/workspaces",
        Some(&admin),
        &json!({"name": "dev", "agents": [{"name": "main"}]}),
    )
    .error(409);
    api.post_json(
        "/api/v1/users",
        Some(&admin),
        &json!({"username": "bob", "password": PASSWORD}),
    )
    .error(409);

    // A body over the limit: 413, before it is parsed.
    let huge = json!({"name": "big", "agents": [{"name": "main", "startup_script": {"run": "x".repeat(2 << 20)}}]});
    api.post_json("/api/v1/workspaces", Some(&bob), &huge)
        .error(413);

    // Unknown routes and methods are JSON too.
    api.get("/api/v1/nope", Some(&bob)).error(404);
    api.get("/nope", None).error(404);
    api.get("/relay", None).error(400);
    api.request("PUT", "/api/v1/workspaces", Some(&bob), None)
        .error(405);

    // None of it changed anything.
    let mine = api.get("/api/v1/workspaces", Some(&bob));
    assert_eq!(mine.status, 200);
    assert_eq!(mine.body.as_array().unwrap().len(), 0);
    let users = api.get("/api/v1/users", Some(&admin));
    assert_eq!(users.body.as_array().unwrap().len(), 2);
    assert_eq!(api.get("/healthz", None).body["status"], "ok");
}

#[test]
fn cli_errors_are_one_line() {
    let env = TestEnv::start();

    // Not logged in yet.
    let line = env.run("alice", &["ls"]).fails();
    assert!(line.contains("not logged in"), "{line}");
    // Nothing listening there.
    let line = env
        .run_with_input(
            "alice",
            &[
                "login",
                "http://127.0.0.1:9",
                "--username",
                "alice",
                "--password-stdin",
            ],
            "x\n",
        )
        .fails();
    assert!(line.contains("cannot reach the coordinator"), "{line}");
    let line = env.run("alice", &["login", "ftp://x"]).fails();
    assert!(line.contains("not a coordinator URL"), "{line}");
    // Not a terminal and no --password-stdin.
    let line = env
        .run(
            "alice",
            &["login", &env.url, "--first-user", "--username", "alice"],
        )
        .fails();
    assert!(line.contains("--password-stdin"), "{line}");

    env.bootstrap("alice");
    // Usage errors from argument parsing are one line too.
    let line = env.run("alice", &["show", "Not_Valid"]).fails();
    assert!(line.contains("bad workspace reference"), "{line}");
    let line = env.run("alice", &["create"]).fails();
    assert!(line.contains("required"), "{line}");
    let line = env
        .run("alice", &["create", "x", "--app", "nonsense"])
        .fails();
    assert!(line.contains("AGENT:SLUG=URL"), "{line}");
    let line = env
        .run("alice", &["create", "x", "--app", "web=localhost"])
        .fails();
    assert!(line.contains("not an http(s) URL"), "{line}");
    let line = env
        .run("alice", &["create", "x", "--from", "/does/not/exist.toml"])
        .fails();
    assert!(line.contains("cannot read /does/not/exist.toml"), "{line}");
    let line = env
        .run("alice", &["tokens", "create", "t", "--lifetime", "soon"])
        .fails();
    assert!(line.contains("lifetime"), "{line}");
    let line = env
        .run("alice", &["tokens", "create", "t", "--lifetime", "400d"])
        .fails();
    assert!(line.contains("too long"), "{line}");
    let line = env.run("alice", &["--token", "garbage", "ls"]).fails();
    assert!(line.contains("invalid API token"), "{line}");

    // The server itself: a port in use, and a data dir held by another server.
    let addr = env.url.trim_start_matches("http://").to_owned();
    let line = env
        .run(
            "alice",
            &[
                "server",
                "--http-address",
                &addr,
                "--data-dir",
                env.config_dir("other").to_str().unwrap(),
            ],
        )
        .fails();
    assert!(line.contains("cannot listen on"), "{line}");
    let line = env
        .run(
            "alice",
            &[
                "server",
                "--http-address",
                "127.0.0.1:0",
                "--data-dir",
                env.data_dir().to_str().unwrap(),
            ],
        )
        .fails();
    assert!(line.contains("in use by another process"), "{line}");
    let line = env
        .run(
            "alice",
            &[
                "server",
                "--http-address",
                "0.0.0.0:0",
                "--data-dir",
                "/tmp/x",
            ],
        )
        .fails();
    assert!(line.contains("--access-url"), "{line}");

    // And nothing was created by any of it.
    let ls = env.run("alice", &["ls", "-o", "json"]).ok().json();
    assert_eq!(ls.as_array().unwrap().len(), 0);
}

/// A reader that goes away is no crash: a coordinator whose log pipe closed stops
/// cleanly on SIGTERM, without a panic message (its last line, that it stopped, goes
/// to the closed pipe; so would a client command's output cut short by `| head -1`).
#[test]
fn a_closed_stdout_ends_quietly() {
    use std::io::BufRead;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let mut server = tests::myco_in(None)
        .args(["server", "--http-address", "127.0.0.1:0"])
        .args(["--relay-quic-address", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("listening"), "{first}");
    // The reader (and with it the pipe) is gone; then the coordinator is stopped.
    tests::fixtures::signal(server.id(), "TERM");
    let out = server.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
