//! Revocation bites on live state, against the real binaries: rotating an agent's
//! token or deleting its workspace ends its control channel at once (pushed, with
//! the reason in the agent's log, not noticed at the next heartbeat); disabling a
//! user, logging out and deleting a token close the mesh sessions their tickets
//! opened; `myco users` manages all of it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};

use tests::{PASSWORD, TestEnv};

/// `myco ssh dev` as `user` running a long command; returns once the command runs.
fn open_session(env: &TestEnv, user: &str) -> Child {
    let mut child = env
        .cmd(user, &["ssh", "dev", "--", "echo ready; sleep 600"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "the session never started");
    child
}

/// Waits (bounded) for the session to end on its own; returns its stderr.
fn session_ended(mut child: Child) -> String {
    let mut status = None;
    tests::eventually("the session is closed", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.unwrap().success(), "{err}");
    err
}

#[test]
fn rotating_an_agent_token_ends_the_old_agents_channel_at_once() {
    let (env, mut agent) = TestEnv::with_agent();
    let rotated = env
        .run("alice", &["rotate-agent-token", "dev", "-o", "json"])
        .ok()
        .json();
    // The coordinator closes the channel with its reason; the agent, refused on
    // reconnecting with the old token, stops.
    assert_ne!(agent.wait_exit(), Some(0));
    let log = agent.log();
    assert!(
        log.contains("the agent token was rotated; restart the agent with the new one"),
        "{log}"
    );
    env.wait_agent_gone("alice", "dev");
    let token = rotated["agent_token"]["token"].as_str().unwrap();
    let _new = env.start_agent(token);
    env.wait_agent_connected("alice", "dev");
    env.run("alice", &["ssh", "dev", "--", "true"]).ok();
}

#[test]
fn deleting_a_workspace_ends_its_agent_and_sessions() {
    let (env, mut agent) = TestEnv::with_agent();
    let session = open_session(&env, "alice");
    env.run("alice", &["delete", "dev", "--yes"]).ok();
    assert_ne!(agent.wait_exit(), Some(0));
    assert!(
        agent.log().contains("the workspace was deleted"),
        "{}",
        agent.log()
    );
    session_ended(session);
}

#[test]
fn disabling_a_user_closes_their_sessions_and_enabling_restores_login() {
    let (env, _agent) = TestEnv::alice_and_bob();
    let api_token = env
        .run("alice", &["tokens", "create", "ci", "-o", "json"])
        .ok()
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let session = open_session(&env, "alice");
    let disabled = env
        .run("admin", &["users", "disable", "alice", "-o", "json"])
        .ok()
        .json();
    assert_eq!(disabled["disabled"], true);
    let err = session_ended(session);
    assert!(err.contains("revoked"), "{err}");
    // Her API token stays but is refused while she is disabled, saying why.
    let reply = env.http().get("/api/v1/users/me", Some(&api_token));
    assert!(
        reply.error(401).contains("user alice is disabled"),
        "{reply:?}"
    );
    // Her login sessions are gone, and logging in again says why not.
    let err = env.run("alice", &["ls"]).fails();
    assert!(err.contains("invalid API token"), "{err}");
    let err = env
        .run_with_input(
            "alice",
            &["login", &env.url, "--username", "alice", "--password-stdin"],
            &format!("{PASSWORD}\n"),
        )
        .fails();
    assert!(err.contains("user alice is disabled"), "{err}");
    // Not on oneself, and not by a non-admin.
    let err = env.run("admin", &["users", "disable", "admin"]).fails();
    assert!(err.contains("yourself"), "{err}");
    let err = env.run("bob", &["users", "disable", "admin"]).fails();
    assert!(err.contains("admin"), "{err}");
    let listed = env.run("admin", &["users", "ls", "-o", "json"]).ok().json();
    let alice = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == "alice")
        .unwrap();
    assert_eq!(alice["disabled"], true);

    env.run("admin", &["users", "enable", "alice"]).ok();
    assert_eq!(
        env.http().get("/api/v1/users/me", Some(&api_token)).status,
        200
    );
    env.login("alice");
    env.run("alice", &["ssh", "dev", "--", "true"]).ok();
}

#[test]
fn logging_out_and_deleting_a_token_close_what_they_opened() {
    let (env, _agent) = TestEnv::with_agent();
    // A session opened with the login session, then that session logged out.
    let session = open_session(&env, "alice");
    env.run("alice", &["logout"]).ok();
    let err = session_ended(session);
    assert!(err.contains("revoked"), "{err}");

    // A session opened with a named API token, then the token deleted.
    env.login("alice");
    let token = env
        .run("alice", &["tokens", "create", "ci", "-o", "json"])
        .ok()
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut child = env
        .cmd(
            "nobody",
            &["ssh", "alice/dev", "--", "echo ready; sleep 600"],
        )
        .env("MYCO_URL", &env.url)
        .env("MYCO_TOKEN", &token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    env.run("alice", &["tokens", "rm", "ci"]).ok();
    let err = session_ended(child);
    assert!(err.contains("revoked"), "{err}");
}

#[test]
fn users_change_passwords_and_revoke_their_sessions() {
    let (env, _agent) = TestEnv::alice_and_bob();
    // Her own: the current password is needed, and a wrong one is refused.
    let err = env
        .run_with_input(
            "alice",
            &["users", "passwd", "--password-stdin"],
            "wrong-password\nanother-good-password\n",
        )
        .fails();
    assert!(err.contains("old password is wrong"), "{err}");
    // Another session of hers (another machine) ends when she changes it.
    env.login_as("alice2", "alice", PASSWORD);
    env.run_with_input(
        "alice",
        &["users", "passwd", "--password-stdin"],
        &format!("{PASSWORD}\nanother-good-password\n"),
    )
    .ok();
    // The session that changed it stays: it is hers, on this machine.
    env.run("alice", &["whoami"]).ok();
    let err = env.run("alice2", &["whoami"]).fails();
    assert!(err.contains("invalid API token"), "{err}");
    let err = env
        .run_with_input(
            "alice2",
            &["login", &env.url, "--username", "alice", "--password-stdin"],
            &format!("{PASSWORD}\n"),
        )
        .fails();
    assert!(err.contains("wrong"), "{err}");
    env.login_as("alice2", "alice", "another-good-password");

    // An admin sets bob's without knowing the old one; bob's sessions end.
    env.run_with_input(
        "admin",
        &["users", "passwd", "bob", "--password-stdin"],
        "bobs-new-password\n",
    )
    .ok();
    let err = env.run("bob", &["whoami"]).fails();
    assert!(err.contains("invalid API token"), "{err}");
    // Bob may not set alice's.
    env.login_as("bob", "bob", "bobs-new-password");
    let err = env
        .run_with_input(
            "bob",
            &["users", "passwd", "alice", "--password-stdin"],
            "x-long-enough-password\n",
        )
        .fails();
    assert!(err.contains("admin"), "{err}");

    // `users revoke`: every session of alice ends, on every machine.
    let session = open_session(&env, "alice2");
    env.run("alice", &["users", "revoke"]).ok();
    let err = session_ended(session);
    assert!(err.contains("revoked"), "{err}");
    env.run("alice2", &["whoami"]).fails();
}

#[test]
fn deleting_a_user_is_refused_while_they_own_workspaces() {
    let (env, _agent) = TestEnv::alice_and_bob();
    let err = env.run("admin", &["users", "delete", "alice"]).fails();
    assert!(err.contains("still owns workspaces"), "{err}");
    let session = open_session(&env, "alice");
    env.run("admin", &["users", "delete", "bob"]).ok();
    let err = env.run("bob", &["whoami"]).fails();
    assert!(err.contains("invalid API token"), "{err}");
    // Deleting bob touched nothing of alice's: her open session goes on.
    env.run("alice", &["ssh", "dev", "--", "true"]).ok();
    let mut session = session;
    assert!(session.try_wait().unwrap().is_none());
    session.kill().unwrap();
    session.wait().unwrap();
    env.run("admin", &["delete", "alice/dev", "--yes"]).ok();
    env.run("admin", &["users", "delete", "alice"]).ok();
    let listed = env.run("admin", &["users", "ls", "-o", "json"]).ok().json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed:#}");
}
