//! `myco ssh WS [-- CMD]`: Myco's own SSH client over the mesh (no OpenSSH involved).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::fixtures::{self, KillOnDrop};
use tests::{TestEnv, eventually, eventually_within, sha256_hex, wait_pane};

#[test]
fn command_exit_code_env_stdin_and_stderr() {
    let (env, _agent) = TestEnv::with_agent();
    let out = env.run(
        "alice",
        &[
            "ssh",
            "-e",
            "GREETING=hello there",
            "dev",
            "--",
            "echo $GREETING $MYCO_WORKSPACE_NAME; echo oops >&2; exit 3",
        ],
    );
    assert_eq!(out.code, Some(3), "{out:?}");
    assert_eq!(out.stdout, "hello there dev\n");
    assert_eq!(out.stderr, "oops\n");

    // Several words are one command line, as with ssh; the host alias form works.
    let out = env.run("alice", &["ssh", "myco.dev.main", "echo", "a", "b"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "a b\n"),
        "{out:?}"
    );

    // 20 MB of stdin reaches the command whole, and EOF ends it.
    let data: Vec<u8> = (0..20_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let mut child = env
        .cmd("alice", &["ssh", "dev", "--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&data).map(|_| data));
    let out = child.wait_with_output().unwrap();
    let data = writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), sha256_hex(&data));
}

#[test]
fn signals_reach_the_command_and_its_signal_is_the_exit_code() {
    let (env, _agent) = TestEnv::with_agent();
    let work = tempfile::tempdir().unwrap();
    // Each member of the pipeline marks that it runs, then waits; our SIGINT must
    // reach them all (the whole process group).
    let first = work.path().join("first");
    let second = work.path().join("second");
    let child = env
        .cmd(
            "alice",
            &[
                "ssh",
                "dev",
                "--",
                &format!(
                    "(touch {}; exec sleep 60) | (touch {}; exec cat)",
                    first.display(),
                    second.display()
                ),
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("both commands of the pipeline run", || {
        first.exists() && second.exists()
    });
    fixtures::signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "128 + SIGINT: {out:?}");
}

#[test]
fn remote_forward_and_agent_forwarding() {
    let (env, _agent) = TestEnv::with_agent();
    // -R: the workspace's port comes back to a server on this side.
    let laptop = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let laptop_port = laptop.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in laptop.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nlaptop",
            );
        }
    });
    let in_workspace = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut tunnel = env
        .cmd(
            "alice",
            &[
                "ssh",
                "-R",
                &format!("{in_workspace}:127.0.0.1:{laptop_port}"),
                "dev",
                "--",
                "sleep 60",
            ],
        )
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::blocking::Client::new();
    let mut body = String::new();
    eventually("the remote forward carries a request", || {
        assert!(tunnel.try_wait().unwrap().is_none(), "myco ssh -R exited");
        match client
            .get(format!("http://127.0.0.1:{in_workspace}/"))
            .send()
        {
            Ok(r) => {
                body = r.text().unwrap();
                true
            }
            Err(_) => false,
        }
    });
    assert_eq!(body, "laptop");
    let _ = tunnel.kill();
    let _ = tunnel.wait();

    // -A: the session's SSH_AUTH_SOCK reaches the local agent's key.
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("id_ed25519");
    assert!(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "myco-forwarded",
                "-f"
            ])
            .arg(&key)
            .status()
            .unwrap()
            .success()
    );
    let sock = work.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    eventually("ssh-agent listens", || sock.exists());
    assert!(
        Command::new("ssh-add")
            .arg(&key)
            .env("SSH_AUTH_SOCK", &sock)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    );
    let out = env
        .cmd("alice", &["ssh", "-A", "dev", "--", "ssh-add -l"])
        .env("SSH_AUTH_SOCK", &sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("myco-forwarded"),
        "{out:?}"
    );
    // -A without a local agent is a clear error.
    let line = env
        .run("alice", &["ssh", "-A", "dev", "--", "true"])
        .fails();
    assert!(line.contains("SSH_AUTH_SOCK"), "{line}");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn output_to_a_pipe_goes_on_while_myco_logs() {
    // Log lines (here iroh's, at debug level) are written to stderr on the runtime's
    // thread while the command's output goes through the output thread; the output
    // thread once held the stderr lock while it waited, and the session hung.
    let (env, _agent) = TestEnv::with_agent();
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("stderr");
    let child = env
        .cmd(
            "alice",
            &[
                "ssh",
                "dev",
                "--",
                "for i in 1 2 3; do echo $i; sleep 0.2; done",
            ],
        )
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Bounded, and the child killed if it hangs (a hung child would outlive the test).
    let mut child = KillOnDrop(child);
    let status = fixtures::poll_for(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "myco ssh exits",
        || {
            child
                .0
                .try_wait()
                .unwrap()
                .ok_or_else(|| "it hangs".to_owned())
        },
    );
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.0.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(status.success(), "{stdout}");
    assert_eq!(stdout, "1\n2\n3\n");
    assert!(std::fs::read_to_string(&log).unwrap().contains("DEBUG"));
}

#[test]
fn bad_arguments_and_other_users_are_refused() {
    let (env, _agent) = TestEnv::alice_and_bob();

    let line = env.run("bob", &["ssh", "alice/dev", "--", "true"]).fails();
    assert!(line.contains("workspace alice/dev not found"), "{line}");
    let line = env.run("alice", &["ssh", "-R", "80:x", "dev"]).fails();
    assert!(line.contains("[BIND:]PORT:HOST:HOSTPORT"), "{line}");
    let line = env.run("alice", &["ssh", "-e", "NOEQUALS", "dev"]).fails();
    assert!(line.contains("KEY=VALUE"), "{line}");
    let line = env
        .run("alice", &["ssh", "--stdio", "dev", "--", "true"])
        .fails();
    assert!(line.contains("--stdio"), "{line}");
}

/// Input for a terminal is written straight into it while nothing is queued, and
/// queued once the terminal is full; a paste much larger than the terminal's buffer
/// must arrive whole and in order across the two.
#[test]
fn a_large_paste_into_a_terminal_arrives_whole_and_in_order() {
    let (env, _agent) = TestEnv::with_agent();
    let data: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let mut child = env
        .cmd(
            "alice",
            &[
                "ssh",
                "-t",
                "dev",
                "--",
                "stty raw -echo; echo READY; head -c 2000000 | sha256sum",
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // The paste goes in once the terminal is raw (a cooked one would take its bytes
    // for ^C and ^D).
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let (mut all, mut buf) = (Vec::new(), [0u8; 4096]);
        loop {
            let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
            if n == 0 {
                return all;
            }
            all.extend_from_slice(&buf[..n]);
            if all.windows(5).any(|w| w == b"READY") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the remote terminal never got ready");
    stdin.write_all(&data).unwrap();
    let status = child.wait().unwrap();
    let out = reader.join().unwrap();
    assert!(status.success(), "{status:?}");
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains(&sha256_hex(&data)), "{text:?}");
}

#[test]
fn interactive_shell_in_raw_mode_follows_resizes() {
    let (env, _agent) = TestEnv::with_agent();
    let session = format!("myco-ssh-{}", std::process::id());
    let tmux = |args: &[&str]| {
        let st = Command::new("tmux").args(args).status().unwrap();
        assert!(st.success(), "tmux {args:?}");
    };
    let cmd = env.cmd("alice", &["ssh", "dev"]);
    let envs: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_str()?, v?.to_str()?)))
        .collect();
    // After the session, the terminal the shell shares with `myco ssh` must be as it
    // was: myco reads it on its runtime (non-blocking) through a file description of
    // its own, never the shared one.
    let script = env.dir().join("interactive.sh");
    std::fs::write(
        &script,
        format!(
            "env {} {} ssh dev\n\
             code=$?\n\
             flags=$(awk '/^flags/ {{print $2}}' /proc/$$/fdinfo/0)\n\
             if [ $((flags & 04000)) -ne 0 ]; then mode=nonblocking; else mode=blocking; fi\n\
             echo \"after-ssh code=$code $mode\"\n\
             env {} {} ssh dev\n\
             echo \"second code=$?\"\n\
             sleep 30\n",
            envs.join(" "),
            tests::myco_bin().display(),
            envs.join(" "),
            tests::myco_bin().display()
        ),
    )
    .unwrap();
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "120",
        "-y",
        "40",
        &format!("sh {}", script.display()),
    ]);
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "echo mark-$((6*7)); stty size",
        "Enter",
    ]);
    wait_pane(&session, "mark-42");
    wait_pane(&session, "40 120");
    tmux(&["resize-window", "-t", &session, "-x", "100", "-y", "30"]);
    tmux(&["send-keys", "-t", &session, "stty size", "Enter"]);
    wait_pane(&session, "30 100");
    // ^C goes to the remote shell (raw mode), which survives it.
    tmux(&["send-keys", "-t", &session, "sleep 30", "Enter"]);
    wait_pane(&session, "sleep 30");
    tmux(&["send-keys", "-t", &session, "C-c"]);
    tmux(&["send-keys", "-t", &session, "echo after-$((1+1))", "Enter"]);
    wait_pane(&session, "after-2");
    // A background job holding the terminal does not keep the session open.
    tmux(&["send-keys", "-t", &session, "sleep 300 & exit 7", "Enter"]);
    wait_pane(&session, "after-ssh code=7 blocking");

    // OpenSSH's escapes, at the start of a line: `~?` lists them, `~~` sends one `~`,
    // `~.` ends the session (exit 255, as ssh).
    tmux(&["send-keys", "-t", &session, "echo second-$((3+3))", "Enter"]);
    wait_pane(&session, "second-6");
    tmux(&["send-keys", "-t", &session, "~?"]);
    wait_pane(&session, "~.   - terminate connection");
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "read x; echo \"got[$x]\"",
        "Enter",
    ]);
    tmux(&["send-keys", "-t", &session, "~~y", "Enter"]);
    wait_pane(&session, "got[~y]");
    tmux(&["send-keys", "-t", &session, "~."]);
    wait_pane(&session, "second code=255");
    tmux(&["kill-session", "-t", &session]);
}

/// A remote command whose shell waits for a `sleep` it started, whose pid it writes
/// to `file`: ending the command must reach the shell's children too.
fn sleeper(file: &Path) -> String {
    format!("sleep 600 & echo $! > {}; wait", file.display())
}

/// The pid [`sleeper`] wrote, once it has.
fn sleeper_pid(file: &Path) -> u32 {
    let mut pid = None;
    eventually("the remote command started", || {
        pid = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        pid.is_some()
    });
    pid.unwrap()
}

/// Whether `pid` runs (a zombie, killed and not yet reaped, has no command line).
fn running(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

#[test]
fn an_idle_timeout_closes_only_connections_without_traffic() {
    let (env, _agent) = TestEnv::with_agent_env(&[("MYCO_SSH_IDLE_TIMEOUT", "2s")]);

    // Output every half second keeps the connection well past the timeout.
    let out = env.run(
        "alice",
        &[
            "ssh",
            "dev",
            "--",
            "for i in 1 2 3 4 5 6 7 8; do echo tick; sleep 0.5; done",
        ],
    );
    assert_eq!(
        (out.code, out.stdout.matches("tick").count()),
        (Some(0), 8),
        "{out:?}"
    );

    // A command that runs silently is cut off with its connection, and the client
    // says why.
    let work = tempfile::tempdir().unwrap();
    let pidfile = work.path().join("pid");
    let out = env.run("alice", &["ssh", "dev", "--", &sleeper(&pidfile)]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(
            "the agent closed the SSH connection after 2s without traffic (its --ssh-idle-timeout)"
        ),
        "{out:?}"
    );
    let pid = sleeper_pid(&pidfile);
    eventually("the silent command's child is gone", || !running(pid));
}

#[test]
fn a_client_that_vanishes_ends_its_session_and_command() {
    // No SSH idle timeout (the default): the mesh connection notices the client is
    // gone.
    let (env, _agent) = TestEnv::with_agent();
    let work = tempfile::tempdir().unwrap();
    let pidfile = work.path().join("pid");
    let mut client = env
        .cmd("alice", &["ssh", "dev", "--", &sleeper(&pidfile)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = sleeper_pid(&pidfile);
    // SIGKILL: neither SSH nor QUIC gets to say goodbye.
    client.kill().unwrap();
    client.wait().unwrap();
    // QUIC's idle timeout is 30 s; the bound leaves room on a loaded machine.
    eventually_within(
        Duration::from_secs(90),
        "the agent ends the command (its child too) of a client that is gone",
        || !running(pid),
    );
}

#[test]
fn a_stopping_agent_tells_its_ssh_clients_why_and_ends_their_commands() {
    let (env, agent) = TestEnv::with_agent();
    let work = tempfile::tempdir().unwrap();
    let pidfile = work.path().join("pid");
    let client = env
        .cmd("alice", &["ssh", "dev", "--", &sleeper(&pidfile)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = sleeper_pid(&pidfile);
    // SIGTERM, and no shutdown script: the agent stops at once.
    tests::fixtures::signal(agent.child.id(), "TERM");
    let out = client.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ended without an exit status: the agent is shutting down"),
        "{stderr}"
    );
    eventually("the command's child is gone", || !running(pid));
}

#[test]
fn an_agent_that_does_not_answer_is_reported_in_one_line() {
    let (env, agent) = TestEnv::with_agent();
    let pid = agent.child.id();
    // Stopped, not gone: the coordinator still lists it as connected, so the client
    // dials and gets no answer (QUIC's handshake gives up after its 30 s idle timeout).
    fixtures::signal(pid, "STOP");
    let out = env.run("alice", &["ssh", "dev", "--", "true"]);
    fixtures::signal(pid, "CONT");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .starts_with("myco: cannot connect to agent alice/dev.main: no answer in "),
        "{out:?}"
    );
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(!out.stderr.contains("timed out"), "{out:?}");
    // Running again, it answers. It may first have to reconnect: stopped this long, it
    // can have missed enough heartbeats for the coordinator to close its channel.
    eventually_within(Duration::from_secs(60), "the resumed agent answers", || {
        env.run("alice", &["ssh", "dev", "--", "echo back"]).stdout == "back\n"
    });
}
