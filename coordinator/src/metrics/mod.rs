//! `/metrics` in Prometheus' text formats (the `prometheus-client` crate): the
//! coordinator's own counters, the relay's traffic, and every agent's status, apps and
//! stats.
//!
//! Architecture Invariant: a scrape takes `now` once, then reads one store snapshot
//! (three range scans, no query per agent) and judges every agent against that one
//! `now`; how long the reading takes cannot change a verdict (Coder's seed bug,
//! ARCHITECTURE.md, decision 7). Scrapes are serialized, so two scrapes never interleave their views.
//!
//! The per-agent families (10k agents give ~130k series) are written here directly in
//! the text syntax both formats share for gauges; prometheus-client's generic encoder
//! took ~150 ms for them at 10k agents, most of it re-checking every label value byte
//! for escapes (BENCHMARKS.md). Between two scrapes most agents change nothing a
//! scrape shows (heartbeats only move connection times), so each family's lines are
//! kept as one block from scrape to scrape: an agent is rendered anew only when its
//! workspace record, its reports or its status changed, a block is built anew only
//! when one of its agents' lines changed (copying the rest from the old block), and
//! the body is the list of blocks, sent without copying them. The coordinator's own
//! metrics, the relay's and the histograms go through prometheus-client's registry,
//! appended after (its OpenMetrics `# EOF` stays last).
//!
//! A scrape ([`CoordinatorMetrics::scrape`]), step by step:
//! 1. takes `now` once;
//! 2. `Store::scrape` reads one snapshot: the count of workspace changes, the workspace
//!    records only if that count moved, then every connection-time and report row,
//!    each table in one range scan, merge-joined by agent id with the agents kept from
//!    the last scrape (`ScrapeCache`, sorted by id). A record whose bytes are those of
//!    last time is not decoded again; an agent's `revision` moves when its workspace
//!    record or its reports changed, never for connection times alone;
//! 3. judges every agent with `status::agent_status` against that `now`;
//! 4. renders anew only the agents whose revision or status changed, and builds anew
//!    only the family blocks (`# HELP`, `# TYPE` and every agent's lines, in id order)
//!    in which one of those agents' lines changed, copying the runs of unchanged
//!    agents between them from the old block at once;
//! 5. answers with `myco_agents_up` (small, written every time), the blocks as they
//!    are (shared `Bytes`) and the registry's families last.
//!
//! What stays between scrapes: the blocks (about one body), per agent its position,
//! its decoded summaries and report bytes, and the workspaces' summaries and bytes. A
//! scrape that fails to read empties what was kept; one that panicked leaves nothing
//! kept behind.
//!
//! Architecture Invariant: `metrics` knows nothing of the HTTP API: it imports nothing
//! from `api` or `error`, and has no routes or handlers. A scrape answers a
//! [`ScrapeBody`] (an `http_body::Body`) or the store's [`StoreError`]; `api` serves
//! `/metrics` on both listeners (`api::diagnostics`), turns a failed scrape into its
//! `ApiError`, and counts requests into [`CoordinatorMetrics::http_request`]. The
//! dependency goes one way: `api` -> `metrics`.
//!
//! Modules: `families` (the per-agent families, `AgentFamily`), `agents` (rendering
//! agents into family blocks kept between scrapes), `text` (the text syntax of one
//! sample), `exposition` ([`Format`] and [`ScrapeBody`]), `relay` (the relay's and the
//! listener's counters).

mod agents;
mod exposition;
mod families;
mod relay;
mod text;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use mesh::Timestamp;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use self::agents::{ScrapeState, encode_agents};
use self::relay::RelayCollector;
use crate::status::StatusPolicy;
use crate::store::{AgentStateBatch, Store, StoreError};

pub use self::exposition::{Format, ScrapeBody};
pub use self::relay::RelaySources;

/// The label of the workspaces-by-state gauge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// Labels of one HTTP request count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route's pattern (`/api/v1/workspaces/{owner}/{name}`), never the raw path,
    /// so the label set stays bounded.
    pub route: String,
    pub code: String,
}

/// The coordinator's metrics; cheap to clone.
#[derive(Clone)]
pub struct CoordinatorMetrics(Arc<Inner>);

impl std::fmt::Debug for CoordinatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorMetrics").finish_non_exhaustive()
    }
}

struct Inner {
    registry: Registry,
    heartbeats: Counter,
    channels_opened: Counter,
    channels_open: Gauge,
    flushes: Counter,
    flushed_records: Counter,
    flush_seconds: Histogram,
    collection_seconds: Histogram,
    http_requests: Family<HttpLabels, Counter>,
    builds_failed: Counter,
    auto_stops: Counter,
    auto_starts: Counter,
    workspaces: Family<StateLabel, Gauge>,
    /// What the last scrape read and rendered; held for the whole scrape, so scrapes
    /// are serialized.
    scrape: Mutex<ScrapeState>,
}

impl CoordinatorMetrics {
    pub fn new(relay: RelaySources) -> Self {
        let mut registry = Registry::with_prefix("myco");
        let heartbeats = Counter::default();
        registry.register(
            "coordinator_heartbeats",
            "Heartbeats received from agents",
            heartbeats.clone(),
        );
        let channels_opened = Counter::default();
        registry.register(
            "coordinator_control_channels_opened",
            "Agent control channels opened",
            channels_opened.clone(),
        );
        let channels_open = Gauge::default();
        registry.register(
            "coordinator_control_channels",
            "Agent control channels open now",
            channels_open.clone(),
        );
        let flushes = Counter::default();
        registry.register(
            "coordinator_agent_state_flushes",
            "Group commits of agent state (one write transaction each)",
            flushes.clone(),
        );
        let flushed_records = Counter::default();
        registry.register(
            "coordinator_agent_state_records",
            "Agent state records and log lines written by group commits",
            flushed_records.clone(),
        );
        let flush_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "coordinator_agent_state_flush_seconds",
            "Duration of one group commit of agent state",
            flush_seconds.clone(),
        );
        let collection_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "agents_collection_seconds",
            "Duration of reading, judging and encoding all agents for one scrape",
            collection_seconds.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status code",
            http_requests.clone(),
        );
        let builds_failed = Counter::default();
        registry.register(
            "workspace_build_failures",
            "Workspace builds that failed: the command failed or timed out, or its provisioner was lost",
            builds_failed.clone(),
        );
        let auto_stops = Counter::default();
        registry.register(
            "workspace_auto_stops",
            "Workspaces stopped by the coordinator: their deadline passed without activity",
            auto_stops.clone(),
        );
        let auto_starts = Counter::default();
        registry.register(
            "workspace_auto_starts",
            "Workspaces started by the coordinator on their auto-start schedule",
            auto_starts.clone(),
        );
        let workspaces = Family::<StateLabel, Gauge>::default();
        registry.register(
            "workspaces",
            "Workspaces by state (as of the schedule ticker's last look, every 2s)",
            workspaces.clone(),
        );
        registry.register_collector(Box::new(RelayCollector(relay)));
        Self(Arc::new(Inner {
            registry,
            heartbeats,
            channels_opened,
            channels_open,
            flushes,
            flushed_records,
            flush_seconds,
            collection_seconds,
            http_requests,
            builds_failed,
            auto_stops,
            auto_starts,
            workspaces,
            scrape: Mutex::new(ScrapeState::default()),
        }))
    }

    pub fn heartbeat(&self) {
        self.0.heartbeats.inc();
    }

    pub fn channel_opened(&self) {
        self.0.channels_opened.inc();
        self.0.channels_open.inc();
    }

    pub fn channel_closed(&self) {
        self.0.channels_open.dec();
    }

    pub fn observe_flush(&self, batch: &AgentStateBatch, took: std::time::Duration) {
        self.0.flushes.inc();
        let lines: usize = batch.logs.iter().map(|(_, l)| l.len()).sum();
        let records = batch.connections.len() + batch.reports.len() + lines;
        self.0.flushed_records.inc_by(records as u64);
        self.0.flush_seconds.observe(took.as_secs_f64());
    }

    pub fn build_failed(&self) {
        self.0.builds_failed.inc();
    }

    pub fn auto_stop(&self) {
        self.0.auto_stops.inc();
    }

    pub fn auto_start(&self) {
        self.0.auto_starts.inc();
    }

    /// Sets the workspaces-by-state gauge; every state is present, 0 when none.
    pub fn workspaces_by_state(
        &self,
        counts: &std::collections::HashMap<mesh::api::WorkspaceState, u64>,
    ) {
        for state in mesh::api::WorkspaceState::ALL {
            let n = counts.get(&state).copied().unwrap_or(0);
            self.0
                .workspaces
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn http_request(&self, labels: HttpLabels) {
        self.0.http_requests.get_or_create(&labels).inc();
    }

    /// One scrape: `now` once, one snapshot, every agent judged, then encoded in the
    /// format the scraper asked for. Blocking (reads the store).
    ///
    /// # Errors
    /// The store could not be read.
    pub fn scrape(
        &self,
        store: &Store,
        policy: &StatusPolicy,
        format: Format,
    ) -> Result<ScrapeBody, StoreError> {
        let mut state = match self.0.scrape.lock() {
            Ok(state) => state,
            Err(poisoned) => {
                // A scrape panicked halfway: what it kept may not match what it sent.
                let mut state = poisoned.into_inner();
                *state = ScrapeState::default();
                self.0.scrape.clear_poison();
                state
            }
        };
        let started = Instant::now();
        let now = Timestamp::now();
        let (mut chunks, done) = encode_agents(&mut state, store, policy, now)?;
        self.0
            .collection_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            agents = done.agents,
            rendered = done.rendered,
            rebuilt = done.rebuilt,
            read = ?done.read,
            judged = ?done.judged,
            took = ?started.elapsed(),
            bytes = chunks.iter().map(Bytes::len).sum::<usize>(),
            "scrape"
        );
        let mut out = String::new();
        let encoded = match format {
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.0.registry)
            }
            Format::Classic => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.0.registry)
            }
        };
        // Writing into a String cannot fail; a failing encoder would be a bug in ours.
        if let Err(e) = encoded {
            tracing::error!("encoding metrics failed: {e}");
        }
        chunks.push(Bytes::from(out));
        Ok(ScrapeBody::new(chunks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AgentRecord, AgentReports, StoredConnection, WorkspaceRecord};
    use mesh::Name;
    use std::time::Duration;

    fn populate(store: &Store, n: usize, last: Timestamp) {
        for i in 0..n {
            let ws = WorkspaceRecord {
                template: None,
                latest_build: None,
                ttl_ms: None,
                activity_bump_ms: None,
                deadline: None,
                autostart: None,
                next_start: None,
                id: format!("w{i}"),
                owner: Name::new("alice").unwrap(),
                name: Name::new(&format!("ws{i}")).unwrap(),
                created_at: Timestamp::from_unix_millis(1),
                agents: vec![AgentRecord {
                    id: format!("a{i}"),
                    name: Name::new("main").unwrap(),
                    created_at: Timestamp::from_unix_millis(1),
                    token_id: format!("t{i}"),
                    apps: vec![],
                    startup_script: None,
                    shutdown_script: None,
                    metadata: vec![],
                    ssh_host_key: None,
                    endpoint_id: None,
                }],
            };
            store.create_workspace(&ws, &[], None).unwrap();
        }
        let batch = AgentStateBatch {
            connections: (0..n)
                .map(|i| {
                    (
                        format!("a{i}"),
                        StoredConnection {
                            first_connected_at: Some(Timestamp::from_unix_millis(1)),
                            last_connected_at: Some(last),
                            disconnected_at: None,
                        },
                    )
                })
                .collect(),
            reports: (0..n)
                .map(|i| (format!("a{i}"), AgentReports::default()))
                .collect(),
            logs: vec![],
        };
        store.write_agent_state(&batch).unwrap();
    }

    fn dummy_metrics() -> CoordinatorMetrics {
        // The relay collector needs a QAD server; scrapes in these tests only look at
        // the agent families, so a registry without it is built by hand.
        let registry = Registry::with_prefix("myco");
        CoordinatorMetrics(Arc::new(Inner {
            registry,
            heartbeats: Counter::default(),
            channels_opened: Counter::default(),
            channels_open: Gauge::default(),
            flushes: Counter::default(),
            flushed_records: Counter::default(),
            flush_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 4)),
            collection_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 4)),
            http_requests: Family::default(),
            builds_failed: Counter::default(),
            auto_stops: Counter::default(),
            auto_starts: Counter::default(),
            workspaces: Family::default(),
            scrape: Mutex::new(ScrapeState::default()),
        }))
    }

    /// Coder's seed bug: with `now` taken per agent, a slow read pushed agents checked
    /// late past the inactive timeout. Every agent here was heard 1 s before the
    /// scrape starts, the timeout is 2 s, and reading takes far longer than the 1 s
    /// margin: every agent must still be connected.
    #[test]
    fn statuses_do_not_change_with_scrape_duration() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        let n = 60;
        let policy = StatusPolicy {
            connection_timeout: None,
            inactive_timeout: Duration::from_secs(2),
        };
        let last = Timestamp::from_unix_millis(Timestamp::now().unix_millis() - 1000);
        populate(&store, n, last);
        store.slow_reads(Duration::from_millis(25));
        let metrics = dummy_metrics();
        let started = Instant::now();
        let out = metrics.scrape(&store, &policy, Format::Classic).unwrap();
        let took = started.elapsed();
        let out = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            took > Duration::from_millis(1500),
            "the slow store must outlast the 1 s margin for this test to mean anything (took {took:?})"
        );
        let connected = out
            .lines()
            .filter(|l| {
                l.starts_with("myco_agents_connections{") && l.contains("status=\"connected\"")
            })
            .count();
        assert_eq!(connected, n, "{out}");
        assert!(
            out.contains("myco_agents_up{username=\"alice\",workspace_name=\"ws0\"} 1"),
            "{out}"
        );
    }
}
