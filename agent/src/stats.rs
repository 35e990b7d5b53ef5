//! The agent's stats, queued for the coordinator every stats interval: traffic,
//! paths and round trips of client mesh connections, open sessions by kind, and the
//! round trip to the coordinator's relay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use iroh::endpoint::{Connection, WeakConnectionHandle};
use mesh::Timestamp;
use mesh::api::{AgentStats, RelayLatency};

use crate::reports::Reports;
use crate::sessions::{SessionCounts, SessionKind};
use crate::{EndpointCell, WelcomeRx};

/// Longest wait for the relay's answer; shorter when the stats interval is.
const RELAY_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Clock skew allowed between coordinator and agent when comparing a ticket's issue
/// time with a revocation: a ticket issued this soon after one is refused too.
const REVOKE_SLACK: Duration = Duration::from_secs(5);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether the ticket was issued before `revoked_at` (plus the skew allowed): its
/// issue time is its expiry less the ticket lifetime.
fn issued_before(claims: &mesh::ticket::TicketClaims, revoked_at: Timestamp) -> bool {
    let issued = claims
        .expires_at
        .unix_millis()
        .saturating_sub(millis(mesh::ticket::LIFETIME));
    issued
        <= revoked_at
            .unix_millis()
            .saturating_add(millis(REVOKE_SLACK))
}

/// What the mesh server tells the stats: connections and sessions.
#[derive(Debug, Default)]
pub(crate) struct MeshActivity {
    connections: Mutex<ConnectionTable>,
    pub sessions: Arc<SessionCounts>,
}

#[derive(Debug, Default)]
struct ConnectionTable {
    next_id: u64,
    open: HashMap<u64, Tracked>,
    /// Bytes of connections that closed.
    closed_rx: u64,
    closed_tx: u64,
    /// Tokens the coordinator revoked, and when: tickets issued under them before
    /// then (give or take clock skew) are refused until they have expired.
    revoked: HashMap<String, Timestamp>,
    /// One task per open connection, waiting for it to close to add its final
    /// counters; owned here, so they end with the agent's `MeshActivity`.
    closing: tokio::task::JoinSet<()>,
}

/// Revoked tokens remembered at once; the oldest are forgotten beyond it (the
/// coordinator revokes a handful at a time, so this is a guard, not a working size).
const MAX_REVOKED: usize = 100_000;

/// The ticket was issued under a token the coordinator has revoked.
#[derive(Debug)]
pub(crate) struct RevokedToken;

/// An open connection, held weakly so tracking never keeps it open.
#[derive(Debug)]
struct Tracked {
    conn: WeakConnectionHandle,
    /// The token its ticket was issued under: what a revocation names.
    token_id: String,
    /// Its counters when last read, used if it goes before its final ones arrive.
    rx: u64,
    tx: u64,
}

/// What the open connections look like now.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ConnectionSnapshot {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub open: u64,
    pub direct: u64,
    pub relayed: u64,
    /// Round trips of the open connections' selected paths.
    pub rtts: Vec<Duration>,
}

impl MeshActivity {
    /// Closes every tracked connection with `code` and `reason`, which clients print.
    pub(crate) fn close_all(&self, code: u32, reason: &str) {
        let open: Vec<Connection> = self
            .table()
            .open
            .values()
            .filter_map(|t| t.conn.upgrade())
            .collect();
        for conn in open {
            conn.close(code.into(), reason.as_bytes());
        }
    }

    /// Closes the connections whose tickets were issued under one of `token_ids`,
    /// and refuses new ones under them while such tickets may still be valid;
    /// returns how many connections closed.
    pub(crate) fn revoke(&self, token_ids: &[String], reason: &str) -> usize {
        let mut table = self.table();
        let now = Timestamp::now();
        let forget_before = Timestamp::from_unix_millis(
            now.unix_millis()
                .saturating_sub(millis(mesh::ticket::LIFETIME + REVOKE_SLACK)),
        );
        table.revoked.retain(|_, at| *at > forget_before);
        for id in token_ids {
            if table.revoked.len() >= MAX_REVOKED {
                break;
            }
            table.revoked.insert(id.clone(), now);
        }
        let open: Vec<Connection> = table
            .open
            .values()
            .filter(|t| token_ids.contains(&t.token_id))
            .filter_map(|t| t.conn.upgrade())
            .collect();
        drop(table);
        for conn in &open {
            conn.close(mesh::alpn::close::REVOKED.into(), reason.as_bytes());
        }
        open.len()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, ConnectionTable> {
        // Plain counters, each update complete: a panic elsewhere cannot corrupt them.
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracks an accepted client connection until it closes; its final counters are
    /// added to the totals then.
    /// Refused when the ticket's token was revoked.
    pub(crate) fn track(
        self: &Arc<Self>,
        conn: &Connection,
        claims: &mesh::ticket::TicketClaims,
    ) -> Result<(), RevokedToken> {
        // The weak handle's future carries the final counters and keeps nothing open.
        let closed = conn.weak_handle().closed();
        let activity = Arc::downgrade(self);
        let mut table = self.table();
        if let Some(at) = table.revoked.get(&claims.token_id)
            && issued_before(claims, *at)
        {
            return Err(RevokedToken);
        }
        table.next_id += 1;
        let id = table.next_id;
        table.open.insert(
            id,
            Tracked {
                conn: conn.weak_handle(),
                token_id: claims.token_id.clone(),
                rx: 0,
                tx: 0,
            },
        );
        // Reap the tasks of connections that closed since the last one opened.
        while table.closing.try_join_next().is_some() {}
        table.closing.spawn(async move {
            let end = closed.await;
            let Some(activity) = activity.upgrade() else {
                return;
            };
            let mut table = activity.table();
            if let Some(t) = table.open.remove(&id) {
                let (rx, tx) = end.map_or((t.rx, t.tx), |c| {
                    (
                        c.stats.udp_rx.bytes.max(t.rx),
                        c.stats.udp_tx.bytes.max(t.tx),
                    )
                });
                table.closed_rx += rx;
                table.closed_tx += tx;
            }
        });
        Ok(())
    }

    pub(crate) fn snapshot(&self) -> ConnectionSnapshot {
        let mut table = self.table();
        let mut snap = ConnectionSnapshot::default();
        for t in table.open.values_mut() {
            if let Some(conn) = t.conn.upgrade() {
                let stats = conn.stats();
                t.rx = stats.udp_rx.bytes;
                t.tx = stats.udp_tx.bytes;
                let paths = conn.paths();
                // A connection can have no path marked selected: iroh keeps path state
                // per remote endpoint id, and of three connections from processes
                // sharing one client key (before `myco` used a key per process) only
                // one was marked. iroh sends over a direct path whenever it holds
                // one, so that one is taken.
                let path = paths
                    .iter()
                    .find(|p| p.is_selected())
                    .or_else(|| paths.iter().find(|p| p.is_ip()))
                    .or_else(|| paths.iter().next());
                if let Some(path) = path {
                    if path.is_relay() {
                        snap.relayed += 1;
                    } else {
                        snap.direct += 1;
                    }
                    snap.rtts.push(path.rtt());
                }
            }
            snap.open += 1;
            snap.rx_bytes += t.rx;
            snap.tx_bytes += t.tx;
        }
        snap.rx_bytes += table.closed_rx;
        snap.tx_bytes += table.closed_tx;
        snap
    }

    /// The stats to send: connections, sessions, and the relay round trips given.
    pub(crate) fn stats(&self, relay_latencies: Vec<RelayLatency>) -> AgentStats {
        let snap = self.snapshot();
        let sessions = &self.sessions;
        AgentStats {
            rx_bytes: snap.rx_bytes,
            tx_bytes: snap.tx_bytes,
            connection_count: snap.open,
            connections_direct: snap.direct,
            connections_relayed: snap.relayed,
            connection_median_latency_ms: median_ms(&snap.rtts),
            session_count_ssh: sessions.get(SessionKind::Ssh),
            session_count_vscode: sessions.get(SessionKind::Vscode),
            session_count_jetbrains: sessions.get(SessionKind::Jetbrains),
            session_count_port_forward: sessions.get(SessionKind::PortForward),
            relay_latencies,
        }
    }
}

/// The median in milliseconds (the mean of the two middle ones for an even count);
/// 0 without any.
pub(crate) fn median_ms(rtts: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = rtts.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    match ms.len() {
        0 => 0.0,
        n if n % 2 == 1 => ms[n / 2],
        n => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
    }
}

/// Every stats interval (the heartbeat interval of the last welcome), gathers the
/// stats and queues them.
pub(crate) async fn run(
    mut welcome: WelcomeRx,
    endpoint: EndpointCell,
    activity: Arc<MeshActivity>,
    reports: Reports,
) {
    let client = match reqwest::Client::builder()
        .use_preconfigured_tls((*trust::get().client_config()).clone())
        .no_proxy()
        .build()
    {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("cannot build an HTTP client; relay latency goes unreported: {e}");
            None
        }
    };
    loop {
        let (interval, relay) = match welcome.wait_for(Option::is_some).await {
            Ok(w) => match w.as_ref() {
                Some(w) => (w.heartbeat_interval, w.relay_url.clone()),
                None => continue,
            },
            Err(_) => return,
        };
        tokio::time::sleep(interval).await;
        let mut relay_latencies = Vec::new();
        if let Some(client) = &client {
            match netcheck::relay_ping(client, &relay, interval.min(RELAY_PING_TIMEOUT)).await {
                Ok(rtt) => {
                    let preferred = endpoint
                        .get()
                        .is_some_and(|ep| ep.endpoint.addr().relay_urls().any(|u| *u == relay));
                    relay_latencies.push(RelayLatency {
                        relay_url: relay.to_string(),
                        latency_ms: rtt.as_secs_f64() * 1000.0,
                        preferred,
                    });
                }
                Err(e) => tracing::debug!(%relay, "relay ping failed: {e}"),
            }
        }
        reports.stats(activity.stats(relay_latencies));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn median_of_round_trips() {
        assert_eq!(median_ms(&[]), 0.0);
        assert_eq!(median_ms(&ms(&[7])), 7.0);
        assert_eq!(median_ms(&ms(&[30, 10, 20])), 20.0);
        assert_eq!(median_ms(&ms(&[40, 10, 20, 30])), 25.0);
    }

    #[test]
    fn stats_count_sessions_by_kind() {
        let activity = MeshActivity::default();
        let _ssh = activity.sessions.open(SessionKind::Ssh);
        let _fwd = activity.sessions.open(SessionKind::PortForward);
        let _fwd2 = activity.sessions.open(SessionKind::PortForward);
        let stats = activity.stats(vec![]);
        assert_eq!(stats.session_count_ssh, 1);
        assert_eq!(stats.session_count_port_forward, 2);
        assert_eq!(stats.session_count_vscode, 0);
        assert_eq!(stats.connection_count, 0);
        assert_eq!(stats.connection_median_latency_ms, 0.0);
    }

    #[test]
    fn a_revocation_refuses_tickets_issued_before_it_only() {
        let key = iroh::SecretKey::from_bytes(&[7; 32]).public();
        let claims = |issued: u64| mesh::ticket::TicketClaims {
            client: key,
            agent: key,
            workspace_id: "w".into(),
            agent_id: "a".into(),
            user: "alice".into(),
            token_id: "t".into(),
            target: "alice/dev.main".into(),
            expires_at: Timestamp::from_unix_millis(issued + millis(mesh::ticket::LIFETIME)),
        };
        let revoked_at = Timestamp::from_unix_millis(1_000_000);
        // Issued before, or within the allowed skew after: refused.
        assert!(issued_before(&claims(900_000), revoked_at));
        assert!(issued_before(&claims(1_004_000), revoked_at));
        // Issued well after (the user was enabled again, logged in anew): accepted.
        assert!(!issued_before(&claims(1_010_000), revoked_at));
    }
}
