//! The agent state ledger: heartbeats and agent reports land here, in memory, and a
//! flusher group-commits whatever changed to the store once per flush interval (one
//! write transaction, never one per heartbeat; ARCHITECTURE.md, decision 6).
//!
//! The ledger holds the state of agents with a live control channel, and of agents
//! whose last changes are not flushed yet; everything else is only in the store.
//! Reads (listings, `/metrics`) go to the store, so what they show is at most one
//! flush interval old, far inside the inactive timeout statuses are judged by.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mesh::Timestamp;
use mesh::api::{AgentStats, LifecycleState, LogLine, MetadataValue};
use mesh::control::AppHealthChange;

use crate::store::{AgentReports, AgentStateBatch, Store, StoredConnection};

/// How often changed agent state is committed.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Log lines one agent may have waiting for the next flush; beyond this the oldest
/// waiting lines are dropped (and a line says so).
const MAX_PENDING_LOG_LINES: usize = 10_000;

#[derive(Debug)]
struct Entry {
    conn: StoredConnection,
    reports: AgentReports,
    /// Control channels open now (a reconnect can overlap the old channel's end).
    channels: u32,
    conn_dirty: bool,
    reports_dirty: bool,
    logs: Vec<LogLine>,
    dropped_logs: u64,
}

impl Entry {
    fn new(conn: StoredConnection, reports: AgentReports) -> Self {
        Self {
            conn,
            reports,
            channels: 0,
            conn_dirty: false,
            reports_dirty: false,
            logs: Vec::new(),
            dropped_logs: 0,
        }
    }

    fn idle(&self) -> bool {
        self.channels == 0 && !self.conn_dirty && !self.reports_dirty && self.logs.is_empty()
    }
}

#[derive(Debug, Default)]
struct Inner {
    agents: HashMap<String, Entry>,
    dirty: HashSet<String>,
}

/// Shared, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct AgentLedger(Arc<Mutex<Inner>>);

impl AgentLedger {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain maps behind, still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `agent_id` has a control channel open now, so the ledger's copy of its
    /// state is complete; if not, the caller loads its stored state and passes it to
    /// [`AgentLedger::connected`].
    pub fn has_channel(&self, agent_id: &str) -> bool {
        self.lock()
            .agents
            .get(agent_id)
            .is_some_and(|e| e.channels > 0)
    }

    /// A control channel of `agent_id` opened at `now`. `stored` is the agent's state
    /// from the store; what the ledger holds and has not flushed yet is newer and wins.
    pub fn connected(
        &self,
        agent_id: &str,
        stored: Option<(StoredConnection, AgentReports)>,
        now: Timestamp,
    ) {
        let mut inner = self.lock();
        let e = match inner.agents.entry(agent_id.to_owned()) {
            std::collections::hash_map::Entry::Occupied(o) => {
                let e = o.into_mut();
                if let Some((conn, reports)) = stored {
                    if !e.conn_dirty {
                        e.conn = conn;
                    }
                    if !e.reports_dirty {
                        e.reports = reports;
                    }
                }
                e
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                let (conn, reports) = stored.unwrap_or_default();
                v.insert(Entry::new(conn, reports))
            }
        };
        e.channels += 1;
        e.conn.first_connected_at.get_or_insert(now);
        e.conn.last_connected_at = Some(now);
        e.conn_dirty = true;
        inner.dirty.insert(agent_id.to_owned());
    }

    /// The agent is alive at `now`.
    pub fn heartbeat(&self, agent_id: &str, now: Timestamp) {
        self.update(agent_id, |e| {
            e.conn.last_connected_at = Some(now);
            e.conn_dirty = true;
        });
    }

    /// A control channel of `agent_id` ended at `now`. `current` says whether it was
    /// the agent's current channel: a reconnect's new channel keeps the agent
    /// connected while the old one's end arrives late.
    pub fn disconnected(&self, agent_id: &str, current: bool, now: Timestamp) {
        self.update(agent_id, |e| {
            e.channels = e.channels.saturating_sub(1);
            if current {
                e.conn.disconnected_at = Some(now);
                e.conn_dirty = true;
            }
        });
    }

    pub fn lifecycle(&self, agent_id: &str, state: LifecycleState, changed_at: Timestamp) {
        self.update(agent_id, |e| {
            e.reports.lifecycle_state = state;
            e.reports.lifecycle_changed_at = Some(changed_at);
            e.reports_dirty = true;
        });
    }

    pub fn app_health(&self, agent_id: &str, changes: Vec<AppHealthChange>) {
        self.update(agent_id, |e| {
            for c in changes {
                e.reports.apps_health.insert(c.slug, c.health);
            }
            e.reports_dirty = true;
        });
    }

    pub fn stats(&self, agent_id: &str, stats: AgentStats) {
        self.update(agent_id, |e| {
            e.reports.stats = Some(stats);
            e.reports_dirty = true;
        });
    }

    pub fn metadata(&self, agent_id: &str, items: Vec<MetadataValue>) {
        self.update(agent_id, |e| {
            for m in items {
                e.reports.metadata.insert(m.key.clone(), m);
            }
            e.reports_dirty = true;
        });
    }

    pub fn netcheck(&self, agent_id: &str, result: mesh::api::NetcheckResult) {
        self.update(agent_id, |e| {
            e.reports.netcheck = Some(result);
            e.reports_dirty = true;
        });
    }

    pub fn logs(&self, agent_id: &str, lines: Vec<LogLine>) {
        self.update(agent_id, |e| {
            e.logs.extend(lines);
            if e.logs.len() > MAX_PENDING_LOG_LINES {
                let excess = e.logs.len() - MAX_PENDING_LOG_LINES;
                e.logs.drain(..excess);
                e.dropped_logs += excess as u64;
            }
        });
    }

    /// Applies `f` to a held agent and marks it dirty; reports of an agent the
    /// ledger does not hold (its channel is gone) are dropped.
    fn update(&self, agent_id: &str, f: impl FnOnce(&mut Entry)) {
        let mut inner = self.lock();
        if let Some(e) = inner.agents.get_mut(agent_id) {
            f(e);
            inner.dirty.insert(agent_id.to_owned());
        }
    }

    /// Takes everything changed since the last batch; agents with no channel and
    /// nothing left to write are forgotten.
    pub fn take_batch(&self) -> AgentStateBatch {
        let mut inner = self.lock();
        let mut batch = AgentStateBatch::default();
        let dirty = std::mem::take(&mut inner.dirty);
        for id in dirty {
            let Some(e) = inner.agents.get_mut(&id) else {
                continue;
            };
            if std::mem::take(&mut e.conn_dirty) {
                batch.connections.push((id.clone(), e.conn));
            }
            if std::mem::take(&mut e.reports_dirty) {
                batch.reports.push((id.clone(), e.reports.clone()));
            }
            if !e.logs.is_empty() {
                let mut lines = std::mem::take(&mut e.logs);
                let dropped = std::mem::take(&mut e.dropped_logs);
                if dropped > 0
                    && let Some(first) = lines.first()
                {
                    let note = LogLine {
                        at: first.at,
                        source: first.source,
                        text: format!(
                            "[myco: {dropped} lines dropped; the agent sent faster than they could be stored]"
                        ),
                    };
                    lines.insert(0, note);
                }
                batch.logs.push((id.clone(), lines));
            }
            if e.idle() {
                inner.agents.remove(&id);
            }
        }
        batch
    }

    /// Puts a batch that could not be written back, so the next flush retries it.
    /// State that changed since wins over the batch's copy.
    pub fn restore(&self, batch: AgentStateBatch) {
        let mut inner = self.lock();
        // An agent forgotten since (no channel, nothing else to write) gets an entry
        // holding only what is to be retried; a reconnect fills in the rest from the
        // store (`connected` keeps dirty parts, takes the others from the store).
        for (id, conn) in batch.connections {
            let e = inner
                .agents
                .entry(id.clone())
                .or_insert_with(|| Entry::new(conn, AgentReports::default()));
            e.conn_dirty = true;
            inner.dirty.insert(id);
        }
        for (id, reports) in batch.reports {
            let e = inner
                .agents
                .entry(id.clone())
                .or_insert_with(|| Entry::new(StoredConnection::default(), reports));
            e.reports_dirty = true;
            inner.dirty.insert(id);
        }
        for (id, mut lines) in batch.logs {
            if let Some(e) = inner.agents.get_mut(&id) {
                lines.append(&mut e.logs);
                e.logs = lines;
                inner.dirty.insert(id);
            }
        }
    }

    /// Drops everything held for `agent_ids` (their workspace was deleted): nothing
    /// more of theirs is flushed, and what their closing channels report is ignored.
    pub fn forget(&self, agent_ids: &[String]) {
        let mut inner = self.lock();
        for id in agent_ids {
            inner.agents.remove(id);
            inner.dirty.remove(id);
        }
    }

    /// Number of agents held in memory now.
    pub fn len(&self) -> usize {
        self.lock().agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Commits the ledger's changes every [`FLUSH_INTERVAL`] until `stop` resolves, then
/// once more.
pub async fn run_flusher(
    ledger: AgentLedger,
    store: Arc<Store>,
    metrics: crate::metrics::CoordinatorMetrics,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            () = &mut stop => true,
        };
        flush(&ledger, &store, &metrics).await;
        if last {
            return;
        }
    }
}

/// One group commit.
///
/// # Cancel safety
/// Not cancel safe. Dropped while the batch is being written, the write still runs
/// to its end on the blocking pool, but a batch that failed to write is lost instead
/// of kept for the next flush, and the flush is not counted in `/metrics`.
pub async fn flush(
    ledger: &AgentLedger,
    store: &Arc<Store>,
    metrics: &crate::metrics::CoordinatorMetrics,
) {
    let batch = ledger.take_batch();
    if batch.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let store = store.clone();
    let written = tokio::task::spawn_blocking(move || {
        let r = store.write_agent_state(&batch);
        (batch, r)
    })
    .await;
    match written {
        Ok((batch, Ok(()))) => {
            metrics.observe_flush(&batch, started.elapsed());
        }
        Ok((batch, Err(e))) => {
            tracing::error!("cannot write agent state, retrying at the next flush: {e}");
            ledger.restore(batch);
        }
        Err(e) => tracing::error!("the agent state flush failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::Name;
    use mesh::api::{AppHealth, LogSource};

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    #[test]
    fn heartbeats_coalesce_into_one_record_per_batch() {
        let l = AgentLedger::default();
        l.connected("a", None, t(1000));
        for i in 1..=100 {
            l.heartbeat("a", t(1000 + i));
        }
        let b = l.take_batch();
        assert_eq!(b.connections.len(), 1);
        let c = b.connections[0].1;
        assert_eq!(c.first_connected_at, Some(t(1000)));
        assert_eq!(c.last_connected_at, Some(t(1100)));
        assert!(l.take_batch().is_empty(), "nothing changed since");
    }

    #[test]
    fn first_connection_is_kept_from_the_store_and_disconnect_is_written() {
        let l = AgentLedger::default();
        let stored = StoredConnection {
            first_connected_at: Some(t(5)),
            last_connected_at: Some(t(9)),
            disconnected_at: Some(t(10)),
        };
        l.connected("a", Some((stored, AgentReports::default())), t(100));
        l.disconnected("a", true, t(200));
        let b = l.take_batch();
        let c = b.connections[0].1;
        assert_eq!(c.first_connected_at, Some(t(5)));
        assert_eq!(c.last_connected_at, Some(t(100)));
        assert_eq!(c.disconnected_at, Some(t(200)));
        assert!(l.is_empty(), "a gone, flushed agent is forgotten");
    }

    #[test]
    fn a_late_end_of_an_old_channel_does_not_disconnect_the_new_one() {
        let l = AgentLedger::default();
        l.connected("a", None, t(100));
        l.connected("a", None, t(150));
        l.disconnected("a", false, t(160));
        let c = l.take_batch().connections[0].1;
        assert_eq!(c.disconnected_at, None);
        assert!(l.has_channel("a"), "still one channel open");
    }

    #[test]
    fn a_reconnect_before_the_flush_keeps_unflushed_changes_and_takes_the_rest_from_the_store() {
        let l = AgentLedger::default();
        l.connected("a", None, t(100));
        l.take_batch();
        l.disconnected("a", true, t(200));
        let stored = StoredConnection {
            first_connected_at: Some(t(100)),
            last_connected_at: Some(t(100)),
            disconnected_at: None,
        };
        let reports = AgentReports {
            lifecycle_state: LifecycleState::Ready,
            ..AgentReports::default()
        };
        l.connected("a", Some((stored, reports)), t(300));
        let b = l.take_batch();
        let c = b.connections[0].1;
        assert_eq!(
            c.disconnected_at,
            Some(t(200)),
            "the unflushed disconnect is kept"
        );
        assert_eq!(c.last_connected_at, Some(t(300)));
        l.stats("a", AgentStats::default());
        let r = &l.take_batch().reports[0].1;
        assert_eq!(r.lifecycle_state, LifecycleState::Ready, "from the store");
    }

    #[test]
    fn reports_of_an_agent_without_a_channel_are_dropped() {
        let l = AgentLedger::default();
        l.lifecycle("ghost", LifecycleState::Ready, t(1));
        assert!(l.take_batch().is_empty());
    }

    #[test]
    fn reports_and_logs_are_batched() {
        let l = AgentLedger::default();
        l.connected("a", None, t(1));
        l.take_batch();
        l.lifecycle("a", LifecycleState::Starting, t(2));
        l.app_health(
            "a",
            vec![AppHealthChange {
                slug: Name::new("web").unwrap(),
                health: AppHealth::Healthy,
            }],
        );
        let line = |n: u64| LogLine {
            at: t(n),
            source: LogSource::Startup,
            text: format!("line {n}"),
        };
        l.logs("a", vec![line(1), line(2)]);
        l.logs("a", vec![line(3)]);
        let b = l.take_batch();
        assert!(b.connections.is_empty());
        assert_eq!(b.reports.len(), 1);
        let r = &b.reports[0].1;
        assert_eq!(r.lifecycle_state, LifecycleState::Starting);
        assert_eq!(
            r.apps_health[&Name::new("web").unwrap()],
            AppHealth::Healthy
        );
        let texts: Vec<_> = b.logs[0].1.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["line 1", "line 2", "line 3"]);
    }

    #[test]
    fn a_failed_batch_is_retried_with_newer_changes_kept() {
        let l = AgentLedger::default();
        l.connected("a", None, t(1));
        let b = l.take_batch();
        l.heartbeat("a", t(2));
        l.restore(b);
        let c = l.take_batch().connections[0].1;
        assert_eq!(c.last_connected_at, Some(t(2)));
    }

    #[test]
    fn a_log_flood_keeps_the_newest_lines_and_says_how_many_went() {
        let l = AgentLedger::default();
        l.connected("a", None, t(1));
        let lines: Vec<_> = (0..MAX_PENDING_LOG_LINES as u64 + 5)
            .map(|n| LogLine {
                at: t(n),
                source: LogSource::Startup,
                text: n.to_string(),
            })
            .collect();
        l.logs("a", lines);
        let b = l.take_batch();
        let got = &b.logs[0].1;
        assert_eq!(got.len(), MAX_PENDING_LOG_LINES + 1);
        assert!(got[0].text.contains("5 lines dropped"), "{}", got[0].text);
        assert_eq!(got[1].text, "5");
    }
}
