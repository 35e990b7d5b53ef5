//! `myco netcheck`: this machine's network as the mesh sees it, probed against the
//! coordinator's relay and its two QUIC address discovery ports.

use std::fmt::Write as _;
use std::time::Duration;

use ::netcheck::Report;
use mesh::api::NetcheckTargets;

use crate::Globals;
use crate::client::Client;
use crate::output::{self, Format, OutputArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The longest any one probe may take.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Do not ask the gateway whether UPnP, NAT-PMP or PCP answer.
    #[arg(long)]
    no_port_mapping: bool,
    #[command(flatten)]
    output: OutputArgs,
}

pub async fn run(globals: &Globals, args: Args) -> anyhow::Result<()> {
    let client = Client::public(globals)?;
    let report = check(&client, args.timeout, !args.no_port_mapping).await?;
    match args.output.format {
        Format::Json => output::json(&report),
        Format::Table => {
            print!("{}", render(&report));
            Ok(())
        }
    }
}

/// Asks the coordinator what to probe, then probes.
pub async fn check(
    client: &Client,
    timeout: Duration,
    port_mapping: bool,
) -> anyhow::Result<Report> {
    let t: NetcheckTargets = client.get("/api/v1/netcheck").await?;
    let targets = mesh::endpoint::netcheck_targets(&t.relay_url, t.relay_quic.as_ref());
    Ok(::netcheck::run(
        &targets,
        &::netcheck::Options {
            timeout,
            port_mapping,
        },
    )
    .await)
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    }
}

/// The report for people: one line per finding, then the probes that failed.
pub fn render(r: &Report) -> String {
    let mut out = String::from("Report:\n");
    let mut line = |s: String| {
        let _ = writeln!(out, "    * {s}");
    };
    line(format!("UDP: {}", if r.udp { "yes" } else { "no" }));
    let family = |ok: bool, addr: Option<std::net::SocketAddr>, probe: &str| match (ok, addr) {
        (true, Some(a)) => format!("yes, public address {a}"),
        (true, None) => "yes".to_owned(),
        (false, _) => match r.failure(probe) {
            Some(why) => format!("no ({why})"),
            None => "no".to_owned(),
        },
    };
    line(format!(
        "IPv4: {}",
        family(r.ipv4, r.global_v4, ::netcheck::probe::UDP_V4)
    ));
    line(format!(
        "IPv6: {}",
        family(r.ipv6, r.global_v6, ::netcheck::probe::UDP_V6)
    ));
    line(format!("behind NAT: {}", yes_no(r.behind_nat)));
    line(format!(
        "mapping varies by destination: {}",
        yes_no(r.mapping_varies_by_dest)
    ));
    line(format!(
        "hairpinning: {}",
        match (r.behind_nat, r.hairpinning) {
            (Some(false), None) => "not applicable (no NAT)",
            (_, h) => yes_no(h),
        }
    ));
    line(format!(
        "port mapping: UPnP {}, NAT-PMP {}, PCP {}",
        yes_no(r.upnp),
        yes_no(r.nat_pmp),
        yes_no(r.pcp)
    ));
    match &r.preferred_relay {
        Some(url) => line(format!("preferred relay: {url}")),
        None => line("preferred relay: none answered".to_owned()),
    }
    for relay in &r.relays {
        let mut via = Vec::new();
        if let Some(ms) = relay.quic_ms {
            via.push(format!("QUIC {ms:.1} ms"));
        }
        if let Some(ms) = relay.http_ms {
            via.push(format!("HTTP {ms:.1} ms"));
        }
        line(format!(
            "relay {}: {:.1} ms ({})",
            relay.url,
            relay.latency_ms,
            via.join(", ")
        ));
    }
    line(format!("took {} ms", r.took_ms));
    if !r.failures.is_empty() {
        out.push_str("Probes that failed:\n");
        for f in &r.failures {
            let _ = writeln!(out, "    * {}: {}", f.probe, f.reason);
        }
    }
    out
}
