//! `myco server`: runs the coordinator until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use coordinator::{Coordinator, ServerConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address the HTTP API listens on (port 0 picks a free one).
    #[arg(long, env = "MYCO_HTTP_ADDRESS", default_value = "127.0.0.1:3000")]
    http_address: SocketAddr,

    /// URL agents and clients are told to use (default: http://<listen address>).
    #[arg(long, env = "MYCO_ACCESS_URL")]
    access_url: Option<String>,

    /// Directory of the store and keys, kept private to its owner (0700) (default:
    /// $XDG_DATA_HOME/myco, i.e. ~/.local/share/myco).
    #[arg(long, env = "MYCO_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// UDP address of QUIC address discovery, which tells peers behind NAT their
    /// public address (default: the --http-address IP, port 7842).
    #[arg(long, env = "MYCO_RELAY_QUIC_ADDRESS")]
    relay_quic_address: Option<SocketAddr>,

    /// UDP address of a second QUIC address discovery port: `myco netcheck` compares
    /// the public address both ports see to tell whether a NAT maps per destination
    /// (default: the --relay-quic-address IP and the next port; any free port when
    /// that one is 0).
    #[arg(long, env = "MYCO_RELAY_QUIC_PROBE_ADDRESS")]
    relay_quic_probe_address: Option<SocketAddr>,

    /// TLS certificate chain (PEM): the API, the agents' control channel and the
    /// relay are served over https with it, and QUIC address discovery serves it.
    /// Read again on SIGHUP. Without it the listener speaks plain HTTP and QUIC
    /// address discovery uses a self-signed certificate made in the data dir.
    #[arg(
        long,
        visible_alias = "tls-cert",
        env = "MYCO_TLS_CERT_FILE",
        requires = "tls_key_file"
    )]
    tls_cert_file: Option<PathBuf>,

    /// TLS private key (PEM) for --tls-cert-file.
    #[arg(
        long,
        visible_alias = "tls-key",
        env = "MYCO_TLS_KEY_FILE",
        requires = "tls_cert_file"
    )]
    tls_key_file: Option<PathBuf>,

    /// How often agents heartbeat; an agent unheard for two intervals is shown
    /// disconnected (at least 1s).
    #[arg(long, env = "MYCO_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,

    /// How long a new agent may take to connect before its status is `timeout`
    /// (0 waits forever).
    #[arg(long, env = "MYCO_AGENT_CONNECTION_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    agent_connection_timeout: Duration,

    /// Also serve /metrics, without authentication, on this address (on the API
    /// listener /metrics needs an admin token).
    #[arg(long, env = "MYCO_PROMETHEUS_ADDRESS")]
    prometheus_address: Option<SocketAddr>,

    /// What one relay client may send through the relay, in MiB a second, with a
    /// second's worth as burst (0: no limit). Above it the relay reads the client
    /// no faster, so one client cannot take the relay from the others.
    #[arg(
        long,
        env = "MYCO_RELAY_CLIENT_RATE",
        default_value_t = 100,
        value_name = "MIB_PER_S"
    )]
    relay_client_rate: u64,

    /// HTTP connections served at once while they send a request; more are closed
    /// at once. (A WebSocket, once upgraded, no longer counts.)
    #[arg(long, env = "MYCO_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,

    /// Of --max-connections, how many one IP address may hold.
    #[arg(long, env = "MYCO_MAX_CONNECTIONS_PER_IP", default_value_t = 512)]
    max_connections_per_ip: usize,

    /// How long a client has to send a request's headers before its connection is
    /// closed (so slow clients cannot hold connections).
    #[arg(long, env = "MYCO_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,

    /// How long a request may take, its body included, before it is answered 503.
    #[arg(long, env = "MYCO_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,

    /// Login and first-user attempts allowed from one address (an IPv6 /64) a
    /// minute, as a burst that refills evenly; beyond it: 429 with Retry-After.
    #[arg(long, env = "MYCO_LOGIN_RATE_PER_IP", default_value_t = std::num::NonZeroU32::new(30).unwrap_or(std::num::NonZeroU32::MIN))]
    login_rate_per_ip: std::num::NonZeroU32,

    /// Login attempts allowed for one username a minute, from anywhere.
    #[arg(long, env = "MYCO_LOGIN_RATE_PER_USER", default_value_t = std::num::NonZeroU32::new(10).unwrap_or(std::num::NonZeroU32::MIN))]
    login_rate_per_user: std::num::NonZeroU32,

    /// Quota: workspaces a user who is not an admin may own.
    #[arg(long, env = "MYCO_MAX_WORKSPACES_PER_USER", default_value_t = 100)]
    max_workspaces_per_user: usize,

    /// Quota: agents one workspace may have.
    #[arg(long, env = "MYCO_MAX_AGENTS_PER_WORKSPACE", default_value_t = 64)]
    max_agents_per_workspace: usize,

    /// Reverse proxies in front of the coordinator (addresses or CIDRs, comma
    /// separated, e.g. 127.0.0.1/32): requests through them are attributed to the
    /// client their X-Forwarded-For names (login rate limits, logs), and their own
    /// connections are not held to --max-connections-per-ip. Others' X-Forwarded-For
    /// is ignored.
    #[arg(long, env = "MYCO_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    trusted_proxies: Vec<ipnet::IpNet>,

    /// A directory of agent binaries named myco-linux-ARCH (amd64, arm64, ...) to
    /// serve at /bin/ for the init script, beside the running binary for this
    /// machine's architecture.
    #[arg(long, env = "MYCO_AGENT_BINARY_DIR")]
    agent_binary_dir: Option<PathBuf>,

    /// Workspace builds this coordinator runs itself at once (its templates'
    /// provisioner commands, as the user running it); 0: none, only external
    /// `myco provisioner`s.
    #[arg(long, env = "MYCO_PROVISIONERS", default_value_t = 3)]
    provisioners: usize,

    /// Quota: named API tokens one user may hold.
    #[arg(long, env = "MYCO_MAX_API_TOKENS_PER_USER", default_value_t = 100)]
    max_api_tokens_per_user: usize,
}

/// An address (a /32 or /128) or a CIDR.
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is not an IP address or CIDR, e.g. 127.0.0.1 or 10.0.0.0/8"))
}

/// iroh's customary QUIC address discovery port.
const DEFAULT_QAD_PORT: u16 = 7842;

pub async fn run(args: Args) -> anyhow::Result<()> {
    let access_url = match args.access_url {
        Some(u) => Some(crate::client::normalize_url(&u).context("bad --access-url")?),
        None => None,
    };
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => crate::dirs::xdg_dir("XDG_DATA_HOME", ".local/share", "myco", "--data-dir")?,
    };
    let data_dir = std::path::absolute(&data_dir)
        .with_context(|| format!("bad --data-dir {}", data_dir.display()))?;
    if args.http_address.ip().is_unspecified() && access_url.is_none() {
        bail!(
            "--http-address {} listens on every interface; also pass --access-url with the URL agents and clients should use",
            args.http_address
        );
    }
    let relay_quic_address = args
        .relay_quic_address
        .unwrap_or_else(|| SocketAddr::new(args.http_address.ip(), DEFAULT_QAD_PORT));
    let relay_quic_probe_address = args.relay_quic_probe_address.unwrap_or_else(|| {
        let port = match relay_quic_address.port() {
            0 => 0,
            p => p.wrapping_add(1),
        };
        SocketAddr::new(relay_quic_address.ip(), port)
    });
    let coordinator = Coordinator::bind(ServerConfig {
        http_address: args.http_address,
        access_url,
        data_dir,
        relay_quic_address,
        relay_quic_probe_address,
        tls_cert: args.tls_cert_file,
        tls_key: args.tls_key_file,
        heartbeat_interval: args.heartbeat_interval,
        agent_connection_timeout: (!args.agent_connection_timeout.is_zero())
            .then_some(args.agent_connection_timeout),
        prometheus_address: args.prometheus_address,
        relay_client_bytes_per_second: args.relay_client_rate.saturating_mul(1024 * 1024),
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        header_read_timeout: args.header_read_timeout,
        request_timeout: args.request_timeout,
        login_limits: coordinator::LoginLimits {
            per_ip_per_minute: args.login_rate_per_ip,
            per_user_per_minute: args.login_rate_per_user,
        },
        agent_binary_dir: args.agent_binary_dir,
        provisioners: args.provisioners,
        trusted_proxies: args.trusted_proxies,
        quotas: coordinator::Quotas {
            workspaces_per_user: args.max_workspaces_per_user,
            agents_per_workspace: args.max_agents_per_workspace,
            api_tokens_per_user: args.max_api_tokens_per_user,
        },
    })
    .await?;
    // The handlers go in before the first line: whoever reads "listening" and then
    // sends SIGTERM gets a clean stop, not the default action (death mid-write).
    let shutdown = shutdown_signal()?;
    let url = coordinator.access_url().to_owned();
    println!(
        "myco coordinator listening on {}://{}",
        coordinator.scheme(),
        coordinator.local_addr()
    );
    // Held until the server has stopped: the reloads end with it.
    let _reloads = match coordinator.tls_reloader() {
        Some(reloader) => Some(reload_on_sighup(reloader)?),
        None => None,
    };
    println!("access URL: {url}");
    println!("relay: {}", coordinator.relay_url());
    println!(
        "ticket key (agents pin it; `myco agent --coordinator-key`): {}",
        coordinator.ticket_key()
    );
    println!(
        "QUIC address discovery on udp://{}",
        coordinator.relay_quic_addr()
    );
    println!(
        "second QUIC address discovery port (netcheck) on udp://{}",
        coordinator.relay_quic_probe_addr()
    );
    println!("store: {}", coordinator.store_path().display());
    if let Some(addr) = coordinator.prometheus_addr() {
        println!("metrics on http://{addr}/metrics");
    }
    if !coordinator.has_users()? {
        println!("no users yet; create the first (admin) user with:");
        match coordinator.setup_code() {
            Some(code) => {
                println!("    myco login {url} --first-user --setup-code {code}");
                println!(
                    "(the setup code is asked for because the listener is not on loopback; it changes at every start until the first user exists)"
                );
            }
            None => println!("    myco login {url} --first-user"),
        }
    }
    coordinator.serve(shutdown).await?;
    println!("myco coordinator stopped");
    Ok(())
}

/// Reads the TLS certificate files again on every SIGHUP, for renewals; connections
/// open meanwhile keep going, new ones get the new certificate.
/// The reloading task is the returned handle's: it stops when that is dropped.
fn reload_on_sighup(
    reloader: coordinator::TlsReloader,
) -> anyhow::Result<tokio_util::task::AbortOnDropHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    Ok(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
        async move {
            while hup.recv().await.is_some() {
                match reloader.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Err(e) => tracing::error!("SIGHUP: kept the TLS certificate being served: {e}"),
                }
            }
        },
    )))
}

/// A future that resolves on the first SIGINT or SIGTERM. The handlers are installed
/// before this returns, so a signal sent meanwhile is not lost.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down: finishing requests in flight");
    })
}
