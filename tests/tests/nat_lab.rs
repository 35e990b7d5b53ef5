//! Direct or relayed through NATs and firewalls: the real coordinator, agent and
//! clients in the NAT lab's network namespaces (`tests/src/natlab.rs`). Each test
//! needs root (CI runs as root); elsewhere it prints why it skipped. The kinds of NAT
//! and firewall are described with [`tests::natlab::Nat`].
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tests::natlab::{Host, Lab, Nat, Side};

/// Longest wait for a connection that should go direct to do so. In the lab it takes
/// well under a second; the bound only turns a hang into a failure.
const DIRECT_WITHIN: Duration = Duration::from_secs(30);

/// Longest wait, after UDP comes back, for a relayed connection to go direct. A
/// connection's hole punching probes for about 4 s (noq's 9 probes, backing off from
/// 33 ms to 2 s); after that iroh starts a new round when its own direct addresses
/// change, which the periodic net report (every 20-26 s) does once QUIC address
/// discovery answers again, and in any case every 60 s while no direct path is good
/// (`UPGRADE_INTERVAL`). Seen: 16-22 s.
const UPGRADE_WITHIN: Duration = Duration::from_secs(90);

/// A `myco` process in the lab whose stdout lines arrive on a channel and whose
/// stderr goes to a file; killed when dropped.
struct Streaming {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
    started: Instant,
}

impl Streaming {
    fn spawn(lab: &Lab, host: Host, args: &[&str]) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr = lab.env.dir().join(format!("streaming-{n}.err"));
        let started = Instant::now();
        let mut child = lab
            .cmd(host, "alice", args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            stderr,
            started,
        }
    }

    /// The next line before `deadline`; `None` at the deadline or when stdout closed.
    fn next_line(&self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.lines.recv_timeout(left).ok()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pings the agent from the client until a pong goes direct to the agent side's
/// public address (its host's, or its NAT's); returns how long that took from the
/// start of `myco ping`, and prints it with the path of the first pong.
fn expect_direct(lab: &Lab, case: &str) -> Duration {
    let want = format!("via direct {}:", lab.public_ip(Side::Agent));
    let ping = Streaming::spawn(
        lab,
        Host::Client,
        &["ping", "dev", "-n", "0", "-i", "100ms"],
    );
    let deadline = ping.started + DIRECT_WITHIN;
    let mut pongs = Vec::new();
    loop {
        let Some(line) = ping.next_line(deadline) else {
            panic!(
                "{case}: no pong via direct within {DIRECT_WITHIN:?}\npongs: {pongs:#?}\nping's stderr: {}\nagent log:\n{}\n{}",
                ping.stderr(),
                lab.agent_log(),
                lab.conntrack()
            );
        };
        if !line.starts_with("pong from") {
            continue;
        }
        pongs.push(line);
        let line = pongs.last().unwrap();
        if line.contains(&want) {
            let after = ping.started.elapsed();
            eprintln!(
                "NAT lab: {case}: first pong {}; direct after {} ms ({} pongs)",
                path_of(&pongs[0]),
                after.as_millis(),
                pongs.len()
            );
            return after;
        }
        assert!(line.contains("via relay http://"), "{case}: {pongs:#?}");
    }
}

/// The `via ...` part of a pong line.
fn path_of(pong: &str) -> &str {
    pong.split(" in ")
        .next()
        .unwrap_or(pong)
        .split(" via ")
        .nth(1)
        .unwrap_or(pong)
}

/// Pings the agent from the client 40 times, 200 ms apart: each pong must go through
/// the relay and the connection must never change path. The 8 s outlast the hole
/// punching iroh does when the connection opens (about 4 s of probes); where a direct
/// path exists in this lab it forms within a second. Returns ping's output, which
/// ends with its explanation.
fn expect_relayed(lab: &Lab, case: &str) -> String {
    let out = lab
        .run(
            Host::Client,
            "alice",
            &["ping", "dev", "-n", "40", "-i", "200ms"],
        )
        .ok();
    let pongs: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("pong from"))
        .collect();
    assert_eq!(pongs.len(), 40, "{case}: {out:#?}");
    assert!(
        pongs.iter().all(|l| l.contains("via relay http://")),
        "{case}: {out:#?}"
    );
    assert!(
        out.stdout.contains("path changes: none"),
        "{case}: {out:#?}"
    );
    assert!(out.stdout.contains("not direct: "), "{case}: {out:#?}");
    eprintln!("NAT lab: {case}: relayed for all 40 pongs (8 s)");
    out.stdout
}

/// `myco netcheck -o json` in `host`.
fn netcheck(lab: &Lab, host: Host) -> serde_json::Value {
    lab.run(
        host,
        "alice",
        &[
            "netcheck",
            "-o",
            "json",
            "--timeout",
            "2s",
            "--no-port-mapping",
        ],
    )
    .ok()
    .json()
}

#[test]
fn both_public_go_direct() {
    let Some(lab) = Lab::start(Nat::None, Nat::None) else {
        return;
    };
    expect_direct(&lab, "both public");
}

#[test]
fn a_client_behind_an_endpoint_independent_nat_goes_direct() {
    let Some(lab) = Lab::start(Nat::EndpointIndependent, Nat::None) else {
        return;
    };
    expect_direct(&lab, "client behind EIM NAT, agent public");
}

#[test]
fn both_behind_endpoint_independent_nats_go_direct() {
    let Some(lab) = Lab::start(Nat::EndpointIndependent, Nat::EndpointIndependent) else {
        return;
    };
    expect_direct(&lab, "both behind EIM NATs");
}

#[test]
fn a_client_behind_a_symmetric_nat_reaches_a_public_agent() {
    let Some(lab) = Lab::start(Nat::Symmetric, Nat::None) else {
        return;
    };
    expect_direct(&lab, "client behind symmetric NAT, agent public");
}

#[test]
fn a_symmetric_nat_against_an_endpoint_independent_one_is_relayed() {
    let Some(lab) = Lab::start(Nat::Symmetric, Nat::EndpointIndependent) else {
        return;
    };
    let ping = expect_relayed(&lab, "client behind symmetric NAT, agent behind EIM NAT");
    assert!(
        ping.contains(
            "not direct: this machine is behind a NAT whose mapping varies by destination (symmetric NAT)"
        ),
        "{ping}"
    );

    let here = netcheck(&lab, Host::Client);
    assert_eq!(here["udp"], true, "{here:#}");
    assert_eq!(here["behind_nat"], true, "{here:#}");
    assert_eq!(here["mapping_varies_by_dest"], true, "{here:#}");
    assert!(
        here["global_v4"]
            .as_str()
            .unwrap()
            .starts_with("198.18.1.2:"),
        "{here:#}"
    );
    // The agent's NAT keeps one mapping for both of the coordinator's QAD ports.
    let there = wait_agent_netcheck(&lab, "the agent reports its check", |n| !n.is_null());
    assert_eq!(there["report"]["behind_nat"], true, "{there:#}");
    assert_eq!(
        there["report"]["mapping_varies_by_dest"], false,
        "{there:#}"
    );
    assert_eq!(there["report"]["hairpinning"], false, "{there:#}");
}

#[test]
fn udp_blocked_at_the_client_is_relayed() {
    let Some(lab) = Lab::start(Nat::None, Nat::None) else {
        return;
    };
    lab.block_udp(Side::Client);
    let ping = expect_relayed(&lab, "UDP blocked by the client host's firewall");
    assert!(
        ping.contains("not direct: UDP is blocked on this network"),
        "{ping}"
    );
    let r = netcheck(&lab, Host::Client);
    assert_eq!(r["udp"], false, "{r:#}");
    assert_eq!(r["ipv4"], false, "{r:#}");
    assert!(r["global_v4"].is_null(), "{r:#}");
    let reasons: Vec<&str> = r["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["probe"] == "udp_v4")
        .map(|f| f["reason"].as_str().unwrap())
        .collect();
    // Both QAD ports, each with its reason.
    assert_eq!(reasons.len(), 2, "{r:#}");
    // The relay still answers over HTTP (TCP passes).
    assert!(r["relays"][0]["http_ms"].as_f64().is_some(), "{r:#}");
    let text = lab
        .run(
            Host::Client,
            "alice",
            &["netcheck", "--timeout", "2s", "--no-port-mapping"],
        )
        .ok()
        .stdout;
    assert!(text.contains("UDP: no"), "{text}");
}

#[test]
fn an_agent_behind_a_symmetric_nat_reports_it_and_checks_again_when_its_network_changes() {
    let Some(lab) = Lab::start(Nat::None, Nat::Symmetric) else {
        return;
    };
    let first = wait_agent_netcheck(&lab, "the agent reports its check", |n| !n.is_null());
    assert_eq!(first["reason"], "start", "{first:#}");
    let r = &first["report"];
    assert_eq!(r["udp"], true, "{first:#}");
    assert_eq!(r["behind_nat"], true, "{first:#}");
    assert_eq!(r["mapping_varies_by_dest"], true, "{first:#}");
    assert!(
        r["global_v4"].as_str().unwrap().starts_with("198.18.2.2:"),
        "{first:#}"
    );
    let shown = lab.run(Host::Core, "alice", &["show", "dev"]).ok().stdout;
    assert!(
        shown.contains("network: UDP ok, public 198.18.2.2:")
            && shown.contains("NAT maps per destination (symmetric)"),
        "{shown}"
    );
    // The client is public: no NAT, so no hairpinning to speak of.
    let here = netcheck(&lab, Host::Client);
    assert_eq!(here["behind_nat"], false, "{here:#}");
    assert!(here["hairpinning"].is_null(), "{here:#}");

    lab.add_address(Host::Agent, "10.2.0.3/24");
    let again = wait_agent_netcheck(&lab, "the agent checks again", |n| {
        n["reason"] == "network change"
    });
    assert_eq!(again["report"]["mapping_varies_by_dest"], true, "{again:#}");
}

#[test]
fn netcheck_finds_the_port_mapping_protocols_a_gateway_answers() {
    let Some(lab) = Lab::start(Nat::EndpointIndependent, Nat::None) else {
        return;
    };
    let probe = |lab: &Lab| {
        lab.run(
            Host::Client,
            "alice",
            &["netcheck", "-o", "json", "--timeout", "2s"],
        )
        .ok()
        .json()
    };
    let none = probe(&lab);
    assert_eq!(none["upnp"], false, "{none:#}");
    assert_eq!(none["nat_pmp"], false, "{none:#}");
    assert_eq!(none["pcp"], false, "{none:#}");
    if !lab.run_port_mapping_gateway(Side::Client) {
        return;
    }
    let r = probe(&lab);
    // miniupnpd answers UPnP and PCP. To NAT-PMP it answers with an error: it will
    // not map ports on a WAN address in a reserved range (the lab's 198.18/15), and
    // n0's portmapper counts only a good answer.
    assert_eq!(r["upnp"], true, "{r:#}");
    assert_eq!(r["pcp"], true, "{r:#}");
    assert_eq!(r["nat_pmp"], false, "{r:#}");
    let text = lab
        .run(Host::Client, "alice", &["netcheck", "--timeout", "2s"])
        .ok()
        .stdout;
    assert!(
        text.contains("port mapping: UPnP yes, NAT-PMP no, PCP yes"),
        "{text}"
    );
}

#[test]
fn netcheck_finds_hairpinning_when_the_nat_does_it() {
    let Some(lab) = Lab::start(Nat::EndpointIndependent, Nat::None) else {
        return;
    };
    let before = netcheck(&lab, Host::Client);
    assert_eq!(before["behind_nat"], true, "{before:#}");
    assert_eq!(before["mapping_varies_by_dest"], false, "{before:#}");
    assert_eq!(before["hairpinning"], false, "{before:#}");
    lab.enable_hairpin(Side::Client);
    let after = netcheck(&lab, Host::Client);
    assert_eq!(after["hairpinning"], true, "{after:#}");
}

/// Polls `field` of the agent in `myco show -o json` (its stats come every second in
/// the lab) until `done` holds, for at most `within`; returns it.
fn wait_agent(
    lab: &Lab,
    field: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    tests::fixtures::poll_for(within, Duration::from_millis(200), what, || {
        let value = lab.agent_shown()[field].clone();
        if done(&value) {
            Ok(value)
        } else {
            Err(format!("{value:#}\nagent log:\n{}", lab.agent_log()))
        }
    })
}

/// Like [`wait_agent`] for its stats.
fn wait_stats(
    lab: &Lab,
    within: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_agent(lab, "stats", within, what, done)
}

/// Like [`wait_agent`] for its last network check.
fn wait_agent_netcheck(
    lab: &Lab,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_agent(lab, "netcheck", DIRECT_WITHIN, what, done)
}

#[test]
fn a_relayed_ssh_session_goes_direct_when_udp_comes_back() {
    let Some(lab) = Lab::start(Nat::EndpointIndependent, Nat::None) else {
        return;
    };
    lab.block_udp(Side::Client);
    // A command that streams a counter, every 100 ms, until the test creates a file
    // (the namespaces share the file system).
    let stop = lab.env.dir().join("stop");
    let script = format!(
        "i=0; while [ ! -e {} ]; do echo $i; i=$((i+1)); sleep 0.1; done; echo end",
        stop.display()
    );
    let mut ssh = Streaming::spawn(&lab, Host::Client, &["ssh", "dev", "--", &script]);
    let mut lines = Vec::new();
    let next_line = |ssh: &Streaming, lines: &mut Vec<String>| {
        let line = ssh.next_line(Instant::now() + DIRECT_WITHIN);
        assert!(
            line.is_some(),
            "the session stalled: {lines:?} {}",
            ssh.stderr()
        );
        lines.extend(line);
    };
    next_line(&ssh, &mut lines);

    // Its one connection runs through the relay, as the agent sees it.
    let one_conn = |s: &serde_json::Value, kind: &str| {
        s["connection_count"] == 1 && s[kind] == 1 && s["session_count_ssh"] == 1
    };
    wait_stats(&lab, DIRECT_WITHIN, "the session is relayed", |s| {
        one_conn(s, "connections_relayed")
    });
    // UDP comes back well into the session, after the hole punching the connection
    // started with has given up (about 4 s; a path found while it still probes forms
    // within half a second): 80 lines are 8 s.
    while lines.len() < 80 {
        next_line(&ssh, &mut lines);
    }

    lab.unblock_udp(Side::Client);
    let unblocked = Instant::now();
    wait_stats(&lab, UPGRADE_WITHIN, "the session goes direct", |s| {
        one_conn(s, "connections_direct")
    });
    let upgrade = unblocked.elapsed();
    eprintln!(
        "NAT lab: UDP unblocked at the client's NAT 8 s into an SSH session: direct after {} ms",
        upgrade.as_millis()
    );

    // The same session goes on streaming over the direct path, then ends cleanly.
    lines.extend(ssh.lines.try_iter());
    let upgraded_at = lines.len();
    while lines.len() < upgraded_at + 10 {
        next_line(&ssh, &mut lines);
    }
    std::fs::write(&stop, b"").unwrap();
    while let Some(line) = ssh.next_line(Instant::now() + DIRECT_WITHIN) {
        lines.push(line);
    }
    let status = ssh.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", ssh.stderr());
    assert_eq!(lines.last().map(String::as_str), Some("end"), "{lines:?}");
    let counted: Vec<String> = (0..lines.len() - 1).map(|i| i.to_string()).collect();
    assert_eq!(lines[..lines.len() - 1], counted[..], "lines were lost");
}
