//! The NAT lab: network namespaces joined by veth links, with nftables NAT and
//! firewalls between them, in which the real `myco server`, `myco agent` and clients
//! run, so tests can see which path (direct or relayed) the mesh takes through each
//! kind of NAT.
//!
//! ```text
//!           core: routes between the sides; `myco server` on 198.18.0.1 (lo)
//!               side1 198.18.1.1/24                side2 198.18.2.1/24
//!                     |                                  |
//!   client side, no NAT:   host eth0 198.18.1.2/24       agent side likewise,
//!   behind a NAT:          router wan 198.18.1.2/24      with 2 for 1
//!                          router lan 10.1.0.1/24
//!                                 |
//!                          host eth0 10.1.0.2/24
//! ```
//!
//! Every address is made up (198.18.0.0/15 is the benchmark range, 10/8 the LANs) and
//! no namespace has a route anywhere else: nothing in a lab can reach a real host.
//! Namespace names carry the test process's pid and a counter, so tests running in
//! parallel never meet. Dropping a [`Lab`] kills every process left in its namespaces
//! and deletes them, on panic too; a lab whose test process was killed outright is
//! swept by the next lab that starts.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{AgentProc, Output, TestEnv, run_command};

/// The coordinator's address on the lab's "internet".
pub const SERVER_IP: &str = "198.18.0.1";

/// Prefix of every lab namespace's name: `myco-lab-PID-N-ROLE`.
const NETNS_PREFIX: &str = "myco-lab-";

/// The nftables table of a side's UDP block, deleted to lift it.
const UDP_BLOCK_TABLE: &str = "natlab_udp_block";

/// How a side reaches the lab's "internet".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// A public address on the core link: no NAT, no firewall.
    None,
    /// Behind a router that masquerades (`masquerade`): Linux keeps the source port
    /// when it is free, so one inside address and port maps to one outside port
    /// whatever the destination (endpoint-independent mapping); its firewall lets in
    /// only packets of flows the inside started (address-and-port-dependent filtering).
    EndpointIndependent,
    /// Behind a router that masquerades with `fully-random`: every new destination
    /// gets a new random outside port (endpoint-dependent mapping, a symmetric NAT);
    /// the same firewall.
    Symmetric,
}

/// One side of the lab: the client's or the agent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Agent,
}

impl Side {
    fn index(self) -> u8 {
        match self {
            Side::Client => 1,
            Side::Agent => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Agent => "agent",
        }
    }
}

/// A namespace processes run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The "internet" router, where the coordinator runs.
    Core,
    /// The client side's host (behind its router, if it has one).
    Client,
    /// The agent side's host (likewise).
    Agent,
}

/// What one side is made of.
#[derive(Debug)]
struct SideNet {
    nat: Nat,
    host: String,
    router: Option<String>,
}

/// The namespaces of one lab, last made first deleted. Dropping it kills every process
/// still in them (by pid, from `ip netns pids`) and deletes them.
#[derive(Debug, Default)]
struct Namespaces(Vec<String>);

impl Namespaces {
    /// Makes namespace `name`, IPv4 only, with its loopback up.
    fn add(&mut self, name: String) -> String {
        must(Command::new("ip").args(["netns", "add", &name]));
        self.0.push(name.clone());
        // Without IPv6 no link-local address finishes duplicate address detection a
        // couple of seconds after a link comes up, which iroh takes for a major
        // network change (and so probes and hole punches again at a time of the
        // lab's choosing, not the test's).
        in_netns(
            &name,
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
        in_netns(&name, "ip", &["link", "set", "lo", "up"]);
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.iter().rev() {
            remove_netns(ns);
        }
    }
}

/// A coordinator, a workspace `dev` of user `alice` and its agent, each in its place
/// in the lab. The coordinator's heartbeat interval is 1 s, so the agent's stats (its
/// client connections, direct and relayed) are at most a second old.
pub struct Lab {
    // Fields drop in order: the agent, then the server and the temp dir, then the
    // namespaces with whatever still runs in them.
    /// The agent [`Lab::start`] started (none from [`Lab::start_with`] without one).
    pub agent: Option<AgentProc>,
    pub env: TestEnv,
    /// The token of `dev`'s agent.
    pub agent_token: String,
    core: String,
    client: SideNet,
    agent_side: SideNet,
    _namespaces: Namespaces,
}

static LABS: AtomicUsize = AtomicUsize::new(0);

impl Lab {
    /// Builds a lab with the client side and the agent side behind `client` and
    /// `agent`, starts the coordinator in the core and the agent in its host, and
    /// waits until the agent is connected.
    ///
    /// Returns `None`, after printing why, when this process is not root or `ip`
    /// and `nft` are missing; under CI (`CI=true`) missing tools fail the test
    /// instead, as does any failure to build the lab anywhere.
    pub fn start(client: Nat, agent: Nat) -> Option<Lab> {
        Self::start_with(client, agent, &[], &[], true)
    }

    /// Like [`Lab::start`], with more `myco server` arguments and client
    /// environment (a certificate and its CA, say), and the agent started only when
    /// `start_agent` (else the workspace `dev` exists and its token is
    /// [`Lab::agent_token`]).
    pub fn start_with(
        client: Nat,
        agent: Nat,
        server_args: &[&str],
        client_env: &[(&str, &str)],
        start_agent: bool,
    ) -> Option<Lab> {
        if !can_use_namespaces("build the NAT lab") {
            return None;
        }
        sweep_stale_labs();
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NETNS_PREFIX}{}-{n}", std::process::id());
        let mut namespaces = Namespaces::default();
        let core = namespaces.add(format!("{prefix}-core"));
        in_netns(&core, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        // On loopback: this kernel has no dummy interfaces, and the core's routes
        // reach its local addresses from every link.
        in_netns(
            &core,
            "ip",
            &["addr", "add", &format!("{SERVER_IP}/32"), "dev", "lo"],
        );
        let client = build_side(&mut namespaces, &core, &prefix, Side::Client, client);
        let agent_side = build_side(&mut namespaces, &core, &prefix, Side::Agent, agent);

        let mut args = vec!["--heartbeat-interval", "1s"];
        args.extend_from_slice(server_args);
        let mut env = TestEnv::start_in(Some(&core), SERVER_IP, &args);
        env.client_env.extend(
            client_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        env.bootstrap("alice");
        let token = env.create_workspace("alice", "dev");
        let agent = start_agent.then(|| {
            let agent = env.start_agent_in(Some(&agent_side.host), &token);
            env.wait_agent_connected("alice", "dev");
            agent
        });
        Some(Lab {
            agent,
            agent_token: token,
            env,
            core,
            client,
            agent_side,
            _namespaces: namespaces,
        })
    }

    /// The log of the agent [`Lab::start`] started.
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(AgentProc::log).unwrap_or_default()
    }

    /// The namespace of `host`, for commands of any kind (`ip netns exec NS ...`).
    pub fn netns(&self, host: Host) -> &str {
        match host {
            Host::Core => &self.core,
            Host::Client => &self.client.host,
            Host::Agent => &self.agent_side.host,
        }
    }

    fn side(&self, side: Side) -> &SideNet {
        match side {
            Side::Client => &self.client,
            Side::Agent => &self.agent_side,
        }
    }

    /// The kind of NAT `side` is behind.
    pub fn nat(&self, side: Side) -> Nat {
        self.side(side).nat
    }

    /// The address `side` has on the "internet": its host's, or its router's.
    pub fn public_ip(&self, side: Side) -> String {
        format!("198.18.{}.2", side.index())
    }

    /// `myco ARGS` as `user` (with that user's config dir) in `host`'s namespace,
    /// its mesh bound to every IPv4 interface there.
    pub fn cmd(&self, host: Host, user: &str, args: &[&str]) -> Command {
        self.env.cmd_in(Some(self.netns(host)), user, args)
    }

    /// Runs `myco ARGS` as `user` in `host`'s namespace to its end; returns its output.
    pub fn run(&self, host: Host, user: &str, args: &[&str]) -> Output {
        run_command(self.cmd(host, user, args), "")
    }

    /// The agent's JSON in `myco show dev -o json`, asked from the core.
    pub fn agent_shown(&self) -> serde_json::Value {
        self.run(Host::Core, "alice", &["show", "dev", "-o", "json"])
            .ok()
            .json()["agents"][0]
            .clone()
    }

    /// The routers' connection-tracking tables (their NAT mappings), for failure
    /// messages.
    pub fn conntrack(&self) -> String {
        let mut text = String::new();
        for s in [&self.client, &self.agent_side] {
            if let Some(router) = &s.router {
                let out = Command::new("ip")
                    .args(["netns", "exec", router, "cat", "/proc/net/nf_conntrack"])
                    .output();
                let table = out.map_or_else(
                    |e| e.to_string(),
                    |o| String::from_utf8_lossy(&o.stdout).into_owned(),
                );
                text.push_str(&format!("conntrack of {router}:\n{table}"));
            }
        }
        text
    }

    /// Drops every UDP packet at `side`'s edge: in its router's forward path when it
    /// has one (a network's firewall; the host sees silence), else in its host's
    /// input and output (a host firewall; sends fail with EPERM). Loopback is spared.
    /// TCP, and so the coordinator's API and relay, still pass.
    pub fn block_udp(&self, side: Side) {
        let s = self.side(side);
        match &s.router {
            Some(router) => nft(
                router,
                &format!(
                    "table inet {UDP_BLOCK_TABLE} {{
                        chain forward {{
                            type filter hook forward priority filter; policy accept;
                            meta l4proto udp drop
                        }}
                    }}"
                ),
            ),
            None => nft(
                &s.host,
                &format!(
                    "table inet {UDP_BLOCK_TABLE} {{
                        chain input {{
                            type filter hook input priority filter; policy accept;
                            iifname != \"lo\" meta l4proto udp drop
                        }}
                        chain output {{
                            type filter hook output priority filter; policy accept;
                            oifname != \"lo\" meta l4proto udp drop
                        }}
                    }}"
                ),
            ),
        }
    }

    /// Makes `side`'s router hairpin: a packet from inside to the router's own outside
    /// address goes back in to the host (to the same port: the mapping preserves it),
    /// as from the router. Panics on a side without a router.
    pub fn enable_hairpin(&self, side: Side) {
        let s = self.side(side);
        let router = s.router.as_ref().expect("hairpinning needs a NAT router");
        let i = side.index();
        nft(
            router,
            &format!(
                "table ip natlab_hairpin {{
                    chain prerouting {{
                        type nat hook prerouting priority dstnat; policy accept;
                        iifname \"lan\" ip daddr 198.18.{i}.2 dnat to 10.{i}.0.2
                    }}
                    chain postrouting {{
                        type nat hook postrouting priority srcnat; policy accept;
                        oifname \"lan\" ip saddr 10.{i}.0.0/24 masquerade
                    }}
                }}"
            ),
        );
    }

    /// Runs miniupnpd (Debian's `miniupnpd-nftables`, a real UPnP-IGD, NAT-PMP and
    /// PCP gateway) on `side`'s router, answering on its LAN side; it is killed with
    /// the lab. Returns `false`, after printing why, when miniupnpd is not installed
    /// (under CI that fails instead). Panics on a side without a router.
    pub fn run_port_mapping_gateway(&self, side: Side) -> bool {
        let found = Command::new("miniupnpd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "miniupnpd is missing under CI; bash .ci/test installs miniupnpd-nftables"
            );
            eprintln!("skipping: needs `miniupnpd` (Debian package miniupnpd-nftables)");
            return false;
        }
        let s = self.side(side);
        let router = s
            .router
            .as_ref()
            .expect("a port-mapping gateway needs a NAT router");
        // The (empty) chains miniupnpd adds its port forwards to.
        nft(
            router,
            "table inet filter {
                chain miniupnpd {
                }
            }
            table ip nat {
                chain prerouting_miniupnpd {
                }
                chain postrouting_miniupnpd {
                }
            }",
        );
        let i = side.index();
        let dir = self.env.dir();
        let conf = dir.join(format!("miniupnpd-{}.conf", side.name()));
        std::fs::write(
            &conf,
            format!(
                "ext_ifname=wan\nlistening_ip=lan\nhttp_port=0\nenable_natpmp=yes\n\
                 enable_upnp=yes\nsecure_mode=yes\nuuid=3d3cec3a-8cf0-11e0-98ee-00000000000{i}\n\
                 allow 1024-65535 10.{i}.0.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
            ),
        )
        .unwrap();
        let log =
            std::fs::File::create(dir.join(format!("miniupnpd-{}.log", side.name()))).unwrap();
        let pid = dir.join(format!("miniupnpd-{}.pid", side.name()));
        // Runs in the foreground (-d) in the router's namespace; the lab's Drop kills
        // every process left in its namespaces, and this thread reaps it then.
        let mut gateway = Command::new("ip")
            .args(["netns", "exec", router, "miniupnpd", "-d", "-f"])
            .arg(&conf)
            .arg("-P")
            .arg(&pid)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        std::thread::spawn(move || gateway.wait());
        // Ready once it listens for NAT-PMP/PCP (UDP 5351) on the router.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", router, "cat", "/proc/net/udp"])
                .output()
                .unwrap();
            // Port 5351 is 14E7 in /proc/net/udp.
            if String::from_utf8_lossy(&out.stdout).contains(":14E7 ") {
                return true;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "miniupnpd did not start: {}",
                std::fs::read_to_string(dir.join(format!("miniupnpd-{}.log", side.name())))
                    .unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Adds another address to `host`'s interface: a network change, as iroh (and so
    /// the agent) sees it.
    pub fn add_address(&self, host: Host, cidr: &str) {
        in_netns(
            self.netns(host),
            "ip",
            &["addr", "add", cidr, "dev", "eth0"],
        );
    }

    /// Lifts [`Lab::block_udp`].
    pub fn unblock_udp(&self, side: Side) {
        let s = self.side(side);
        let ns = s.router.as_ref().unwrap_or(&s.host);
        in_netns(ns, "nft", &["delete", "table", "inet", UDP_BLOCK_TABLE]);
    }
}

/// Why this process cannot build a lab, if it cannot.
/// Whether this process may make network namespaces (root, with `ip`, `nft` and
/// `sysctl`); when not, prints why, as a skip. Under CI (`CI=true`) a missing tool
/// fails the test instead: `.ci/test` installs them.
pub(crate) fn can_use_namespaces(to: &str) -> bool {
    let Err(why) = prerequisites() else {
        return true;
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true") || why.starts_with("needs root"),
        "cannot {to} under CI: {why}"
    );
    eprintln!("skipping: cannot {to}: {why}");
    false
}

fn prerequisites() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // "Uid:\treal\teffective\tsaved\tfs"
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    if euid != "0" {
        return Err("needs root for network namespaces and nftables".into());
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("sysctl", "procps"),
    ] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Err(format!(
                "needs `{tool}` (Debian package {package}; bash .ci/test installs it)"
            ));
        }
    }
    Ok(())
}

/// Makes one side: a host on the core link (no NAT), or a host behind a router.
fn build_side(
    namespaces: &mut Namespaces,
    core: &str,
    prefix: &str,
    side: Side,
    nat: Nat,
) -> SideNet {
    let i = side.index();
    let core_if = format!("side{i}");
    let core_addr = format!("198.18.{i}.1");
    let public = format!("198.18.{i}.2/24");
    let host = namespaces.add(format!("{prefix}-{}", side.name()));
    if nat == Nat::None {
        veth(core, &core_if, &core_addr, &host, "eth0", &public);
        in_netns(&host, "ip", &["route", "add", "default", "via", &core_addr]);
        return SideNet {
            nat,
            host,
            router: None,
        };
    }
    let router = namespaces.add(format!("{prefix}-{}-nat", side.name()));
    in_netns(&router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    veth(core, &core_if, &core_addr, &router, "wan", &public);
    let gateway = format!("10.{i}.0.1");
    veth(
        &router,
        "lan",
        &gateway,
        &host,
        "eth0",
        &format!("10.{i}.0.2/24"),
    );
    in_netns(
        &router,
        "ip",
        &["route", "add", "default", "via", &core_addr],
    );
    in_netns(&host, "ip", &["route", "add", "default", "via", &gateway]);
    // The input chain matters: a peer's probe that reaches the router before the
    // inside host has sent to that peer would otherwise be accepted as traffic to the
    // router itself, and its connection-tracking entry then holds the outside port, so
    // the inside host's own packet to that peer gets a new port. The mapping would
    // then depend on the destination after all, and two such NATs never punch
    // through. Dropped packets leave no entry, as behind
    // a router whose firewall refuses unsolicited packets (OpenWrt's default).
    let masquerade = match nat {
        Nat::Symmetric => "masquerade fully-random",
        _ => "masquerade",
    };
    nft(
        &router,
        &format!(
            "table ip natlab {{
                chain postrouting {{
                    type nat hook postrouting priority srcnat; policy accept;
                    oifname \"wan\" {masquerade}
                }}
                chain forward {{
                    type filter hook forward priority filter; policy accept;
                    iifname \"wan\" ct state established,related accept
                    iifname \"wan\" drop
                }}
                chain input {{
                    type filter hook input priority filter; policy accept;
                    iifname \"wan\" ct state established,related accept
                    iifname \"wan\" drop
                }}
            }}"
        ),
    );
    SideNet {
        nat,
        host,
        router: Some(router),
    }
}

/// A veth pair from `a`'s `a_if` (address `a_ip`/24) to `b`'s `b_if` (`b_cidr`), up.
fn veth(a: &str, a_if: &str, a_ip: &str, b: &str, b_if: &str, b_cidr: &str) {
    in_netns(
        a,
        "ip",
        &[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
        ],
    );
    in_netns(
        a,
        "ip",
        &["addr", "add", &format!("{a_ip}/24"), "dev", a_if],
    );
    in_netns(b, "ip", &["addr", "add", b_cidr, "dev", b_if]);
    in_netns(a, "ip", &["link", "set", a_if, "up"]);
    in_netns(b, "ip", &["link", "set", b_if, "up"]);
}

/// Runs `program ARGS` in namespace `ns`; panics with its stderr if it fails.
fn in_netns(ns: &str, program: &str, args: &[&str]) {
    must(
        Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args),
    );
}

/// Loads an nftables ruleset in namespace `ns`.
fn nft(ns: &str, ruleset: &str) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "nft", "-f", "-"]);
    let out = run_command(cmd, ruleset);
    assert_eq!(out.code, Some(0), "nft in {ns} failed: {out:#?}\n{ruleset}");
}

pub(crate) fn must(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills every process in `ns` and deletes it; best effort (it runs in `Drop`).
fn remove_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

/// Removes the namespaces of labs whose test process is gone (killed at a timeout,
/// where no `Drop` runs), with the processes left in them.
fn sweep_stale_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove_netns(name);
        }
    }
}
