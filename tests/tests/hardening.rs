//! What other local users, and other processes of the agent's own user, can learn of
//! the coordinator's and the agent's secrets: the agent token never in a process's
//! arguments, the agent non-dumpable, and data dirs private whatever the umask.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tests::{AgentProc, eventually, myco_bin, run_command};

/// `cmd` without any `MYCO_*` of the test's own environment, its mesh on loopback.
fn clean(mut cmd: Command) -> Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MYCO_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("MYCO_MESH_BIND", "127.0.0.1:0")
        .env("MYCO_PORTMAPPER", "false")
        .env("RUST_LOG", "info,iroh=warn");
    cmd
}

/// Starts `cmd` (an agent) with stderr in `log`.
fn spawn_agent(mut cmd: Command, log: PathBuf) -> AgentProc {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    AgentProc { child, log }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// `myco ARGS` under `umask 000`, stdout piped, stderr into `log`.
fn myco_umask_000(args: &[&str], log: &Path) -> Child {
    let mut cmd = clean(Command::new("sh"));
    cmd.args(["-c", "umask 000 && exec \"$0\" \"$@\""])
        .arg(myco_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
    cmd.spawn().unwrap()
}

/// A dir that exists already, open to everyone as `mkdir` under a usual umask makes it.
fn open_dir(path: &Path) {
    std::fs::create_dir(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn data_dirs_are_private_whatever_the_umask_or_a_dir_made_before() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("coordinator");
    open_dir(&data);
    let log = work.path().join("server.log");
    let mut server = myco_umask_000(
        &[
            "server",
            "--http-address",
            "127.0.0.1:0",
            "--relay-quic-address",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &log,
    );
    let mut url = None;
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("myco coordinator listening on ") {
            url = Some(rest.to_owned());
        }
        if line.starts_with("QUIC address discovery on") {
            break;
        }
    }
    let url = url.expect("the server never said where it listens");
    // Drained on, so the server never writes to a closed pipe.
    std::thread::spawn(move || for _ in lines {});
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("myco.redb")), 0o600);
    for entry in std::fs::read_dir(&data).unwrap().flatten() {
        let path = entry.path();
        // The self-signed certificate is public; its key is not.
        if path.ends_with("relay-tls.crt") {
            continue;
        }
        assert_eq!(mode(&path) & 0o077, 0, "{} is open", path.display());
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("the data dir was open to other users (mode 755)"),
        "{text}"
    );

    // The agent's data dir (its key, the SSH host key) likewise.
    let env_dir = work.path().join("config-alice");
    let login = |args: &[&str], input: &str| {
        let mut cmd = clean(Command::new(myco_bin()));
        cmd.env("MYCO_CONFIG_DIR", &env_dir).args(args);
        run_command(cmd, input).ok()
    };
    login(
        &[
            "login",
            &url,
            "--first-user",
            "--username",
            "alice",
            "--password-stdin",
        ],
        &format!("{}\n", tests::PASSWORD),
    );
    let created = login(&["create", "dev", "-o", "json"], "").json();
    let token = created["agent_tokens"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent_data = work.path().join("agent");
    open_dir(&agent_data);
    let agent_log = work.path().join("agent.log");
    let mut cmd = clean(Command::new("sh"));
    cmd.args(["-c", "umask 000 && exec \"$0\" \"$@\""])
        .arg(myco_bin())
        .args(["agent", "--url", &url, "--data-dir"])
        .arg(&agent_data)
        .env("MYCO_AGENT_TOKEN", &token);
    let agent = spawn_agent(cmd, agent_log);
    eventually("the agent made its SSH host key", || {
        agent_data.join("ssh_host_ed25519_key").exists()
    });
    assert_eq!(mode(&agent_data), 0o700);
    assert_eq!(mode(&agent_data.join("agent.key")), 0o600);
    assert_eq!(mode(&agent_data.join("ssh_host_ed25519_key")), 0o600);
    assert!(
        agent
            .log()
            .contains("the data dir was open to other users (mode 755)"),
        "{}",
        agent.log()
    );
    drop(agent);
    let _ = server.kill();
    let _ = server.wait();
}
