//! What other local users, and other processes of the agent's own user, can learn of
//! the coordinator's and the agent's secrets: the agent token never in a process's
//! arguments, the agent non-dumpable, and data dirs private whatever the umask.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tests::{AgentProc, TestEnv, eventually, myco_bin, run_command};

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
    // Its data dir is the test's own business here.
    AgentProc {
        child,
        log,
        data_dir: PathBuf::new(),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every process whose command line holds `needle`, with that command line.
fn processes_naming(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(cmdline);
            }
        }
    }
    found
}

#[test]
fn the_printed_start_line_and_token_files_keep_the_token_out_of_argv() {
    let env = TestEnv::start();
    env.bootstrap("alice");

    // The line `myco create` prints, run as printed in a shell.
    let created = env.run("alice", &["create", "dev"]).ok();
    let line = created
        .stdout
        .lines()
        .find(|l| l.contains("myco agent"))
        .unwrap()
        .trim()
        .to_owned();
    let token = line
        .strip_prefix("MYCO_AGENT_TOKEN=")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    let data = env.dir().join("agent-printed");
    let bin_dir = myco_bin().parent().unwrap();
    // `exec` after the assignment, so the shell's pid is the agent's, which the
    // harness kills.
    let (assignment, command) = line.split_once(' ').unwrap();
    let mut sh = clean(Command::new("sh"));
    sh.args([
        "-c",
        &format!("{assignment} exec {command} --data-dir {}", data.display()),
    ])
    .env(
        "PATH",
        format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
    );
    let printed = spawn_agent(sh, env.dir().join("agent-printed.log"));
    env.wait_agent_connected("alice", "dev");
    let running = processes_naming(&data.display().to_string());
    assert!(!running.is_empty(), "the agent is not running");
    for cmdline in &running {
        assert!(!cmdline.contains(&token), "the token is in argv: {cmdline}");
    }
    drop(printed);

    // --token-file: read and trimmed; nothing of it in argv either.
    let token = env.create_workspace("alice", "two");
    let file = env.dir().join("token");
    std::fs::write(&file, format!("  {token}\n\n")).unwrap();
    let data = env.dir().join("agent-file");
    let mut cmd = env.cmd("agent", &["agent", "--url", &env.url, "--data-dir"]);
    cmd.arg(&data).arg("--token-file").arg(&file);
    let from_file = spawn_agent(cmd, env.dir().join("agent-file.log"));
    env.wait_agent_connected("alice", "two");
    for cmdline in processes_naming(&data.display().to_string()) {
        assert!(!cmdline.contains(&token), "the token is in argv: {cmdline}");
    }
    drop(from_file);

    // Unusable token files, and a token given twice, are refused with what to do.
    let empty = env.dir().join("empty");
    std::fs::write(&empty, " \n").unwrap();
    let agent_with = |file: &Path, token_env: Option<&str>| {
        let mut cmd = env.cmd("agent", &["agent", "--url", &env.url, "--token-file"]);
        cmd.arg(file)
            .arg("--data-dir")
            .arg(env.dir().join("agent-refused"));
        if let Some(t) = token_env {
            cmd.env("MYCO_AGENT_TOKEN", t);
        }
        run_command(cmd, "").fails()
    };
    let line = agent_with(&empty, None);
    assert!(line.contains("is empty"), "{line}");
    let line = agent_with(&env.dir().join("missing"), None);
    assert!(line.contains("cannot read the agent token file"), "{line}");
    let line = agent_with(&file, Some(&token));
    assert!(
        line.contains("given twice, by --token-file and by MYCO_AGENT_TOKEN"),
        "{line}"
    );

    // The global --token still works, with a warning, once.
    let token = env.create_workspace("alice", "three");
    let data = env.dir().join("agent-argv");
    let mut cmd = env.cmd(
        "agent",
        &["agent", "--url", &env.url, "--token", &token, "--data-dir"],
    );
    cmd.arg(&data);
    let argv = spawn_agent(cmd, env.dir().join("agent-argv.log"));
    env.wait_agent_connected("alice", "three");
    let warning = "--token puts the agent token in the process list";
    assert_eq!(argv.log().matches(warning).count(), 1, "{}", argv.log());
}

/// Runs commands as an unprivileged user: `nobody` through `setpriv` when the test
/// runs as root (root reads every process's /proc files, dumpable or not), else as
/// the test's own user.
struct Unprivileged {
    root: bool,
}

impl Unprivileged {
    fn new() -> Self {
        let uid = Command::new("id").arg("-u").output().unwrap();
        Self {
            root: String::from_utf8_lossy(&uid.stdout).trim() == "0",
        }
    }

    fn command(&self, program: &Path) -> Command {
        if self.root {
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(program);
            cmd
        } else {
            Command::new(program)
        }
    }

    /// A dir the user owns.
    fn dir(&self) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        if self.root {
            std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        }
        dir
    }
}

#[test]
fn no_process_of_the_agents_user_reads_its_environment() {
    let user = Unprivileged::new();
    let env = TestEnv::start();
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let home = user.dir();
    // The test's binary may sit where that user cannot reach (a root-only target
    // dir): then a copy in its home.
    let mut bin = myco_bin().to_owned();
    let reachable = user
        .command(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !reachable {
        let copy = home.path().join("myco");
        std::fs::copy(&bin, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin = copy;
    }
    let mut cmd = clean(user.command(&bin));
    cmd.args(["agent", "--url", &env.url, "--data-dir"])
        .arg(home.path().join("data"))
        .env("MYCO_AGENT_TOKEN", &token)
        .env("HOME", home.path());
    let agent = spawn_agent(cmd, env.dir().join("agent.log"));
    env.wait_agent_connected("alice", "dev");
    // setpriv execs: the child's pid is the agent's.
    let pid = agent.child.id();

    // The same user reads the environment of a process of its own that is dumpable
    // (any it runs), so the check below can fail...
    let mut sleeper = user.command(Path::new("/bin/sleep"));
    let mut sleeper = sleeper.arg("600").spawn().unwrap();
    // Until it has exec'd `sleep`, it is `setpriv` after changing credentials, which
    // the kernel keeps non-dumpable: wait for the exec.
    tests::eventually("the sleeper runs sleep", || {
        std::fs::read_to_string(format!("/proc/{}/comm", sleeper.id()))
            .is_ok_and(|c| c.trim() == "sleep")
    });
    let read = |pid: u32| {
        user.command(Path::new("/bin/cat"))
            .arg(format!("/proc/{pid}/environ"))
            .output()
            .unwrap()
    };
    let out = read(sleeper.id());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(out.status.success(), "{out:?}");
    // ...but not the agent's, which holds the token.
    let out = read(pid);
    assert!(!out.status.success(), "the agent's environment was read");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );

    // An SSH session (a child of the agent, the same user) cannot either, while its
    // own process is an ordinary one (exec made it dumpable again).
    let cfg = env.config_ssh("alice");
    let out = env
        .openssh(&cfg)
        .arg("myco.dev")
        .arg(format!(
            "test $PPID = {pid} || echo not-the-agent; \
             cat /proc/$PPID/environ >/dev/null 2>&1 && echo agent-readable || echo agent-hidden; \
             cat /proc/$$/environ >/dev/null && echo self-readable"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "agent-hidden\nself-readable\n",
        "{out:?}"
    );
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
