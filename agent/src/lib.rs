//! The workspace agent (`myco agent`): holds one control channel to the coordinator,
//! publishes its mesh address as it changes, and serves the mesh protocols to clients
//! that present a ticket signed by that coordinator.
//!
//! Entry point: [`run`]. Architecture Invariant: the agent trusts the coordinator only
//! through the key it announced on the control channel; every mesh connection is
//! checked against a ticket, whatever network path it came by.

mod control;
mod forward;
mod serve;
mod sftp;
mod ssh;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

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
}

/// What the coordinator told us on the control channel, shared with the mesh server.
#[derive(Debug, Clone)]
pub(crate) struct Welcome {
    pub coordinator_key: iroh::PublicKey,
    pub agent: String,
}

pub(crate) type SharedWelcome = Arc<RwLock<Option<Welcome>>>;
/// The mesh endpoint, built on the first welcome and kept across reconnects.
pub(crate) type EndpointCell = Arc<tokio::sync::OnceCell<mesh::endpoint::MeshEndpoint>>;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The key file could not be used.
    #[error(transparent)]
    Identity(#[from] mesh::identity::IdentityError),
    /// The SSH host key could not be loaded or created.
    #[error("{0}")]
    HostKey(String),
    /// The control channel failed in a way retrying cannot fix.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Runs the agent until `shutdown` resolves or the coordinator refuses its token.
///
/// # Errors
/// [`AgentError`]: an unusable key file, or a token the coordinator refuses.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let key = mesh::identity::load_or_create(&config.data_dir.join("agent.key"))?;
    let host_key = ssh::load_or_create_host_key(&config.data_dir).map_err(AgentError::HostKey)?;
    tracing::info!(endpoint = %key.public(), "agent identity");
    let welcome: SharedWelcome = Arc::default();
    let endpoint: EndpointCell = Arc::default();
    let result = tokio::select! {
        r = control::run(control::ChannelConfig { agent: config, host_key }, key, welcome, endpoint.clone()) => r.map_err(AgentError::from),
        () = shutdown => Ok(()),
    };
    if let Some(ep) = endpoint.get() {
        // Tell connected clients we are going instead of letting them time out;
        // closing waits for peers, so it gets a bound.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), ep.endpoint.close()).await;
    }
    tracing::info!("agent stopped");
    result
}

/// A random fraction in `[0, 1)`, for backoff jitter.
pub(crate) fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}
