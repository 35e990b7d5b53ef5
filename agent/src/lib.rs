//! The workspace agent (`myco agent`): holds one control channel to the coordinator,
//! publishes its mesh address as it changes, serves the mesh protocols to clients
//! that present a ticket signed by that coordinator, runs the workspace's startup and
//! shutdown scripts, checks the workspace's apps, runs its metadata scripts, and
//! reports all that, with traffic and session stats, on the control channel.
//!
//! Entry point: [`run`]. Architecture Invariant: the agent trusts the coordinator only
//! through the key it announced on the control channel; every mesh connection is
//! checked against a ticket, whatever network path it came by.

mod account;
mod app_health;
mod backoff;
mod control;
mod forward;
mod lifecycle;
mod metadata;
mod netcheck;
mod pin;
mod reports;
mod schedule;
mod script;
mod serve;
mod sessions;
mod sftp;
mod ssh;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh::control::Manifest;
use tokio::sync::watch;

pub use control::ControlError;

/// Validated configuration of `myco agent`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The coordinator's URL.
    pub url: String,
    /// The agent token, as printed by `myco create`.
    pub token: String,
    /// Holds the agent's key.
    pub data_dir: PathBuf,
    /// Bind the mesh's UDP socket here (default: every interface, a random port).
    pub bind_addr: Option<SocketAddr>,
    /// Ask the gateway for a port mapping.
    pub portmapper: bool,
    /// The least time between two network checks.
    pub netcheck_min_interval: Duration,
    /// Close an SSH connection after this long without SSH traffic (None: never).
    pub ssh_idle_timeout: Option<Duration>,
    /// The coordinator's ticket key, pinned up front (`--coordinator-key`); without
    /// it the first welcome's key is pinned.
    pub coordinator_key: Option<iroh::PublicKey>,
    /// Let remote forwards (`ssh -R`) listen where the client asks; otherwise they
    /// listen on loopback only (OpenSSH's `GatewayPorts no`).
    pub ssh_gateway_ports: bool,
}

/// What the coordinator told us on the last control channel, shared with the mesh
/// server and the tasks that run what the manifest asks for.
#[derive(Debug, Clone)]
pub(crate) struct Welcome {
    pub coordinator_key: iroh::PublicKey,
    /// This agent's workspace record id; tickets must name it.
    pub workspace_id: String,
    /// This agent's record id; tickets must name it.
    pub agent_id: String,
    pub agent: String,
    pub relay_url: iroh::RelayUrl,
    /// The coordinator's QUIC address discovery ports, which netcheck probes.
    pub relay_quic: Option<mesh::control::RelayQuic>,
    /// Also the stats interval.
    pub heartbeat_interval: Duration,
    pub manifest: Arc<Manifest>,
}

/// Holds `None` until the first welcome; closed when the control channel gives up.
pub(crate) type WelcomeRx = watch::Receiver<Option<Welcome>>;
/// The mesh endpoint, built on the first welcome and kept across reconnects; netcheck
/// waits for it to be built.
pub(crate) type EndpointCell = Arc<tokio::sync::SetOnce<mesh::endpoint::MeshEndpoint>>;

/// Holds the mesh server from the moment the control channel built the endpoint; [`run`]
/// takes it out at shutdown and awaits it, and dropping it aborts what it serves.
#[derive(Default)]
pub(crate) struct ServerSlot(std::sync::Mutex<Option<serve::MeshServer>>);

impl ServerSlot {
    fn put(&self, server: serve::MeshServer) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(server);
    }

    fn take(&self) -> Option<serve::MeshServer> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The data dir could not be created or made private to its owner (0700).
    #[error("cannot create the agent's data dir {path}, or make it private to its owner: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The key file could not be used.
    #[error(transparent)]
    Identity(#[from] mesh::identity::IdentityError),
    /// The SSH host key could not be loaded or created.
    #[error(transparent)]
    HostKey(#[from] ssh::HostKeyError),
    /// The control channel failed in a way retrying cannot fix.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// How long the last lifecycle changes and script output may take to reach the
/// coordinator once the shutdown script is done.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` resolves or the coordinator refuses its token.
///
/// When `shutdown` resolves the agent runs the shutdown script (bounded by its
/// timeout, or until `hurry` resolves) while the control channel and the mesh stay up,
/// reports the outcome, then stops.
///
/// # Errors
/// [`AgentError`]: an unusable key file, or a token the coordinator refuses.
///
/// # Cancel safety
/// Dropping the future stops the agent at once: its tasks are aborted and its scripts
/// killed, without the shutdown script; resolve `shutdown` for an orderly stop.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
    hurry: impl std::future::Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    // It holds the agent's key and the SSH host key: 0700 whatever the umask, and
    // narrowed to that when it exists more open.
    match mesh::identity::private_dir(&config.data_dir) {
        Ok(None) => {}
        Ok(Some(old)) => tracing::warn!(
            path = %config.data_dir.display(),
            "the data dir was open to other users (mode {old:o}); narrowed it to owner only"
        ),
        Err(source) => {
            return Err(AgentError::DataDir {
                path: config.data_dir.clone(),
                source,
            });
        }
    }
    let key = mesh::identity::load_or_create(&config.data_dir.join("agent.key"))?;
    let host_key = ssh::load_or_create_host_key(&config.data_dir)?;
    tracing::info!(endpoint = %key.public(), "agent identity");
    ssh::set_gateway_ports(config.ssh_gateway_ports);
    let (welcome_tx, welcome) = watch::channel(None);
    let endpoint: EndpointCell = Arc::default();
    let server = ServerSlot::default();
    let reports = reports::Reports::default();
    let activity = Arc::new(stats::MeshActivity::default());
    let netcheck_opts = ::netcheck::Options {
        port_mapping: config.portmapper,
        ..::netcheck::Options::default()
    };
    let netcheck_spacing = config.netcheck_min_interval;
    let control = control::run(
        control::ChannelConfig {
            agent: config,
            host_key,
        },
        key,
        welcome_tx,
        endpoint.clone(),
        &server,
        reports.clone(),
        activity.clone(),
    );
    tokio::pin!(control);
    // Each ends (killing the scripts it runs) when dropped, as the agent stops.
    let startup = AbortOnDrop(tokio::spawn(lifecycle::startup(
        welcome.clone(),
        reports.clone(),
    )));
    let _checks = [
        AbortOnDrop(tokio::spawn(app_health::run(
            welcome.clone(),
            reports.clone(),
        ))),
        AbortOnDrop(tokio::spawn(metadata::run(
            welcome.clone(),
            reports.clone(),
        ))),
        AbortOnDrop(tokio::spawn(stats::run(
            welcome.clone(),
            endpoint.clone(),
            activity.clone(),
            reports.clone(),
        ))),
        AbortOnDrop(tokio::spawn(netcheck::run(
            welcome.clone(),
            endpoint.clone(),
            reports.clone(),
            netcheck_opts,
            netcheck_spacing,
        ))),
    ];
    tokio::pin!(shutdown);
    let stopped = tokio::select! {
        r = &mut control => Some(r.map_err(AgentError::from)),
        () = &mut shutdown => None,
    };
    let result = match stopped {
        Some(result) => result,
        None => {
            drop(startup);
            // The control channel keeps running (and reconnecting) meanwhile, so the
            // coordinator hears how the shutdown went.
            let finish = async {
                lifecycle::shutdown(&welcome, &reports, hurry).await;
                if welcome.borrow().is_some() {
                    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, reports.drained()).await;
                }
            };
            tokio::select! {
                r = &mut control => r.map_err(AgentError::from),
                () = finish => Ok(()),
            }
        }
    };
    if let Some(server) = server.take() {
        // Tell connected clients we are going, and why (`myco ssh` and `myco ssh
        // --stdio` print it), instead of letting them time out; closing waits for
        // peers, so it gets a bound, past which the connections left are aborted.
        activity.close_all(mesh::alpn::close::SHUTDOWN, "the agent is shutting down");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), server.shutdown()).await;
    }
    tracing::info!("agent stopped");
    result
}

/// Aborts a task when dropped: the agent's background work ends with [`run`].
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `work` on one part of the manifest (picked by `part`) from the first welcome
/// on, and starts it over whenever a welcome brings a different part; returns when
/// the control channel gives up.
///
/// # Cancel safety
/// Dropping it drops the `work` under way.
pub(crate) async fn follow_manifest<T, F>(
    mut welcome: WelcomeRx,
    part: fn(&Manifest) -> &T,
    mut work: impl FnMut(T) -> F,
) where
    T: Clone + Default + PartialEq,
    F: std::future::Future<Output = ()>,
{
    loop {
        let current = match welcome.wait_for(Option::is_some).await {
            Ok(w) => w
                .as_ref()
                .map(|w| part(&w.manifest).clone())
                .unwrap_or_default(),
            Err(_) => return,
        };
        let running = work(current.clone());
        let changed =
            welcome.wait_for(|w| w.as_ref().is_some_and(|w| *part(&w.manifest) != current));
        tokio::select! {
            () = running => {}
            changed = changed => if changed.is_err() { return },
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
///
/// # Cancel safety
/// Cancel safe.
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A random fraction in `[0, 1)`, for backoff jitter.
pub(crate) fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}
