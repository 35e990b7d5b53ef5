//! The end-to-end harness: a [`TestEnv`] holds a temp dir and a real `myco server`
//! process, and runs the real `myco` binary as one or more users, each with its own
//! config dir; on loopback, or in the network namespaces of a [`natlab::Lab`].
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod api;
pub mod fixtures;
pub mod hostaddr;
pub mod natlab;
pub mod pki;

pub use api::{Api, Reply};

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The password every test user gets.
pub const PASSWORD: &str = "correct-horse-battery";

/// Path of the `myco` binary beside the test executable.
///
/// Cargo does not build another package's binary for a test crate, so the suite's
/// command (`bash .ci/test`) runs `cargo build --workspace --all-targets` first. (Building
/// it from inside a test was tried: the nested cargo sees the test's environment,
/// which dirties build scripts and rebuilt iroh's dependencies for minutes.)
pub fn myco_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/<test-exe> -> target/<profile>/myco
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
        let bin = profile_dir.join("myco");
        assert!(
            bin.exists(),
            "{} does not exist; run `cargo build --workspace --all-targets` first (bash .ci/test does)",
            bin.display()
        );
        bin
    })
}

/// The `myco` binary, run in network namespace `netns` through `ip netns exec` (which
/// execs it, so the child's pid is myco's), or directly when `netns` is `None`.
pub fn myco_in(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(myco_bin());
            cmd
        }
        None => Command::new(myco_bin()),
    }
}

/// Polls `done` every 50 ms until it holds; fails the test after 30 s. For state that
/// changes outside the test (an agent connecting), where no event can be awaited.
#[track_caller]
pub fn eventually(what: &str, done: impl FnMut() -> bool) {
    eventually_within(Duration::from_secs(30), what, done);
}

/// [`eventually`] with another bound, for what takes a known long while (a timeout of
/// the system under test).
#[track_caller]
pub fn eventually_within(bound: Duration, what: &str, mut done: impl FnMut() -> bool) {
    fixtures::poll_for(bound, Duration::from_millis(50), what, || {
        if done() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
}

/// Hex SHA-256 of `data` as `sha256sum` prints it (digest, two spaces, `-`, newline),
/// to compare with the same tool run on the workspace's side.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

/// A loopback port that was free for both TCP and UDP a moment ago, for a process the
/// test starts to bind.
///
/// It comes from below the kernel's ephemeral range (`ip_local_port_range`): `bind` to
/// port 0 and every outgoing connection take their ports from that range, so none of
/// the suite's many connections can take this one before its process binds it. Test
/// processes running at once start at random points among the thousands of ports there.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    const LOWEST: u32 = 20_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = u64::from(ephemeral.saturating_sub(LOWEST));
    let start = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    for i in 0..span {
        let port = u64::from(LOWEST) + start.wrapping_add(i) % span;
        let port = u16::try_from(port).expect("ports below the ephemeral range fit in u16");
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    // The ephemeral range starts low, or everything below it is taken: take one from
    // the kernel, as before.
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// Polls tmux pane `session` until `want` appears (bounded); returns the pane's text.
pub fn wait_pane(session: &str, want: &str) -> String {
    let mut text = String::new();
    eventually(&format!("{want:?} appears in the terminal"), || {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", session])
            .output()
            .expect("tmux must be installed: bash .ci/test installs it");
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains(want)
    });
    text
}

/// What a finished `myco` command left behind.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics with everything printed unless the command succeeded.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "command failed: {self:#?}");
        self
    }

    /// Asserts the command failed the way users should see failures: non-zero, one
    /// line on stderr starting `myco: `, no panic or backtrace. Returns that line.
    #[track_caller]
    pub fn fails(self) -> String {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "command should have failed: {self:#?}"
        );
        assert!(!self.stderr.contains("panicked"), "panic: {self:#?}");
        assert!(
            !self.stderr.contains("RUST_BACKTRACE"),
            "backtrace: {self:#?}"
        );
        // Less the warning that plain HTTP off loopback (which the env opted into
        // with MYCO_INSECURE_HTTP) prints before whatever the command does.
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.starts_with("myco: warning: sending credentials in clear text"))
            .collect();
        assert_eq!(lines.len(), 1, "want one line on stderr: {self:#?}");
        assert!(lines[0].starts_with("myco: "), "{self:#?}");
        lines[0].to_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// Runs `cmd` to its end with `stdin` as its input; returns what it printed.
pub fn run_command(mut cmd: Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

static AGENTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A running `myco agent`; killed when dropped.
pub struct AgentProc {
    pub child: Child,
    pub log: PathBuf,
    /// Its `--data-dir` (its keys and its coordinator pin).
    pub data_dir: PathBuf,
}

impl AgentProc {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the agent exits on its own; returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut status = None;
        eventually("the agent exits", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.and_then(|s| s.code())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `myco server`.
struct Server {
    child: Child,
}

/// A temp dir with a coordinator and users of it.
pub struct TestEnv {
    dir: tempfile::TempDir,
    server: Option<Server>,
    /// The network namespace the server and, unless told otherwise, every command
    /// runs in (the NAT lab's core); `None`: this process's own, on loopback.
    netns: Option<String>,
    /// The IP the server binds.
    server_ip: String,
    /// The HTTP address once the first server bound it; restarts reuse it.
    addr: Option<String>,
    /// Likewise the UDP address of QUIC address discovery.
    qad_addr: Option<String>,
    /// More `myco server` arguments, given on every start.
    server_args: Vec<String>,
    pub url: String,
    /// The coordinator's ticket key as `myco server` printed it.
    pub ticket_key: String,
    /// The first-user setup code, when `myco server` printed one.
    setup_code: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// More environment for every `myco` command and agent this env starts (a CA
    /// file to trust, say).
    pub client_env: Vec<(String, String)>,
}

impl TestEnv {
    /// A coordinator, its first user `alice`, her workspace `dev` and its agent,
    /// connected to the mesh.
    pub fn with_agent() -> (Self, AgentProc) {
        Self::with_agent_env(&[])
    }

    /// Like [`TestEnv::with_agent`], the agent started with more environment
    /// (`MYCO_*` settings, or what a container would or would not give it).
    pub fn with_agent_env(agent_env: &[(&str, &str)]) -> (Self, AgentProc) {
        let env = Self::start();
        env.bootstrap("alice");
        let token = env.create_workspace("alice", "dev");
        let agent = env.start_agent_with(None, &token, agent_env);
        env.wait_agent_connected("alice", "dev");
        (env, agent)
    }

    /// An admin, users `alice` and `bob`, alice's workspace `dev` and its connected
    /// agent: the setup of every "another user is refused" test.
    pub fn alice_and_bob() -> (Self, AgentProc) {
        Self::alice_and_bob_with(&[])
    }

    /// Like [`TestEnv::alice_and_bob`], with more `myco server` arguments.
    pub fn alice_and_bob_with(server_args: &[&str]) -> (Self, AgentProc) {
        let env = Self::start_with(server_args);
        env.bootstrap("admin");
        env.add_user("admin", "alice");
        env.add_user("admin", "bob");
        let token = env.create_workspace("alice", "dev");
        let agent = env.start_agent(&token);
        env.wait_agent_connected("alice", "dev");
        (env, agent)
    }

    /// Starts a coordinator on a free loopback port with an empty data dir.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`TestEnv::start`], with more `myco server` arguments.
    pub fn start_with(server_args: &[&str]) -> Self {
        Self::start_in(None, "127.0.0.1", server_args)
    }

    /// Starts a coordinator on a free port of `ip` inside network namespace `netns`
    /// (`ip netns exec`), or in this process's own namespace when it is `None`. Every
    /// command of this env then runs in that namespace unless [`TestEnv::cmd_in`] names
    /// another.
    pub fn start_in(netns: Option<&str>, ip: &str, server_args: &[&str]) -> Self {
        let mut env = Self {
            dir: tempfile::tempdir().unwrap(),
            server: None,
            netns: netns.map(str::to_owned),
            server_ip: ip.to_owned(),
            addr: None,
            qad_addr: None,
            server_args: server_args.iter().map(|s| s.to_string()).collect(),
            url: String::new(),
            ticket_key: String::new(),
            setup_code: Default::default(),
            client_env: Vec::new(),
        };
        env.start_server();
        env
    }

    /// The first-user setup code `myco server` printed (it does so when its listener
    /// is not on loopback); waits (bounded) for the line.
    pub fn setup_code(&self) -> String {
        let mut code = None;
        eventually("the server prints its setup code", || {
            code = self.setup_code.lock().unwrap().clone();
            code.is_some()
        });
        code.unwrap()
    }

    /// The env's temp dir (config dirs, agents' data and logs, the store).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server (again) on the same data dir and address.
    pub fn start_server(&mut self) {
        assert!(self.server.is_none(), "server already running");
        let any_port = format!("{}:0", self.server_ip);
        let addr = self.addr.clone().unwrap_or_else(|| any_port.clone());
        let qad = self.qad_addr.clone().unwrap_or(any_port);
        let mut child = myco_in(self.netns.as_deref())
            .args([
                "server",
                "--http-address",
                &addr,
                "--relay-quic-address",
                &qad,
                "--data-dir",
            ])
            .arg(self.data_dir())
            .args(&self.server_args)
            .env_remove("MYCO_ACCESS_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut listening = String::new();
        loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.strip_prefix("myco coordinator listening on ") {
                        listening = rest.to_owned();
                    }
                    if let Some((_, key)) = line
                        .strip_prefix("ticket key ")
                        .and_then(|rest| rest.rsplit_once(": "))
                    {
                        self.ticket_key = key.to_owned();
                    }
                    if let Some(rest) = line.strip_prefix("QUIC address discovery on udp://") {
                        self.qad_addr = Some(rest.to_owned());
                        break;
                    }
                }
                _ => {
                    let status = child.wait().unwrap();
                    panic!("myco server exited before listening: {status}");
                }
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe, noting a
        // setup code on the way.
        let setup_code = self.setup_code.clone();
        std::thread::spawn(move || {
            for line in lines.by_ref().map_while(Result::ok) {
                if let Some((_, code)) = line.split_once("--setup-code ") {
                    *setup_code.lock().unwrap() = Some(code.trim().to_owned());
                }
            }
        });
        self.url = listening.clone();
        self.addr = Some(listening.trim_start_matches("http://").to_owned());
        self.server = Some(Server { child });
    }

    /// `kill -9` the server: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.child.kill().unwrap();
            s.child.wait().unwrap();
        }
    }

    /// Sends the server a signal (`HUP`, ...).
    pub fn signal_server(&self, signal: &str) {
        let s = self.server.as_ref().expect("the server runs");
        fixtures::signal(s.child.id(), signal);
    }

    /// SIGTERM the server and wait for it to exit; returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut s = self.server.take()?;
        fixtures::signal(s.child.id(), "TERM");
        s.child.wait().unwrap().code()
    }

    pub fn restart(&mut self) {
        self.stop();
        self.start_server();
    }

    /// The config dir `user`'s CLI uses.
    pub fn config_dir(&self, user: &str) -> PathBuf {
        self.dir.path().join(format!("config-{user}"))
    }

    /// A `myco` command as `user` (with that user's config dir and no stray MYCO_ env),
    /// in the env's namespace.
    pub fn cmd(&self, user: &str, args: &[&str]) -> Command {
        self.cmd_in(self.netns.as_deref(), user, args)
    }

    /// Like [`TestEnv::cmd`], in network namespace `netns` (`None`: this process's own).
    pub fn cmd_in(&self, netns: Option<&str>, user: &str, args: &[&str]) -> Command {
        let mut cmd = myco_in(netns);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("MYCO_") {
                cmd.env_remove(k);
            }
        }
        // A coordinator off loopback (the NAT lab's, one on 0.0.0.0) is plain HTTP
        // in these tests: the CLI must be told that is meant.
        if self.server_ip != "127.0.0.1" {
            cmd.env("MYCO_INSECURE_HTTP", "true");
        }
        cmd.env("MYCO_CONFIG_DIR", self.config_dir(user))
            .env("MYCO_MESH_BIND", self.mesh_bind(netns))
            .env("MYCO_PORTMAPPER", "false")
            .env_remove("RUST_LOG")
            .envs(self.client_env.iter().map(|(k, v)| (k, v)))
            .args(args);
        cmd
    }

    /// Where a client's mesh socket binds: on loopback (or on this host's address off
    /// loopback that the coordinator listens on, which namespaces on this host
    /// reach), or in namespace `netns` on its IPv4 interfaces (the NAT lab has no
    /// IPv6).
    fn mesh_bind(&self, netns: Option<&str>) -> String {
        match (netns, self.server_ip.as_str()) {
            (Some(_), _) => "0.0.0.0:0".to_owned(),
            (None, "0.0.0.0") => "127.0.0.1:0".to_owned(),
            (None, ip) => format!("{ip}:0"),
        }
    }

    /// Creates workspace `name` as `user` with one agent; returns the agent's token.
    pub fn create_workspace(&self, user: &str, name: &str) -> String {
        let created = self.run(user, &["create", name, "-o", "json"]).ok().json();
        created["agent_tokens"][0]["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Starts `myco agent` with `token`, its data in the temp dir, its mesh on loopback.
    pub fn start_agent(&self, token: &str) -> AgentProc {
        self.start_agent_in(self.netns.as_deref(), token)
    }

    /// Like [`TestEnv::start_agent`], in network namespace `netns`.
    pub fn start_agent_in(&self, netns: Option<&str>, token: &str) -> AgentProc {
        self.start_agent_with(netns, token, &[])
    }

    /// Like [`TestEnv::start_agent_in`], with more environment (see
    /// [`TestEnv::with_agent_env`]).
    pub fn start_agent_with(
        &self,
        netns: Option<&str>,
        token: &str,
        env: &[(&str, &str)],
    ) -> AgentProc {
        let n = AGENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let data = self.dir.path().join(format!("agent-{n}"));
        self.start_agent_at(netns, token, &data, env)
    }

    /// Like [`TestEnv::start_agent_with`], with the agent's data dir at `data` (which
    /// may hold another agent's keys or pin).
    pub fn start_agent_at(
        &self,
        netns: Option<&str>,
        token: &str,
        data: &Path,
        env: &[(&str, &str)],
    ) -> AgentProc {
        let n = AGENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::fs::File::create(self.dir.path().join(format!("agent-{n}.log"))).unwrap();
        let child = self
            .cmd_in(netns, "agent", &["agent", "--url", &self.url, "--data-dir"])
            .arg(data)
            // The environment, not an argument: sessions must not see it (tests/ssh.rs).
            .env("MYCO_AGENT_TOKEN", token)
            .env("RUST_LOG", "info,iroh=warn")
            // A network change is checked again after a second, not 30.
            .env("MYCO_NETCHECK_MIN_INTERVAL", "1s")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        AgentProc {
            child,
            log: self.dir.path().join(format!("agent-{n}.log")),
            data_dir: data.to_owned(),
        }
    }

    /// Waits (bounded, 60 s) until the first agent of `user`'s workspace `ws`, as
    /// `myco show -o json` has it, satisfies `done`; returns that agent's JSON. A
    /// failure names `what` and shows the last view. Polls: the coordinator's view
    /// changes outside the test.
    #[track_caller]
    pub fn await_agent(
        &self,
        user: &str,
        ws: &str,
        what: &str,
        mut done: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        fixtures::poll_for(
            Duration::from_secs(60),
            Duration::from_millis(50),
            what,
            || {
                let shown = self.run(user, &["show", ws, "-o", "json"]).ok().json();
                let agent = shown["agents"][0].clone();
                if done(&agent) {
                    Ok(agent)
                } else {
                    Err(format!("{shown:#}"))
                }
            },
        )
    }

    /// Waits (bounded) until `user`'s workspace shows its first agent connected with a
    /// direct address; returns that agent's JSON.
    #[track_caller]
    pub fn wait_agent_connected(&self, user: &str, ws: &str) -> serde_json::Value {
        self.await_agent(user, ws, "the agent connects", |agent| {
            let addrs = agent["connection"]["direct_addrs"]
                .as_array()
                .map_or(0, Vec::len);
            addrs > 0 && agent["connection"]["relay_url"].is_string()
        })
    }

    /// Waits (bounded) until the workspace's first agent shows `status`
    /// (`connected`, `disconnected`, ...); returns that agent's JSON.
    #[track_caller]
    pub fn wait_agent_status(&self, user: &str, ws: &str, status: &str) -> serde_json::Value {
        self.await_agent(user, ws, &format!("the agent is {status}"), |agent| {
            agent["status"] == status
        })
    }

    /// Waits (bounded) until the workspace shows no connected agent.
    #[track_caller]
    pub fn wait_agent_gone(&self, user: &str, ws: &str) {
        self.await_agent(user, ws, "the agent goes away", |agent| {
            agent["connection"].is_null()
        });
    }

    /// Runs `myco ARGS` as `user` with `stdin` as its input.
    pub fn run_with_input(&self, user: &str, args: &[&str], stdin: &str) -> Output {
        run_command(self.cmd(user, args), stdin)
    }

    /// Runs `myco ARGS` as `user` with an empty stdin (not a terminal).
    pub fn run(&self, user: &str, args: &[&str]) -> Output {
        self.run_with_input(user, args, "")
    }

    /// Creates the first user, an admin, and logs them in (with the setup code the
    /// server printed, when it listens beyond loopback).
    pub fn bootstrap(&self, admin: &str) {
        let ip = self.server_ip.trim_matches(['[', ']']);
        let loopback = ip
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
        let code = (!loopback).then(|| self.setup_code());
        let mut args = vec![
            "login",
            &self.url,
            "--first-user",
            "--username",
            admin,
            "--password-stdin",
        ];
        if let Some(code) = &code {
            args.extend(["--setup-code", code.as_str()]);
        }
        self.run_with_input(admin, &args, &format!("{PASSWORD}\n"))
            .ok();
    }

    /// As `admin`, creates `user` (not an admin) and logs them in.
    pub fn add_user(&self, admin: &str, user: &str) {
        self.run_with_input(
            admin,
            &["users", "create", user, "--password-stdin"],
            &format!("{PASSWORD}\n"),
        )
        .ok();
        self.login(user);
    }

    pub fn login(&self, user: &str) {
        self.login_as(user, user, PASSWORD);
    }

    /// Logs `username` in with `password`, saving the session in `dir`'s config
    /// (another machine of the same user when `dir` is not `username`).
    pub fn login_as(&self, dir: &str, username: &str, password: &str) {
        self.run_with_input(
            dir,
            &[
                "login",
                &self.url,
                "--username",
                username,
                "--password-stdin",
            ],
            &format!("{password}\n"),
        )
        .ok();
    }

    /// `myco config-ssh` as `user` into `ssh_config` in their config dir; returns
    /// its path.
    pub fn config_ssh(&self, user: &str) -> PathBuf {
        let cfg = self.config_dir(user).join("ssh_config");
        self.run(
            user,
            &[
                "config-ssh",
                "--ssh-config-file",
                cfg.to_str().unwrap(),
                "-y",
            ],
        )
        .ok();
        cfg
    }

    /// OpenSSH's client with config `cfg` in batch mode, its ProxyCommand seeing
    /// this env's client environment and a loopback mesh; stdin empty.
    pub fn openssh(&self, cfg: &Path) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(cfg)
            .args(["-o", "BatchMode=yes"])
            .envs(self.client_env.iter().map(|(k, v)| (k, v)))
            .env("MYCO_MESH_BIND", self.mesh_bind(None))
            .env("MYCO_PORTMAPPER", "false")
            .stdin(Stdio::null());
        cmd
    }

    /// The session token `user`'s CLI saved.
    pub fn token_of(&self, user: &str) -> String {
        let text = std::fs::read_to_string(self.config_dir(user).join("session.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["token"].as_str().unwrap().to_owned()
    }

    /// A raw HTTP client of the API, for the cases the CLI never sends. It runs in
    /// this process, so it cannot reach a server in another network namespace.
    pub fn http(&self) -> Api {
        assert!(
            self.netns.is_none(),
            "the server runs in another network namespace"
        );
        let mut builder = reqwest::blocking::Client::builder();
        // The CA the env's clients trust, for a coordinator on https.
        if let Some((_, ca)) = self
            .client_env
            .iter()
            .find(|(k, _)| k == "MYCO_CA_CERT_FILE")
        {
            for cert in reqwest::Certificate::from_pem_bundle(&std::fs::read(ca).unwrap()).unwrap()
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        Api {
            base: self.url.clone(),
            client: builder
                .timeout(Duration::from_secs(30))
                // A fresh connection per request: the server drops a connection
                // after refusing an oversized body, and a pooled one would then fail.
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.kill9();
    }
}
