//! The per-agent families a scrape writes after `myco_agents_up`: which there are, in
//! which order, their names and help texts, and a `T` per family indexed by them.

use std::ops::{Index, IndexMut};

use mesh::api::AgentStats;

/// A per-agent family. Declared in the order a scrape writes them, which is also
/// their place in [`AgentFamily::ALL`] and in a [`PerFamily`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AgentFamily {
    /// `myco_agents_connections`: one line per agent, its status and lifecycle state.
    Connections,
    /// `myco_agents_apps`: one line per app of the agent, its health.
    Apps,
    /// `myco_agents_connection_latencies_seconds`: a connected agent's round trip to
    /// each relay.
    RelayLatencies,
    /// `myco_agentstats_rx_bytes`: bytes received on mesh connections.
    RxBytes,
    /// `myco_agentstats_tx_bytes`: bytes sent on mesh connections.
    TxBytes,
    /// `myco_agentstats_connections`: mesh connections open.
    MeshConnections,
    /// `myco_agentstats_connection_median_latency_seconds`: their median round trip.
    MedianLatency,
    /// `myco_agentstats_session_count_ssh`: SSH sessions open.
    SshSessions,
    /// `myco_agentstats_session_count_vscode`: VS Code Remote-SSH sessions open.
    VscodeSessions,
    /// `myco_agentstats_session_count_jetbrains`: JetBrains Gateway sessions open.
    JetbrainsSessions,
    /// `myco_agentstats_session_count_port_forward`: port-forwarding connections open.
    PortForwardSessions,
}

/// How many per-agent families there are.
pub(super) const AGENT_FAMILIES: usize = AgentFamily::ALL.len();

// `ALL` lists the families in declaration order, so a family's discriminant is its
// place in `ALL` and in a `PerFamily`.
const _: () = {
    let mut i = 0;
    while i < AGENT_FAMILIES {
        assert!(AgentFamily::ALL[i] as usize == i);
        i += 1;
    }
};

impl AgentFamily {
    /// Every per-agent family, in the order they are written.
    pub(super) const ALL: [Self; 11] = [
        Self::Connections,
        Self::Apps,
        Self::RelayLatencies,
        Self::RxBytes,
        Self::TxBytes,
        Self::MeshConnections,
        Self::MedianLatency,
        Self::SshSessions,
        Self::VscodeSessions,
        Self::JetbrainsSessions,
        Self::PortForwardSessions,
    ];

    pub(super) fn name(self) -> &'static str {
        self.name_and_help().0
    }

    pub(super) fn help(self) -> &'static str {
        self.name_and_help().1
    }

    fn name_and_help(self) -> (&'static str, &'static str) {
        match self {
            Self::Connections => (
                "myco_agents_connections",
                "Agents by status and lifecycle state (1 per agent)",
            ),
            Self::Apps => ("myco_agents_apps", "Agents' apps by health (1 per app)"),
            Self::RelayLatencies => (
                "myco_agents_connection_latencies_seconds",
                "Connected agents' round trip to each relay",
            ),
            Self::RxBytes => (
                "myco_agentstats_rx_bytes",
                "Bytes the agent received on mesh connections since it started",
            ),
            Self::TxBytes => (
                "myco_agentstats_tx_bytes",
                "Bytes the agent sent on mesh connections since it started",
            ),
            Self::MeshConnections => (
                "myco_agentstats_connections",
                "Mesh connections open on the agent",
            ),
            Self::MedianLatency => (
                "myco_agentstats_connection_median_latency_seconds",
                "Median round trip of the agent's mesh connections",
            ),
            Self::SshSessions => ("myco_agentstats_session_count_ssh", "Open SSH sessions"),
            Self::VscodeSessions => (
                "myco_agentstats_session_count_vscode",
                "Open VS Code Remote-SSH sessions",
            ),
            Self::JetbrainsSessions => (
                "myco_agentstats_session_count_jetbrains",
                "Open JetBrains Gateway sessions",
            ),
            Self::PortForwardSessions => (
                "myco_agentstats_session_count_port_forward",
                "Open port-forwarding connections",
            ),
        }
    }

    /// The number of `stats` a `myco_agentstats_*` family shows; `None` for the
    /// families that are not one number of the agent's stats.
    pub(super) fn stat(self, s: &AgentStats) -> Option<f64> {
        match self {
            Self::Connections | Self::Apps | Self::RelayLatencies => None,
            Self::RxBytes => Some(s.rx_bytes as f64),
            Self::TxBytes => Some(s.tx_bytes as f64),
            Self::MeshConnections => Some(s.connection_count as f64),
            Self::MedianLatency => Some(s.connection_median_latency_ms / 1000.0),
            Self::SshSessions => Some(s.session_count_ssh as f64),
            Self::VscodeSessions => Some(s.session_count_vscode as f64),
            Self::JetbrainsSessions => Some(s.session_count_jetbrains as f64),
            Self::PortForwardSessions => Some(s.session_count_port_forward as f64),
        }
    }

    /// The family written just before this one; `None` for the first.
    pub(super) fn previous(self) -> Option<Self> {
        (self as usize).checked_sub(1).map(|i| Self::ALL[i])
    }
}

/// One `T` per per-agent family, indexed by [`AgentFamily`].
#[derive(Debug, Default)]
pub(super) struct PerFamily<T>([T; AGENT_FAMILIES]);

impl<T> Index<AgentFamily> for PerFamily<T> {
    type Output = T;

    fn index(&self, f: AgentFamily) -> &T {
        &self.0[f as usize]
    }
}

impl<T> IndexMut<AgentFamily> for PerFamily<T> {
    fn index_mut(&mut self, f: AgentFamily) -> &mut T {
        &mut self.0[f as usize]
    }
}
