//! SSH over the mesh with the real OpenSSH client, through `myco config-ssh`.
//!
//! One file for every way OpenSSH's users reach a workspace (sessions, scp, sftp,
//! forwarding, agent forwarding, config-ssh's pinning), so they share one binary
//! and its helpers; each test is one scenario, read on its own.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::io::Write;
use std::process::{Command, Stdio};

use tests::fixtures::{self, echo_server, http_server};
use tests::{TestEnv, eventually, free_port, sha256_hex, wait_pane};

fn ssh(cfg: &std::path::Path, args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(cfg)
        .args(["-o", "BatchMode=yes"])
        .args(args)
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the OpenSSH client (ssh) must be installed: bash .ci/test installs it");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn exec_exit_code_env_and_bulk_through_real_ssh() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");

    let out = ssh(
        &cfg,
        &[
            "myco.dev",
            "echo hi; echo oops >&2; echo $MYCO $MYCO_WORKSPACE_NAME $MYCO_AGENT_NAME; exit 3",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\ntrue dev main\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("oops"),
        "{out:?}"
    );

    // Sessions do not inherit the agent's credentials.
    let out = ssh(&cfg, &["myco.dev", "echo ${MYCO_AGENT_TOKEN:-unset}"], b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "unset\n", "{out:?}");

    // OpenSSH and the agent settle on AES-128-GCM, the cheapest cipher per byte both
    // have (config-ssh's `Ciphers` line and the agent's list put it first).
    let out = ssh(&cfg, &["-v", "myco.dev", "true"], b"");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("client->server cipher: aes128-gcm@openssh.com")
            && said.contains("server->client cipher: aes128-gcm@openssh.com"),
        "{said}"
    );

    // The agent's name works as well as the workspace's.
    let out = ssh(&cfg, &["myco.dev.main", "cat"], b"echo back");
    assert_eq!(out.stdout, b"echo back", "{out:?}");

    // 20 MB through sha256sum on the far side: same digest.
    let data: Vec<u8> = (0..20_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let out = ssh(&cfg, &["myco.dev", "sha256sum"], &data);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), sha256_hex(&data));

    // The client re-keys the connection every 512 KB (OpenSSH's RekeyLimit), many
    // times in the middle of 4 MB each way: nothing is lost or reordered.
    let data = &data[..4_000_000];
    let out = ssh(
        &cfg,
        &["-v", "-o", "RekeyLimit=512K", "myco.dev", "cat"],
        data,
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        out.stdout == data,
        "{} bytes came back, they differ",
        out.stdout.len()
    );
    let rekeys = log.matches("SSH2_MSG_NEWKEYS received").count();
    assert!(rekeys > 4, "the connection was not re-keyed: {log}");
}

/// The account's name and login shell from the password database, as `getent` shows
/// them; a shell that cannot run gives `/bin/sh` (the test's agent has no `$SHELL`).
fn passwd_entry() -> (String, String) {
    let uid = Command::new("id").arg("-u").output().unwrap();
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_owned();
    let out = Command::new("getent")
        .args(["passwd", &uid])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let fields: Vec<&str> = line.split(':').collect();
    assert_eq!(fields.len(), 7, "{line}");
    let shell = fields[6];
    let runnable = !shell.ends_with("/nologin")
        && !shell.ends_with("/false")
        && std::fs::metadata(shell).is_ok_and(|m| m.is_file());
    let shell = if runnable { shell } else { "/bin/sh" };
    (fields[0].to_owned(), shell.to_owned())
}

#[test]
fn a_session_gets_the_variables_of_an_openssh_login() {
    // An agent started as a container's entrypoint often has no $SHELL or $USER, and
    // one started from an SSH session carries that session's variables.
    let (env, _agent) = TestEnv::with_agent_env(&[
        ("SHELL", ""),
        ("USER", ""),
        ("LOGNAME", ""),
        ("SSH_TTY", "/dev/pts/999"),
        ("SSH_CONNECTION", "192.0.2.1 1 192.0.2.2 22"),
        ("SSH_CLIENT", "192.0.2.1 1 22"),
    ]);
    let cfg = env.config_ssh("alice");
    let (name, shell) = passwd_entry();
    let home = std::env::var("HOME").unwrap();

    let out = ssh(
        &cfg,
        &[
            "myco.dev",
            r#"printf '%s|' "$USER" "$LOGNAME" "$SHELL" "$0" "$HOME" "$PWD" "${SSH_TTY-none}" "$SSH_CONNECTION" "$SSH_CLIENT""#,
        ],
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Vec<&str> = text.split('|').collect();
    assert_eq!(
        v[..7],
        [&name, &name, &shell, &shell, &home, &home, "none"],
        "{text}"
    );
    // The client's and the agent's UDP addresses on loopback, where the test binds
    // both: the connection is direct.
    let connection: Vec<&str> = v[7].split(' ').collect();
    assert_eq!(connection.len(), 4, "{text}");
    assert_eq!(connection[0], "127.0.0.1", "{text}");
    assert_eq!(connection[2], "127.0.0.1", "{text}");
    for port in [connection[1], connection[3]] {
        assert!(port.parse::<u16>().is_ok_and(|p| p > 0), "{text}");
    }
    assert_eq!(
        v[8],
        format!("{} {} {}", connection[0], connection[1], connection[3]),
        "{text}"
    );

    // On a terminal, SSH_TTY names it.
    let out = ssh(&cfg, &["-tt", "myco.dev", "echo \"$SSH_TTY\"; tty"], b"");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("/dev/pts/"), "{text}");
    assert_eq!(lines[0], lines[1], "{text}");
}

#[test]
fn a_changed_host_key_makes_ssh_refuse() {
    let (env, agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    assert!(ssh(&cfg, &["myco.dev", "true"], b"").status.success());
    let before =
        env.run("alice", &["show", "dev", "-o", "json"]).ok().json()["agents"][0]["ssh_host_key"]
            .clone();

    // Another agent process with a fresh data dir has another host key.
    drop(agent);
    env.wait_agent_gone("alice", "dev");
    let token = env
        .run("alice", &["rotate-agent-token", "dev", "-o", "json"])
        .ok()
        .json()["agent_token"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let _agent = env.start_agent(&token);
    env.await_agent(
        "alice",
        "dev",
        "the new host key reaches the coordinator",
        |agent| agent["ssh_host_key"] != before && agent["connection"]["relay_url"].is_string(),
    );

    let out = ssh(&cfg, &["myco.dev", "echo should-not-run"], b"");
    assert!(!out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("should-not-run"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("verification failed"),
        "{out:?}"
    );

    // Re-pinning from the coordinator's record lets it in again.
    env.config_ssh("alice");
    assert!(ssh(&cfg, &["myco.dev", "true"], b"").status.success());
}

#[test]
fn config_ssh_keeps_user_lines_and_others_are_refused() {
    let (env, _agent) = TestEnv::alice_and_bob();

    let cfg = env.config_dir("alice").join("ssh_config");
    std::fs::write(&cfg, "Host work\n  User me\n").unwrap();
    let dry = env
        .run(
            "alice",
            &[
                "config-ssh",
                "--ssh-config-file",
                cfg.to_str().unwrap(),
                "--dry-run",
            ],
        )
        .ok();
    assert!(dry.stdout.contains("would write"), "{dry:?}");
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        "Host work\n  User me\n"
    );
    let line = env
        .run(
            "alice",
            &["config-ssh", "--ssh-config-file", cfg.to_str().unwrap()],
        )
        .fails();
    assert!(line.contains("pass -y"), "{line}");
    env.config_ssh("alice");
    env.config_ssh("alice");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.starts_with("Host work\n  User me\n"), "{text}");
    assert_eq!(text.matches("Host myco.*").count(), 1, "{text}");

    // Bob pins nothing of alice's and cannot reach her agent.
    let bob_cfg = env.config_ssh("bob");
    assert_eq!(
        std::fs::read_to_string(env.config_dir("bob").join("known_hosts")).unwrap(),
        ""
    );
    let line = env.run("bob", &["ssh", "--stdio", "alice/dev"]).fails();
    assert!(line.contains("workspace alice/dev not found"), "{line}");
    let out = ssh(&bob_cfg, &["myco.dev", "true"], b"");
    assert!(!out.status.success(), "{out:?}");
}

#[test]
fn local_forwarding_carries_http() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    let remote = http_server();
    let local = free_port();
    forward_and_fetch(
        &cfg,
        "-L",
        &format!("127.0.0.1:{local}:127.0.0.1:{remote}"),
        local,
    );
}

#[test]
fn remote_forwarding_carries_http() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    // The server runs on the laptop; the workspace side connects to the forwarded port.
    let laptop = http_server();
    let in_workspace = free_port();
    forward_and_fetch(
        &cfg,
        "-R",
        &format!("127.0.0.1:{in_workspace}:127.0.0.1:{laptop}"),
        in_workspace,
    );
}

/// Holds `ssh -N FLAG SPEC myco.dev` open and fetches the HTTP server through `local`.
fn forward_and_fetch(cfg: &std::path::Path, flag: &str, spec: &str, local: u16) {
    let mut tunnel = Command::new("ssh")
        .arg("-F")
        .arg(cfg)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-N",
            flag,
        ])
        .arg(spec)
        .arg("myco.dev")
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::blocking::Client::new();
    let body = fixtures::poll_for(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(50),
        "the forward opens",
        || {
            assert!(tunnel.try_wait().unwrap().is_none(), "ssh -L exited");
            let r = client.get(format!("http://127.0.0.1:{local}/")).send();
            r.map_err(|e| e.to_string())
        },
    )
    .text()
    .unwrap();
    assert_eq!(body, "hello from the workspace");
    // A second request over a new forwarded connection.
    let again = client
        .get(format!("http://127.0.0.1:{local}/"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(again, "hello from the workspace");
    // SIGTERM, as a user's ^C would: ssh then ends its ProxyCommand too.
    tests::fixtures::signal(tunnel.id(), "TERM");
    tunnel.wait().unwrap();
}

#[test]
fn interactive_pty_session_follows_resizes() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    let session = format!("myco-test-{}", std::process::id());
    let tmux = |args: &[&str]| {
        let st = Command::new("tmux")
            .args(args)
            .status()
            .expect("tmux must be installed: bash .ci/test installs it");
        assert!(st.success(), "tmux {args:?}");
    };
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "120",
        "-y",
        "40",
        &format!(
            "MYCO_MESH_BIND=127.0.0.1:0 ssh -F {} myco.dev",
            cfg.display()
        ),
    ]);
    // Typed into the remote shell: only its execution prints "mark-42".
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
    tmux(&["send-keys", "-t", &session, "exit", "Enter"]);
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &session])
        .status();
}

/// Runs an OpenSSH file tool (`scp`, `sftp`) with the managed config.
fn file_tool(tool: &str, cfg: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .arg("-F")
        .arg(cfg)
        .args(["-o", "BatchMode=yes"])
        .args(args)
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{tool} must be installed (openssh-client): {e}"))
}

/// Test data that is not all one byte, so misplaced blocks change the digest.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 24) as u8)
        .collect()
}

#[test]
fn scp_both_ways_keeps_contents() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    // The agent runs on this machine, so "remote" paths are local temp paths.
    let work = tempfile::tempdir().unwrap();
    let up = work.path().join("up.bin");
    let remote = work.path().join("remote.bin");
    let down = work.path().join("down.bin");
    let data = pattern(9_000_000, 7);
    std::fs::write(&up, &data).unwrap();

    let out = file_tool(
        "scp",
        &cfg,
        &[
            up.to_str().unwrap(),
            &format!("myco.dev:{}", remote.display()),
        ],
    );
    assert!(out.status.success(), "scp upload: {out:?}");
    assert_eq!(
        sha256_hex(&std::fs::read(&remote).unwrap()),
        sha256_hex(&data)
    );

    let out = file_tool(
        "scp",
        &cfg,
        &[
            &format!("myco.dev:{}", remote.display()),
            down.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "scp download: {out:?}");
    assert_eq!(
        sha256_hex(&std::fs::read(&down).unwrap()),
        sha256_hex(&data)
    );

    // A missing remote file is an error that names it, not an empty file.
    let out = file_tool(
        "scp",
        &cfg,
        &[
            &format!("myco.dev:{}/nope", work.path().display()),
            work.path().join("nope").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file"),
        "{out:?}"
    );
}

/// `sftp -b` with `script` as the batch (written into `dir`).
fn sftp_batch(cfg: &std::path::Path, dir: &std::path::Path, script: &str) -> std::process::Output {
    let batch = dir.join("batch");
    std::fs::write(&batch, script).unwrap();
    file_tool("sftp", cfg, &["-b", batch.to_str().unwrap(), "myco.dev"])
}

#[test]
fn sftp_batch_mkdir_put_get_rename_rm() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    let work = tempfile::tempdir().unwrap();
    let remote = work.path().join("remote");
    let local = work.path().join("a.bin");
    let back = work.path().join("back.bin");
    let data = pattern(3_000_000, 11);
    std::fs::write(&local, &data).unwrap();
    let out = sftp_batch(
        &cfg,
        work.path(),
        &format!(
            "mkdir {r}\ncd {r}\nput {l} a.bin\nrename a.bin b.bin\nls -l\nget b.bin {b}\nsymlink b.bin c.bin\nrm c.bin\nrm b.bin\ncd ..\nrmdir {r}\n",
            r = remote.display(),
            l = local.display(),
            b = back.display()
        ),
    );
    assert!(out.status.success(), "sftp -b: {out:?}");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("b.bin"), "{listing}");
    assert!(
        listing.contains("3000000"),
        "ls -l shows the size: {listing}"
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&back).unwrap()),
        sha256_hex(&data)
    );
    assert!(!remote.exists(), "rmdir removed the remote dir");

    // A failing command stops the batch with the server's reason.
    let out = sftp_batch(
        &cfg,
        work.path(),
        &format!("rm {}/missing\n", work.path().display()),
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file"),
        "{out:?}"
    );
}

#[test]
fn sftp_df_hard_links_copies_owner_names_and_scp_to_a_users_home() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    let work = tempfile::tempdir().unwrap();
    let remote = work.path().join("remote");
    let local = work.path().join("a.bin");
    let data = pattern(2_500_000, 5);
    std::fs::write(&local, &data).unwrap();
    let out = sftp_batch(
        &cfg,
        work.path(),
        &format!(
            "df\nmkdir {r}\ncd {r}\nput {l} a.bin\nln a.bin hard.bin\ncp a.bin copy.bin\nls -l\n",
            r = remote.display(),
            l = local.display(),
        ),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "sftp -b: {stdout}{stderr}");
    // df: statvfs@openssh.com.
    assert!(stdout.contains("%Capacity"), "{stdout}");
    // ln: hardlink@openssh.com; cp: copy-data, done by the agent.
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(remote.join("a.bin")).unwrap();
    assert_eq!(a.nlink(), 2, "a.bin and hard.bin are one file");
    assert_eq!(
        a.ino(),
        std::fs::metadata(remote.join("hard.bin")).unwrap().ino()
    );
    assert!(std::fs::read(remote.join("copy.bin")).unwrap() == data);
    // ls -l names the owner (users-groups-by-id@openssh.com), not its number.
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    let user = user.trim();
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("copy.bin") && l.contains(&format!(" {user} "))),
        "{stdout}"
    );

    // scp to ~USER/...: OpenSSH's scp needs expand-path@openssh.com for it.
    // The home the system's user database names, as the shell expands `~user`.
    let home = Command::new("sh")
        .arg("-c")
        .arg(format!("echo ~{user}"))
        .output()
        .unwrap()
        .stdout;
    let home = std::path::PathBuf::from(String::from_utf8(home).unwrap().trim());
    let name = format!(".myco-test-{}.bin", std::process::id());
    let out = file_tool(
        "scp",
        &cfg,
        &[local.to_str().unwrap(), &format!("myco.dev:~{user}/{name}")],
    );
    let landed = std::fs::read(home.join(&name));
    let _ = std::fs::remove_file(home.join(&name));
    assert!(out.status.success(), "scp to ~{user}: {out:?}");
    assert!(landed.unwrap() == data, "the copy in ~{user} differs");
}

#[test]
fn agent_forwarding_lists_the_local_agents_key() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "forwarded-key-marker",
            "-f",
        ])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let sock = work.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .expect("ssh-agent must be installed (openssh-client)");
    tests::eventually("ssh-agent listens", || sock.exists());
    let st = Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &sock)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());

    let out = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "-A", "myco.dev"])
        .arg("echo sock=$SSH_AUTH_SOCK; ssh-add -l")
        .env("SSH_AUTH_SOCK", &sock)
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("forwarded-key-marker"), "{text}");
    assert!(
        !text.contains(&format!("sock={}", sock.display())),
        "{text}"
    );

    // Without -A there is no agent in the session.
    let out = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "-a", "myco.dev"])
        .arg("echo sock=${SSH_AUTH_SOCK:-none}")
        .env("SSH_AUTH_SOCK", &sock)
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "sock=none\n",
        "{out:?}"
    );
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn a_command_killed_by_a_signal_is_reported_as_such() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    // The agent sends exit-signal, as sshd does; OpenSSH's client then has no exit
    // status to pass on and exits 255 (`myco ssh` turns it into 128 + the signal).
    let out = ssh(&cfg, &["myco.dev", "echo before; kill -TERM $$"], b"");
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "before\n");
}

#[test]
fn a_slow_reader_does_not_deadlock_a_session() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    // 20 MB through `cat` and back while the local reader waits: the client's window
    // fills, `cat` stops reading, and the agent must still take the window adjust
    // that arrives once the reader starts.
    let data = pattern(20_000_000, 3);
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "myco.dev", "cat"])
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&data).unwrap();
        data
    });
    // Not a timing assertion: only a pause that lets every buffer on the way fill.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut child.stdout.take().unwrap(), &mut back).unwrap();
    let data = writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echoed bytes differ");
}

#[test]
fn the_agents_idle_timeout_reaches_openssh_with_its_reason() {
    let (env, _agent) = TestEnv::with_agent_env(&[("MYCO_SSH_IDLE_TIMEOUT", "2s")]);
    let cfg = env.config_ssh("alice");
    let out = ssh(&cfg, &["myco.dev", "sleep 60"], b"");
    assert_eq!(out.status.code(), Some(255), "ssh's own failure: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "myco: the agent closed the SSH connection after 2s without traffic (its --ssh-idle-timeout)"
        ),
        "{stderr}"
    );
}

/// Runs `tool` (rsync, git) with OpenSSH through the temp config as its transport;
/// fails the test with the tool's own words if it fails.
fn over_ssh(tool: &str, cfg: &std::path::Path, dir: &std::path::Path, args: &[&str]) -> String {
    let ssh = format!("ssh -F {} -o BatchMode=yes", cfg.display());
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .env("RSYNC_RSH", &ssh)
        .env("GIT_SSH_COMMAND", &ssh)
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{tool} must be installed (bash .ci/test installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed: {text}");
    text
}

#[test]
fn rsync_and_git_work_through_real_ssh() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    // The agent runs on this machine, so "remote" paths are local temp paths.
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let remote = dir.join("remote");
    std::fs::create_dir_all(dir.join("src/sub")).unwrap();
    let mut big = pattern(3_000_000, 11);
    std::fs::write(dir.join("src/big.bin"), &big).unwrap();
    std::fs::write(dir.join("src/sub/small.txt"), "hello\n").unwrap();
    let same = |a: &str, b: &str| {
        for file in ["big.bin", "sub/small.txt"] {
            let (a, b) = (dir.join(a).join(file), dir.join(b).join(file));
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{} and {} differ",
                a.display(),
                b.display()
            );
        }
    };
    let dest = format!("myco.dev:{}/", remote.display());

    // rsync up, then again after a change in the middle of the big file: the second
    // run sends only what changed (rsync's delta transfer runs both its ends). `-I`:
    // the change keeps the size and may keep the mtime's second, which rsync's quick
    // check would take for unchanged.
    over_ssh("rsync", &cfg, dir, &["-a", "src/", &dest]);
    same("src", "remote");
    big[1_500_000..1_500_100].fill(0);
    std::fs::write(dir.join("src/big.bin"), &big).unwrap();
    let stats = over_ssh(
        "rsync",
        &cfg,
        dir,
        &["-a", "-I", "--no-W", "--stats", "src/", &dest],
    );
    same("src", "remote");
    let matched: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Matched data: "))
        .and_then(|v| v.split_whitespace().next())
        .map(|v| v.replace(',', "").parse().unwrap())
        .unwrap_or_else(|| panic!("no matched data in rsync's stats: {stats}"));
    assert!(
        matched > 2_000_000,
        "the delta transfer re-sent the file: {stats}"
    );
    // And back down.
    over_ssh("rsync", &cfg, dir, &["-a", &dest, "down/"]);
    same("src", "down");

    // git: clone a repository in the workspace, commit, push, clone again.
    let bare = dir.join("project.git");
    let url = format!("myco.dev:{}", bare.display());
    let git = |cwd: &std::path::Path, args: &[&str]| over_ssh("git", &cfg, cwd, args);
    git(
        dir,
        &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
    );
    git(dir, &["clone", "-q", &url, "one"]);
    let one = dir.join("one");
    std::fs::write(one.join("README"), "over the mesh\n").unwrap();
    git(&one, &["add", "README"]);
    git(
        &one,
        &[
            "-c",
            "user.name=Alice",
            "-c",
            "user.email=alice@example.com",
            "commit",
            "-q",
            "-m",
            "first over myco",
        ],
    );
    git(&one, &["push", "-q", "origin", "HEAD:main"]);
    let log = git(&bare, &["log", "--format=%s", "main"]);
    assert_eq!(log, "first over myco\n");
    git(dir, &["clone", "-q", &url, "two"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("two/README")).unwrap(),
        "over the mesh\n"
    );
}

/// Sends `line` on the Unix socket at `path` and returns the answer.
/// An HTTP GET of `http_server`'s page through a SOCKS5 proxy on `proxy` (what
/// `ssh -D` serves; VS Code Remote-SSH reaches the workspace that way), by hand:
/// no authentication, an IPv4 target. `None` until the proxy answers.
fn get_through_socks(proxy: u16, target: u16) -> Option<String> {
    use std::io::Read;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", proxy)).ok()?;
    conn.write_all(&[5, 1, 0]).ok()?;
    let mut reply = [0u8; 2];
    conn.read_exact(&mut reply).ok()?;
    assert_eq!(reply, [5, 0], "the proxy wants authentication");
    let mut connect = vec![5, 1, 0, 1, 127, 0, 0, 1];
    connect.extend_from_slice(&target.to_be_bytes());
    conn.write_all(&connect).unwrap();
    let mut reply = [0u8; 10];
    conn.read_exact(&mut reply).unwrap();
    assert_eq!(reply[1], 0, "the proxy could not connect: {reply:?}");
    conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    Some(response)
}

/// The other ways OpenSSH's users reach a workspace's ports and sessions: `ssh -D`
/// (a SOCKS proxy, as VS Code Remote-SSH uses), `ssh -W` (a port on stdin/stdout, as
/// ProxyJump uses), and sessions sharing one connection (ControlMaster).
#[test]
fn socks_stdio_forwarding_and_shared_connections_through_real_ssh() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    let server = http_server();

    let socks = free_port();
    let mut tunnel = forwarding(&cfg, "-D", &format!("127.0.0.1:{socks}"));
    let mut response = None;
    eventually("ssh -D serves its SOCKS port", || {
        assert!(tunnel.try_wait().unwrap().is_none(), "ssh -D exited");
        response = get_through_socks(socks, server);
        response.is_some()
    });
    assert!(
        response.unwrap().ends_with("hello from the workspace"),
        "through ssh -D"
    );
    // A second connection through the same proxy.
    let again = get_through_socks(socks, server).unwrap();
    assert!(again.ends_with("hello from the workspace"), "{again}");
    tunnel.kill().unwrap();
    tunnel.wait().unwrap();

    let out = ssh(
        &cfg,
        &["-W", &format!("127.0.0.1:{server}"), "myco.dev"],
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("hello from the workspace"), "{out:?}");

    // A master connection in the background (it keeps no pipe of ours open); sessions
    // then go over it.
    let control = env.config_dir("alice").join("cm.sock");
    let control = format!("ControlPath={}", control.display());
    let master = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "-f", "-N", "-o", "ControlMaster=yes"])
        .args(["-o", &control, "myco.dev"])
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(master.success(), "ssh -f -N -o ControlMaster=yes failed");
    let check = ssh(&cfg, &["-o", &control, "-O", "check", "myco.dev"], b"");
    assert!(check.status.success(), "{check:?}");
    let sessions: Vec<_> = (0..3)
        .map(|i| {
            let cfg = cfg.clone();
            let control = control.clone();
            std::thread::spawn(move || {
                ssh(
                    &cfg,
                    &[
                        "-o",
                        &control,
                        "myco.dev",
                        &format!("sleep 0.5; echo session {i}"),
                    ],
                    b"",
                )
            })
        })
        .collect();
    for (i, s) in sessions.into_iter().enumerate() {
        let out = s.join().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("session {i}\n")
        );
    }
    // The client says so when it uses the master rather than a connection of its own.
    let out = ssh(&cfg, &["-v", "-o", &control, "myco.dev", "true"], b"");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("mux_client_request_session"), "{log}");
    let exit = ssh(&cfg, &["-o", &control, "-O", "exit", "myco.dev"], b"");
    assert!(exit.status.success(), "{exit:?}");
}

fn ask_unix(path: &std::path::Path, line: &str) -> String {
    use std::io::Read;
    let mut sock = std::os::unix::net::UnixStream::connect(path).unwrap();
    sock.write_all(line.as_bytes()).unwrap();
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    sock.read_to_string(&mut answer).unwrap();
    answer
}

/// `ssh -N` with one forward, in the background until killed.
fn forwarding(cfg: &std::path::Path, flag: &str, spec: &str) -> std::process::Child {
    Command::new("ssh")
        .arg("-F")
        .arg(cfg)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-N",
        ])
        .args([flag, spec, "myco.dev"])
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn unix_socket_forwarding_both_ways() {
    let (env, _agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    let work = tempfile::tempdir().unwrap();
    // A Unix socket server that answers each connection's line upper-cased. The agent
    // runs on this machine, so both "sides" are here.
    let server = work.path().join("server.sock");
    let listener = std::os::unix::net::UnixListener::bind(&server).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut conn), &mut line);
            let _ = conn.write_all(line.to_uppercase().as_bytes());
        }
    });

    // -L: a socket here, the agent connects to the server's socket.
    let local = work.path().join("local.sock");
    let mut ssh_l = forwarding(
        &cfg,
        "-L",
        &format!("{}:{}", local.display(), server.display()),
    );
    eventually("ssh listens on the local socket", || local.exists());
    assert_eq!(ask_unix(&local, "through -l\n"), "THROUGH -L\n");
    let _ = ssh_l.kill();
    let _ = ssh_l.wait();

    // -R: the agent listens on a socket, connections come back to the server.
    let remote = work.path().join("remote.sock");
    let mut ssh_r = forwarding(
        &cfg,
        "-R",
        &format!("{}:{}", remote.display(), server.display()),
    );
    eventually("the agent listens on the remote socket", || remote.exists());
    assert_eq!(ask_unix(&remote, "through -r\n"), "THROUGH -R\n");
    // A second forward on a path in use is refused, as by sshd.
    let out = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"])
        .args(["-R", &format!("{}:{}", remote.display(), server.display())])
        .args(["myco.dev", "true"])
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("remote port forwarding failed"),
        "{out:?}"
    );
    // The agent removes its socket when the SSH connection ends.
    let _ = ssh_r.kill();
    let _ = ssh_r.wait();
    eventually("the agent removed the remote socket", || !remote.exists());
}

/// Runs `ssh` through the temp config with `args`; its output once it exits.
fn ssh_output(cfg: &std::path::Path, args: &[String]) -> std::process::Output {
    Command::new("ssh")
        .arg("-F")
        .arg(cfg)
        .args(["-o", "BatchMode=yes"])
        .args(args)
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn environment_requests_past_the_limit_are_refused() {
    let (env, agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    // 200 variables asked for: the first 128 (the agent's limit, as sshd's) are set.
    let vars: Vec<String> = (0..200).map(|i| format!("LIMIT_{i:03}={i}")).collect();
    let out = ssh_output(
        &cfg,
        &[
            "-o".into(),
            format!("SetEnv={}", vars.join(" ")),
            "myco.dev".into(),
            "env | grep '^LIMIT_' | sort".into(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let set: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(set, vars[..128], "{out:?}");
    assert!(
        agent.log().contains("refused an environment variable"),
        "{}",
        agent.log()
    );

    // A value over 16 KiB is refused; a long one within it, and the command, are not.
    let out = ssh_output(
        &cfg,
        &[
            "-o".into(),
            format!(
                "SetEnv=BIG={} FITS={}",
                "x".repeat(17_000),
                "y".repeat(16_000)
            ),
            "myco.dev".into(),
            "echo ${#BIG} ${#FITS}".into(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0 16000\n", "{out:?}");
}

#[test]
fn remote_forwards_past_the_limit_are_refused() {
    let (env, agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    let laptop = http_server();
    let work = tempfile::tempdir().unwrap();
    // 31 TCP ports (the agent picks each: port 0) and a Unix socket: 32, the limit.
    let forwards = |tcp: usize, socket: &str| -> Vec<String> {
        let mut args: Vec<String> = ["-o", "ExitOnForwardFailure=yes"]
            .map(String::from)
            .to_vec();
        // Each to another target: OpenSSH drops a forward repeated exactly. None is
        // connected to.
        for i in 0..tcp {
            args.push("-R".into());
            args.push(format!("127.0.0.1:0:127.0.0.1:{}", 10_000 + i));
        }
        args.push("-R".into());
        args.push(format!(
            "{}:127.0.0.1:{laptop}",
            work.path().join(socket).display()
        ));
        args.extend(["myco.dev".into(), "echo held".into()]);
        args
    };
    let out = ssh_output(&cfg, &forwards(31, "within.sock"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "held\n");

    // One more: refused, and ssh (ExitOnForwardFailure) says so.
    let out = ssh_output(&cfg, &forwards(32, "over.sock"));
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("remote port forwarding failed"),
        "{out:?}"
    );
    assert!(
        agent.log().contains(
            "refused a remote forward (ssh -R): this SSH connection holds the most allowed"
        ),
        "{}",
        agent.log()
    );
}

/// Connects to `port` and checks a line comes back; None when the connection is
/// closed instead (ssh closes it when the agent refuses the channel).
fn echoed(port: u16) -> Option<std::net::TcpStream> {
    use std::io::{BufRead, BufReader};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.write_all(b"ping\n").ok()?;
    let mut line = String::new();
    BufReader::new(conn.try_clone().unwrap())
        .read_line(&mut line)
        .ok()?;
    (line == "ping\n").then_some(conn)
}

#[test]
fn channels_past_the_limit_are_refused_and_freed_ones_reused() {
    let (env, agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    let remote = echo_server();
    let local = free_port();
    let mut tunnel = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        // The config's LogLevel ERROR would hide the line of a refused channel.
        .args(["-o", "BatchMode=yes", "-o", "LogLevel=INFO", "-N"])
        .args(["-L", &format!("127.0.0.1:{local}:127.0.0.1:{remote}")])
        .arg("myco.dev")
        .env("MYCO_MESH_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Every forwarded connection is a channel of the one SSH connection: 64 stay open.
    let mut held = Vec::new();
    eventually("the forward is up", || match echoed(local) {
        Some(c) => {
            held.push(c);
            true
        }
        None => false,
    });
    while held.len() < 64 {
        held.push(echoed(local).expect("a channel within the limit is opened"));
    }
    // The 65th is refused: ssh closes the local connection.
    assert!(echoed(local).is_none(), "a 65th channel was opened");
    assert!(
        agent
            .log()
            .contains("too many channels open on this SSH connection"),
        "{}",
        agent.log()
    );
    // A channel that closes gives its place back.
    drop(held.pop());
    eventually("a freed channel is reused", || echoed(local).is_some());

    terminate(&mut tunnel);
    let out = tunnel.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the agent allows 64 open channels per SSH connection"),
        "{stderr}"
    );
}

/// The addresses the TCP sockets listening on `port` are bound to, from
/// /proc/net/tcp and tcp6 (as `ss -ltn` reads them): hex, as the kernel prints.
fn listening_on(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ...; 0A is LISTEN.
            let (Some(local), Some("0A")) = (fields.get(1), fields.get(3).copied()) else {
                continue;
            };
            if let Some((addr, p)) = local.split_once(':')
                && u16::from_str_radix(p, 16) == Ok(port)
            {
                found.push(addr.to_owned());
            }
        }
    }
    found
}

/// `ssh -N -R ADDR:PORT:...` in the background; returns it once the agent listens.
fn remote_forward_on(cfg: &std::path::Path, addr: &str) -> (std::process::Child, u16) {
    let laptop = http_server();
    let port = free_port();
    let ssh = forwarding(cfg, "-R", &format!("{addr}:{port}:127.0.0.1:{laptop}"));
    eventually("the agent listens for the remote forward", || {
        !listening_on(port).is_empty()
    });
    (ssh, port)
}

#[test]
fn remote_forwards_listen_on_loopback_whatever_the_client_asks() {
    let (env, agent) = TestEnv::with_agent();
    let cfg = env.config_ssh("alice");
    // `*` reaches the agent as "", every interface (RFC 4254).
    for asked in ["0.0.0.0", "*"] {
        let (mut ssh, port) = remote_forward_on(&cfg, asked);
        let bound = listening_on(port);
        // 127.0.0.1 as /proc prints it.
        assert_eq!(bound, ["0100007F"], "-R {asked}:{port}:... listens there");
        terminate(&mut ssh);
    }
    assert!(
        agent.log().contains("listening on loopback"),
        "{}",
        agent.log()
    );
}

#[test]
fn gateway_ports_lets_remote_forwards_listen_where_asked() {
    let (env, _agent) = TestEnv::with_agent_env(&[("MYCO_SSH_GATEWAY_PORTS", "true")]);
    let cfg = env.config_ssh("alice");
    let (mut ssh, port) = remote_forward_on(&cfg, "0.0.0.0");
    assert_eq!(listening_on(port), ["00000000"]);
    terminate(&mut ssh);
}

/// SIGTERM, as a user's ^C would: ssh then ends its ProxyCommand too (SIGKILL would
/// leave it behind).
fn terminate(ssh: &mut std::process::Child) {
    tests::fixtures::signal(ssh.id(), "TERM");
    let _ = ssh.wait();
}

#[test]
fn a_workspace_made_after_config_ssh_works_at_once_and_is_pinned() {
    let (env, _agent) = TestEnv::with_agent();
    // The SSH config is a symlink, as dotfile managers make it: edited through it.
    let real = env.config_dir("alice").join("dotfiles-ssh-config");
    std::fs::write(&real, "Host work\n  User me\n").unwrap();
    let link = env.config_dir("alice").join("ssh_config");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    env.run(
        "alice",
        &[
            "config-ssh",
            "--ssh-config-file",
            link.to_str().unwrap(),
            "-y",
            "--ssh-option",
            "ServerAliveInterval=15",
        ],
    )
    .ok();
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let text = std::fs::read_to_string(&real).unwrap();
    assert!(
        text.starts_with("Host work\n") && text.contains("  ServerAliveInterval 15\n"),
        "{text}"
    );
    let err = env
        .run(
            "alice",
            &[
                "config-ssh",
                "--ssh-config-file",
                link.to_str().unwrap(),
                "-y",
                "-o",
                "=yes",
            ],
        )
        .fails();
    assert!(err.contains("is not an SSH option"), "{err}");

    // A new workspace, no second config-ssh: ssh gets its key from the coordinator.
    let token = env.create_workspace("alice", "later");
    let _later = env.start_agent(&token);
    tests::eventually("the new agent reports its host key", || {
        env.run("alice", &["show", "later", "-o", "json"])
            .ok()
            .json()["agents"][0]["ssh_host_key"]
            .is_string()
    });
    let out = ssh(&link, &["myco.later", "echo", "at-once"], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "at-once");
    // ...and pins it, so a later change is refused like any other.
    let pinned = std::fs::read_to_string(env.config_dir("alice").join("known_hosts")).unwrap();
    assert!(pinned.contains("myco.later"), "{pinned}");
    let out = ssh(&link, &["myco.later", "true"], b"");
    assert!(out.status.success(), "{out:?}");
    // A workspace that does not exist gets no key, and ssh refuses it.
    let out = ssh(&link, &["myco.nothing", "true"], b"");
    assert!(!out.status.success(), "{out:?}");

    // Another prefix for the aliases (Coder's --ssh-host-prefix).
    let other = env.config_dir("alice").join("other_config");
    env.run(
        "alice",
        &[
            "config-ssh",
            "--ssh-config-file",
            other.to_str().unwrap(),
            "-y",
            "--ssh-host-prefix",
            "dev-",
        ],
    )
    .ok();
    let out = ssh(&other, &["dev-later", "echo", "prefixed"], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "prefixed");
    let err = env
        .run("alice", &["config-ssh", "--ssh-host-prefix", "a b", "-y"])
        .fails();
    assert!(err.contains("is not a host prefix"), "{err}");
}
