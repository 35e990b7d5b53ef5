//! Workspaces through the real CLI: create, list, show, delete, agent tokens, and
//! that one user cannot see or touch another's.

use tests::TestEnv;

#[test]
fn create_list_show_delete() {
    let env = TestEnv::start();
    env.bootstrap("alice");

    let out = env
        .run(
            "alice",
            &[
                "create",
                "dev",
                "--agent",
                "main",
                "--agent",
                "gpu",
                "--app",
                "main:web=http://localhost:8080",
            ],
        )
        .ok();
    assert!(
        out.stdout
            .contains("created workspace alice/dev with 2 agents"),
        "{out:#?}"
    );
    let starts: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("myco agent --url"))
        .collect();
    assert_eq!(starts.len(), 2, "{out:#?}");
    // The token goes in the agent's environment, never in its arguments (the
    // process list); `tests/hardening.rs` runs the line.
    assert!(
        starts[0].trim().starts_with("MYCO_AGENT_TOKEN=myco_")
            && starts[0].ends_with(&format!(" myco agent --url {}", env.url)),
        "{out:#?}"
    );
    assert!(!out.stdout.contains("--token"), "{out:#?}");

    env.run("alice", &["create", "second"]).ok();
    let ls = env.run("alice", &["ls"]).ok();
    assert!(ls.stdout.starts_with("WORKSPACE"), "{ls:#?}");
    // One row per agent: a new agent has never connected.
    let rows: Vec<&str> = ls
        .stdout
        .lines()
        .filter(|l| l.starts_with("alice/dev"))
        .collect();
    assert_eq!(rows.len(), 2, "{ls:#?}");
    assert!(
        rows[0].contains(" main ") && rows[0].contains("connecting") && rows[0].contains("created"),
        "{ls:#?}"
    );
    assert!(rows[1].contains(" gpu "), "{ls:#?}");
    let ls = env.run("alice", &["ls", "-o", "json"]).ok().json();
    assert_eq!(ls.as_array().unwrap().len(), 2);

    let ws = env.run("alice", &["show", "dev", "-o", "json"]).ok().json();
    assert_eq!(ws["agents"][0]["apps"][0]["slug"], "web");
    assert_eq!(ws["agents"][1]["name"], "gpu");
    let shown = env.run("alice", &["show", "alice/dev"]).ok();
    assert!(
        shown
            .stdout
            .contains("app web  http://localhost:8080  disabled"),
        "{shown:#?}"
    );
    assert!(shown.stdout.contains("status: connecting"), "{shown:#?}");
    assert!(shown.stdout.contains("lifecycle: created"), "{shown:#?}");
    // Agent tokens are shown once at creation and never again.
    assert!(!shown.stdout.contains("myco_"), "{shown:#?}");

    let line = env.run("alice", &["create", "dev"]).fails();
    assert!(line.contains("already exists"), "{line}");

    let line = env.run("alice", &["delete", "dev"]).fails();
    assert!(line.contains("pass -y"), "{line}");
    env.run("alice", &["delete", "dev", "-y"]).ok();
    let line = env.run("alice", &["show", "dev"]).fails();
    assert!(line.contains("not found"), "{line}");
    let ls = env.run("alice", &["ls", "-o", "json"]).ok().json();
    assert_eq!(ls.as_array().unwrap().len(), 1);
}

#[test]
fn create_from_a_file() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let spec = env.config_dir("alice").join("ws.toml");
    std::fs::write(
        &spec,
        r#"
[[agents]]
name = "main"
startup_script = { run = "make setup", timeout = 120 }
shutdown_script = { run = "make save" }

[[agents.apps]]
slug = "code"
url = "http://localhost:13337"
healthcheck = { url = "http://localhost:13337/healthz", interval = 5, threshold = 6 }
"#,
    )
    .unwrap();
    env.run(
        "alice",
        &["create", "dev", "--from", spec.to_str().unwrap()],
    )
    .ok();
    let ws = env.run("alice", &["show", "dev", "-o", "json"]).ok().json();
    let agent = &ws["agents"][0];
    assert_eq!(agent["startup_script"]["timeout"], 120);
    assert_eq!(agent["shutdown_script"]["timeout"], 300);
    assert_eq!(agent["apps"][0]["healthcheck"]["threshold"], 6);

    std::fs::write(
        &spec,
        "[[agents]]\nname = \"main\"\n[[agents.apps]]\nslug = \"x\"\nurl = \"ftp://nope\"\n",
    )
    .unwrap();
    let line = env
        .run(
            "alice",
            &["create", "bad", "--from", spec.to_str().unwrap()],
        )
        .fails();
    assert!(line.contains("not an http(s) URL"), "{line}");
}

#[test]
fn other_users_cannot_see_or_delete_my_workspace() {
    let env = TestEnv::start();
    env.bootstrap("admin");
    env.add_user("admin", "alice");
    env.add_user("admin", "bob");
    env.run("alice", &["create", "dev"]).ok();

    // Bob sees nothing and is told "not found", as if it did not exist.
    let ls = env.run("bob", &["ls", "-o", "json"]).ok().json();
    assert_eq!(ls.as_array().unwrap().len(), 0);
    let line = env.run("bob", &["show", "alice/dev"]).fails();
    assert!(line.contains("not found"), "{line}");
    let line = env.run("bob", &["delete", "alice/dev", "-y"]).fails();
    assert!(line.contains("not found"), "{line}");
    let line = env.run("bob", &["rotate-agent-token", "alice/dev"]).fails();
    assert!(line.contains("not found"), "{line}");
    let line = env.run("bob", &["ls", "--all"]).fails();
    assert!(line.contains("only admins"), "{line}");
    let bob = env.token_of("bob");
    env.http()
        .get("/api/v1/workspaces/alice/dev", Some(&bob))
        .error(404);
    env.http()
        .delete("/api/v1/workspaces/alice/dev", Some(&bob))
        .error(404);

    // Bob may use the same name for his own workspace.
    env.run("bob", &["create", "dev"]).ok();

    // The admin sees everyone's and alice's is still there.
    let all = env.run("admin", &["ls", "--all", "-o", "json"]).ok().json();
    assert_eq!(all.as_array().unwrap().len(), 2);
    env.run("admin", &["show", "alice/dev"]).ok();
    env.run("alice", &["show", "dev"]).ok();
}

#[test]
fn rotating_an_agent_token_replaces_it() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let created = env
        .run("alice", &["create", "dev", "-o", "json"])
        .ok()
        .json();
    let old = created["agent_tokens"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let rotated = env
        .run("alice", &["rotate-agent-token", "dev", "-o", "json"])
        .ok()
        .json();
    let new = rotated["agent_token"]["token"].as_str().unwrap();
    assert_ne!(old, new);
    assert!(new.starts_with("myco_"));
    // Agent tokens never pass as a user's token.
    let reply = env.http().get("/api/v1/users/me", Some(new));
    assert!(
        reply.error(401).contains("does not belong to a user"),
        "{reply:#?}"
    );
    env.http().get("/api/v1/users/me", Some(&old)).error(401);
    let line = env
        .run("alice", &["rotate-agent-token", "dev.nope"])
        .fails();
    assert!(line.contains("agent nope not found"), "{line}");
    // As printed for people: the token by the environment, not as an argument.
    let printed = env.run("alice", &["rotate-agent-token", "dev"]).ok();
    let start = printed
        .stdout
        .lines()
        .find(|l| l.contains("myco agent"))
        .unwrap_or_else(|| panic!("{printed:#?}"));
    assert!(
        start.trim().starts_with("MYCO_AGENT_TOKEN=myco_")
            && start.ends_with(&format!(" myco agent --url {}", env.url)),
        "{printed:#?}"
    );
}
