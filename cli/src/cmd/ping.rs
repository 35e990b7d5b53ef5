//! `myco ping WS[.AGENT]`: round trips over the mesh, saying for each whether it went
//! direct or through the relay, and at the end why the connection is not direct.

use std::time::{Duration, Instant};

use anyhow::Context;
use mesh::WorkspaceRef;

use crate::Globals;
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
    summary(&d, &agent, &rtts, first_pong, &args.mesh);
    d.conn.close(0u32.into(), b"done");
    d.mesh.endpoint.close().await;
    Ok(())
}

fn summary(
    d: &dial::Dialed,
    agent: &str,
    rtts: &[Duration],
    first_pong: Option<Duration>,
    mesh: &MeshArgs,
) {
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
    if !matches!(now, PathKind::Direct(_)) {
        println!("not direct: {}", explain(d, mesh));
    }
}

/// The best explanation we have of why the connection is relayed.
fn explain(d: &dial::Dialed, mesh: &MeshArgs) -> String {
    if mesh.relay_only {
        return "--relay-only was given".into();
    }
    if d.info.agent_addr.ip_addrs().next().is_none() {
        return "the agent published no direct address; it may have no usable network interface or UDP may be blocked on its side".into();
    }
    "no direct UDP path was found between here and the agent: UDP may be blocked on one side, \
     or a NAT maps ports per destination (symmetric NAT); `myco netcheck` on both sides tells which"
        .into()
}
