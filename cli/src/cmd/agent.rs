//! `myco agent`: runs the workspace agent until SIGINT or SIGTERM; its shutdown script
//! runs then, and a second signal cuts it short.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use crate::Globals;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "The coordinator URL and agent token come from the global --url and --token, \
or from MYCO_AGENT_URL and MYCO_AGENT_TOKEN; `myco create` prints the exact line to run."
)]
pub struct Args {
    /// Directory of the agent's key (default: $XDG_DATA_HOME/myco-agent, i.e. ~/.local/share/myco-agent).
    #[arg(long, env = "MYCO_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Bind the mesh's UDP socket to this address (default: every interface, a random port).
    #[arg(long, env = "MYCO_MESH_BIND", value_name = "ADDR")]
    mesh_bind: Option<SocketAddr>,
    /// Ask the network's gateway for a port mapping (UPnP, NAT-PMP, PCP).
    #[arg(long, env = "MYCO_PORTMAPPER", default_value_t = true, action = clap::ArgAction::Set)]
    portmapper: bool,
    /// The least time between two network checks; the agent checks at start and when
    /// its addresses change, and reports the result (`myco show`).
    #[arg(long, env = "MYCO_NETCHECK_MIN_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    netcheck_min_interval: std::time::Duration,
    /// Close an SSH connection after this long with no SSH traffic either way, a
    /// command that runs silently included (0, the default: never, as with OpenSSH's
    /// sshd). A client that is gone is noticed without it, by the mesh connection.
    #[arg(long, env = "MYCO_SSH_IDLE_TIMEOUT", default_value = "0", value_parser = humantime::parse_duration)]
    ssh_idle_timeout: std::time::Duration,
    /// Let remote forwards (`ssh -R`) listen on the address the client names, every
    /// interface for `*` or `0.0.0.0` (OpenSSH's `GatewayPorts clientspecified`);
    /// without it they listen on loopback only, whatever the client asks.
    #[arg(long, env = "MYCO_SSH_GATEWAY_PORTS")]
    ssh_gateway_ports: bool,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

pub async fn run(globals: &Globals, args: Args) -> anyhow::Result<()> {
    let url = globals
        .url
        .clone()
        .or_else(|| env_nonempty("MYCO_AGENT_URL"))
        .context("no coordinator URL: pass --url or set MYCO_AGENT_URL")?;
    let url = crate::client::normalize_url(&url)?;
    let token = globals
        .token
        .clone()
        .or_else(|| env_nonempty("MYCO_AGENT_TOKEN"))
        .context(
            "no agent token: pass --token or set MYCO_AGENT_TOKEN (printed by `myco create`)",
        )?;
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => crate::dirs::xdg_dir("XDG_DATA_HOME", ".local/share", "myco-agent", "--data-dir")?,
    };
    let config = agent::AgentConfig {
        url,
        token,
        data_dir,
        bind_addr: args.mesh_bind,
        portmapper: args.portmapper,
        netcheck_min_interval: args.netcheck_min_interval,
        ssh_idle_timeout: (!args.ssh_idle_timeout.is_zero()).then_some(args.ssh_idle_timeout),
        ssh_gateway_ports: args.ssh_gateway_ports,
    };
    let (shutdown, hurry) = stop_signals()?;
    agent::run(config, shutdown, hurry).await?;
    Ok(())
}

/// Two futures: the first SIGTERM or SIGINT resolves the first (the agent stops after
/// its shutdown script), a second one resolves the second (the script is cut short).
/// The handlers are installed before this returns, so no signal is lost meanwhile.
fn stop_signals() -> anyhow::Result<(
    impl std::future::Future<Output = ()>,
    impl std::future::Future<Output = ()>,
)> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let (count_tx, count) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            let n = *count_tx.borrow() + 1;
            if n == 1 {
                tracing::info!(
                    signal = name,
                    "stopping after the shutdown script, if any (send it again to cut the script short)"
                );
            } else {
                tracing::warn!(
                    signal = name,
                    "stopping now: the shutdown script is cut short"
                );
            }
            if count_tx.send(n).is_err() {
                return;
            }
        }
    });
    let reached = |n: u32| {
        let mut count = count.clone();
        async move {
            // The sender lives as long as the runtime: an error only means it is going.
            let _ = count.wait_for(|c| *c >= n).await;
        }
    };
    Ok((reached(1), reached(2)))
}
