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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use mesh::Timestamp;
use mesh::api::{AgentStats, AgentStatus};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ApiError;
use crate::status::{ConnectionTimes, StatusPolicy, agent_status};
use crate::store::{
    AgentStateBatch, AgentSummary, ReportsSummary, ScrapeAgent, ScrapeCache, Store,
    WorkspaceSummary,
};

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

/// What scrapes keep between them.
#[derive(Debug, Default)]
struct ScrapeState {
    agents: ScrapeCache<AgentLines>,
    /// Every per-agent family as last sent.
    families: [FamilyBlock; AGENT_FAMILIES],
    /// The lines of the agents one scrape renders anew, and where each agent's are
    /// (kept only for their buffers).
    fresh_text: String,
    fresh: Vec<Fresh>,
}

/// Where the relay's and QAD's own counters come from.
pub struct RelaySources {
    pub relay: Arc<iroh_relay::server::Metrics>,
    pub qad: Arc<crate::qad::QadServer>,
    /// The HTTP listener's own counters (connections refused over the caps).
    pub http: Arc<crate::http::HttpCounters>,
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
    ) -> Result<ScrapeBody, crate::store::StoreError> {
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

/// A scrape's body: its chunks are sent as they are, so family blocks no agent changed
/// since the last scrape go out again without being copied.
#[derive(Debug, Clone, Default)]
pub struct ScrapeBody {
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    len: usize,
}

impl ScrapeBody {
    fn new(chunks: Vec<Bytes>) -> Self {
        let chunks: VecDeque<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let len = chunks.iter().map(Bytes::len).sum();
        Self { chunks, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole body in one buffer (a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        out
    }
}

impl http_body::Body for ScrapeBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let chunk = this.chunks.pop_front().map(|c| {
            this.len -= c.len();
            Ok(http_body::Frame::data(c))
        });
        std::task::Poll::Ready(chunk)
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len as u64)
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
            axum::body::Body::new(body),
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

/// The per-agent families after `myco_agents_up`, in the order they are written.
const AGENT_FAMILIES: usize = 3 + AGENT_STATS.len();

/// Name and help of per-agent family `f`.
fn agent_family(f: usize) -> (&'static str, &'static str) {
    match f {
        0 => (
            "myco_agents_connections",
            "Agents by status and lifecycle state (1 per agent)",
        ),
        1 => ("myco_agents_apps", "Agents' apps by health (1 per app)"),
        2 => (
            "myco_agents_connection_latencies_seconds",
            "Connected agents' round trip to each relay",
        ),
        f => (AGENT_STATS[f - 3].0, AGENT_STATS[f - 3].1),
    }
}

/// One per-agent family as the last scrape sent it: its `# HELP` and `# TYPE` lines,
/// then the lines of every agent, in agent order.
#[derive(Debug, Default)]
struct FamilyBlock {
    bytes: Bytes,
    /// Where the lines of the agent at each position start in `bytes`; one more entry
    /// for where the last agent's end.
    starts: Vec<usize>,
}

impl FamilyBlock {
    fn lines(&self, position: usize) -> &[u8] {
        &self.bytes[self.starts[position]..self.starts[position + 1]]
    }
}

/// What scrapes keep of each agent.
#[derive(Debug, Default)]
struct AgentLines {
    /// The store's revision of the agent its lines show; 0 (never a revision): none.
    revision: u64,
    /// The status they show.
    status: AgentStatus,
    /// Where the agent is in the family blocks; `None` before it is in them.
    position: Option<usize>,
}

/// An agent rendered anew by this scrape; its lines are in the scrape's `fresh_text`.
#[derive(Debug)]
struct Fresh {
    /// Position in this scrape.
    index: usize,
    /// Position in the family blocks before this scrape.
    was: Option<usize>,
    start: usize,
    /// Where each family's lines end in `fresh_text`.
    ends: [usize; AGENT_FAMILIES],
}

impl Fresh {
    fn lines<'t>(&self, text: &'t str, f: usize) -> &'t [u8] {
        let start = if f == 0 { self.start } else { self.ends[f - 1] };
        &text.as_bytes()[start..self.ends[f]]
    }
}

/// Appends the agent's lines of every per-agent family to `text`, as of `reports` and
/// `status`; returns where each family's lines end. `labels` is scratch.
fn render_agent(
    agent: &AgentSummary,
    workspace: &WorkspaceSummary,
    reports: Option<&ReportsSummary>,
    status: AgentStatus,
    labels: &mut String,
    text: &mut String,
) -> [usize; AGENT_FAMILIES] {
    labels.clear();
    labels.push_str("agent_name=\"");
    push_label_value(labels, &agent.name);
    labels.push_str("\",username=\"");
    push_label_value(labels, &workspace.owner);
    labels.push_str("\",workspace_name=\"");
    push_label_value(labels, &workspace.name);
    labels.push('"');
    let mut ends = [0; AGENT_FAMILIES];

    let lifecycle = reports.map(|r| r.lifecycle_state).unwrap_or_default();
    sample(
        text,
        agent_family(0).0,
        labels,
        &[
            ("status", status.as_str()),
            ("lifecycle_state", lifecycle.as_str()),
        ],
        1.0,
    );
    ends[0] = text.len();

    for app in &agent.apps {
        let reported = reports.and_then(|r| r.apps_health.get(&app.slug)).copied();
        let health = crate::status::app_health(app.healthcheck.is_some(), reported);
        sample(
            text,
            agent_family(1).0,
            labels,
            &[("app_name", &app.slug), ("health", health.as_str())],
            1.0,
        );
    }
    ends[1] = text.len();

    // A gone agent's last numbers are not current.
    let stats = reports
        .filter(|_| status == AgentStatus::Connected)
        .and_then(|r| r.stats.as_ref());
    for r in stats.iter().flat_map(|s| &s.relay_latencies) {
        let preferred = if r.preferred { "true" } else { "false" };
        sample(
            text,
            agent_family(2).0,
            labels,
            &[("relay", &r.relay_url), ("preferred", preferred)],
            r.latency_ms / 1000.0,
        );
    }
    ends[2] = text.len();

    for (f, (name, _, get)) in AGENT_STATS.iter().enumerate() {
        if let Some(s) = stats {
            sample(text, name, labels, &[], get(s));
        }
        ends[3 + f] = text.len();
    }
    ends
}

/// Family `f`'s block for this scrape's `agents`: the lines of agents rendered anew
/// from `text`, everyone else's from `old`. With the agents where they were
/// (`same_layout`), each run of agents between two fresh ones is one copy.
fn rebuild_block(
    old: &FamilyBlock,
    f: usize,
    agents: &[ScrapeAgent<AgentLines>],
    fresh: &[Fresh],
    text: &str,
    same_layout: bool,
) -> FamilyBlock {
    let (name, help) = agent_family(f);
    let mut header = String::new();
    gauge_family(&mut header, name, help);
    let fresh_len: usize = fresh.iter().map(|fr| fr.lines(text, f).len()).sum();
    let mut bytes = BytesMut::with_capacity(header.len() + old.bytes.len() + fresh_len);
    bytes.put_slice(header.as_bytes());
    let mut starts = Vec::with_capacity(agents.len() + 1);
    if same_layout {
        let mut next = 0;
        for fr in fresh.iter().map(Some).chain([None]) {
            let until = fr.map_or(agents.len(), |fr| fr.index);
            let (from, to) = (old.starts[next], old.starts[until]);
            let base = bytes.len();
            starts.extend(old.starts[next..until].iter().map(|s| base + (s - from)));
            bytes.put_slice(&old.bytes[from..to]);
            if let Some(fr) = fr {
                starts.push(bytes.len());
                bytes.put_slice(fr.lines(text, f));
                next = fr.index + 1;
            }
        }
    } else {
        let mut fresh = fresh.iter().peekable();
        for (i, a) in agents.iter().enumerate() {
            starts.push(bytes.len());
            match fresh.next_if(|fr| fr.index == i) {
                Some(fr) => bytes.put_slice(fr.lines(text, f)),
                // Every agent not rendered anew has a position (encode_agents).
                None => bytes.put_slice(a.kept.position.map_or(&[][..], |p| old.lines(p))),
            }
        }
    }
    starts.push(bytes.len());
    FamilyBlock {
        bytes: bytes.freeze(),
        starts,
    }
}

/// What one pass over the agents did.
#[derive(Debug)]
struct AgentsEncoded {
    agents: usize,
    /// Agents whose lines were rendered anew.
    rendered: usize,
    /// Family blocks built anew (the others were sent as they were).
    rebuilt: usize,
    /// Time spent reading the store.
    read: Duration,
    /// Time spent reading, judging and rendering (the rest is building blocks).
    judged: Duration,
}

/// Reads every agent from one snapshot and judges each against `now`; renders anew
/// the agents whose workspace record, reports or status changed since the last
/// scrape, and builds anew the family blocks whose lines changed. Returns the body's
/// chunks: `myco_agents_up`, then every per-agent family's block.
fn encode_agents(
    state: &mut ScrapeState,
    store: &Store,
    policy: &StatusPolicy,
    now: Timestamp,
) -> Result<(Vec<Bytes>, AgentsEncoded), crate::store::StoreError> {
    let started = Instant::now();
    let ScrapeState {
        agents: cache,
        families,
        fresh_text,
        fresh,
    } = state;
    let view = store.scrape(cache)?;
    let read = started.elapsed();

    fresh_text.clear();
    fresh.clear();
    // Connected agents per workspace; `None` for workspaces without agents.
    let mut up: Vec<Option<u64>> = vec![None; view.workspaces.len()];
    // Whether every agent is where the blocks have it (none came, went or moved).
    let mut same_layout = families[0].starts.len() == view.agents.len() + 1;
    let mut labels = String::new();
    for (i, a) in view.agents.iter_mut().enumerate() {
        let times = ConnectionTimes::from_stored(a.created_at, &a.connection);
        let status = agent_status(&times, policy, now);
        *up[a.workspace_slot].get_or_insert(0) += u64::from(status == AgentStatus::Connected);
        same_layout &= a.kept.position == Some(i);
        if a.kept.revision != a.revision || a.kept.status != status || a.kept.position.is_none() {
            let start = fresh_text.len();
            let ends = render_agent(
                &a.workspace.agents[a.index],
                &a.workspace,
                a.reports.as_deref(),
                status,
                &mut labels,
                fresh_text,
            );
            fresh.push(Fresh {
                index: i,
                was: a.kept.position,
                start,
                ends,
            });
            a.kept.revision = a.revision;
            a.kept.status = status;
        }
    }
    let judged = started.elapsed();

    let mut up: Vec<(&str, &str, u64)> = view
        .workspaces
        .iter()
        .zip(up)
        .filter_map(|(ws, n)| Some((ws.owner.as_str(), ws.name.as_str(), n?)))
        .collect();
    up.sort_unstable();
    let mut head = String::with_capacity(up.len() * 80 + 256);
    gauge_family(
        &mut head,
        "myco_agents_up",
        "Connected agents per workspace",
    );
    for (user, ws, n) in up {
        sample(
            &mut head,
            "myco_agents_up",
            "",
            &[("username", user), ("workspace_name", ws)],
            n as f64,
        );
    }
    let mut chunks = Vec::with_capacity(AGENT_FAMILIES + 2);
    chunks.push(Bytes::from(head));

    let mut rebuilt = 0;
    for (f, block) in families.iter_mut().enumerate() {
        let changed = !same_layout
            || fresh.iter().any(|fr| {
                fr.was
                    .is_none_or(|p| block.lines(p) != fr.lines(fresh_text, f))
            });
        if changed {
            *block = rebuild_block(block, f, view.agents, fresh, fresh_text, same_layout);
            rebuilt += 1;
        }
        chunks.push(block.bytes.clone());
    }
    if !same_layout {
        for (i, a) in view.agents.iter_mut().enumerate() {
            a.kept.position = Some(i);
        }
    }
    Ok((
        chunks,
        AgentsEncoded {
            agents: view.agents.len(),
            rendered: fresh.len(),
            rebuilt,
            read,
            judged,
        },
    ))
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
            (
                "http_refused_connections",
                "HTTP connections closed at accept: over --max-connections or --max-connections-per-ip",
                self.0
                    .http
                    .refused_connections
                    .load(std::sync::atomic::Ordering::Relaxed),
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

    const BASE: u64 = 1_800_000_000_000;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_unix_millis(BASE + ms)
    }

    const POLICY: StatusPolicy = StatusPolicy {
        connection_timeout: None,
        inactive_timeout: Duration::from_secs(30),
    };

    /// A workspace of alice's with agents of these ids, each with an app that has a
    /// health check and one that has none.
    fn workspace(id: &str, agents: &[&str]) -> WorkspaceRecord {
        WorkspaceRecord {
            template: None,
            latest_build: None,
            ttl_ms: None,
            activity_bump_ms: None,
            deadline: None,
            autostart: None,
            next_start: None,
            id: id.to_owned(),
            owner: Name::new("alice").unwrap(),
            name: Name::new(id).unwrap(),
            created_at: at(0),
            agents: agents
                .iter()
                .map(|a| AgentRecord {
                    id: (*a).to_owned(),
                    name: Name::new(a).unwrap(),
                    created_at: at(0),
                    token_id: format!("t-{a}"),
                    apps: vec![
                        mesh::api::App {
                            slug: Name::new("web").unwrap(),
                            url: "http://127.0.0.1:8080/".into(),
                            healthcheck: Some(mesh::api::HealthCheck {
                                url: "http://127.0.0.1:8080/healthz".into(),
                                interval: 10,
                                threshold: 3,
                            }),
                        },
                        mesh::api::App {
                            slug: Name::new("docs").unwrap(),
                            url: "http://127.0.0.1:8081/".into(),
                            healthcheck: None,
                        },
                    ],
                    startup_script: None,
                    shutdown_script: None,
                    metadata: vec![],
                    ssh_host_key: None,
                    endpoint_id: None,
                })
                .collect(),
        }
    }

    fn ready(rx_bytes: u64) -> AgentReports {
        AgentReports {
            lifecycle_state: mesh::api::LifecycleState::Ready,
            apps_health: [(Name::new("web").unwrap(), mesh::api::AppHealth::Healthy)]
                .into_iter()
                .collect(),
            stats: Some(AgentStats {
                rx_bytes,
                connection_count: 1,
                relay_latencies: vec![mesh::api::RelayLatency {
                    relay_url: "http://127.0.0.1:3000/".into(),
                    latency_ms: 1.5,
                    preferred: true,
                }],
                ..AgentStats::default()
            }),
            ..AgentReports::default()
        }
    }

    fn heard(store: &Store, agents: &[&str], last: Timestamp) {
        let batch = AgentStateBatch {
            connections: agents
                .iter()
                .map(|a| {
                    let c = StoredConnection {
                        first_connected_at: Some(at(1)),
                        last_connected_at: Some(last),
                        disconnected_at: None,
                    };
                    ((*a).to_owned(), c)
                })
                .collect(),
            ..AgentStateBatch::default()
        };
        store.write_agent_state(&batch).unwrap();
    }

    fn reported(store: &Store, agent: &str, reports: AgentReports) {
        let batch = AgentStateBatch {
            reports: vec![(agent.to_owned(), reports)],
            ..AgentStateBatch::default()
        };
        store.write_agent_state(&batch).unwrap();
    }

    /// The per-agent families as a scrape with `state` writes them at `now`, how many
    /// agents it rendered anew and how many family blocks it built anew. The text must
    /// be byte for byte what a scrape with nothing kept writes.
    fn render(state: &mut ScrapeState, store: &Store, now: Timestamp) -> (String, usize, usize) {
        let encode = |state: &mut ScrapeState| {
            let (chunks, done) = encode_agents(state, store, &POLICY, now).unwrap();
            let text = String::from_utf8(ScrapeBody::new(chunks).to_vec()).unwrap();
            (text, done.rendered, done.rebuilt)
        };
        let (text, rendered, rebuilt) = encode(state);
        let (fresh, _, _) = encode(&mut ScrapeState::default());
        assert_eq!(text, fresh, "kept lines differ from a fresh render");
        (text, rendered, rebuilt)
    }

    fn connection_line(text: &str, agent: &str) -> String {
        let needle = format!("myco_agents_connections{{agent_name=\"{agent}\",");
        text.lines()
            .find(|l| l.starts_with(&needle))
            .unwrap_or_else(|| panic!("no connection line of {agent} in\n{text}"))
            .to_owned()
    }

    /// Each change an agent can go through renders that agent anew and rebuilds the
    /// families whose lines changed, nothing more, and the result is always what a
    /// scrape from nothing writes.
    #[test]
    fn kept_lines_follow_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store
            .create_workspace(&workspace("w1", &["a1", "a2"]), &[], None)
            .unwrap();
        store
            .create_workspace(&workspace("w2", &["b1"]), &[], None)
            .unwrap();
        store
            .create_workspace(&workspace("w3", &["c1"]), &[], None)
            .unwrap();
        let all = ["a1", "a2", "b1", "c1"];
        heard(&store, &all, at(10_000));
        for a in all {
            reported(&store, a, ready(100));
        }
        let mut state = ScrapeState::default();

        let (text, n, blocks) = render(&mut state, &store, at(11_000));
        assert_eq!((n, blocks), (4, AGENT_FAMILIES));
        for a in all {
            let line = connection_line(&text, a);
            assert!(
                line.contains("status=\"connected\",lifecycle_state=\"ready\""),
                "{line}"
            );
        }
        assert!(text.contains("myco_agentstats_rx_bytes{agent_name=\"a1\",username=\"alice\",workspace_name=\"w1\"} 100\n"), "{text}");
        assert!(
            text.contains("myco_agents_up{username=\"alice\",workspace_name=\"w1\"} 2\n"),
            "{text}"
        );

        // Heartbeats move only connection times: nothing to render.
        heard(&store, &all, at(15_000));
        let (again, n, blocks) = render(&mut state, &store, at(16_000));
        assert_eq!((n, blocks, &again), (0, 0, &text));

        // Time passes: b1 fell silent, the others were heard. b1's connection line
        // changes and its latency and stats lines go; its app lines stay.
        heard(&store, &["a1", "a2", "c1"], at(40_000));
        let (text, n, blocks) = render(&mut state, &store, at(45_001));
        assert_eq!((n, blocks), (1, AGENT_FAMILIES - 1));
        assert!(connection_line(&text, "b1").contains("status=\"disconnected\""));
        assert!(
            !text.contains("myco_agentstats_rx_bytes{agent_name=\"b1\""),
            "{text}"
        );
        assert!(
            text.contains("myco_agents_up{username=\"alice\",workspace_name=\"w2\"} 0\n"),
            "{text}"
        );

        // Lifecycle.
        let mut r = ready(100);
        r.lifecycle_state = mesh::api::LifecycleState::ShuttingDown;
        reported(&store, "a1", r);
        let (text, n, blocks) = render(&mut state, &store, at(45_002));
        assert_eq!((n, blocks), (1, 1));
        assert!(connection_line(&text, "a1").contains("lifecycle_state=\"shutting_down\""));

        // App health.
        let mut r = ready(100);
        r.apps_health
            .insert(Name::new("web").unwrap(), mesh::api::AppHealth::Unhealthy);
        reported(&store, "a2", r);
        let (text, n, blocks) = render(&mut state, &store, at(45_003));
        assert_eq!((n, blocks), (1, 1));
        assert!(text.contains("myco_agents_apps{agent_name=\"a2\",username=\"alice\",workspace_name=\"w1\",app_name=\"web\",health=\"unhealthy\"} 1\n"), "{text}");

        // Stats: only the family of the number that moved.
        reported(&store, "c1", ready(250));
        let (text, n, blocks) = render(&mut state, &store, at(45_004));
        assert_eq!((n, blocks), (1, 1));
        assert!(text.contains("myco_agentstats_rx_bytes{agent_name=\"c1\",username=\"alice\",workspace_name=\"w3\"} 250\n"), "{text}");

        // A changed workspace record renders its agents anew; their lines are the same.
        store
            .set_agent_host_key("w1", "a1", "ssh-ed25519 AAAA")
            .unwrap();
        let (again, n, blocks) = render(&mut state, &store, at(45_005));
        assert_eq!((n, blocks, &again), (2, 0, &text));

        // A new agent.
        store
            .create_workspace(&workspace("w4", &["d1"]), &[], None)
            .unwrap();
        let (text, n, blocks) = render(&mut state, &store, at(45_006));
        assert_eq!((n, blocks), (1, AGENT_FAMILIES));
        assert!(
            connection_line(&text, "d1")
                .contains("status=\"connecting\",lifecycle_state=\"created\"")
        );

        // A deleted workspace: its agents are gone, no one else is rendered.
        let alice = Name::new("alice").unwrap();
        assert!(
            store
                .delete_workspace(&alice, &Name::new("w2").unwrap())
                .unwrap()
                .is_some()
        );
        let (text, n, blocks) = render(&mut state, &store, at(45_007));
        assert_eq!((n, blocks), (0, AGENT_FAMILIES));
        assert!(!text.contains("workspace_name=\"w2\""), "{text}");
        assert!(!text.contains("agent_name=\"b1\""), "{text}");
        assert_eq!(text.matches("myco_agents_connections{").count(), 4);
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
