//! `myco ping WS[.AGENT]`: round trips over the mesh, saying for each whether it went
//! direct or through the relay, and at the end why the connection is not direct.

use std::time::{Duration, Instant};

use anyhow::Context;
use mesh::WorkspaceRef;

use netcheck::Report;

use crate::Globals;
use crate::client::Client;
use crate::dial::{self, MeshArgs, PathKind};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent: [OWNER/]WORKSPACE[.AGENT].
    target: WorkspaceRef,
    /// How many pings (0: until interrupted).
    #[arg(short = 'n', long = "num", default_value_t = 10)]
    num: u64,
    /// Time between pings, e.g. 1s, 200ms.
    #[arg(short, long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Give up on one pong after this long.
    #[arg(short, long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    mesh: MeshArgs,
}

pub async fn run(globals: &Globals, args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut d = dial::dial(globals, &args.target, mesh::alpn::PING, &args.mesh).await?;
    let agent = d.hello.agent.clone();
    let mut rtts = Vec::new();
    let mut seq = 0u64;
    let mut buf = [0u8; 16];
    let mut first_pong: Option<Duration> = None;
    loop {
        if args.num != 0 && seq >= args.num {
            break;
        }
        seq += 1;
        let mut probe = [0u8; 16];
        probe[..8].copy_from_slice(&seq.to_be_bytes());
        let sent = Instant::now();
        let exchange = async {
            d.send.write_all(&probe).await?;
            d.recv.read_exact(&mut buf).await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(args.timeout, exchange).await {
            Ok(Ok(())) => {
                let rtt = sent.elapsed();
                first_pong.get_or_insert(started.elapsed());
                rtts.push(rtt);
                println!(
                    "pong from {agent} via {} in {:.2}ms",
                    dial::current_path(&d.conn),
                    rtt.as_secs_f64() * 1000.0
                );
            }
            Ok(Err(e)) => {
                let why = dial::close_reason(&d.conn).unwrap_or_else(|| e.to_string());
                return Err(anyhow::anyhow!(
                    "connection to {agent} lost after {} pongs: {why}",
                    rtts.len()
                ));
            }
            Err(_) => {
                println!("timeout waiting for pong {seq} from {agent}");
                // The stream is out of step now: a late pong would be read as the next one.
                anyhow::bail!("no pong from {agent} within {:?}", args.timeout);
            }
        }
        if args.num == 0 || seq < args.num {
            tokio::time::sleep(args.interval).await;
        }
    }
    d.send.finish().context("cannot close the ping stream")?;
    summary(&d, &agent, &rtts, first_pong);
    if !matches!(dial::current_path(&d.conn), PathKind::Direct(_)) {
        for why in explain(globals, &d, &args.mesh).await {
            println!("not direct: {why}");
        }
    }
    d.conn.close(0u32.into(), b"done");
    d.mesh.endpoint.close().await;
    Ok(())
}

fn summary(d: &dial::Dialed, agent: &str, rtts: &[Duration], first_pong: Option<Duration>) {
    println!();
    println!("--- {agent} ping statistics ---");
    if let (Some(min), Some(max)) = (rtts.iter().min(), rtts.iter().max()) {
        let avg = rtts.iter().sum::<Duration>() / u32::try_from(rtts.len()).unwrap_or(1);
        println!(
            "{} pongs; rtt min/avg/max {:.2}/{:.2}/{:.2} ms; first pong after {:.0} ms",
            rtts.len(),
            min.as_secs_f64() * 1000.0,
            avg.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0,
            first_pong.unwrap_or_default().as_secs_f64() * 1000.0
        );
    }
    let now = dial::current_path(&d.conn);
    println!("connection: {now}");
    let changes = d.paths.changes();
    if changes.len() <= 1 {
        println!("path changes: none");
    } else {
        let t0 = changes[0].0;
        let steps: Vec<String> = changes
            .iter()
            .enumerate()
            .map(|(i, (t, p))| {
                if i == 0 {
                    p.short().to_owned()
                } else {
                    format!(
                        "{} (+{:.0} ms)",
                        p.short(),
                        t.duration_since(t0).as_secs_f64() * 1000.0
                    )
                }
            })
            .collect();
        println!("path changes: {}", steps.join(" -> "));
    }
}

/// Why the connection is relayed, from this side's network check (run now) and the
/// agent's last one (from the coordinator).
async fn explain(globals: &Globals, d: &dial::Dialed, mesh: &MeshArgs) -> Vec<String> {
    if mesh.relay_only {
        return vec!["--relay-only was given".into()];
    }
    let targets = mesh::endpoint::netcheck_targets(&d.info.relay_url, d.info.relay_quic.as_ref());
    let opts = netcheck::Options {
        timeout: Duration::from_secs(2),
        port_mapping: false,
    };
    let (local, remote) = tokio::join!(
        netcheck::run(&targets, &opts),
        agent_netcheck(globals, &d.info.agent)
    );
    let mut reasons = why_relayed(&local, remote.as_ref().map(|r| &r.report));
    if remote.is_none() {
        reasons.push("the agent has reported no network check (yet)".into());
    }
    if reasons.is_empty() {
        reasons.push(if d.info.agent_addr.ip_addrs().next().is_none() {
            "the agent published no direct address; it may have no usable network interface".into()
        } else {
            "both sides have UDP and neither NAT maps per destination, yet no direct path \
             formed; a firewall between the two may drop UDP"
                .into()
        });
    }
    reasons
}

/// The agent's last network check, if the coordinator has one.
async fn agent_netcheck(globals: &Globals, agent: &str) -> Option<mesh::api::NetcheckResult> {
    // `owner/workspace.agent`, as the coordinator names it in the dial answer
    let r: mesh::WorkspaceRef = agent.parse().ok()?;
    let name = r.agent.as_ref()?;
    let client = Client::authenticated(globals).ok()?;
    let w: mesh::api::Workspace = client.get(&super::workspaces::ws_path(&r)).await.ok()?;
    w.agents.into_iter().find(|a| &a.name == name)?.netcheck
}

/// What in the two network checks stands in the way of a direct path.
pub fn why_relayed(local: &Report, remote: Option<&Report>) -> Vec<String> {
    let mut out = Vec::new();
    if !local.udp {
        out.push(
            "UDP is blocked on this network (no answer from the coordinator's QUIC address \
             discovery over UDP)"
                .to_owned(),
        );
    }
    if remote.is_some_and(|r| !r.udp) {
        out.push("UDP is blocked on the agent's network".to_owned());
    }
    let local_sym = local.mapping_varies_by_dest == Some(true);
    let remote_sym = remote.is_some_and(|r| r.mapping_varies_by_dest == Some(true));
    match (local_sym, remote_sym) {
        (true, true) => out.push(
            "both sides are behind NATs whose mapping varies by destination (symmetric NATs): \
             hole punching cannot work, the relay is the only path"
                .to_owned(),
        ),
        (true, false) => out.push(
            "this machine is behind a NAT whose mapping varies by destination (symmetric NAT)"
                .to_owned(),
        ),
        (false, true) => out.push(
            "the agent is behind a NAT whose mapping varies by destination (symmetric NAT)"
                .to_owned(),
        ),
        (false, false) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(udp: bool, symmetric: Option<bool>) -> Report {
        Report {
            udp,
            ipv4: udp,
            mapping_varies_by_dest: symmetric,
            ..Report::default()
        }
    }

    #[test]
    fn explanations_name_the_side_and_the_cause() {
        let open = report(true, Some(false));
        assert!(why_relayed(&open, Some(&open)).is_empty());
        assert!(why_relayed(&open, None).is_empty());

        let blocked = report(false, None);
        let here = why_relayed(&blocked, Some(&open));
        assert_eq!(here.len(), 1);
        assert!(
            here[0].starts_with("UDP is blocked on this network"),
            "{here:?}"
        );
        let there = why_relayed(&open, Some(&blocked));
        assert_eq!(there, ["UDP is blocked on the agent's network"]);

        let sym = report(true, Some(true));
        assert_eq!(
            why_relayed(&open, Some(&sym)),
            ["the agent is behind a NAT whose mapping varies by destination (symmetric NAT)"]
        );
        assert!(why_relayed(&sym, Some(&open))[0].starts_with("this machine is behind a NAT"));
        assert!(why_relayed(&sym, Some(&sym))[0].contains("both sides"));
    }
}
