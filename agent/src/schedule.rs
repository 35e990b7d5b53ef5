//! When each of a set of periodic jobs (app health checks, metadata scripts) is next
//! due, as a pure state machine with time passed in: every job runs every interval,
//! one run of a job at a time, jobs independent of each other.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
struct Job<K> {
    key: K,
    interval: Duration,
    state: JobState,
}

#[derive(Debug, Clone, Copy)]
enum JobState {
    Due(Instant),
    /// Running since then.
    Running(Instant),
}

/// The schedule of a fixed set of jobs keyed by `K`.
#[derive(Debug)]
pub(crate) struct PeriodicSchedule<K> {
    jobs: Vec<Job<K>>,
}

impl<K: Clone + PartialEq> PeriodicSchedule<K> {
    /// Every job is due at once.
    pub(crate) fn new(jobs: impl IntoIterator<Item = (K, Duration)>, now: Instant) -> Self {
        Self {
            jobs: jobs
                .into_iter()
                .map(|(key, interval)| Job {
                    key,
                    interval,
                    state: JobState::Due(now),
                })
                .collect(),
        }
    }

    /// The jobs due at `now`, now marked running.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<K> {
        let mut due = Vec::new();
        for job in &mut self.jobs {
            if let JobState::Due(at) = job.state
                && at <= now
            {
                job.state = JobState::Running(now);
                due.push(job.key.clone());
            }
        }
        due
    }

    /// A run of `key` ended: the next is due an interval after this one started, or
    /// at once if this one took longer.
    pub(crate) fn finished(&mut self, key: &K, now: Instant) {
        if let Some(job) = self.jobs.iter_mut().find(|j| j.key == *key)
            && let JobState::Running(started) = job.state
        {
            job.state = JobState::Due((started + job.interval).max(now));
        }
    }

    /// The earliest time a job not running is due; `None` when every job runs (or
    /// there are none).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.jobs
            .iter()
            .filter_map(|j| match j.state {
                JobState::Due(at) => Some(at),
                JobState::Running(_) => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn jobs_run_at_once_then_every_interval_one_run_at_a_time() {
        let t0 = Instant::now();
        let mut s = PeriodicSchedule::new([("a", 10 * S), ("b", 3 * S)], t0);
        assert_eq!(s.poll_timeout(), Some(t0));
        assert_eq!(s.take_due(t0), ["a", "b"]);
        // Both run: nothing is due until one ends.
        assert_eq!(s.poll_timeout(), None);
        assert!(s.take_due(t0 + 20 * S).is_empty());
        s.finished(&"b", t0 + S);
        assert_eq!(s.poll_timeout(), Some(t0 + 3 * S));
        assert!(s.take_due(t0 + 3 * S - Duration::from_millis(1)).is_empty());
        assert_eq!(s.take_due(t0 + 3 * S), ["b"]);
        // A run longer than its interval: the next is due as soon as it ends.
        s.finished(&"a", t0 + 12 * S);
        assert_eq!(s.poll_timeout(), Some(t0 + 12 * S));
        assert_eq!(s.take_due(t0 + 12 * S), ["a"]);
        // Unknown keys and jobs not running are ignored.
        s.finished(&"zzz", t0);
        s.finished(&"b", t0 + 4 * S);
        s.finished(&"b", t0 + 5 * S);
        assert_eq!(s.poll_timeout(), Some(t0 + 6 * S));
    }

    #[test]
    fn an_empty_schedule_never_wakes() {
        let mut s = PeriodicSchedule::<u8>::new([], Instant::now());
        assert_eq!(s.poll_timeout(), None);
        assert!(s.take_due(Instant::now()).is_empty());
    }
}
