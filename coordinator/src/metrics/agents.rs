//! The per-agent families of a scrape: every agent judged against the scrape's `now`,
//! rendered anew only when what its lines show changed, and each family kept as one
//! block from scrape to scrape (see the module doc of `metrics`).

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use mesh::Timestamp;
use mesh::api::AgentStatus;

use super::families::{AGENT_FAMILIES, AgentFamily, PerFamily};
use super::text::{gauge_family, push_label_value, sample};
use crate::status::{ConnectionTimes, StatusPolicy, agent_status};
use crate::store::{
    AgentSummary, ReportsSummary, ScrapeAgent, ScrapeCache, Store, StoreError, WorkspaceSummary,
};

/// What scrapes keep between them.
#[derive(Debug, Default)]
pub(super) struct ScrapeState {
    agents: ScrapeCache<AgentLines>,
    /// Every per-agent family as last sent.
    families: PerFamily<FamilyBlock>,
    /// The lines of the agents one scrape renders anew, and where each agent's are
    /// (kept only for their buffers).
    fresh_text: String,
    fresh: Vec<Fresh>,
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
    ends: PerFamily<usize>,
}

impl Fresh {
    fn lines<'t>(&self, text: &'t str, f: AgentFamily) -> &'t [u8] {
        let start = f.previous().map_or(self.start, |p| self.ends[p]);
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
) -> PerFamily<usize> {
    labels.clear();
    labels.push_str("agent_name=\"");
    push_label_value(labels, &agent.name);
    labels.push_str("\",username=\"");
    push_label_value(labels, &workspace.owner);
    labels.push_str("\",workspace_name=\"");
    push_label_value(labels, &workspace.name);
    labels.push('"');

    let lifecycle = reports.map(|r| r.lifecycle_state).unwrap_or_default();
    // A gone agent's last numbers are not current.
    let stats = reports
        .filter(|_| status == AgentStatus::Connected)
        .and_then(|r| r.stats.as_ref());
    let mut ends = PerFamily::default();
    for f in AgentFamily::ALL {
        match f {
            AgentFamily::Connections => sample(
                text,
                f.name(),
                labels,
                &[
                    ("status", status.as_str()),
                    ("lifecycle_state", lifecycle.as_str()),
                ],
                1.0,
            ),
            AgentFamily::Apps => {
                for app in &agent.apps {
                    let reported = reports.and_then(|r| r.apps_health.get(&app.slug)).copied();
                    let health = crate::status::app_health(app.healthcheck.is_some(), reported);
                    sample(
                        text,
                        f.name(),
                        labels,
                        &[("app_name", &app.slug), ("health", health.as_str())],
                        1.0,
                    );
                }
            }
            AgentFamily::RelayLatencies => {
                for r in stats.iter().flat_map(|s| &s.relay_latencies) {
                    let preferred = if r.preferred { "true" } else { "false" };
                    sample(
                        text,
                        f.name(),
                        labels,
                        &[("relay", &r.relay_url), ("preferred", preferred)],
                        r.latency_ms / 1000.0,
                    );
                }
            }
            // The `myco_agentstats_*` families: one number of the stats each.
            stat => {
                if let Some(value) = stats.and_then(|s| stat.stat(s)) {
                    sample(text, stat.name(), labels, &[], value);
                }
            }
        }
        ends[f] = text.len();
    }
    ends
}

/// Family `f`'s block for this scrape's `agents`: the lines of agents rendered anew
/// from `text`, everyone else's from `old`. With the agents where they were
/// (`same_layout`), each run of agents between two fresh ones is one copy.
fn rebuild_block(
    old: &FamilyBlock,
    f: AgentFamily,
    agents: &[ScrapeAgent<AgentLines>],
    fresh: &[Fresh],
    text: &str,
    same_layout: bool,
) -> FamilyBlock {
    let mut header = String::new();
    gauge_family(&mut header, f.name(), f.help());
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
pub(super) struct AgentsEncoded {
    pub(super) agents: usize,
    /// Agents whose lines were rendered anew.
    pub(super) rendered: usize,
    /// Family blocks built anew (the others were sent as they were).
    pub(super) rebuilt: usize,
    /// Time spent reading the store.
    pub(super) read: Duration,
    /// Time spent reading, judging and rendering (the rest is building blocks).
    pub(super) judged: Duration,
}

/// Reads every agent from one snapshot and judges each against `now`; renders anew
/// the agents whose workspace record, reports or status changed since the last
/// scrape, and builds anew the family blocks whose lines changed. Returns the body's
/// chunks: `myco_agents_up`, then every per-agent family's block.
pub(super) fn encode_agents(
    state: &mut ScrapeState,
    store: &Store,
    policy: &StatusPolicy,
    now: Timestamp,
) -> Result<(Vec<Bytes>, AgentsEncoded), StoreError> {
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
    // Whether every agent is where the blocks have it (none came, went or moved); every
    // block has an entry per agent, so any one tells.
    let mut same_layout = families[AgentFamily::Connections].starts.len() == view.agents.len() + 1;
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
    for f in AgentFamily::ALL {
        let block = &mut families[f];
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ScrapeBody;
    use crate::store::{
        AgentRecord, AgentReports, AgentStateBatch, StoredConnection, WorkspaceRecord,
    };
    use mesh::Name;
    use mesh::api::AgentStats;

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
}
