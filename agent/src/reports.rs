//! What the agent tells the coordinator beyond its address and heartbeats: lifecycle,
//! script logs, app health, metadata and stats.
//!
//! Reporters push into one [`ReportQueue`], a pure state machine with time passed in;
//! the control channel's task polls it for the messages to send ([`ReportQueue::poll_transmit`],
//! [`ReportQueue::poll_timeout`]). Lifecycle changes and log lines keep their order
//! and wait, bounded, while no channel is up; app health and metadata are kept as
//! current state, sent as batched changes, and all sent again on every new channel.
//!
//! Over 800 lines with its tests, which are half of it: the queue's ordering, bounds
//! and resend rules are tested here with explicit instants, next to the code.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mesh::api::{AgentStats, AppHealth, LogLine, MetadataValue, NetcheckResult};
use mesh::control::{AgentMessage, AppHealthChange};
use mesh::{Name, Timestamp};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lifecycle::{Lifecycle, LifecycleEvent};

/// Most log lines in one message (the coordinator refuses more).
const LOG_BATCH_LINES: usize = mesh::limits::LOG_BATCH_LINES;
/// Most bytes of log lines in one message, as JSON, which is never less than the
/// text the coordinator counts. It refuses control messages above
/// [`mesh::limits::MESSAGE_MAX`], and 100 lines of 16 KiB of control characters
/// would be 9.6 MiB escaped.
const LOG_BATCH_BYTES: usize = mesh::limits::LOG_BATCH_BYTES;
/// How long a log line waits for others to share its message.
const LOG_BATCH_DELAY: Duration = Duration::from_millis(250);
/// Unsent log lines kept while the coordinator is unreachable; older ones are dropped.
const LOG_BUFFER_LINES: usize = 10_000;
/// How long an app health or metadata change waits for others to share its message.
const STATE_BATCH_DELAY: Duration = Duration::from_millis(500);

/// Lifecycle changes and log lines, kept in the order they happened.
#[derive(Debug)]
enum Event {
    Lifecycle(Lifecycle),
    Log(LogLine),
}

/// Everything waiting to be reported, and the current state to report again on a new
/// channel.
#[derive(Debug)]
pub(crate) struct ReportQueue {
    lifecycle: Lifecycle,
    events: VecDeque<Event>,
    queued_lines: usize,
    queued_lifecycles: usize,
    /// Log lines dropped from the front of `events` since the last log message.
    dropped_lines: u64,
    logs_due: Option<Instant>,
    apps: BTreeMap<Name, AppHealth>,
    apps_changed: BTreeSet<Name>,
    apps_due: Option<Instant>,
    metadata: BTreeMap<Name, MetadataValue>,
    metadata_changed: BTreeSet<Name>,
    metadata_due: Option<Instant>,
    stats: Option<AgentStats>,
    /// The last network check, and whether this channel has not had it yet.
    netcheck: Option<NetcheckResult>,
    netcheck_unsent: bool,
}

impl ReportQueue {
    pub(crate) fn new(now: Timestamp) -> Self {
        Self {
            lifecycle: Lifecycle::new(now),
            events: VecDeque::new(),
            queued_lines: 0,
            queued_lifecycles: 0,
            dropped_lines: 0,
            logs_due: None,
            apps: BTreeMap::new(),
            apps_changed: BTreeSet::new(),
            apps_due: None,
            metadata: BTreeMap::new(),
            metadata_changed: BTreeSet::new(),
            metadata_due: None,
            stats: None,
            netcheck: None,
            netcheck_unsent: false,
        }
    }

    /// Moves the lifecycle; a change is queued behind the log lines before it.
    pub(crate) fn apply_lifecycle(&mut self, event: &LifecycleEvent, at: Timestamp) {
        if self.lifecycle.apply(event, at) {
            self.events.push_back(Event::Lifecycle(self.lifecycle));
            self.queued_lifecycles += 1;
        }
    }

    /// Queues a line; returns whether the sender must be woken: the line starts a
    /// batch (a new deadline) or fills one. A script printing fast then costs a
    /// wake-up per batch, not per line.
    pub(crate) fn log(&mut self, line: LogLine, now: Instant) -> bool {
        self.events.push_back(Event::Log(line));
        self.queued_lines += 1;
        let first = self.logs_due.is_none();
        self.logs_due.get_or_insert(now + LOG_BATCH_DELAY);
        while self.queued_lines > LOG_BUFFER_LINES {
            self.drop_oldest_line();
        }
        first || self.queued_lines.is_multiple_of(LOG_BATCH_LINES)
    }

    fn drop_oldest_line(&mut self) {
        // Only the few lifecycle changes can stand before the oldest line.
        if let Some(i) = self.events.iter().position(|e| matches!(e, Event::Log(_))) {
            self.events.remove(i);
            self.queued_lines -= 1;
            self.dropped_lines += 1;
        }
    }

    /// The apps of a (new) manifest with their health: apps no longer listed are
    /// forgotten, new or changed ones reported.
    pub(crate) fn set_apps(
        &mut self,
        apps: impl IntoIterator<Item = (Name, AppHealth)>,
        now: Instant,
    ) {
        let apps: BTreeMap<_, _> = apps.into_iter().collect();
        self.apps_changed.retain(|slug| apps.contains_key(slug));
        for (slug, health) in &apps {
            if self.apps.get(slug) != Some(health) {
                self.apps_changed.insert(slug.clone());
            }
        }
        self.apps = apps;
        if !self.apps_changed.is_empty() {
            self.apps_due.get_or_insert(now + STATE_BATCH_DELAY);
        }
    }

    /// An app's health as its checks now see it; only changes are reported.
    pub(crate) fn app_health(&mut self, slug: &Name, health: AppHealth, now: Instant) {
        let Some(current) = self.apps.get_mut(slug) else {
            // Not in the current manifest: a check of an app since removed.
            return;
        };
        if *current != health {
            *current = health;
            self.apps_changed.insert(slug.clone());
            self.apps_due.get_or_insert(now + STATE_BATCH_DELAY);
        }
    }

    /// Forgets metadata items no longer in the manifest.
    pub(crate) fn retain_metadata(&mut self, keys: &BTreeSet<Name>) {
        self.metadata.retain(|k, _| keys.contains(k));
        self.metadata_changed.retain(|k| keys.contains(k));
    }

    /// A metadata item's latest result; only a new value or error is reported.
    pub(crate) fn metadata(&mut self, value: MetadataValue, now: Instant) {
        if let Some(old) = self.metadata.get_mut(&value.key)
            && old.value == value.value
            && old.error == value.error
        {
            old.collected_at = value.collected_at;
            return;
        }
        self.metadata_changed.insert(value.key.clone());
        self.metadata.insert(value.key.clone(), value);
        self.metadata_due.get_or_insert(now + STATE_BATCH_DELAY);
    }

    /// The latest stats, sent as soon as the channel allows; older unsent ones are
    /// replaced.
    pub(crate) fn stats(&mut self, stats: AgentStats) {
        self.stats = Some(stats);
    }

    /// A new network check, sent as soon as the channel allows.
    pub(crate) fn netcheck(&mut self, result: NetcheckResult) {
        self.netcheck = Some(result);
        self.netcheck_unsent = true;
    }

    /// A control channel just came up: the current lifecycle, every app's health,
    /// every metadata value and the last network check go once more; unsent log lines
    /// go now.
    pub(crate) fn channel_opened(&mut self, now: Instant) {
        if self.queued_lifecycles == 0 {
            // It happened before everything still queued, since everything before it
            // was sent.
            self.events.push_front(Event::Lifecycle(self.lifecycle));
            self.queued_lifecycles += 1;
        }
        if self.queued_lines > 0 {
            self.logs_due = Some(now);
        }
        self.apps_changed = self.apps.keys().cloned().collect();
        self.apps_due = (!self.apps_changed.is_empty()).then_some(now);
        self.metadata_changed = self.metadata.keys().cloned().collect();
        self.metadata_due = (!self.metadata_changed.is_empty()).then_some(now);
        self.netcheck_unsent = self.netcheck.is_some();
    }

    /// The next message to send now, if any. Call until `None`, then wait until
    /// [`Self::poll_timeout`] or new reports.
    pub(crate) fn poll_transmit(&mut self, now: Instant) -> Option<AgentMessage> {
        match self.events.front() {
            Some(Event::Lifecycle(_)) => {
                if let Some(Event::Lifecycle(l)) = self.events.pop_front() {
                    self.queued_lifecycles -= 1;
                    return Some(AgentMessage::Lifecycle {
                        state: l.state,
                        changed_at: l.changed_at,
                    });
                }
            }
            Some(Event::Log(_)) if self.logs_ready(now) => return Some(self.take_logs()),
            _ => {}
        }
        if self.apps_due.is_some_and(|due| due <= now) {
            self.apps_due = None;
            let changes: Vec<_> = std::mem::take(&mut self.apps_changed)
                .into_iter()
                .filter_map(|slug| {
                    let health = *self.apps.get(&slug)?;
                    Some(AppHealthChange { slug, health })
                })
                .collect();
            if !changes.is_empty() {
                return Some(AgentMessage::AppHealth { changes });
            }
        }
        if self.metadata_due.is_some_and(|due| due <= now) {
            self.metadata_due = None;
            let items: Vec<_> = std::mem::take(&mut self.metadata_changed)
                .into_iter()
                .filter_map(|key| self.metadata.get(&key).cloned())
                .collect();
            if !items.is_empty() {
                return Some(AgentMessage::Metadata { items });
            }
        }
        if self.netcheck_unsent
            && let Some(result) = self.netcheck.clone()
        {
            self.netcheck_unsent = false;
            return Some(AgentMessage::Netcheck { result });
        }
        self.stats.take().map(|stats| AgentMessage::Stats { stats })
    }

    fn logs_ready(&self, now: Instant) -> bool {
        // A lifecycle change waits for no batch: the lines before it go at once.
        self.queued_lifecycles > 0
            || self.queued_lines >= LOG_BATCH_LINES
            || self.logs_due.is_some_and(|due| due <= now)
    }

    fn take_logs(&mut self) -> AgentMessage {
        let mut lines = Vec::new();
        if self.dropped_lines > 0
            && let Some(Event::Log(first)) = self.events.front()
        {
            lines.push(LogLine {
                at: first.at,
                source: first.source,
                text: format!(
                    "myco: {} earlier lines were dropped: the agent keeps at most {LOG_BUFFER_LINES} unsent lines",
                    self.dropped_lines
                ),
            });
            self.dropped_lines = 0;
        }
        let mut bytes = lines.iter().map(wire_len).sum::<usize>();
        while lines.len() < LOG_BATCH_LINES {
            let Some(Event::Log(next)) = self.events.front() else {
                break;
            };
            // One line always goes, however long: it is capped where it is read.
            bytes += wire_len(next);
            if bytes > LOG_BATCH_BYTES && !lines.is_empty() {
                break;
            }
            if let Some(Event::Log(line)) = self.events.pop_front() {
                self.queued_lines -= 1;
                lines.push(line);
            }
        }
        if self.queued_lines == 0 {
            self.logs_due = None;
        }
        AgentMessage::Logs { lines }
    }

    /// When [`Self::poll_transmit`] will next have something without new reports.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let logs = if self.queued_lines > 0 {
            self.logs_due
        } else {
            None
        };
        [logs, self.apps_due, self.metadata_due]
            .into_iter()
            .flatten()
            .min()
    }

    /// Puts back a message the channel failed to send, so lifecycle changes, log lines
    /// and the last network check are not lost. App health and metadata need nothing:
    /// a new channel sends them all; stats are sent afresh every interval.
    pub(crate) fn requeue(&mut self, msg: AgentMessage, now: Instant) {
        match msg {
            AgentMessage::Lifecycle { state, changed_at } => {
                self.events
                    .push_front(Event::Lifecycle(Lifecycle { state, changed_at }));
                self.queued_lifecycles += 1;
            }
            AgentMessage::Logs { lines } => {
                for line in lines.into_iter().rev() {
                    self.events.push_front(Event::Log(line));
                    self.queued_lines += 1;
                }
                self.logs_due.get_or_insert(now);
                while self.queued_lines > LOG_BUFFER_LINES {
                    self.drop_oldest_line();
                }
            }
            AgentMessage::Netcheck { .. } => self.netcheck_unsent = true,
            _ => {}
        }
    }

    /// No lifecycle change or log line waits to be sent.
    pub(crate) fn is_drained(&self) -> bool {
        self.events.is_empty()
    }
}

/// About how many bytes `line` takes in a message's JSON: its text as escaped, plus
/// the timestamp, source and punctuation.
fn wire_len(line: &LogLine) -> usize {
    let text: usize = line
        .text
        .chars()
        .map(|c| match c {
            '"' | '\\' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum();
    text + 80
}

/// The shared handle to the [`ReportQueue`]: reporters push, the control channel's
/// task is woken and sends.
#[derive(Clone)]
pub(crate) struct Reports(Arc<Shared>);

struct Shared {
    queue: Mutex<ReportQueue>,
    /// Wakes the control channel's task: there is something new.
    pushed: Notify,
    /// Wakes whoever waits for the queue to drain: the control channel sent.
    sent: Notify,
}

impl Default for Reports {
    fn default() -> Self {
        Self(Arc::new(Shared {
            queue: Mutex::new(ReportQueue::new(Timestamp::now())),
            pushed: Notify::new(),
            sent: Notify::new(),
        }))
    }
}

impl Reports {
    fn queue(&self) -> MutexGuard<'_, ReportQueue> {
        // The queue holds plain data whose every update completes: a panic elsewhere
        // cannot leave it half-changed.
        self.0.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, f: impl FnOnce(&mut ReportQueue, Instant)) {
        f(&mut self.queue(), Instant::now());
        self.0.pushed.notify_one();
    }

    pub(crate) fn lifecycle(&self, event: LifecycleEvent) {
        self.push(|q, _| q.apply_lifecycle(&event, Timestamp::now()));
    }

    pub(crate) fn log(&self, line: LogLine) {
        let wake = self.queue().log(line, Instant::now());
        if wake {
            self.0.pushed.notify_one();
        }
    }

    pub(crate) fn set_apps(&self, apps: impl IntoIterator<Item = (Name, AppHealth)>) {
        self.push(|q, now| q.set_apps(apps, now));
    }

    pub(crate) fn app_health(&self, slug: &Name, health: AppHealth) {
        self.push(|q, now| q.app_health(slug, health, now));
    }

    pub(crate) fn retain_metadata(&self, keys: &BTreeSet<Name>) {
        self.push(|q, _| q.retain_metadata(keys));
    }

    pub(crate) fn metadata(&self, value: MetadataValue) {
        self.push(|q, now| q.metadata(value, now));
    }

    pub(crate) fn stats(&self, stats: AgentStats) {
        self.push(|q, _| q.stats(stats));
    }

    pub(crate) fn netcheck(&self, result: NetcheckResult) {
        self.push(|q, _| q.netcheck(result));
    }

    /// For the control channel: see [`ReportQueue::channel_opened`].
    pub(crate) fn channel_opened(&self) {
        self.queue().channel_opened(Instant::now());
    }

    pub(crate) fn poll_transmit(&self) -> Option<AgentMessage> {
        self.queue().poll_transmit(Instant::now())
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.queue().poll_timeout()
    }

    pub(crate) fn requeue(&self, msg: AgentMessage) {
        self.queue().requeue(msg, Instant::now());
    }

    /// For the control channel, after sending what [`Self::poll_transmit`] gave.
    pub(crate) fn sent(&self) {
        self.0.sent.notify_waiters();
    }

    /// Resolves when something was pushed since the last call.
    ///
    /// # Cancel safety
    /// Cancel safe: a push while nobody waits is remembered for the next call.
    pub(crate) async fn pushed(&self) {
        self.0.pushed.notified().await;
    }

    /// Resolves once every lifecycle change and log line has been sent.
    pub(crate) async fn drained(&self) {
        loop {
            let sent = self.0.sent.notified();
            tokio::pin!(sent);
            sent.as_mut().enable();
            if self.queue().is_drained() {
                return;
            }
            sent.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::ScriptOutcome;
    use mesh::api::LogSource;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn line(text: &str) -> LogLine {
        LogLine {
            at: Timestamp::from_unix_millis(1),
            source: LogSource::Startup,
            text: text.into(),
        }
    }

    fn drain(q: &mut ReportQueue, now: Instant) -> Vec<AgentMessage> {
        std::iter::from_fn(|| q.poll_transmit(now)).collect()
    }

    fn summary(msgs: &[AgentMessage]) -> Vec<String> {
        msgs.iter()
            .map(|m| match m {
                AgentMessage::Lifecycle { state, .. } => format!("lifecycle {state}"),
                AgentMessage::Logs { lines } => format!(
                    "logs {}",
                    lines
                        .iter()
                        .map(|l| l.text.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                AgentMessage::AppHealth { changes } => format!(
                    "apps {}",
                    changes
                        .iter()
                        .map(|c| format!("{}={}", c.slug, c.health))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                AgentMessage::Metadata { items } => format!(
                    "metadata {}",
                    items
                        .iter()
                        .map(|i| format!("{}={}", i.key, i.value))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                AgentMessage::Stats { .. } => "stats".into(),
                AgentMessage::Netcheck { result } => format!("netcheck {}", result.reason),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn queue() -> (ReportQueue, Instant) {
        (
            ReportQueue::new(Timestamp::from_unix_millis(0)),
            Instant::now(),
        )
    }

    #[test]
    fn a_new_channel_gets_the_current_lifecycle_once() {
        let (mut q, t0) = queue();
        q.channel_opened(t0);
        assert_eq!(summary(&drain(&mut q, t0)), ["lifecycle created"]);
        assert!(drain(&mut q, t0).is_empty());
        q.channel_opened(t0);
        assert_eq!(summary(&drain(&mut q, t0)), ["lifecycle created"]);
    }

    #[test]
    fn the_last_netcheck_goes_once_per_channel_and_survives_a_failed_send() {
        let (mut q, t0) = queue();
        q.channel_opened(t0);
        drain(&mut q, t0);
        let result = |reason: &str| NetcheckResult {
            checked_at: Timestamp::from_unix_millis(5),
            reason: reason.into(),
            report: netcheck::Report::default(),
        };
        q.netcheck(result("start"));
        q.netcheck(result("network change"));
        let sent = drain(&mut q, t0);
        assert_eq!(summary(&sent), ["netcheck network change"]);
        assert!(drain(&mut q, t0).is_empty());
        // The send failed: it goes again.
        q.requeue(sent.into_iter().next().unwrap(), t0);
        assert_eq!(summary(&drain(&mut q, t0)), ["netcheck network change"]);
        // A new channel gets it (after the lifecycle) without a new check.
        q.channel_opened(t0);
        assert_eq!(
            summary(&drain(&mut q, t0)),
            ["lifecycle created", "netcheck network change"]
        );
    }

    #[test]
    fn logs_are_batched_by_time_and_count_and_stay_in_order_with_lifecycle() {
        let (mut q, t0) = queue();
        q.channel_opened(t0);
        drain(&mut q, t0);
        q.apply_lifecycle(
            &LifecycleEvent::StartupBegan,
            Timestamp::from_unix_millis(1),
        );
        assert_eq!(summary(&drain(&mut q, t0)), ["lifecycle starting"]);
        // The first line sets a deadline, so the sender must wake; the next need not.
        assert!(q.log(line("a"), t0));
        assert!(!q.log(line("b"), t0 + Duration::from_millis(100)));
        // Not yet: the batch waits for more lines.
        assert!(drain(&mut q, t0 + Duration::from_millis(249)).is_empty());
        assert_eq!(q.poll_timeout(), Some(t0 + LOG_BATCH_DELAY));
        assert_eq!(summary(&drain(&mut q, t0 + LOG_BATCH_DELAY)), ["logs a,b"]);
        assert_eq!(q.poll_timeout(), None);

        // A full batch goes at once.
        let t1 = t0 + Duration::from_secs(1);
        for i in 0..LOG_BATCH_LINES + 1 {
            let wake = q.log(line(&i.to_string()), t1);
            assert_eq!(wake, i == 0 || i == LOG_BATCH_LINES - 1, "line {i}");
        }
        let msgs = drain(&mut q, t1);
        assert_eq!(msgs.len(), 1);
        assert!(matches!(&msgs[0], AgentMessage::Logs { lines } if lines.len() == LOG_BATCH_LINES));
        // A lifecycle change flushes the lines before it, then goes itself.
        q.apply_lifecycle(
            &LifecycleEvent::StartupEnded(ScriptOutcome::Exited(3)),
            Timestamp::from_unix_millis(2),
        );
        q.log(line("after"), t1);
        assert_eq!(
            summary(&drain(&mut q, t1)),
            ["logs 100", "lifecycle start_error"]
        );
        assert_eq!(
            summary(&drain(&mut q, t1 + LOG_BATCH_DELAY)),
            ["logs after"]
        );
    }

    #[test]
    fn log_messages_stay_small_however_long_the_lines() {
        let (mut q, t0) = queue();
        q.channel_opened(t0);
        drain(&mut q, t0);
        // 16 KiB of control characters escape to 96 KiB each.
        let ugly = "\u{1}".repeat(16 * 1024);
        for _ in 0..LOG_BATCH_LINES {
            q.log(line(&ugly), t0);
        }
        let msgs = drain(&mut q, t0 + LOG_BATCH_DELAY);
        assert!(msgs.len() > 1);
        let mut lines = 0;
        for m in &msgs {
            let json = serde_json::to_string(m).unwrap();
            assert!(json.len() <= LOG_BATCH_BYTES, "{} bytes", json.len());
            if let AgentMessage::Logs { lines: l } = m {
                lines += l.len();
            }
        }
        assert_eq!(lines, LOG_BATCH_LINES);
        // A line longer than a message's budget still goes, alone.
        q.log(line(&"x".repeat(2 * LOG_BATCH_BYTES)), t0);
        assert_eq!(drain(&mut q, t0 + LOG_BATCH_DELAY).len(), 1);
    }

    #[test]
    fn lines_wait_for_a_channel_and_the_oldest_are_dropped_beyond_the_bound() {
        let (mut q, t0) = queue();
        q.apply_lifecycle(
            &LifecycleEvent::StartupBegan,
            Timestamp::from_unix_millis(1),
        );
        for i in 0..LOG_BUFFER_LINES + 5 {
            q.log(line(&i.to_string()), t0);
        }
        q.apply_lifecycle(
            &LifecycleEvent::StartupEnded(ScriptOutcome::Exited(0)),
            Timestamp::from_unix_millis(2),
        );
        q.channel_opened(t0);
        let msgs = drain(&mut q, t0);
        let texts: Vec<String> = msgs
            .iter()
            .flat_map(|m| match m {
                AgentMessage::Logs { lines } => lines.iter().map(|l| l.text.clone()).collect(),
                AgentMessage::Lifecycle { state, .. } => vec![format!("[{state}]")],
                _ => vec![],
            })
            .collect();
        assert_eq!(texts[0], "[starting]");
        assert!(
            texts[1].starts_with("myco: 5 earlier lines were dropped"),
            "{}",
            texts[1]
        );
        assert_eq!(texts[2], "5");
        assert_eq!(texts[texts.len() - 2], (LOG_BUFFER_LINES + 4).to_string());
        assert_eq!(texts[texts.len() - 1], "[ready]");
        assert_eq!(texts.len(), LOG_BUFFER_LINES + 3);
        assert!(q.is_drained());
    }

    #[test]
    fn a_failed_send_is_put_back_in_order() {
        let (mut q, t0) = queue();
        q.channel_opened(t0);
        drain(&mut q, t0);
        q.log(line("a"), t0);
        q.log(line("b"), t0);
        q.apply_lifecycle(
            &LifecycleEvent::StartupBegan,
            Timestamp::from_unix_millis(1),
        );
        let logs = q.poll_transmit(t0).unwrap();
        let lifecycle = q.poll_transmit(t0).unwrap();
        assert!(q.is_drained());
        // The channel broke while sending the lifecycle change.
        q.requeue(lifecycle, t0);
        q.requeue(logs, t0);
        q.channel_opened(t0);
        assert_eq!(
            summary(&drain(&mut q, t0)),
            ["logs a,b", "lifecycle starting"]
        );
    }

    #[test]
    fn app_health_changes_are_batched_and_all_sent_on_a_new_channel() {
        let (mut q, t0) = queue();
        q.channel_opened(t0);
        drain(&mut q, t0);
        q.set_apps(
            [
                (name("web"), AppHealth::Initializing),
                (name("docs"), AppHealth::Disabled),
            ],
            t0,
        );
        assert_eq!(q.poll_timeout(), Some(t0 + STATE_BATCH_DELAY));
        assert!(drain(&mut q, t0).is_empty());
        let t1 = t0 + STATE_BATCH_DELAY;
        assert_eq!(
            summary(&drain(&mut q, t1)),
            ["apps docs=disabled,web=initializing"]
        );
        // Unchanged health is not sent again; changes within the window share a message.
        q.app_health(&name("web"), AppHealth::Initializing, t1);
        assert_eq!(q.poll_timeout(), None);
        q.app_health(&name("web"), AppHealth::Unhealthy, t1);
        q.app_health(
            &name("web"),
            AppHealth::Healthy,
            t1 + Duration::from_millis(400),
        );
        assert!(drain(&mut q, t1 + Duration::from_millis(499)).is_empty());
        assert_eq!(
            summary(&drain(&mut q, t1 + STATE_BATCH_DELAY)),
            ["apps web=healthy"]
        );
        // An app the manifest no longer has is not reported.
        q.app_health(&name("gone"), AppHealth::Healthy, t1);
        assert_eq!(q.poll_timeout(), None);
        q.channel_opened(t1);
        assert_eq!(
            summary(&drain(&mut q, t1)),
            ["lifecycle created", "apps docs=disabled,web=healthy"]
        );
    }

    fn value(key: &str, v: &str, at: u64) -> MetadataValue {
        MetadataValue {
            key: name(key),
            value: v.into(),
            error: None,
            collected_at: Timestamp::from_unix_millis(at),
        }
    }

    #[test]
    fn metadata_sends_changed_values_and_everything_on_a_new_channel() {
        let (mut q, t0) = queue();
        q.channel_opened(t0);
        drain(&mut q, t0);
        q.metadata(value("load", "0.1", 1), t0);
        q.metadata(value("disk", "50%", 1), t0);
        let t1 = t0 + STATE_BATCH_DELAY;
        assert_eq!(summary(&drain(&mut q, t1)), ["metadata disk=50%,load=0.1"]);
        q.metadata(value("load", "0.1", 2), t1);
        assert_eq!(q.poll_timeout(), None);
        q.metadata(
            MetadataValue {
                error: Some("exit status 1".into()),
                ..value("load", "0.1", 3)
            },
            t1,
        );
        assert_eq!(
            summary(&drain(&mut q, t1 + STATE_BATCH_DELAY)),
            ["metadata load=0.1"]
        );
        q.retain_metadata(&BTreeSet::from([name("disk")]));
        q.channel_opened(t1);
        assert_eq!(
            summary(&drain(&mut q, t1)),
            ["lifecycle created", "metadata disk=50%"]
        );
    }

    #[test]
    fn only_the_latest_stats_are_sent() {
        let (mut q, t0) = queue();
        q.stats(AgentStats {
            rx_bytes: 1,
            ..Default::default()
        });
        q.stats(AgentStats {
            rx_bytes: 2,
            ..Default::default()
        });
        let msgs = drain(&mut q, t0);
        assert!(matches!(&msgs[..], [AgentMessage::Stats { stats }] if stats.rx_bytes == 2));
    }

    #[tokio::test(start_paused = true)]
    async fn drained_waits_for_the_control_channel() {
        let reports = Reports::default();
        reports.lifecycle(LifecycleEvent::StartupBegan);
        let waiter = tokio::spawn({
            let reports = reports.clone();
            async move { reports.drained().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        while reports.poll_transmit().is_some() {}
        reports.sent();
        waiter.await.unwrap();
    }
}
