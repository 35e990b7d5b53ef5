//! Starting and stopping the coordinator: data dir, store, listener, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::api::{self, AppState, MetricsState};
use crate::ledger::AgentLedger;
use crate::metrics::{CoordinatorMetrics, RelaySources};
use crate::registry::MeshRegistry;
use crate::relay::RelayState;
use crate::status::StatusPolicy;
use crate::store::{Store, StoreError};
use crate::tasks::TaskGroup;

/// The store's file name inside the data dir.
pub const STORE_FILE: &str = "myco.redb";
/// The coordinator's ed25519 key (signs connection tickets) inside the data dir.
pub const SIGNING_KEY_FILE: &str = "coordinator.key";

/// Validated configuration of `myco server`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the HTTP API listens; port 0 picks a free port.
    pub http_address: SocketAddr,
    /// The URL agents and clients are told to use; the listen address when `None`.
    pub access_url: Option<String>,
    /// Holds the store file.
    pub data_dir: PathBuf,
    /// UDP address of QUIC address discovery; port 0 picks a free port.
    pub relay_quic_address: SocketAddr,
    /// UDP address of the second QAD port netcheck compares against.
    pub relay_quic_probe_address: SocketAddr,
    /// The operator's TLS certificate and key (PEM): the HTTP listener (API, control
    /// channel, relay) speaks https with them, and QAD serves them. Without them the
    /// listener is plain HTTP and QAD's certificate is self-signed.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// How often agents heartbeat; they count as disconnected after two missed.
    pub heartbeat_interval: std::time::Duration,
    /// How long a new agent may take to connect before its status is `timeout`;
    /// `None`: it stays `connecting`.
    pub agent_connection_timeout: Option<std::time::Duration>,
    /// A listener of its own for `/metrics`, without authentication.
    pub prometheus_address: Option<SocketAddr>,
    /// What each relay client may send, in bytes a second (0: no limit).
    pub relay_client_bytes_per_second: u64,
    /// HTTP connections served at once (in their request phase; an upgraded
    /// WebSocket no longer counts), and of those from one IP address.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// How long a client has to send a request's headers.
    pub header_read_timeout: std::time::Duration,
    /// How long a request may take, body included, before it is answered `503`.
    pub request_timeout: std::time::Duration,
    /// Login and first-user attempts allowed per source address and per username.
    pub login_limits: crate::throttle::LoginLimits,
    pub quotas: crate::quota::Quotas,
    /// Reverse proxies whose `X-Forwarded-For` names the client (rate limits, logs).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Agent binaries (`myco-linux-ARCH`) to serve beside the running one.
    pub agent_binary_dir: Option<PathBuf>,
    /// Builds the coordinator runs itself at once (0: only external provisioners).
    pub provisioners: usize,
}

/// Why the coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data dir could not be created or made private (0700).
    #[error("cannot create the data dir {path}, or make it private to its owner: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The builds this coordinator was running when it last stopped could not be
    /// failed.
    #[error(transparent)]
    Recover(#[from] crate::store::FinishBuildError),
    /// The coordinator's ticket-signing key could not be loaded or created.
    #[error(transparent)]
    Key(#[from] mesh::identity::IdentityError),
    /// The access URL cannot serve as the relay URL.
    #[error("the access URL {0} cannot be used as the relay URL: {1}")]
    RelayUrl(String, String),
    /// QUIC address discovery could not be set up.
    #[error(transparent)]
    Qad(#[from] crate::qad::QadError),
    /// The HTTP listener could not be bound.
    #[error("cannot listen on {addr}: {source}; pick another --http-address")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The metrics listener could not be bound.
    #[error("cannot listen on {addr}: {source}; pick another --prometheus-address")]
    BindPrometheus {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("{0}")]
    Config(String),
    /// Serving failed.
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// A coordinator with its store open and its listener bound, not yet serving.
pub struct Coordinator {
    store: Arc<Store>,
    qad: Arc<crate::qad::QadServer>,
    relay_quic: crate::qad::QadInfo,
    signing_key: Arc<iroh::SecretKey>,
    relay_url: iroh::RelayUrl,
    listener: tokio::net::TcpListener,
    prometheus: Option<tokio::net::TcpListener>,
    local_addr: SocketAddr,
    heartbeat_interval: std::time::Duration,
    agent_connection_timeout: Option<std::time::Duration>,
    access_url: String,
    store_path: PathBuf,
    relay_limit: crate::relay::RelayClientLimit,
    http_limits: crate::http::HttpLimits,
    request_timeout: std::time::Duration,
    login_limits: crate::throttle::LoginLimits,
    quotas: crate::quota::Quotas,
    /// Needed to create the first user when the listener is not on loopback.
    setup_code: Option<Arc<str>>,
    agent_binary_dir: Option<PathBuf>,
    provisioners: usize,
    data_dir: PathBuf,
    /// The listener's TLS, when the operator gave a certificate.
    tls: Option<(tokio_rustls::TlsAcceptor, crate::tls::TlsReloader)>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("local_addr", &self.local_addr)
            .field("access_url", &self.access_url)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// Creates the data dir (mode 0700), opens the store and binds the listener.
    ///
    /// # Errors
    /// See [`ServerError`]: the data dir, the store (in use by another server, or
    /// unreadable) or the address.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        if config.heartbeat_interval < std::time::Duration::from_secs(1) {
            return Err(ServerError::Config(format!(
                "--heartbeat-interval {:?} is too short; use at least 1s",
                config.heartbeat_interval
            )));
        }
        create_private_dir(&config.data_dir).map_err(|source| ServerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let store_path = config.data_dir.join(STORE_FILE);
        let path = store_path.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .map_err(|e| ServerError::Serve(std::io::Error::other(e)))??;
        let signing_key = mesh::identity::load_or_create(&config.data_dir.join(SIGNING_KEY_FILE))?;
        let listener = tokio::net::TcpListener::bind(config.http_address)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.http_address,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(ServerError::Serve)?;
        let prometheus = match config.prometheus_address {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::BindPrometheus { addr, source })?,
            ),
            None => None,
        };
        // Whoever reaches an empty coordinator first becomes its admin: off loopback,
        // only someone who can read its output may.
        let setup_code = (!config.http_address.ip().is_loopback() && !store.has_users()?)
            .then(|| Arc::from(crate::auth::setup_code()));
        let operator_tls = match (&config.tls_cert, &config.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => None,
        };
        let scheme = if operator_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let access_url = config
            .access_url
            .map(|u| u.trim_end_matches('/').to_owned())
            .unwrap_or_else(|| format!("{scheme}://{local_addr}"));
        let relay_url: iroh::RelayUrl =
            format!("{access_url}/")
                .parse()
                .map_err(|e: iroh::RelayUrlParseError| {
                    ServerError::RelayUrl(access_url.clone(), e.to_string())
                })?;
        let host = relay_url
            .host_str()
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_owned();
        let tls = crate::qad::TlsMaterial::load(
            config.tls_cert.as_deref(),
            config.tls_key.as_deref(),
            &config.data_dir,
            &host,
        )?;
        // One certificate for the HTTP listener and QAD, reloaded for both at once.
        let cert = crate::tls::CurrentCert::new(tls.certified_key()?);
        let https = match operator_tls {
            Some((c, k)) => Some(crate::tls::acceptor(&c, &k, cert.clone())?),
            None => None,
        };
        let qad = crate::qad::start(
            config.relay_quic_address,
            config.relay_quic_probe_address,
            &cert,
        )
        .await?;
        let relay_quic = crate::qad::QadInfo {
            port: qad.addr.port(),
            probe_port: qad.probe_addr.port(),
            cert,
        };
        Ok(Self {
            store: Arc::new(store),
            qad: Arc::new(qad),
            relay_quic,
            signing_key: Arc::new(signing_key),
            relay_url,
            listener,
            prometheus,
            local_addr,
            heartbeat_interval: config.heartbeat_interval,
            agent_connection_timeout: config.agent_connection_timeout,
            access_url,
            store_path,
            relay_limit: crate::relay::RelayClientLimit {
                bytes_per_second: config.relay_client_bytes_per_second,
            },
            http_limits: crate::http::HttpLimits {
                trusted_proxies: config.trusted_proxies.into(),
                max_connections: config.max_connections.max(1),
                max_connections_per_ip: config.max_connections_per_ip.max(1),
                header_read_timeout: config.header_read_timeout,
            },
            request_timeout: config.request_timeout,
            login_limits: config.login_limits,
            quotas: config.quotas,
            setup_code,
            tls: https,
            agent_binary_dir: config.agent_binary_dir,
            provisioners: config.provisioners,
            data_dir: config.data_dir.clone(),
        })
    }

    /// Reads the TLS certificate files again (on SIGHUP), when the listener has TLS.
    pub fn tls_reloader(&self) -> Option<crate::tls::TlsReloader> {
        self.tls.as_ref().map(|(_, r)| r.clone())
    }

    /// `https` when the listener speaks TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The one-time code `myco login --first-user` needs, when the listener is not
    /// on loopback and there is no user yet.
    pub fn setup_code(&self) -> Option<&str> {
        self.setup_code.as_deref()
    }

    /// Where QUIC address discovery listens.
    pub fn relay_quic_addr(&self) -> SocketAddr {
        self.qad.addr
    }

    /// Where the second QAD port, for netcheck's mapping probe, listens.
    pub fn relay_quic_probe_addr(&self) -> SocketAddr {
        self.qad.probe_addr
    }

    /// The public half of the key that signs connection tickets; agents pin it.
    pub fn ticket_key(&self) -> iroh::PublicKey {
        self.signing_key.public()
    }

    pub fn relay_url(&self) -> &iroh::RelayUrl {
        &self.relay_url
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the separate metrics listener is bound, if one was asked for.
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.prometheus.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn access_url(&self) -> &str {
        &self.access_url
    }

    pub fn store_path(&self) -> &std::path::Path {
        &self.store_path
    }

    /// Whether any user exists; on an empty store the operator is told how to make one.
    pub fn has_users(&self) -> Result<bool, StoreError> {
        self.store.has_users()
    }

    /// Serves the API until `shutdown` resolves, then lets requests in flight finish.
    ///
    /// # Errors
    /// [`ServerError::Serve`] when accepting connections fails for good.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let registry = MeshRegistry::default();
        let relay = RelayState::new(registry.clone(), self.store.clone(), self.relay_limit);
        let http_counters = Arc::new(crate::http::HttpCounters::default());
        let metrics = CoordinatorMetrics::new(RelaySources {
            relay: relay.metrics.clone(),
            qad: self.qad.clone(),
            http: http_counters.clone(),
        });
        let policy =
            StatusPolicy::for_heartbeat(self.heartbeat_interval, self.agent_connection_timeout);
        let ledger = AgentLedger::default();
        let state = AppState {
            store: self.store.clone(),
            access_url: self.access_url.clone(),
            relay,
            registry,
            signing_key: self.signing_key.clone(),
            relay_url: self.relay_url.clone(),
            relay_quic: self.relay_quic.clone(),
            qad: self.qad.clone(),
            ledger: ledger.clone(),
            metrics: metrics.clone(),
            heartbeat_interval: self.heartbeat_interval,
            policy,
            throttle: Arc::new(crate::throttle::Throttle::new(
                self.login_limits,
                std::thread::available_parallelism().map_or(1, usize::from),
            )),
            quotas: self.quotas,
            setup_code: self.setup_code.clone(),
            request_timeout: self.request_timeout,
            agent_binaries: crate::api::bootstrap::AgentBinaries::new(
                self.agent_binary_dir.clone(),
            ),
            builds: crate::builds::BuildQueue::default(),
        };
        // Builds this coordinator was running when it last stopped ended with it.
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || crate::builds::recover(&store)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::warn!(
                builds = n,
                "failed the builds that were running when the coordinator stopped"
            ),
            Ok(Err(e)) => return Err(ServerError::Recover(e)),
            Err(e) => tracing::error!("cannot look for interrupted builds: {e}"),
        }
        // Each task below has an owner held here: after the listener drains, the build
        // workers and the ticker are aborted (as a process exit did before), the
        // flusher commits once more, and the rest are stopped and awaited.
        let provisioners =
            crate::builds::spawn(state.clone(), self.provisioners, self.data_dir.clone());
        let ticker = crate::autostop::spawn(state.clone());
        let mut background = TaskGroup::new("the server's background tasks");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        background.spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut flusher = TaskGroup::new("the ledger flusher");
        flusher.spawn(crate::ledger::run_flusher(
            ledger,
            self.store.clone(),
            metrics.clone(),
            stopped(),
        ));
        {
            // The login rate limits forget callers whose budgets refilled.
            let throttle = state.throttle.clone();
            let stop = stopped();
            background.spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
                tokio::select! {
                    () = stop => {}
                    () = async { loop { tick.tick().await; throttle.retain_recent(); } } => {}
                }
            });
        }
        if let Some(listener) = self.prometheus {
            let app = api::prometheus_router(MetricsState {
                metrics: metrics.clone(),
                store: self.store.clone(),
                policy,
            });
            let stop = stopped();
            background.spawn(async move {
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
                {
                    tracing::error!("the metrics listener failed: {e}");
                }
            });
        }
        let app = api::router(state);
        let served = crate::http::serve(
            self.listener,
            app,
            self.http_limits,
            self.tls.map(|(acceptor, _)| acceptor),
            http_counters,
            stopped(),
        )
        .await
        .map_err(ServerError::Serve);
        provisioners.shutdown().await;
        ticker.shutdown().await;
        // The flusher commits once more after the stop, so nothing acknowledged to
        // agents in the last interval is lost.
        flusher.join_all().await;
        background.shutdown().await;
        served
    }
}

/// The data dir holds the store (password hashes, token hashes) and the ticket
/// signing key: 0700 whatever the umask, and narrowed to that when it exists more
/// open (made by hand, or by an older version), with a warning saying so.
fn create_private_dir(path: &std::path::Path) -> std::io::Result<()> {
    if let Some(old) = mesh::identity::private_dir(path)? {
        tracing::warn!(
            path = %path.display(),
            "the data dir was open to other users (mode {old:o}); narrowed it to owner only"
        );
    }
    Ok(())
}
