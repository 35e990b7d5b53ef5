//! Messages of the agent's control channel to the coordinator (a WebSocket at
//! `GET /api/v1/agent/control`, authenticated by the agent token), and of the ticket
//! handshake that opens every mesh connection to an agent.

use iroh::{EndpointAddr, EndpointId, PublicKey, RelayUrl};
use serde::{Deserialize, Serialize};

use crate::Name;
use crate::Timestamp;
use crate::api::{
    AgentStats, App, AppHealth, LifecycleState, LogLine, MetadataSpec, MetadataValue, Script,
};

/// Path of the control channel's WebSocket.
pub const CONTROL_PATH: &str = "/api/v1/agent/control";

/// Coordinator -> agent.
// The welcome is large and sent once per channel; the others are few and small, and
// none is held in bulk, so boxing the welcome would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoordinatorMessage {
    /// First message on every control channel: who the agent is and how to reach the mesh.
    Welcome {
        /// Verifies connection tickets. The agent pins it on its first welcome and
        /// refuses a welcome with another one.
        coordinator_key: PublicKey,
        /// The agent's workspace record id, which tickets for it name.
        workspace_id: String,
        /// The agent's record id, which tickets for it name.
        agent_id: String,
        /// Random, new on every channel: the agent signs it with its endpoint key
        /// ([`crate::sign::endpoint_proof`]) to prove the address it announces is its own.
        challenge: String,
        /// The coordinator's relay.
        relay_url: RelayUrl,
        /// `owner/workspace.agent`.
        agent: String,
        /// How often to send [`AgentMessage::Heartbeat`].
        heartbeat_interval_ms: u64,
        /// Where the coordinator answers QUIC address discovery, if it does.
        #[serde(default)]
        relay_quic: Option<RelayQuic>,
        /// The coordinator key's signature over `relay_quic`'s certificate
        /// ([`crate::sign::qad_cert_signature`]), so a renewed certificate is accepted
        /// by an agent that pinned the key.
        #[serde(default)]
        relay_quic_signature: Option<String>,
        /// What the agent should run and check.
        #[serde(default)]
        manifest: Manifest,
    },
    /// Close every mesh connection opened with a ticket issued under one of
    /// `token_ids` (a user disabled or deleted, a token revoked, a logout): the
    /// access those tickets granted is gone. Token ids, not user names, so an agent
    /// learns nothing about other users.
    Revoke {
        /// Public ids of tokens (never their secrets).
        token_ids: Vec<String>,
    },
}

/// The agent's part of its workspace's spec: apps to check, scripts, metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub apps: Vec<App>,
    #[serde(default)]
    pub startup_script: Option<Script>,
    #[serde(default)]
    pub shutdown_script: Option<Script>,
    #[serde(default)]
    pub metadata: Vec<MetadataSpec>,
}

/// One app's new health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppHealthChange {
    pub slug: Name,
    pub health: AppHealth,
}

/// The coordinator's QUIC address discovery port and the certificate to pin for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayQuic {
    pub port: u16,
    /// A second QAD port on the same host: netcheck compares the public address both
    /// ports see to tell whether a NAT maps per destination.
    #[serde(default)]
    pub probe_port: Option<u16>,
    /// DER of the certificate the QAD server presents, hex encoded.
    pub cert_der_hex: String,
}

/// Agent -> coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The agent's mesh address, sent first and again whenever it changes, with
    /// `proof` ([`crate::sign::endpoint_proof`]) that the agent holds `addr.id`'s key:
    /// the coordinator records no address without it.
    Addr { addr: EndpointAddr, proof: String },
    /// Still alive.
    Heartbeat,
    /// The agent's SSH host key (`ssh-ed25519 AAAA...`), sent once per channel.
    HostKey { openssh: String },
    /// The agent's lifecycle changed (and once on every new channel).
    Lifecycle {
        state: LifecycleState,
        changed_at: Timestamp,
    },
    /// Apps whose health changed since the last report, batched (all apps once on
    /// every new channel).
    AppHealth { changes: Vec<AppHealthChange> },
    /// Traffic and session counters, every stats interval.
    Stats { stats: AgentStats },
    /// New results of metadata items, batched.
    Metadata { items: Vec<MetadataValue> },
    /// Startup and shutdown script output, in order, batched.
    Logs { lines: Vec<LogLine> },
    /// A network check, run at start and when the agent's network changes.
    Netcheck { result: crate::api::NetcheckResult },
}

impl AgentMessage {
    /// The message's type, as in its JSON `type`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentMessage::Addr { .. } => "addr",
            AgentMessage::Heartbeat => "heartbeat",
            AgentMessage::HostKey { .. } => "host_key",
            AgentMessage::Lifecycle { .. } => "lifecycle",
            AgentMessage::AppHealth { .. } => "app_health",
            AgentMessage::Stats { .. } => "stats",
            AgentMessage::Metadata { .. } => "metadata",
            AgentMessage::Logs { .. } => "logs",
            AgentMessage::Netcheck { .. } => "netcheck",
        }
    }
}

/// First frame a client sends on a mesh connection to an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientHello {
    pub ticket: String,
}

/// The agent's answer when the ticket is good; a bad ticket closes the connection
/// with [`crate::alpn::close::TICKET_REFUSED`] and the reason instead.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentHello {
    /// `owner/workspace.agent` as the agent knows itself.
    pub agent: String,
    pub endpoint_id: EndpointId,
}

/// Answer of `POST /api/v1/workspaces/{owner}/{name}/connect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectInfo {
    /// `owner/workspace.agent`.
    pub agent: String,
    /// The agent's last published address.
    pub agent_addr: EndpointAddr,
    /// Present to the agent in [`ClientHello`].
    pub ticket: String,
    /// The coordinator's relay, to be used as the client's home relay.
    pub relay_url: RelayUrl,
    /// Its QUIC address discovery, if served.
    #[serde(default)]
    pub relay_quic: Option<RelayQuic>,
    pub expires_at: Timestamp,
    /// The agent's SSH host key as it reported it (OpenSSH format), for clients to pin.
    #[serde(default)]
    pub ssh_host_key: Option<String>,
}

/// Body of `POST /api/v1/workspaces/{owner}/{name}/connect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// Which agent; may be left out when the workspace has one.
    #[serde(default)]
    pub agent: Option<crate::Name>,
    /// The client's endpoint id, which the ticket will name.
    pub client_id: EndpointId,
    /// Seconds to wait for an agent that is not connected yet (a workspace just
    /// started); absent or 0: answer at once. The coordinator bounds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<u64>,
}

/// Which way a speedtest sends its data, seen from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Client to agent.
    Up,
    /// Agent to client.
    Down,
}

/// Second frame of a speedtest connection, after the ticket handshake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpeedtestRequest {
    pub direction: Direction,
    pub duration_ms: u64,
}

/// The agent's count of what it received in an upload test.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpeedtestResult {
    pub bytes: u64,
    pub elapsed_ms: u64,
}

/// What a port-forwarding stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardProtocol {
    /// Raw bytes both ways after the reply: one stream per TCP connection.
    Tcp,
    /// Datagrams both ways, each a `u16` big-endian length and the payload
    /// ([`crate::frame::write_datagram`]): one stream per local UDP source.
    Udp,
}

impl std::fmt::Display for ForwardProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForwardProtocol::Tcp => "tcp",
            ForwardProtocol::Udp => "udp",
        })
    }
}

/// First frame of every stream after the first on a [`crate::alpn::FORWARD`]
/// connection: where the agent should connect (or send datagrams) for this stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRequest {
    pub protocol: ForwardProtocol,
    /// Host as the agent resolves it; clients send `127.0.0.1`.
    pub host: String,
    pub port: u16,
}

/// The agent's answer to a [`ForwardRequest`], sent once it has connected (TCP) or
/// bound its socket (UDP). With an error the agent finishes the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardReply {
    /// Why the agent could not forward, as a sentence for the user.
    #[serde(default)]
    pub error: Option<String>,
}
