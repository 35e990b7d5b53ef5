//! `myco scaletest agents`: N simulated agents in this one process, each on a real
//! control channel (WebSocket, agent token) to a running coordinator. They heartbeat
//! at the interval the coordinator dictates and report lifecycle, app health and
//! stats like real agents. Halfway through, a share of them hang up for good.
//!
//! On every scrape of `/metrics` the test compares what the coordinator says about
//! each agent with what it knows: an agent whose channel has been open for longer
//! than a grace period (the coordinator's flush interval plus slack) must be
//! `connected` (else a false disconnect, Coder's seed bug); one it closed longer than
//! that ago must not be (else a false connect). Agents inside the grace window after
//! a change are not judged.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh::api::{
    AgentSpec, AgentStats, App, AppHealth, CreateWorkspace, CreatedWorkspace, HealthCheck,
    LifecycleState,
};
use mesh::control::{AgentMessage, AppHealthChange, CoordinatorMessage};
use mesh::control_channel::{self, Received, RecvError};
use mesh::{Name, Timestamp};

use crate::Globals;
use crate::client::Client;

#[derive(Debug, clap::Subcommand)]
pub enum ScaletestCommand {
    /// Simulate agents on real control channels and check /metrics against them.
    Agents(AgentsArgs),
}

#[derive(Debug, clap::Args)]
pub struct AgentsArgs {
    /// How many agents.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Apps per agent (each with a health check the simulated agent reports healthy).
    #[arg(long, default_value_t = 4)]
    apps: usize,
    /// How long to run once every agent is connected.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time between scrapes of /metrics.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    scrape_interval: Duration,
    /// Share of agents that hang up halfway through (0 to 1), to catch false connects.
    #[arg(long, default_value_t = 0.1)]
    hang_up: f64,
    /// Scrape this URL (e.g. the coordinator's --prometheus-address) instead of
    /// /metrics on the API with your admin session.
    #[arg(long)]
    metrics_url: Option<String>,
    /// Keep the scaletest's workspaces instead of deleting them at the end.
    #[arg(long)]
    keep: bool,
    /// Also create this many agents that never connect, so scrapes judge a store
    /// larger than one machine's open files allow live channels for.
    #[arg(long, default_value_t = 0)]
    extra_agents: usize,
}

/// Agents per workspace (the coordinator's limit).
const AGENTS_PER_WORKSPACE: usize = 64;
/// Channels opened at once while connecting.
const CONNECT_CONCURRENCY: usize = 128;
/// After a hang-up, how long the coordinator may still show an agent connected: its
/// flush interval plus slack for the channel's end to be noticed.
const GRACE: Duration = Duration::from_secs(3);

pub async fn run(globals: &Globals, cmd: ScaletestCommand) -> anyhow::Result<()> {
    match cmd {
        ScaletestCommand::Agents(args) => run_fake_agents(globals, args).await,
    }
}

/// One simulated agent as the test knows it.
struct SimAgent {
    workspace: String,
    name: String,
    token: String,
    /// Set (and `wake` notified) to make the agent hang up; the agent sets
    /// `closed_at` when it has.
    hang_up: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    /// Milliseconds since the test's start when its welcome arrived; 0 before.
    opened_at: Arc<AtomicU64>,
    /// Milliseconds since the test's start when its channel closed; 0 while open.
    closed_at: Arc<AtomicU64>,
}

/// `myco scaletest agents`: create the workspaces, connect the simulated agents,
/// scrape and judge for the run's duration, then clean up and give the verdict.
async fn run_fake_agents(globals: &Globals, args: AgentsArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    let client = Client::authenticated(globals)?;
    let me: mesh::api::User = client.get("/api/v1/users/me").await?;
    if args.metrics_url.is_none() && !me.admin {
        bail!(
            "/metrics on the API is for admins; log in as one, or pass --metrics-url with the coordinator's --prometheus-address"
        );
    }
    let (sims, extra) = create_agents(&client, &args).await?;
    let t0 = Instant::now();
    let mut tasks = connect_agents(client.base_url(), &sims, args.apps, t0).await?;
    let report = scrape_and_judge(&client, &args, &sims, &extra, t0).await?;
    hang_up(&sims);
    tasks.shutdown().await;
    report.print();
    if !args.keep {
        delete_workspaces(&client, &sims, &extra).await?;
    }
    if report.false_disconnects + report.false_connects + report.missing > 0 {
        bail!("the coordinator's /metrics disagreed with the agents' real state");
    }
    Ok(())
}

fn check_args(args: &AgentsArgs) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.hang_up) {
        bail!("--hang-up is a share between 0 and 1, not {}", args.hang_up);
    }
    check_open_files(args.count)
}

/// Creates the workspaces of the agents that connect and of those that never do.
async fn create_agents(
    client: &Client,
    args: &AgentsArgs,
) -> anyhow::Result<(Vec<SimAgent>, Vec<SimAgent>)> {
    let started = Instant::now();
    let run_id = format!("{:06x}", u32::from_le_bytes(random4()) & 0xff_ffff);
    let sims = create_workspaces(client, &run_id, args.count, args.apps).await?;
    let extra = if args.extra_agents > 0 {
        create_workspaces(client, &format!("{run_id}-x"), args.extra_agents, args.apps).await?
    } else {
        Vec::new()
    };
    eprintln!(
        "created {} agents ({} of them never connect) in {} workspaces in {:.1?}",
        sims.len() + extra.len(),
        extra.len(),
        sims.len().div_ceil(AGENTS_PER_WORKSPACE) + extra.len().div_ceil(AGENTS_PER_WORKSPACE),
        started.elapsed()
    );
    Ok((sims, extra))
}

/// Starts one task per simulated agent and returns once every one has its welcome
/// (or failed, which fails the run); the tasks run on until told to hang up.
async fn connect_agents(
    url: &str,
    sims: &[SimAgent],
    apps: usize,
    t0: Instant,
) -> anyhow::Result<tokio::task::JoinSet<()>> {
    let sources = source_addrs(url)?;
    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, sim) in sims.iter().enumerate() {
        let permit = sem.clone().acquire_owned().await?;
        let ctx = AgentTask {
            url: url.to_owned(),
            source: sources.get(i % sources.len().max(1)).copied(),
            token: sim.token.clone(),
            apps,
            hang_up: sim.hang_up.clone(),
            wake: sim.wake.clone(),
            opened_at: sim.opened_at.clone(),
            closed_at: sim.closed_at.clone(),
            t0,
            connected: connected.clone(),
            failed: failed.clone(),
        };
        tasks.spawn(async move { run_agent(ctx, permit).await });
    }
    // Every agent has taken its permit back once its welcome arrived (or it failed).
    let _all = sem.acquire_many(CONNECT_CONCURRENCY as u32).await?;
    drop(_all);
    let failures = failed.load(Ordering::Relaxed);
    eprintln!(
        "{} agents connected in {:.1?}{}",
        connected.load(Ordering::Relaxed),
        t0.elapsed(),
        if failures > 0 {
            format!(", {failures} could not connect")
        } else {
            String::new()
        }
    );
    if failures > 0 {
        bail!("{failures} simulated agents could not open their control channel");
    }
    Ok(tasks)
}

/// Scrapes every interval for the run's duration, judging each scrape against the
/// agents' real state; halfway through, a share of the agents hang up.
async fn scrape_and_judge(
    client: &Client,
    args: &AgentsArgs,
    sims: &[SimAgent],
    extra: &[SimAgent],
    t0: Instant,
) -> anyhow::Result<Report> {
    let mut scraper = Scraper::new(client, args.metrics_url.clone())?;
    let mut report = Report::default();
    let end = Instant::now() + args.duration;
    let halfway = Instant::now() + args.duration / 2;
    let mut hung_up = false;
    // The first scrape comes one interval after the last agent connected, as every
    // later one comes an interval after the one before.
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + args.scrape_interval,
        args.scrape_interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scrape_no = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        scrape_no += 1;
        let since_start = t0.elapsed();
        let scrape = scraper.scrape(scrape_no).await?;
        let mut verdict = judge(sims, &scrape.shown, since_start);
        verdict.add(judge_never_connected(extra, &scrape.shown));
        println!(
            "scrape {scrape_no}: {:.1?} (headers after {:.1?}), {} agents shown, {} judged: {} false disconnects, {} false connects, {} missing",
            scrape.took,
            scrape.headers,
            scrape.shown.len(),
            verdict.judged,
            verdict.false_disconnects,
            verdict.false_connects,
            verdict.missing
        );
        report.add(scrape.took, scrape.headers, &verdict);
        // Hang up right after a scrape, so that this process's own burst of closes
        // does not delay the reading of the next response: it has an interval to pass.
        if !hung_up && Instant::now() >= halfway {
            let n = (sims.len() as f64 * args.hang_up).round() as usize;
            hang_up(&sims[..n.min(sims.len())]);
            hung_up = true;
            eprintln!("{n} agents hang up");
        }
    }
    Ok(report)
}

/// Tells each of `sims` to hang up.
fn hang_up(sims: &[SimAgent]) {
    for s in sims {
        s.hang_up.store(true, Ordering::Relaxed);
        s.wake.notify_one();
    }
}

/// Reads `/metrics` (or `--metrics-url`) into a buffer kept from scrape to scrape.
struct Scraper<'a> {
    client: &'a Client,
    http: reqwest::Client,
    metrics_url: Option<String>,
    /// Bodies go into one buffer kept from scrape to scrape, as Prometheus reads a
    /// scrape into a buffer sized from the last one: a fresh buffer per scrape would
    /// add this process's page faults and copies to the time.
    body: Vec<u8>,
}

/// What one scrape showed, and how long it took.
struct Scrape {
    took: Duration,
    /// Until the response's headers.
    headers: Duration,
    shown: HashMap<(String, String), String>,
}

impl<'a> Scraper<'a> {
    fn new(client: &'a Client, metrics_url: Option<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*trust::get().client_config()).clone())
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            client,
            http,
            metrics_url,
            body: Vec::new(),
        })
    }

    /// Scrape number `scrape_no`.
    async fn scrape(&mut self, scrape_no: u64) -> anyhow::Result<Scrape> {
        let began = Instant::now();
        let response = match &self.metrics_url {
            Some(u) => self.http.get(u).send().await,
            None => {
                self.http
                    .get(format!("{}/metrics", self.client.base_url()))
                    .bearer_auth(self.client.token().unwrap_or_default())
                    .send()
                    .await
            }
        };
        let mut response = match response.and_then(|r| r.error_for_status()) {
            Ok(r) => r,
            Err(e) => bail!("scrape {scrape_no} failed: {e}"),
        };
        // The coordinator sends nothing before the whole body is ready: the headers
        // arrive when its work is done, the rest is transfer.
        let headers = began.elapsed();
        self.body.clear();
        while let Some(chunk) = response.chunk().await.context("the scrape broke off")? {
            self.body.extend_from_slice(&chunk);
        }
        let took = began.elapsed();
        let text = std::str::from_utf8(&self.body).context("the scrape is not UTF-8")?;
        Ok(Scrape {
            took,
            headers,
            shown: parse_connections(text),
        })
    }
}

/// Agents that never connected must never be shown connected.
fn judge_never_connected(extra: &[SimAgent], shown: &HashMap<(String, String), String>) -> Verdict {
    let mut v = Verdict::default();
    for s in extra {
        match shown.get(&(s.workspace.clone(), s.name.clone())) {
            None => v.missing += 1,
            Some(status) => {
                v.judged += 1;
                if status == "connected" {
                    v.false_connects += 1;
                }
            }
        }
    }
    v
}

/// Deletes the scaletest's workspaces.
async fn delete_workspaces(
    client: &Client,
    sims: &[SimAgent],
    extra: &[SimAgent],
) -> anyhow::Result<()> {
    let mut names: Vec<&str> = sims
        .iter()
        .chain(extra)
        .map(|s| s.workspace.as_str())
        .collect();
    names.dedup();
    for ws in names {
        client
            .call(
                reqwest::Method::DELETE,
                &format!("/api/v1/workspaces/me/{ws}"),
            )
            .await
            .with_context(|| format!("cannot delete scaletest workspace {ws}"))?;
    }
    Ok(())
}

/// Milliseconds since `t0`, at least 1 (0 means "not yet").
fn since(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn random4() -> [u8; 4] {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    b
}

/// Each agent holds a socket; say so before opening thousands.
fn check_open_files(count: usize) -> anyhow::Result<()> {
    let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return Ok(());
    };
    let need = count as u64 + 64;
    if soft < need {
        bail!(
            "--count {count} needs about {need} open files but the limit is {soft}; raise it with `ulimit -n {need}` (the coordinator needs as many)"
        );
    }
    Ok(())
}

/// Loopback source addresses to spread connections over: one source address has
/// only ~28k ephemeral ports to one server port, and 127.0.0.0/8 is all loopback.
fn source_addrs(url: &str) -> anyhow::Result<Vec<IpAddr>> {
    let u: reqwest::Url = url.parse().context("bad coordinator URL")?;
    let loopback_v4 = match u.host_str() {
        Some("localhost") => true,
        Some(h) => h.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    Ok(if loopback_v4 {
        (1..=250u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect()
    } else {
        Vec::new()
    })
}

async fn create_workspaces(
    client: &Client,
    run_id: &str,
    count: usize,
    apps: usize,
) -> anyhow::Result<Vec<SimAgent>> {
    let mut sims = Vec::with_capacity(count);
    let workspaces = count.div_ceil(AGENTS_PER_WORKSPACE);
    for w in 0..workspaces {
        let n = AGENTS_PER_WORKSPACE.min(count - w * AGENTS_PER_WORKSPACE);
        let name = format!("st-{run_id}-{w}");
        let agents = (0..n)
            .map(|a| {
                Ok(AgentSpec {
                    name: Name::new(&format!("a{a}"))?,
                    apps: (0..apps)
                        .map(|k| {
                            Ok(App {
                                slug: Name::new(&format!("app{k}"))?,
                                url: format!("http://127.0.0.1:{}/", 8000 + k),
                                healthcheck: Some(HealthCheck {
                                    url: format!("http://127.0.0.1:{}/healthz", 8000 + k),
                                    interval: 10,
                                    threshold: 3,
                                }),
                            })
                        })
                        .collect::<anyhow::Result<_>>()?,
                    startup_script: None,
                    shutdown_script: None,
                    metadata: Vec::new(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let spec = CreateWorkspace {
            name: Name::new(&name)?,
            agents,
            template: None,
            ttl: None,
        };
        let created: CreatedWorkspace = client
            .post("/api/v1/workspaces", &spec)
            .await
            .with_context(|| format!("cannot create scaletest workspace {name}"))?;
        for t in created.agent_tokens {
            sims.push(SimAgent {
                workspace: name.clone(),
                name: t.agent.to_string(),
                token: t.token,
                hang_up: Arc::default(),
                wake: Arc::default(),
                opened_at: Arc::default(),
                closed_at: Arc::default(),
            });
        }
    }
    Ok(sims)
}

struct AgentTask {
    url: String,
    source: Option<IpAddr>,
    token: String,
    apps: usize,
    hang_up: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    opened_at: Arc<AtomicU64>,
    closed_at: Arc<AtomicU64>,
    t0: Instant,
    connected: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

/// One simulated agent: connect, report, heartbeat until told to hang up. A channel
/// the coordinator ends also counts as hung up (and fails the run's judgement).
async fn run_agent(ctx: AgentTask, permit: tokio::sync::OwnedSemaphorePermit) {
    let mut permit = Some(permit);
    let result = agent_channel(&ctx, &mut permit).await;
    if permit.is_some() {
        ctx.failed.fetch_add(1, Ordering::Relaxed);
    }
    ctx.closed_at.store(since(ctx.t0), Ordering::Relaxed);
    if let Err(e) = result
        && !ctx.hang_up.load(Ordering::Relaxed)
    {
        eprintln!(
            "simulated agent channel ended: {}",
            mesh::error::error_chain(e.as_ref())
        );
    }
}

async fn agent_channel(
    ctx: &AgentTask,
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    let mut ws = control_channel::connect(&ctx.url, &ctx.token, ctx.source).await?;
    let CoordinatorMessage::Welcome {
        heartbeat_interval_ms,
        ..
    } = (match ws.recv().await? {
        Received::Message(m) => m,
        Received::Closed(reason) => bail!("no welcome: the channel closed ({reason:?})"),
    })
    else {
        bail!("the first message was not a welcome");
    };
    let now = Timestamp::now();
    ws.send(&AgentMessage::Lifecycle {
        state: LifecycleState::Ready,
        changed_at: now,
    })
    .await?;
    let changes = (0..ctx.apps)
        .map(|k| {
            Ok(AppHealthChange {
                slug: Name::new(&format!("app{k}"))?,
                health: AppHealth::Healthy,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    ws.send(&AgentMessage::AppHealth { changes }).await?;
    ctx.opened_at.store(since(ctx.t0), Ordering::Relaxed);
    ctx.connected.fetch_add(1, Ordering::Relaxed);
    *permit = None;

    let interval = Duration::from_millis(heartbeat_interval_ms.max(1000));
    // Spread heartbeats over the interval instead of sending them in lockstep.
    let offset = interval.mul_f64(f64::from(u32::from_le_bytes(random4())) / f64::from(u32::MAX));
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
    let mut beats = 0u64;
    loop {
        tokio::select! {
            _ = beat.tick() => {
                ws.send(&AgentMessage::Heartbeat).await?;
                beats += 1;
                if beats.is_multiple_of(2) {
                    let stats = AgentStats { connection_count: 1, connections_direct: 1, rx_bytes: beats * 1000, tx_bytes: beats * 2000, connection_median_latency_ms: 0.2, session_count_ssh: 1, ..AgentStats::default() };
                    ws.send(&AgentMessage::Stats { stats }).await?;
                }
            }
            () = ctx.wake.notified() => {
                let _ = ws.close().await;
                return Ok(());
            }
            msg = ws.recv() => match msg {
                Ok(Received::Closed(_)) => bail!("the coordinator closed the channel"),
                Err(RecvError::Socket(e)) => return Err(e.into()),
                Ok(Received::Message(_)) | Err(RecvError::Decode(_)) => {}
            },
        }
    }
}

/// `(workspace, agent) -> status` from the `myco_agents_connections` series.
fn parse_connections(text: &str) -> HashMap<(String, String), String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("myco_agents_connections{") else {
            continue;
        };
        let Some((labels, _)) = rest.split_once('}') else {
            continue;
        };
        let (mut ws, mut agent, mut status) = (None, None, None);
        for pair in labels.split(',') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            let v = v.trim_matches('"').to_owned();
            match k {
                "workspace_name" => ws = Some(v),
                "agent_name" => agent = Some(v),
                "status" => status = Some(v),
                _ => {}
            }
        }
        if let (Some(w), Some(a), Some(s)) = (ws, agent, status) {
            out.insert((w, a), s);
        }
    }
    out
}

#[derive(Debug, Default)]
struct Verdict {
    judged: u64,
    false_disconnects: u64,
    false_connects: u64,
    /// Agents of this test absent from the scrape.
    missing: u64,
}

impl Verdict {
    fn add(&mut self, other: Verdict) {
        self.judged += other.judged;
        self.false_disconnects += other.false_disconnects;
        self.false_connects += other.false_connects;
        self.missing += other.missing;
    }
}

fn judge(
    sims: &[SimAgent],
    shown: &HashMap<(String, String), String>,
    scrape_started: Duration,
) -> Verdict {
    let mut v = Verdict::default();
    for s in sims {
        let Some(status) = shown.get(&(s.workspace.clone(), s.name.clone())) else {
            v.missing += 1;
            continue;
        };
        let settled = |ms: u64| ms != 0 && Duration::from_millis(ms) + GRACE < scrape_started;
        let opened = s.opened_at.load(Ordering::Relaxed);
        let closed = s.closed_at.load(Ordering::Relaxed);
        let hanging_up = s.hang_up.load(Ordering::Relaxed);
        if closed == 0 && !hanging_up && settled(opened) {
            v.judged += 1;
            if status != "connected" {
                v.false_disconnects += 1;
            }
        } else if settled(closed) {
            v.judged += 1;
            if status == "connected" {
                v.false_connects += 1;
            }
        }
    }
    v
}

#[derive(Debug, Default)]
struct Report {
    scrapes: Vec<Duration>,
    /// Until the response's headers, per scrape.
    headers: Vec<Duration>,
    judged: u64,
    false_disconnects: u64,
    false_connects: u64,
    missing: u64,
}

impl Report {
    fn add(&mut self, took: Duration, headers: Duration, v: &Verdict) {
        self.scrapes.push(took);
        self.headers.push(headers);
        self.judged += v.judged;
        self.false_disconnects += v.false_disconnects;
        self.false_connects += v.false_connects;
        self.missing += v.missing;
    }

    fn print(&self) {
        let mut s = self.scrapes.clone();
        s.sort();
        let mut h = self.headers.clone();
        h.sort();
        let pct = |s: &[Duration], p: f64| {
            s.get(((s.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        println!(
            "summary: {} scrapes, scrape p50 {:.1?} p99 {:.1?} max {:.1?} (headers after p50 {:.1?} p99 {:.1?}); {} verdicts: {} false disconnects, {} false connects, {} missing",
            s.len(),
            pct(&s, 0.5),
            pct(&s, 0.99),
            s.last().copied().unwrap_or_default(),
            pct(&h, 0.5),
            pct(&h, 0.99),
            self.judged,
            self.false_disconnects,
            self.false_connects,
            self.missing
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connection_series() {
        let text = "# HELP x\nmyco_agents_connections{agent_name=\"a1\",username=\"u\",workspace_name=\"st-1-0\",status=\"connected\",lifecycle_state=\"ready\"} 1\nmyco_agents_up{username=\"u\",workspace_name=\"st-1-0\"} 1\n";
        let m = parse_connections(text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[&("st-1-0".to_owned(), "a1".to_owned())], "connected");
    }

    #[test]
    fn agents_inside_the_grace_window_are_not_judged() {
        let sim = |closed_ms: u64| SimAgent {
            workspace: "w".into(),
            name: "a".into(),
            token: String::new(),
            hang_up: Arc::new(AtomicBool::new(closed_ms != 0)),
            wake: Arc::default(),
            opened_at: Arc::new(AtomicU64::new(500)),
            closed_at: Arc::new(AtomicU64::new(closed_ms)),
        };
        let shown: HashMap<_, _> = [(("w".to_owned(), "a".to_owned()), "connected".to_owned())]
            .into_iter()
            .collect();
        // Closed 1 s before the scrape: within grace, not judged.
        let v = judge(&[sim(9_000)], &shown, Duration::from_secs(10));
        assert_eq!((v.judged, v.false_connects), (0, 0));
        // Closed long ago yet shown connected: a false connect.
        let v = judge(&[sim(1_000)], &shown, Duration::from_secs(10));
        assert_eq!((v.judged, v.false_connects), (1, 1));
        // Open and shown disconnected: a false disconnect.
        let gone: HashMap<_, _> = [(("w".to_owned(), "a".to_owned()), "disconnected".to_owned())]
            .into_iter()
            .collect();
        let v = judge(&[sim(0)], &gone, Duration::from_secs(10));
        assert_eq!(v.false_disconnects, 1);
    }
}
