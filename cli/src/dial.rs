//! Dialing an agent over the mesh: ask the coordinator for a ticket, bind an endpoint
//! (our key lives in the config dir), connect with the protocol's ALPN, and trade the
//! ticket for the agent's hello. A refusal comes back as the agent's own reason.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use iroh::endpoint::{Connection, ConnectionError, PathEvent, RecvStream, SendStream};
use mesh::control::{AgentHello, ClientHello, ConnectInfo, ConnectRequest};
use mesh::endpoint::{EndpointOptions, MeshEndpoint};
use mesh::{WorkspaceRef, WorkspaceRefError, frame};
use n0_future::StreamExt;

use crate::Globals;
use crate::client::Client;

/// Host aliases written by `config-ssh` look like `myco.WS[.AGENT]`.
/// SSH host aliases look like `myco.WS` or `myco.WS.AGENT`.
pub const HOST_PREFIX: &str = "myco.";

/// Parses a command's target, `[OWNER/]WS[.AGENT]`, or the SSH host alias
/// `myco.WS[.AGENT]` a user may have in mind after `config-ssh`.
///
/// # Errors
/// [`WorkspaceRefError`] when the text is neither.
pub fn parse_target(text: &str) -> Result<WorkspaceRef, WorkspaceRefError> {
    text.strip_prefix(HOST_PREFIX).unwrap_or(text).parse()
}

/// How the user asked to reach the mesh.
#[derive(Debug, Clone, clap::Args)]
pub struct MeshArgs {
    /// Use the relay only, never a direct path.
    #[arg(long)]
    pub relay_only: bool,
    /// Bind the mesh's UDP socket to this address (default: every interface).
    #[arg(long, env = "MYCO_MESH_BIND", value_name = "ADDR")]
    pub mesh_bind: Option<SocketAddr>,
    /// Dial through the relay first and let the direct path form by hole punching
    /// (shows the upgrade; for diagnosis).
    #[arg(long, hide = true)]
    pub relay_first: bool,
    /// A template's stopped workspace is started first (its build's output on
    /// stderr) and then connected to; with this it is refused instead.
    #[arg(long)]
    pub no_start: bool,
}

/// A ticketed connection to an agent, with a record of its path changes.
pub struct Dialed {
    pub mesh: MeshEndpoint,
    pub conn: Connection,
    pub send: SendStream,
    pub recv: RecvStream,
    pub info: ConnectInfo,
    pub hello: AgentHello,
    pub paths: PathLog,
}

/// What path carries the connection now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathKind {
    Direct(String),
    Relay(String),
    Unknown,
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathKind::Direct(a) => write!(f, "direct {a}"),
            PathKind::Relay(u) => write!(f, "relay {u}"),
            PathKind::Unknown => f.write_str("unknown path"),
        }
    }
}

impl PathKind {
    pub fn short(&self) -> &'static str {
        match self {
            PathKind::Direct(_) => "direct",
            PathKind::Relay(_) => "relay",
            PathKind::Unknown => "unknown",
        }
    }
}

fn describe(addr: &iroh::TransportAddr) -> PathKind {
    match addr {
        iroh::TransportAddr::Ip(a) => PathKind::Direct(a.to_string()),
        iroh::TransportAddr::Relay(u) => PathKind::Relay(u.to_string()),
        _ => PathKind::Unknown,
    }
}

/// The path selected now.
pub fn current_path(conn: &Connection) -> PathKind {
    let paths = conn.paths();
    paths
        .iter()
        .find(|p| p.is_selected())
        .map(|p| describe(p.remote_addr()))
        .unwrap_or(PathKind::Unknown)
}

/// Every change of the selected path, with when it happened.
/// The task that follows the connection's path events is the log's: it stops when the
/// last clone is dropped (or the connection's events end).
#[derive(Clone, Default)]
pub struct PathLog {
    log: Arc<Mutex<Vec<(Instant, PathKind)>>>,
    _watcher: Option<Arc<tokio_util::task::AbortOnDropHandle<()>>>,
}

impl PathLog {
    fn watch(conn: &Connection) -> Self {
        let log = Arc::new(Mutex::new(vec![(Instant::now(), current_path(conn))]));
        let mut events = conn.path_events();
        let l = log.clone();
        let watcher = tokio::spawn(async move {
            while let Some(ev) = events.next().await {
                if let PathEvent::Selected { remote_addr, .. } = ev
                    && let Ok(mut v) = l.lock()
                {
                    v.push((Instant::now(), describe(&remote_addr)));
                }
            }
        });
        Self {
            log,
            _watcher: Some(Arc::new(tokio_util::task::AbortOnDropHandle::new(watcher))),
        }
    }

    /// The selected path at connect time, then every change (repeats folded).
    pub fn changes(&self) -> Vec<(Instant, PathKind)> {
        let mut v = self.log.lock().map(|v| v.clone()).unwrap_or_default();
        v.dedup_by(|b, a| a.1.short() == b.1.short());
        v
    }
}

/// The reason an agent gave for closing, if it closed.
pub fn close_reason(conn: &Connection) -> Option<String> {
    match conn.close_reason()? {
        ConnectionError::ApplicationClosed(ac) => {
            Some(String::from_utf8_lossy(&ac.reason).into_owned())
        }
        other => Some(other.to_string()),
    }
}

/// Why the agent ended the connection, if it said (its idle timeout, its shutdown),
/// once its close arrives: it can trail the end of the stream it ended, so this waits
/// for it, a second at most.
pub async fn agent_reason(conn: &Connection) -> Option<String> {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn.closed()).await;
    close_reason(conn).filter(|r| !r.is_empty())
}

/// A ticket for `target`'s agent; when it is not connected yet, the coordinator
/// waits for it up to `wait` seconds (0: answers at once).
async fn connect(
    client: &Client,
    target: &WorkspaceRef,
    key: &iroh::SecretKey,
    wait: u64,
) -> anyhow::Result<ConnectInfo> {
    let owner = target.owner.as_ref().map_or("me", |o| o.as_str());
    client
        .post(
            &format!("/api/v1/workspaces/{owner}/{}/connect", target.workspace),
            &ConnectRequest {
                agent: target.agent.clone(),
                client_id: key.public(),
                wait: (wait > 0).then_some(wait),
            },
        )
        .await
}

/// A template's workspace that is stopped (or failed) is started, one that is
/// building is waited for, with the build's output on stderr; true when either
/// happened or when it was started a moment ago and its agent is yet to connect
/// (`myco create` or `myco start`, then `myco ssh`), false otherwise.
async fn start_if_stopped(
    client: &Client,
    target: &WorkspaceRef,
    no_start: bool,
) -> anyhow::Result<bool> {
    use mesh::api::{Transition, Workspace, WorkspaceState as S};
    let ws_ref = WorkspaceRef {
        agent: None,
        ..target.clone()
    };
    let Ok(ws) = client
        .get::<Workspace>(&crate::cmd::workspaces::ws_path(&ws_ref))
        .await
    else {
        return Ok(false);
    };
    if ws.template.is_none() {
        return Ok(false);
    }
    match ws.state {
        S::Stopped | S::Failed if no_start => bail!(
            "workspace {ws_ref} is {}; start it with `myco start {ws_ref}`, or leave out --no-start",
            ws.state.as_str()
        ),
        S::Stopped | S::Failed => {
            eprintln!(
                "myco: workspace {ws_ref} is {}; starting it",
                ws.state.as_str()
            );
            crate::cmd::lifecycle::transition(client, &ws_ref, Transition::Start, false).await?;
            Ok(true)
        }
        S::Pending | S::Starting => {
            let number = ws.latest_build.as_ref().map_or(0, |b| b.number);
            eprintln!("myco: workspace {ws_ref} is starting (build {number}); waiting");
            let build =
                crate::cmd::lifecycle::follow(client, &ws_ref, number, 0, &mut std::io::stderr())
                    .await?;
            crate::cmd::lifecycle::ended_well(&ws_ref, &build)?;
            Ok(true)
        }
        S::Running => {
            let agent = match &target.agent {
                Some(name) => ws.agents.iter().find(|a| a.name == *name),
                None => ws.agents.first().filter(|_| ws.agents.len() == 1),
            };
            let connected = agent.is_none_or(|a| a.status == mesh::api::AgentStatus::Connected);
            let just_started = ws
                .latest_build
                .as_ref()
                .filter(|b| b.transition == Transition::Start)
                .and_then(|b| b.ended_at)
                .is_some_and(|t| mesh::Timestamp::now().since(t) < AGENT_START_WAIT);
            Ok(!connected && just_started)
        }
        _ => Ok(false),
    }
}

/// How long a started workspace's agent may take to connect.
const AGENT_START_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Asks for a ticket until the freshly started agent is connected.
async fn wait_for_agent(
    client: &Client,
    target: &WorkspaceRef,
    key: &iroh::SecretKey,
) -> anyhow::Result<ConnectInfo> {
    eprintln!("myco: waiting for the agent of {target} to connect");
    let deadline = Instant::now() + AGENT_START_WAIT;
    loop {
        // The coordinator answers the moment the agent is up, or after (its bound
        // of) 20 s: then ask again.
        match connect(client, target, key, 20).await {
            Ok(info) => return Ok(info),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!(
                    "the workspace started, but its agent did not connect in {} s",
                    AGENT_START_WAIT.as_secs()
                )));
            }
            // Not a busy loop when the coordinator answers at once (an older one).
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

pub async fn dial(
    globals: &Globals,
    target: &WorkspaceRef,
    alpn: &[u8],
    args: &MeshArgs,
) -> anyhow::Result<Dialed> {
    let client = Client::authenticated(globals)?;
    // A key of this process's own: the coordinator's ticket names it, so nothing needs
    // to persist, and two `myco` processes of one user (VS Code opens several
    // `myco ssh --stdio` at once) must not be one endpoint id to the mesh, where their
    // connections to the same agent would disturb each other's paths.
    let key = iroh::SecretKey::generate();
    let info = match connect(&client, target, &key, 0).await {
        Ok(info) => info,
        // Not connectable: a template's workspace may be stopped, or starting.
        Err(e) => {
            if !start_if_stopped(&client, target, args.no_start).await? {
                return Err(e);
            }
            wait_for_agent(&client, target, &key).await?
        }
    };
    let mesh = mesh::endpoint::bind(EndpointOptions {
        secret_key: key,
        relay_url: info.relay_url.clone(),
        relay_only: args.relay_only,
        bind_addr: args.mesh_bind,
        portmapper: false,
        alpns: Vec::new(),
        relay_token: None,
        relay_quic: info.relay_quic.clone(),
    })
    .await?;
    let dial_addr = if args.relay_first {
        iroh::EndpointAddr::from_parts(
            info.agent_addr.id,
            info.agent_addr
                .relay_urls()
                .cloned()
                .map(iroh::TransportAddr::Relay),
        )
    } else {
        info.agent_addr.clone()
    };
    mesh.lookup.add_endpoint_info(dial_addr.clone());
    let started = Instant::now();
    let conn = match mesh.endpoint.connect(dial_addr, alpn).await {
        Ok(conn) => conn,
        Err(e) => {
            let e = anyhow::Error::from(e);
            if e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<ConnectionError>(),
                    Some(ConnectionError::TimedOut)
                )
            }) {
                bail!(
                    "cannot connect to agent {}: no answer in {} s, directly or through the relay; \
                     the agent process may be stuck (see its log), or its network may block UDP \
                     and the relay",
                    info.agent,
                    started.elapsed().as_secs()
                );
            }
            return Err(e.context(format!("cannot connect to agent {}", info.agent)));
        }
    };
    let paths = PathLog::watch(&conn);
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .context("cannot open a stream to the agent")?;
    let hello_sent = frame::write(
        &mut send,
        &ClientHello {
            ticket: info.ticket.clone(),
        },
    )
    .await;
    let answer: Result<AgentHello, _> = match hello_sent {
        Ok(()) => frame::read(&mut recv).await,
        Err(e) => Err(e),
    };
    let hello = match answer {
        Ok(h) => h,
        Err(e) => match close_reason(&conn) {
            Some(reason) => bail!("agent {} refused the connection: {reason}", info.agent),
            None => bail!("agent {} broke off the handshake: {e}", info.agent),
        },
    };
    Ok(Dialed {
        mesh,
        conn,
        send,
        recv,
        info,
        hello,
        paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_aliases_parse() {
        let r = parse_target("myco.dev.main").unwrap();
        assert_eq!(r.workspace.as_str(), "dev");
        assert_eq!(r.agent.unwrap().as_str(), "main");
        assert!(parse_target("myco.dev").unwrap().agent.is_none());
        assert!(parse_target("alice/dev").unwrap().owner.is_some());
    }
}
