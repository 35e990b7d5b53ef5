//! `myco agent`: runs the workspace agent until SIGINT or SIGTERM; its shutdown script
//! runs then, and a second signal cuts it short.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::{ClientArgs, TlsArgs};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "The agent token comes from MYCO_AGENT_TOKEN or --token-file (--token puts it in \
the process list, where every local user can read it); `myco create` prints the exact line to run."
)]
pub struct Args {
    /// URL of the coordinator (`myco server`'s --access-url).
    #[arg(long, env = "MYCO_AGENT_URL")]
    url: Option<String>,
    /// The agent token `myco create` printed. Prefer MYCO_AGENT_TOKEN or --token-file:
    /// on the command line every local user can read it.
    #[arg(long, env = "MYCO_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the agent token from this file (surrounding whitespace trimmed), so it is
    /// in neither the process list nor the agent's environment.
    #[arg(long, env = "MYCO_AGENT_TOKEN_FILE", value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Directory of the agent's keys, made private to its owner (0700) (default:
    /// $XDG_DATA_HOME/myco-agent, i.e. ~/.local/share/myco-agent).
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
    /// The coordinator's ticket key (`myco server` prints it), pinned before the first
    /// connection. Without it the agent pins the key of the first coordinator it
    /// reaches (in DATA_DIR/coordinator.pin) and refuses any other after.
    #[arg(long, env = "MYCO_COORDINATOR_KEY", value_name = "KEY")]
    coordinator_key: Option<iroh::PublicKey>,
    /// Let remote forwards (`ssh -R`) listen on the address the client names, every
    /// interface for `*` or `0.0.0.0` (OpenSSH's `GatewayPorts clientspecified`);
    /// without it they listen on loopback only, whatever the client asks.
    #[arg(long, env = "MYCO_SSH_GATEWAY_PORTS")]
    ssh_gateway_ports: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

/// `top` holds the client flags given before the command (`myco --url U agent`),
/// which the agent has always taken.
pub async fn run(args: Args, top: ClientArgs, token_in_argv: bool) -> anyhow::Result<()> {
    // Before anything secret is read: no other process of this user (the sessions
    // the agent starts included) may read its memory, environment or open files
    // through /proc or ptrace. Commands it starts are dumpable again after exec.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(
            "cannot make the agent non-dumpable; processes of the same user can read its memory: {e}"
        );
    }
    let top = ClientArgs {
        url: args.url.clone(),
        session: crate::SessionArgs {
            tls: args.tls.clone(),
            ..Default::default()
        },
        ..ClientArgs::default()
    }
    .or(top);
    top.session.tls.apply()?;
    let url = top
        .url
        .filter(|u| !u.is_empty())
        .context("no coordinator URL: pass --url or set MYCO_AGENT_URL")?;
    let url = crate::client::normalize_url(&url)?;
    // The agent token goes in the control channel's first request.
    crate::client::check_cleartext(&url)?;
    let token = agent_token(args.token, token_in_argv, args.token_file.as_deref())?;
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
        coordinator_key: args.coordinator_key,
        ssh_gateway_ports: args.ssh_gateway_ports,
    };
    let (shutdown, hurry) = stop_signals()?;
    agent::run(config, shutdown, hurry).await?;
    Ok(())
}

/// The agent token: from `--token-file` (`MYCO_AGENT_TOKEN_FILE`) or `--token`
/// (`MYCO_AGENT_TOKEN`), exactly one of them.
fn agent_token(
    token: Option<String>,
    in_argv: bool,
    token_file: Option<&Path>,
) -> anyhow::Result<String> {
    let token = token.filter(|t| !t.is_empty());
    let name = if in_argv {
        "--token"
    } else {
        "MYCO_AGENT_TOKEN"
    };
    if let Some(path) = token_file {
        if token.is_some() {
            bail!("the agent token is given twice, by --token-file and by {name}; give it one way");
        }
        return read_token_file(path);
    }
    if in_argv {
        tracing::warn!(
            "--token puts the agent token in the process list, where every local user can read it; \
set MYCO_AGENT_TOKEN or use --token-file instead"
        );
    }
    token.context(
        "no agent token: set MYCO_AGENT_TOKEN or pass --token-file (`myco create` prints the token)",
    )
}

/// The token in `path`, without surrounding whitespace.
fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the agent token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!(
            "the agent token file {} is empty; write the token `myco create` printed into it",
            path.display()
        );
    }
    Ok(token.to_owned())
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
    // Owned by the two futures together: the counting stops when both are dropped.
    let counting = Arc::new(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
        async move {
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
        },
    )));
    let reached = |n: u32| {
        let mut count = count.clone();
        let counting = counting.clone();
        async move {
            let _counting = counting;
            // The sender lives as long as the runtime: an error only means it is going.
            let _ = count.wait_for(|c| *c >= n).await;
        }
    };
    Ok((reached(1), reached(2)))
}
