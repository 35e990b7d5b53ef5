//! `/metrics` in Prometheus' text formats (the `prometheus-client` crate): the
//! coordinator's own counters, the relay's traffic, and every agent's status, apps and
//! stats.
//!
//! Architecture Invariant: a scrape takes `now` once, then reads one store snapshot
//! (three range scans, no query per agent) and judges every agent against that one
//! `now`; how long the reading takes cannot change a verdict (Coder's seed bug,
//! DESIGN.md). Scrapes are serialized, so two scrapes never interleave their views.
//!
//! The per-agent families (10k agents give ~130k series) are written here directly in
//! the text syntax both formats share for gauges, each agent's labels rendered once per
//! scrape; prometheus-client's generic encoder took ~150 ms for them at 10k agents,
//! most of it re-checking every label value byte for escapes (BENCHMARKS.md). The
//! coordinator's own metrics, the relay's and the histograms go through
//! prometheus-client's registry, appended after (its OpenMetrics `# EOF` stays last).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mesh::Timestamp;
use mesh::api::{AgentStats, AgentStatus};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::ApiError;
use crate::status::{ConnectionTimes, StatusPolicy, agent_status};
use crate::store::{AgentStateBatch, ScrapeAgent, ScrapeCache, Store};

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
    /// Decoded records of the last scrape; held for the whole scrape, so scrapes are
    /// serialized.
    scrape: Mutex<ScrapeCache>,
}

/// Where the relay's and QAD's own counters come from.
pub struct RelaySources {
    pub relay: Arc<iroh_relay::server::Metrics>,
    pub qad: Arc<crate::qad::QadServer>,
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
            "Duration of reading and judging all agents for one scrape",
            collection_seconds.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status code",
            http_requests.clone(),
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
            scrape: Mutex::new(ScrapeCache::default()),
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
    ) -> Result<String, crate::store::StoreError> {
        let mut cache = self.0.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let now = Timestamp::now();
        let agents = store.scrape(&mut cache)?;
        let statuses: Vec<AgentStatus> = agents
            .iter()
            .map(|a| {
                let times = ConnectionTimes::from_stored(a.agent().created_at, &a.connection);
                agent_status(&times, policy, now)
            })
            .collect();
        let collected = started.elapsed();
        self.0.collection_seconds.observe(collected.as_secs_f64());
        let mut out = String::with_capacity(agents.len() * 1600 + 16 * 1024);
        encode_agents(&agents, &statuses, &mut out);
        tracing::debug!(
            agents = agents.len(),
            ?collected,
            encoded = ?started.elapsed() - collected,
            bytes = out.len(),
            "scrape"
        );
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
        Ok(out)
    }
}

/// The exposition format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0, when the scraper's Accept asks for it (Prometheus does).
    OpenMetrics,
    /// The classic text format 0.0.4 (what `promtool check metrics` lints).
    Classic,
}

impl Format {
    /// Negotiated like the Go client: OpenMetrics only when asked for.
    pub fn from_accept(headers: &HeaderMap) -> Self {
        let asks = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        if asks {
            Self::OpenMetrics
        } else {
            Self::Classic
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// What `/metrics` needs.
#[derive(Clone)]
pub struct MetricsState {
    pub metrics: CoordinatorMetrics,
    pub store: Arc<Store>,
    pub policy: StatusPolicy,
}

/// The router of a `--prometheus-address` listener: `/metrics` and nothing else, no
/// authentication (bind it where only the scraper reaches).
pub fn router(state: MetricsState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_handler))
        .with_state(state)
}

/// `GET /metrics`.
pub async fn metrics_handler(State(state): State<MetricsState>, headers: HeaderMap) -> Response {
    scrape_response(state, &headers).await
}

/// A scrape answered in the format the request asked for.
pub async fn scrape_response(state: MetricsState, headers: &HeaderMap) -> Response {
    let format = Format::from_accept(headers);
    let scraped = tokio::task::spawn_blocking(move || {
        state.metrics.scrape(&state.store, &state.policy, format)
    })
    .await;
    match scraped {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, format.content_type())],
            body,
        )
            .into_response(),
        Ok(Err(e)) => ApiError::from(e).into_response(),
        Err(e) => ApiError::internal("the scrape failed", e.to_string()).into_response(),
    }
}

/// Counts every request by method, matched route and status code.
pub async fn count_requests(
    State(metrics): State<CoordinatorMetrics>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    metrics.http_request(HttpLabels {
        method,
        route,
        code: resp.status().as_u16().to_string(),
    });
    resp
}

/// Writes `s` as a label value: `\\`, `"` and newlines escaped.
fn push_label_value(out: &mut String, s: &str) {
    if s.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
    } else {
        out.push_str(s);
    }
}

/// `# HELP` and `# TYPE` of a gauge family (prometheus-client's help style).
fn gauge_family(out: &mut String, name: &str, help: &str) {
    use std::fmt::Write;
    let _ = write!(out, "# HELP {name} {help}.\n# TYPE {name} gauge\n");
}

/// One sample: `name{labels,extra} value`.
fn sample(out: &mut String, name: &str, labels: &str, extra: &[(&str, &str)], value: f64) {
    use std::fmt::Write;
    out.push_str(name);
    out.push('{');
    out.push_str(labels);
    for (k, v) in extra {
        if !out.ends_with('{') {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        push_label_value(out, v);
        out.push('"');
    }
    out.push_str("} ");
    if value.fract() == 0.0 && value.abs() < 1e15 {
        let _ = write!(out, "{}", value as i64);
    } else {
        let _ = write!(out, "{value}");
    }
    out.push('\n');
}

type Stat = fn(&AgentStats) -> f64;

/// The per-agent `myco_agentstats_*` families.
const AGENT_STATS: [(&str, &str, Stat); 8] = [
    (
        "myco_agentstats_rx_bytes",
        "Bytes the agent received on mesh connections since it started",
        |s| s.rx_bytes as f64,
    ),
    (
        "myco_agentstats_tx_bytes",
        "Bytes the agent sent on mesh connections since it started",
        |s| s.tx_bytes as f64,
    ),
    (
        "myco_agentstats_connections",
        "Mesh connections open on the agent",
        |s| s.connection_count as f64,
    ),
    (
        "myco_agentstats_connection_median_latency_seconds",
        "Median round trip of the agent's mesh connections",
        |s| s.connection_median_latency_ms / 1000.0,
    ),
    (
        "myco_agentstats_session_count_ssh",
        "Open SSH sessions",
        |s| s.session_count_ssh as f64,
    ),
    (
        "myco_agentstats_session_count_vscode",
        "Open VS Code Remote-SSH sessions",
        |s| s.session_count_vscode as f64,
    ),
    (
        "myco_agentstats_session_count_jetbrains",
        "Open JetBrains Gateway sessions",
        |s| s.session_count_jetbrains as f64,
    ),
    (
        "myco_agentstats_session_count_port_forward",
        "Open port-forwarding connections",
        |s| s.session_count_port_forward as f64,
    ),
];

/// Writes every per-agent family for `agents`, judged as `statuses`.
fn encode_agents(agents: &[ScrapeAgent], statuses: &[AgentStatus], out: &mut String) {
    // Each agent's own labels, rendered once.
    let labels: Vec<String> = agents
        .iter()
        .map(|a| {
            let mut l = String::with_capacity(96);
            l.push_str("agent_name=\"");
            push_label_value(&mut l, &a.agent().name);
            l.push_str("\",username=\"");
            push_label_value(&mut l, &a.workspace.owner);
            l.push_str("\",workspace_name=\"");
            push_label_value(&mut l, &a.workspace.name);
            l.push('"');
            l
        })
        .collect();
    // A gone agent's last numbers are not current.
    let stats = |i: usize| {
        (statuses[i] == AgentStatus::Connected)
            .then(|| agents[i].reports.as_ref().and_then(|r| r.stats.as_ref()))
            .flatten()
    };

    let mut up: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for (a, s) in agents.iter().zip(statuses) {
        *up.entry((&a.workspace.owner, &a.workspace.name))
            .or_default() += u64::from(*s == AgentStatus::Connected);
    }
    gauge_family(out, "myco_agents_up", "Connected agents per workspace");
    for ((user, ws), n) in &up {
        sample(
            out,
            "myco_agents_up",
            "",
            &[("username", user), ("workspace_name", ws)],
            *n as f64,
        );
    }

    gauge_family(
        out,
        "myco_agents_connections",
        "Agents by status and lifecycle state (1 per agent)",
    );
    for (i, a) in agents.iter().enumerate() {
        let lifecycle = a
            .reports
            .as_ref()
            .map(|r| r.lifecycle_state)
            .unwrap_or_default();
        sample(
            out,
            "myco_agents_connections",
            &labels[i],
            &[
                ("status", statuses[i].as_str()),
                ("lifecycle_state", lifecycle.as_str()),
            ],
            1.0,
        );
    }

    gauge_family(
        out,
        "myco_agents_apps",
        "Agents' apps by health (1 per app)",
    );
    for (i, a) in agents.iter().enumerate() {
        for app in &a.agent().apps {
            let reported = a
                .reports
                .as_ref()
                .and_then(|r| r.apps_health.get(&app.slug))
                .copied();
            let health = crate::status::app_health(app.healthcheck.is_some(), reported);
            sample(
                out,
                "myco_agents_apps",
                &labels[i],
                &[("app_name", &app.slug), ("health", health.as_str())],
                1.0,
            );
        }
    }

    gauge_family(
        out,
        "myco_agents_connection_latencies_seconds",
        "Connected agents' round trip to each relay",
    );
    for (i, l) in labels.iter().enumerate() {
        for r in stats(i).iter().flat_map(|s| &s.relay_latencies) {
            let preferred = if r.preferred { "true" } else { "false" };
            sample(
                out,
                "myco_agents_connection_latencies_seconds",
                l,
                &[("relay", &r.relay_url), ("preferred", preferred)],
                r.latency_ms / 1000.0,
            );
        }
    }

    for (name, help, get) in AGENT_STATS {
        gauge_family(out, name, help);
        for (i, l) in labels.iter().enumerate() {
            if let Some(s) = stats(i) {
                sample(out, name, l, &[], get(s));
            }
        }
    }
}

struct RelayCollector(RelaySources);

impl std::fmt::Debug for RelayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayCollector").finish_non_exhaustive()
    }
}

impl Collector for RelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = &self.0.relay;
        let counters = [
            (
                "relay_bytes_sent",
                "Bytes the relay sent to clients",
                r.bytes_sent.get(),
            ),
            (
                "relay_bytes_recv",
                "Bytes the relay received from clients",
                r.bytes_recv.get(),
            ),
            (
                "relay_packets_sent",
                "Packets the relay sent to clients",
                r.send_packets_sent.get(),
            ),
            (
                "relay_packets_recv",
                "Packets the relay received from clients",
                r.send_packets_recv.get(),
            ),
            (
                "relay_accepts",
                "Relay client connections accepted",
                r.accepts.get(),
            ),
            (
                "relay_disconnects",
                "Relay client connections ended",
                r.disconnects.get(),
            ),
            (
                "relay_qad_connections",
                "QUIC address discovery connections served",
                self.0.qad.connections(),
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        AgentRecord, AgentReports, AgentStateBatch, StoredConnection, WorkspaceRecord,
    };
    use mesh::Name;
    use std::time::Duration;

    fn populate(store: &Store, n: usize, last: Timestamp) {
        for i in 0..n {
            let ws = WorkspaceRecord {
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
                }],
            };
            store.create_workspace(&ws, &[]).unwrap();
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
            scrape: Mutex::new(ScrapeCache::default()),
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

    #[test]
    fn samples_escape_label_values_and_print_integers_plainly() {
        let mut out = String::new();
        gauge_family(&mut out, "m", "Help");
        sample(
            &mut out,
            "m",
            "a=\"x\"",
            &[("relay", "http://h/\"q\"\\\n")],
            1.0,
        );
        sample(&mut out, "m", "", &[("k", "v")], 0.25);
        assert_eq!(
            out,
            "# HELP m Help.\n# TYPE m gauge\nm{a=\"x\",relay=\"http://h/\\\"q\\\"\\\\\\n\"} 1\nm{k=\"v\"} 0.25\n"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let mut h = HeaderMap::new();
        assert_eq!(Format::from_accept(&h), Format::Classic);
        h.insert(
            header::ACCEPT,
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4"
                .parse()
                .unwrap(),
        );
        assert_eq!(Format::from_accept(&h), Format::OpenMetrics);
    }
}
