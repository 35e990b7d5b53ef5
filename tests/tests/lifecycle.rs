//! Workspaces made from templates, against the real binaries: templates pushed and
//! versioned, builds run by the coordinator's own provisioners (the example
//! `process` template makes a real agent process), a failing or hanging command, a
//! cancel, and a coordinator killed with -9 in the middle of a build.
//!
//! Long because each scenario runs a whole workspace life against real processes;
//! they share one binary, the `Env` that deletes the machines left behind, and its
//! template helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use serde_json::Value;
use tests::fixtures::KillOnDrop;
use tests::hostaddr::HostAddress;
use tests::{TestEnv, eventually};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/templates")
        .join(name)
}

/// A template directory whose provisioner runs `run`.
fn template_dir(dir: &Path, name: &str, extra: &str, run: &str) -> PathBuf {
    let t = dir.join(name);
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(
        t.join("template.toml"),
        format!("[provisioner]\nrun = {run:?}\n{extra}\n"),
    )
    .unwrap();
    t
}

fn push(env: &TestEnv, dir: &Path) -> Value {
    env.run(
        "admin",
        &["templates", "push", dir.to_str().unwrap(), "-o", "json"],
    )
    .ok()
    .json()
}

fn state(env: &TestEnv, user: &str, ws: &str) -> String {
    env.run(user, &["show", ws, "-o", "json"]).ok().json()["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn latest_build(env: &TestEnv, user: &str, ws: &str) -> Value {
    env.run(user, &["builds", ws, "-o", "json"]).ok().json()[0].clone()
}

/// Whether a process group `pgid` has a member left (from /proc: field 5 of stat).
fn group_alive(pgid: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("stat")).is_ok_and(|stat| {
            // After the command's name in parentheses: state, ppid, pgrp.
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(2).map(str::to_owned))
                .is_some_and(|g| g == pgid)
        })
    })
}

/// Whether network namespace `name` exists.
fn netns_exists(name: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

/// Whether a process whose command line holds `pattern` runs.
fn process_running(pattern: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .status()
        .is_ok_and(|s| s.success())
}

/// A coordinator for the `process` template. When this process may make network
/// namespaces it listens on a host address off loopback, which the template's
/// namespaces reach; else on loopback, and the template shares the host's network.
/// Dropping it deletes the machines its workspaces left (agents, namespaces).
struct Env {
    env: TestEnv,
    /// Whether the template's machines get network namespaces of their own.
    namespaces: bool,
    _addr: Option<HostAddress>,
}

impl std::ops::Deref for Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let Ok(dirs) = std::fs::read_dir(self.env.data_dir().join("provisioner/state")) else {
            return;
        };
        for dir in dirs.flatten() {
            let _ = std::process::Command::new("sh")
                .arg(example("process").join("provision.sh"))
                .env("MYCO_TRANSITION", "delete")
                .env("MYCO_WORKSPACE_ID", dir.file_name())
                .env("MYCO_STATE_DIR", dir.path())
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
}

fn lifecycle_env(server_args: &[&str]) -> Env {
    let addr = HostAddress::add();
    let ip = addr.as_ref().map_or("127.0.0.1", |a| a.ip.as_str());
    Env {
        env: TestEnv::start_in(None, ip, server_args),
        namespaces: addr.is_some(),
        _addr: addr,
    }
}

fn process_template_env() -> Env {
    let env = lifecycle_env(&[]);
    env.bootstrap("admin");
    env.add_user("admin", "alice");
    let pushed = push(&env, &example("process"));
    assert_eq!(pushed["name"], "process");
    assert_eq!(pushed["version"], 1);
    env
}

#[test]
fn a_template_workspace_is_built_stopped_started_and_deleted_with_its_machine() {
    let env = process_template_env();
    let out = env
        .run("alice", &["create", "dev", "--template", "process"])
        .ok();
    assert!(out.stderr.contains("starting the agent"), "{out:#?}");
    assert!(out.stdout.contains("running"), "{out:#?}");
    assert_eq!(state(&env, "alice", "dev"), "running");
    env.wait_agent_connected("alice", "dev");
    let hi = env.run("alice", &["ssh", "dev", "--", "echo", "hi"]).ok();
    assert_eq!(hi.stdout.trim(), "hi");
    let shown = env.run("alice", &["show", "dev", "-o", "json"]).ok().json();
    assert_eq!(shown["template"]["name"], "process");
    let ws_id = shown["id"].as_str().unwrap().to_owned();
    let state_dir = env.data_dir().join("provisioner/state").join(&ws_id);
    let pgid = std::fs::read_to_string(state_dir.join("agent.pid")).unwrap();
    let pgid = pgid.trim();
    assert!(group_alive(pgid));
    let netns = format!("myco-{ws_id}");
    if env.namespaces {
        // The machine has a network of its own, and SSH reached it through the mesh.
        assert!(netns_exists(&netns));
        let theirs = std::fs::read_link(format!("/proc/{pgid}/ns/net")).unwrap();
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_ne!(theirs, ours, "the agent shares the host's network");
        assert!(out.stderr.contains("network namespace"), "{out:#?}");
    } else {
        assert!(
            out.stderr.contains("sharing the host's network"),
            "{out:#?}"
        );
    }

    // Stop: the machine is gone, the agent and its namespace with it.
    env.run("alice", &["stop", "dev"]).ok();
    assert_eq!(state(&env, "alice", "dev"), "stopped");
    assert!(
        !group_alive(pgid),
        "the agent's process group outlived stop"
    );
    assert!(!netns_exists(&netns), "the namespace outlived stop");
    env.wait_agent_status("alice", "dev", "disconnected");
    // Stopping a stopped workspace says what to do.
    let line = env.run("alice", &["stop", "dev"]).fails();
    assert!(
        line.contains("stopped") && line.contains("myco start"),
        "{line}"
    );

    // Start again: a new machine, new agent tokens, SSH works.
    env.run("alice", &["start", "dev"]).ok();
    env.wait_agent_connected("alice", "dev");
    let again = env
        .run("alice", &["ssh", "dev", "--", "echo", "again"])
        .ok();
    assert_eq!(again.stdout.trim(), "again");
    let builds = env
        .run("alice", &["builds", "dev", "-o", "json"])
        .ok()
        .json();
    let transitions: Vec<&str> = builds
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["transition"].as_str().unwrap())
        .collect();
    assert_eq!(transitions, ["start", "stop", "start"]);
    assert!(
        builds
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["status"] == "succeeded"),
        "{builds:#}"
    );
    let log = env.run("alice", &["logs", "dev", "--build", "2"]).ok();
    assert!(log.stdout.contains("stopping the agent"), "{log:#?}");

    // Delete: the machine, its state dir and the workspace go.
    let pgid = std::fs::read_to_string(state_dir.join("agent.pid")).unwrap();
    env.run("alice", &["delete", "-y", "dev"]).ok();
    assert!(!group_alive(pgid.trim()));
    assert!(!state_dir.exists());
    let list = env.run("alice", &["ls", "-o", "json"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 0, "{list:#}");
    // The template is no longer used, so it may go.
    env.run("admin", &["templates", "delete", "process"]).ok();
}

#[test]
fn a_failing_provisioner_leaves_the_workspace_failed_with_its_output() {
    let env = TestEnv::start();
    env.bootstrap("admin");
    let dir = tempfile::tempdir().unwrap();
    let t = template_dir(
        dir.path(),
        "broken",
        "",
        "echo making the machine; echo no quota left >&2; exit 3",
    );
    push(&env, &t);
    let out = env.run("admin", &["create", "dev", "--template", "broken"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    let last = out.stderr.lines().last().unwrap();
    assert!(
        last.starts_with("myco: build 1 (start) of admin/dev failed"),
        "{last}"
    );
    assert!(last.contains("exited with status 3"), "{last}");
    assert!(last.contains("myco logs admin/dev --build 1"), "{last}");
    assert!(out.stderr.contains("no quota left"), "{out:#?}");
    assert_eq!(state(&env, "admin", "dev"), "failed");
    let list = env.run("admin", &["ls", "-o", "json"]).ok().json();
    assert_eq!(list[0]["state"], "failed");
    // The output stays readable.
    let log = env.run("admin", &["logs", "dev", "--build"]).ok().stdout;
    assert!(log.contains("making the machine"), "{log}");
    assert!(log.contains("no quota left"), "{log}");
    let build = latest_build(&env, "admin", "dev");
    assert_eq!(build["status"], "failed");
    assert!(
        build["reason"].as_str().unwrap().contains("status 3"),
        "{build:#}"
    );
    // A template in use cannot be deleted; the workspace can, by its delete build
    // (which fails too), or as an orphan.
    let line = env.run("admin", &["templates", "delete", "broken"]).fails();
    assert!(line.contains("admin/dev"), "{line}");
    env.run("admin", &["delete", "-y", "--orphan", "dev"]).ok();
    env.run("admin", &["templates", "delete", "broken"]).ok();
}

#[test]
fn a_build_times_out_or_is_canceled_and_its_command_is_stopped() {
    let env = TestEnv::start();
    env.bootstrap("admin");
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("{}", tests::free_port() as u32 + 100_000);
    let t = template_dir(
        dir.path(),
        "slow",
        "timeout = \"2s\"",
        &format!("echo begun; sleep {marker}"),
    );
    // `timeout` belongs in [provisioner]: the extra line lands there.
    push(&env, &t);
    let out = env.run("admin", &["create", "dev", "--template", "slow"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("timed out after 2s"), "{out:#?}");
    let sleeping = || process_running(&format!("sleep {marker}"));
    eventually("the timed-out command is stopped", || !sleeping());

    // A cancel stops a running command within seconds.
    std::fs::write(
        t.join("template.toml"),
        format!("[provisioner]\nrun = \"echo begun; sleep {marker}\"\n"),
    )
    .unwrap();
    push(&env, &t);
    env.run(
        "admin",
        &["create", "two", "--template", "slow", "--no-wait"],
    )
    .ok();
    eventually("the build runs", &sleeping);
    env.run("admin", &["cancel", "two"]).ok();
    eventually("the canceled command is stopped", || !sleeping());
    eventually("the build is canceled", || {
        latest_build(&env, "admin", "two")["status"] == "canceled"
    });
    assert_eq!(state(&env, "admin", "two"), "failed");
}

#[test]
fn a_coordinator_killed_mid_build_fails_the_build_clearly_after_restart() {
    let mut env = TestEnv::start();
    env.bootstrap("admin");
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("{}", tests::free_port() as u32 + 200_000);
    let t = template_dir(
        dir.path(),
        "hang",
        "",
        &format!("echo begun; sleep {marker}"),
    );
    push(&env, &t);
    env.run(
        "admin",
        &["create", "dev", "--template", "hang", "--no-wait"],
    )
    .ok();
    eventually("the build has begun", || {
        env.run("admin", &["logs", "dev", "--build"])
            .stdout
            .contains("begun")
    });
    assert_eq!(state(&env, "admin", "dev"), "starting");
    env.kill9();
    env.start_server();
    // Its command, and what it started, are stopped: the shell died with the
    // coordinator, the rest when it came back.
    let sleeping = || process_running(&format!("sleep {marker}"));
    eventually("the build's processes are stopped", || !sleeping());
    let build = latest_build(&env, "admin", "dev");
    assert_eq!(build["status"], "failed", "{build:#}");
    assert!(
        build["reason"]
            .as_str()
            .unwrap()
            .contains("the coordinator stopped while this build ran"),
        "{build:#}"
    );
    assert_eq!(state(&env, "admin", "dev"), "failed");
    // What it printed before is kept.
    let log = env.run("admin", &["logs", "dev", "--build"]).ok().stdout;
    assert!(log.contains("begun"), "{log}");
}

#[test]
fn bad_templates_are_refused_with_what_to_fix() {
    let env = TestEnv::start();
    env.bootstrap("admin");
    env.add_user("admin", "alice");
    let dir = tempfile::tempdir().unwrap();
    // No template.toml.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let line = env
        .run("admin", &["templates", "push", empty.to_str().unwrap()])
        .fails();
    assert!(line.contains("template.toml"), "{line}");
    // A bad duration, named.
    let t = template_dir(dir.path(), "bad", "[schedule]\nttl = \"soonish\"", "true");
    let line = env
        .run("admin", &["templates", "push", t.to_str().unwrap()])
        .fails();
    assert!(line.contains("[schedule] ttl \"soonish\""), "{line}");
    // Only admins push.
    let ok = template_dir(dir.path(), "fine", "", "true");
    let line = env
        .run("alice", &["templates", "push", ok.to_str().unwrap()])
        .fails();
    assert!(line.contains("admin"), "{line}");
    // A hand-made archive whose entry climbs out of the template: refused by the
    // coordinator, whatever the CLI would have sent.
    let mut header = tar::Header::new_gnu();
    let spec = b"[provisioner]\nrun = \"true\"\n";
    header.set_size(spec.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut header, "template.toml", &spec[..])
        .unwrap();
    let mut evil = tar::Header::new_gnu();
    evil.set_size(1);
    evil.set_mode(0o644);
    evil.set_entry_type(tar::EntryType::Regular);
    let name = b"../../escape";
    evil.as_old_mut().name[..name.len()].copy_from_slice(name);
    evil.set_cksum();
    b.append(&evil, &b"x"[..]).unwrap();
    let archive = b.into_inner().unwrap();
    let admin = env.token_of("admin");
    let reply = env.http().request(
        "PUT",
        "/api/v1/templates/evil",
        Some(&admin),
        Some(("application/x-tar", archive)),
    );
    let message = reply.error(400);
    assert!(message.contains("outside"), "{reply:?}");
    // Too big: refused before it is read whole.
    let big = vec![0u8; mesh::api::TEMPLATE_ARCHIVE_MAX + 1];
    let reply = env.http().request(
        "PUT",
        "/api/v1/templates/big",
        Some(&admin),
        Some(("application/x-tar", big)),
    );
    assert_eq!(reply.status, 413, "{reply:?}");
    // Nothing of these was kept.
    let list = env
        .run("admin", &["templates", "ls", "-o", "json"])
        .ok()
        .json();
    assert_eq!(list.as_array().unwrap().len(), 0, "{list:#}");
    // A workspace without a template has no builds to run.
    env.create_workspace("alice", "plain");
    let line = env.run("alice", &["start", "plain"]).fails();
    assert!(line.contains("without a template"), "{line}");
}

/// The process template with its schedule replaced.
fn process_with(dir: &Path, schedule: &str) -> PathBuf {
    let t = dir.join("quick");
    std::fs::create_dir_all(&t).unwrap();
    let src = example("process");
    std::fs::copy(src.join("provision.sh"), t.join("provision.sh")).unwrap();
    std::fs::write(
        t.join("template.toml"),
        format!("[provisioner]\nrun = \"./provision.sh\"\n\n[schedule]\n{schedule}\n"),
    )
    .unwrap();
    t
}

fn scheduled_env() -> Env {
    // Agents report their sessions every heartbeat.
    let env = lifecycle_env(&["--heartbeat-interval", "1s"]);
    env.bootstrap("admin");
    env
}

/// Waits (up to `secs`) until admin's `dev` is `want` (stopped or running) by a
/// build nobody asked for: the schedule's.
fn scheduled_build_ends(env: &TestEnv, want: &str, secs: u64) {
    tests::eventually_within(
        std::time::Duration::from_secs(secs),
        &format!("it is {want} by itself"),
        || state(env, "admin", "dev") == want,
    );
    let build = latest_build(env, "admin", "dev");
    let transition = if want == "stopped" { "stop" } else { "start" };
    assert_eq!(build["transition"], transition, "{build:#}");
    assert!(build.get("initiator").is_none(), "{build:#}");
}

#[test]
fn an_idle_workspace_stops_by_itself_at_its_ttl_and_its_machine_is_gone() {
    let env = scheduled_env();
    push(&env, &example("process"));
    // The template says 8h; this workspace 20s.
    env.run(
        "admin",
        &["create", "dev", "--template", "process", "--ttl", "20s"],
    )
    .ok();
    env.wait_agent_connected("admin", "dev");
    let shown = env
        .run("admin", &["schedule", "show", "dev", "-o", "json"])
        .ok()
        .json();
    assert_eq!(shown["ttl"], "20s", "{shown:#}");
    assert!(shown["deadline"].is_string(), "{shown:#}");
    let id = env.run("admin", &["show", "dev", "-o", "json"]).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pidfile = env
        .data_dir()
        .join("provisioner/state")
        .join(&id)
        .join("agent.pid");
    let pgid = std::fs::read_to_string(&pidfile).unwrap();
    scheduled_build_ends(&env, "stopped", 60);
    assert!(
        !group_alive(pgid.trim()),
        "the machine outlived the auto-stop"
    );
    let admin = env.token_of("admin");
    let metrics = || {
        let reply = env.http().get("/metrics", Some(&admin));
        reply.body.as_str().unwrap_or_default().to_owned()
    };
    assert!(
        metrics().contains("myco_workspace_auto_stops_total 1"),
        "{}",
        metrics()
    );
    // The gauge is as of the ticker's last look.
    eventually("/metrics counts it stopped", || {
        metrics().contains("myco_workspaces{state=\"stopped\"} 1")
    });
}

#[test]
fn an_open_ssh_session_keeps_a_workspace_up_past_its_ttl() {
    let env = scheduled_env();
    let dir = tempfile::tempdir().unwrap();
    push(
        &env,
        // Long enough for the agent to connect and report the session first on a
        // loaded machine (the deadline counts from the build's end). The bump outlasts
        // a few late heartbeats: with 1 s heartbeats an agent counts as disconnected
        // (so not in use) after 2 s unheard, and a 4 s bump once let a busy machine
        // stop the workspace mid-session.
        &process_with(dir.path(), "ttl = \"12s\"\nactivity_bump = \"10s\""),
    );
    env.run("admin", &["create", "dev", "--template", "quick"])
        .ok();
    env.wait_agent_connected("admin", "dev");
    // A session that lasts well past the TTL.
    // The session says when it runs (so a slow connect is told from a session not
    // counted), and what the client logged goes into a failure's message.
    let said = dir.path().join("session.err");
    let mut session = env.cmd(
        "admin",
        &["ssh", "dev", "--", "echo", "open;", "exec", "sleep", "26"],
    );
    let mut child = session
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&said).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut open = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut open,
    )
    .unwrap();
    let opened = started.elapsed();
    assert_eq!(open.trim(), "open", "the session never opened");
    while child.try_wait().unwrap().is_none() {
        let shown = env.run("admin", &["show", "dev", "-o", "json"]).ok().json();
        if shown["state"] != "running" {
            let agent_log = env
                .data_dir()
                .join("provisioner/state")
                .join(shown["id"].as_str().unwrap_or_default())
                .join("agent.log");
            panic!(
                "stopped {:?} into a session open since {opened:?}: {shown:#}\nthe client said: {}\nthe agent said: {}",
                started.elapsed(),
                std::fs::read_to_string(&said).unwrap_or_default(),
                std::fs::read_to_string(&agent_log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(started.elapsed() > std::time::Duration::from_secs(16));
    // The session ended: the bump runs out, and it stops.
    tests::eventually_within(
        std::time::Duration::from_secs(40),
        "it stops after the session",
        || state(&env, "admin", "dev") == "stopped",
    );
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_stopped_workspace_starts_by_itself_at_its_auto_start_time() {
    let env = scheduled_env();
    push(&env, &example("process"));
    env.run("admin", &["create", "dev", "--template", "process"])
        .ok();
    env.run("admin", &["stop", "dev"]).ok();
    // The next whole minute at least 15 s away (schedules name minutes).
    let now = unix_now();
    let mut at = (now / 60 + 1) * 60;
    if at - now < 15 {
        at += 60;
    }
    let hhmm = format!("{:02}:{:02}", (at / 3600) % 24, (at / 60) % 60);
    env.run(
        "admin",
        &["schedule", "start", "dev", &format!("daily {hhmm} UTC")],
    )
    .ok();
    // Not before its time...
    while unix_now() + 2 < at {
        assert_eq!(state(&env, "admin", "dev"), "stopped", "started early");
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    // ...and soon after it (the ticker looks every 2 s).
    scheduled_build_ends(&env, "running", 30);
    env.wait_agent_connected("admin", "dev");
    let hi = env.run("admin", &["ssh", "dev", "--", "echo", "hi"]).ok();
    assert_eq!(hi.stdout.trim(), "hi");
    let admin = env.token_of("admin");
    let metrics = env.http().get("/metrics", Some(&admin));
    let text = metrics.body.as_str().unwrap_or_default();
    assert!(
        text.contains("myco_workspace_auto_starts_total 1"),
        "{text}"
    );
    // The next start is tomorrow's.
    let shown = env
        .run("admin", &["schedule", "show", "dev", "-o", "json"])
        .ok()
        .json();
    let next = shown["next_start"].as_str().unwrap_or_default().to_owned();
    assert!(next.contains(&format!("T{hhmm}:00")), "{shown:#}");
}

#[test]
fn schedules_are_set_shown_and_checked() {
    let env = scheduled_env();
    push(&env, &example("process"));
    env.run("admin", &["create", "dev", "--template", "process"])
        .ok();
    let out = env
        .run(
            "admin",
            &["schedule", "start", "dev", "Mon-Fri 09:00 Europe/Berlin"],
        )
        .ok();
    assert!(
        out.stdout.contains("Mon-Fri 09:00 Europe/Berlin"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("next start:"), "{out:#?}");
    let line = env
        .run("admin", &["schedule", "start", "dev", "Mon-Fry 09:00"])
        .fails();
    assert!(line.contains("bad days"), "{line}");
    env.run("admin", &["schedule", "stop", "dev", "manual"])
        .ok();
    let s = env
        .run("admin", &["schedule", "show", "dev", "-o", "json"])
        .ok()
        .json();
    assert!(
        s.get("ttl").is_none() && s.get("deadline").is_none(),
        "{s:#}"
    );
    env.run("admin", &["schedule", "extend", "dev", "2h"]).ok();
    let s = env
        .run("admin", &["schedule", "show", "dev", "-o", "json"])
        .ok()
        .json();
    assert!(s["deadline"].is_string(), "{s:#}");
    env.run("admin", &["stop", "dev"]).ok();
    let line = env
        .run("admin", &["schedule", "extend", "dev", "1h"])
        .fails();
    assert!(line.contains("stopped"), "{line}");
    env.run("admin", &["delete", "-y", "dev"]).ok();
}

#[test]
fn ssh_to_a_stopped_workspace_starts_it_first() {
    let env = process_template_env();
    env.run("alice", &["create", "dev", "--template", "process"])
        .ok();
    env.run("alice", &["stop", "dev"]).ok();
    // Refused when asked not to start it.
    let line = env
        .run("alice", &["ssh", "--no-start", "dev", "--", "echo", "hi"])
        .fails();
    assert!(
        line.contains("is stopped") && line.contains("myco start"),
        "{line}"
    );
    assert_eq!(state(&env, "alice", "dev"), "stopped");
    // Started, with its progress on stderr, then connected.
    let out = env.run("alice", &["ssh", "dev", "--", "echo", "hi"]).ok();
    assert_eq!(out.stdout.trim(), "hi");
    assert!(out.stderr.contains("starting it"), "{out:#?}");
    assert!(out.stderr.contains("starting the agent"), "{out:#?}");
    assert_eq!(state(&env, "alice", "dev"), "running");
    // OpenSSH through config-ssh (what IDEs drive) does the same.
    env.run("alice", &["stop", "dev"]).ok();
    let cfg = env.config_ssh("alice");
    let ssh = env
        .openssh(&cfg)
        .args(["myco.dev", "echo", "through-openssh"])
        .output()
        .unwrap();
    assert!(ssh.status.success(), "{ssh:?}");
    assert_eq!(
        String::from_utf8_lossy(&ssh.stdout).trim(),
        "through-openssh"
    );
    assert_eq!(state(&env, "alice", "dev"), "running");
    // From loopback, which cannot reach a namespace's address, so through the relay
    // only, dialed the moment the new agent connects: the first address it published
    // may not name the relay yet, the ticket still does.
    env.run("alice", &["stop", "dev"]).ok();
    let mut cmd = env.cmd("alice", &["ssh", "dev", "--", "echo", "relayed"]);
    cmd.env("MYCO_MESH_BIND", "127.0.0.1:0");
    let out = tests::run_command(cmd, "").ok();
    assert_eq!(out.stdout.trim(), "relayed");
}

#[test]
fn port_forward_to_a_stopped_workspace_starts_it_first() {
    use std::io::{BufRead, Read, Write};
    let env = process_template_env();
    env.run("alice", &["create", "dev", "--template", "process"])
        .ok();
    env.run("alice", &["stop", "dev"]).ok();
    let (local, remote) = (tests::free_port(), tests::free_port());
    let mut forward = KillOnDrop(
        env.cmd(
            "alice",
            &["port-forward", "dev", "--tcp", &format!("{local}:{remote}")],
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let mut stdout = std::io::BufReader::new(forward.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("Forwarding "), "{line:?}");
    assert_eq!(state(&env, "alice", "dev"), "running");
    // A service in the (new) machine, reached through the forward.
    let mut service = KillOnDrop(
        env.cmd(
            "alice",
            &[
                "ssh",
                "dev",
                "--",
                &format!("echo through-the-forward | exec busybox nc -l -p {remote}"),
            ],
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap(),
    );
    let mut got = String::new();
    eventually("the service answers through the forward", || {
        let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", local)) else {
            return false;
        };
        let _ = conn.write_all(b"\n");
        got.clear();
        let _ = conn.read_to_string(&mut got);
        got.contains("through-the-forward")
    });
    let _ = service.0.kill();
    let mut stderr = String::new();
    let _ = forward.0.kill();
    forward
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("starting it"), "{stderr}");
}

#[test]
fn twenty_workspaces_through_two_external_provisioners_each_build_run_once() {
    let env = TestEnv::start();
    env.bootstrap("admin");
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs.log");
    // Tagged: the coordinator's own provisioners (no tags) leave it alone.
    let t = template_dir(
        dir.path(),
        "remote",
        "tags = { pool = \"ext\" }",
        "echo \"$MYCO_WORKSPACE_NAME $MYCO_BUILD_NUMBER $PROVISIONER_NAME\" >> \"$RUNS\"; sleep 0.3",
    );
    push(&env, &t);
    let mut procs = Vec::new();
    let mut keys = Vec::new();
    for name in ["p1", "p2"] {
        let key = env
            .run("admin", &["provisioner-keys", "create", name])
            .ok()
            .stdout
            .trim()
            .to_owned();
        let mut cmd = std::process::Command::new(tests::myco_bin());
        cmd.args([
            "provisioner",
            "--url",
            &env.url,
            "--tag",
            "pool=ext",
            "--data-dir",
        ])
        .arg(dir.path().join(name))
        .env("MYCO_PROVISIONER_KEY", &key)
        .env("RUNS", &runs)
        .env("PROVISIONER_NAME", name)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap());
        procs.push(KillOnDrop(cmd.spawn().unwrap()));
        keys.push(key);
    }
    // What a provisioner sends is bounded: its instance name, and its output lines
    // per batch (each line is cut, as the coordinator's own builds' are).
    let api = env.http();
    let send = |path: &str, body: serde_json::Value| {
        api.request(
            "POST",
            path,
            Some(&keys[0]),
            Some(("application/json", serde_json::to_vec(&body).unwrap())),
        )
    };
    let reply = send(
        "/api/v1/provisioner/acquire",
        serde_json::json!({"instance": "not an instance!", "tags": {}}),
    );
    assert!(reply.error(400).contains("instance"), "{reply:?}");
    let lines: Vec<Value> = (0..=mesh::api::JOB_LOG_BATCH_MAX)
        .map(|_| serde_json::json!(["2026-01-01T00:00:00Z", "x"]))
        .collect();
    let reply = send(
        "/api/v1/provisioner/jobs/nothing/1/logs",
        serde_json::json!({"instance": "i", "lines": lines}),
    );
    assert!(reply.error(400).contains("lines in one batch"), "{reply:?}");
    // A job it does not hold is not its to write.
    let reply = send(
        "/api/v1/provisioner/jobs/nothing/1/logs",
        serde_json::json!({"instance": "i", "lines": [["2026-01-01T00:00:00Z", "x"]]}),
    );
    assert_eq!(reply.status, 409, "{reply:?}");
    for i in 0..20 {
        env.run(
            "admin",
            &[
                "create",
                &format!("w{i}"),
                "--template",
                "remote",
                "--no-wait",
            ],
        )
        .ok();
    }
    tests::eventually_within(std::time::Duration::from_secs(60), "all 20 run", || {
        let list = env.run("admin", &["ls", "-o", "json"]).ok().json();
        list.as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "running")
            .count()
            == 20
    });
    let log = std::fs::read_to_string(&runs).unwrap();
    let mut lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 20, "{log}");
    let by = |p: &str| lines.iter().filter(|l| l.ends_with(p)).count();
    assert!(
        by(" p1") > 0 && by(" p2") > 0,
        "one provisioner did all: {log}"
    );
    lines.sort_unstable();
    lines.dedup_by_key(|l| l.rsplit_once(' ').map(|(w, _)| w.to_owned()));
    assert_eq!(lines.len(), 20, "a build ran twice: {log}");
    let build = latest_build(&env, "admin", "w7");
    assert!(
        build["provisioner"].as_str().unwrap().starts_with('p'),
        "{build:#}"
    );
    // A wrong key is refused in words.
    let mut bad = std::process::Command::new(tests::myco_bin());
    bad.args(["provisioner-keys", "ls"])
        .env("MYCO_CONFIG_DIR", env.config_dir("nobody"))
        .env("MYCO_URL", &env.url)
        .env("MYCO_TOKEN", "myco_nonsense");
    let out = tests::run_command(bad, "");
    assert_ne!(out.code, Some(0));
}

#[test]
fn a_build_whose_external_provisioner_died_is_failed_when_its_lease_runs_out() {
    let env = TestEnv::start();
    env.bootstrap("admin");
    let dir = tempfile::tempdir().unwrap();
    // `exec`: the command is the shell, which dies with its provisioner.
    let t = template_dir(
        dir.path(),
        "remote",
        "tags = { pool = \"ext\" }",
        "echo begun; exec sleep 300",
    );
    push(&env, &t);
    let key = env
        .run("admin", &["provisioner-keys", "create", "doomed"])
        .ok()
        .stdout
        .trim()
        .to_owned();
    let mut cmd = std::process::Command::new(tests::myco_bin());
    cmd.args([
        "provisioner",
        "--url",
        &env.url,
        "--tag",
        "pool=ext",
        "--data-dir",
    ])
    .arg(dir.path().join("p"))
    .env("MYCO_PROVISIONER_KEY", &key)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut provisioner = KillOnDrop(cmd.spawn().unwrap());
    env.run(
        "admin",
        &["create", "dev", "--template", "remote", "--no-wait"],
    )
    .ok();
    eventually("the provisioner runs the build", || {
        env.run("admin", &["logs", "dev", "--build"])
            .stdout
            .contains("begun")
    });
    assert_eq!(state(&env, "admin", "dev"), "starting");
    provisioner.0.kill().unwrap();
    provisioner.0.wait().unwrap();
    // The lease (30 s) runs out; the reaper fails the build, saying why.
    tests::eventually_within(
        std::time::Duration::from_secs(60),
        "the build is failed",
        || latest_build(&env, "admin", "dev")["status"] == "failed",
    );
    let build = latest_build(&env, "admin", "dev");
    assert!(
        build["reason"]
            .as_str()
            .unwrap()
            .contains("provisioner doomed/"),
        "{build:#}"
    );
    assert_eq!(state(&env, "admin", "dev"), "failed");
}

/// Removes a workspace's podman container and home volume (the podman template's
/// names), whatever the test did.
struct PodmanLeftovers(String);

impl Drop for PodmanLeftovers {
    fn drop(&mut self) {
        let id = &self.0;
        let podman = |args: &[&str]| {
            let _ = std::process::Command::new("podman")
                .args(args)
                .env(
                    "CONTAINERS_CONF",
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("podman.conf"),
                )
                .output();
        };
        podman(&["rm", "--force", &format!("myco-{id}")]);
        podman(&["volume", "rm", "--force", &format!("myco-home-{id}")]);
    }
}

/// Whether podman's container `name` exists.
fn container_exists(name: &str) -> bool {
    std::process::Command::new("podman")
        .args(["container", "exists", name])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_container_template_runs_the_agent_in_a_podman_container() {
    let env = process_template_env();
    if !env.namespaces {
        eprintln!("skipping: a container cannot reach a coordinator on loopback");
        return;
    }
    let missing: Vec<&str> = ["podman", "busybox"]
        .into_iter()
        .filter(|tool| {
            std::process::Command::new(tool)
                .arg("--help")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_err()
        })
        .collect();
    if !missing.is_empty() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{missing:?} missing under CI; bash .ci/test installs them"
        );
        eprintln!("skipping: {missing:?} not installed");
        return;
    }
    // An image made from this host's files: nothing is pulled from a registry.
    let image = "localhost/myco-test-workspace:latest";
    let built = std::process::Command::new("sh")
        .arg(example("podman").join("local-image.sh"))
        .arg(image)
        .output()
        .unwrap();
    assert!(built.status.success(), "{built:?}");
    // The example, told of that image and of what podman needs on this VM.
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("podman");
    std::fs::create_dir_all(&t).unwrap();
    for f in ["template.toml", "provision.sh"] {
        std::fs::copy(example("podman").join(f), t.join(f)).unwrap();
    }
    std::fs::write(t.join("image"), image).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("podman.conf"),
        t.join("containers.conf"),
    )
    .unwrap();
    push(&env, &t);

    let out = env
        .run("alice", &["create", "dev", "--template", "podman"])
        .ok();
    assert!(out.stderr.contains("starting container"), "{out:#?}");
    let id = env.run("alice", &["show", "dev", "-o", "json"]).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let _leftovers = PodmanLeftovers(id.clone());
    let container = format!("myco-{id}");
    assert!(container_exists(&container));
    // Right after create: `myco ssh` waits for the agent, then runs in the container
    // (its hostname is the workspace's; its home is the volume).
    let out = env
        .run(
            "alice",
            &[
                "ssh",
                "dev",
                "--",
                "hostname && echo kept > ~/file && cat /etc/passwd",
            ],
        )
        .ok();
    assert!(out.stdout.starts_with("dev\n"), "{out:#?}");
    assert_eq!(
        out.stdout.lines().nth(1),
        Some("root:x:0:0:root:/root:/bin/sh"),
        "not the image's /etc/passwd: {out:#?}"
    );

    // Stop: the container is gone; the home volume stays.
    env.run("alice", &["stop", "dev"]).ok();
    assert!(!container_exists(&container), "the container outlived stop");
    // ssh starts it again, and the home is still there.
    let out = env.run("alice", &["ssh", "dev", "--", "cat ~/file"]).ok();
    assert_eq!(out.stdout.trim(), "kept", "{out:#?}");
    assert!(container_exists(&container));

    // Delete: container and volume are gone.
    env.run("alice", &["delete", "-y", "dev"]).ok();
    assert!(!container_exists(&container));
    let volume = std::process::Command::new("podman")
        .args(["volume", "exists", &format!("myco-home-{id}")])
        .status()
        .unwrap();
    assert!(!volume.success(), "the home volume outlived delete");
}
