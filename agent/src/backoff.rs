//! How long the control channel waits before it reconnects, as a pure state machine
//! with time and randomness passed in: the delay doubles from [`BACKOFF_MIN`] up to
//! [`BACKOFF_MAX`] with each attempt that ends, is jittered so agents restarted
//! together spread out, and starts over after an attempt that lasted more than
//! [`STABLE`] (a channel that was up that long was not a failure to retry hard).

use std::time::Duration;

use tokio::time::Instant;

/// The delay before the first retry, before jitter.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// The longest delay, before jitter.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An attempt (connecting and the channel's life) that lasted longer resets the delay.
pub(crate) const STABLE: Duration = Duration::from_secs(30);

/// The reconnect delay of one control channel.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// The next delay, before jitter.
    delay: Duration,
    /// When the attempt under way started.
    started: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            delay: BACKOFF_MIN,
            started: None,
        }
    }
}

impl Backoff {
    /// An attempt starts at `now`.
    pub(crate) fn started(&mut self, now: Instant) {
        self.started = Some(now);
    }

    /// The attempt ended at `now`: how long to wait before the next one, with
    /// `jitter` (a random fraction in `[0, 1)`) placing it in `[delay/2, delay)`.
    pub(crate) fn ended(&mut self, now: Instant, jitter: f64) -> Duration {
        if self
            .started
            .take()
            .is_some_and(|at| now.saturating_duration_since(at) > STABLE)
        {
            self.delay = BACKOFF_MIN;
        }
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let wait = self.delay.mul_f64(0.5 + jitter / 2.0);
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// The waits of attempts that each end as soon as they start, with `jitter`.
    fn waits(backoff: &mut Backoff, now: Instant, n: usize, jitter: f64) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                backoff.started(now);
                backoff.ended(now, jitter)
            })
            .collect()
    }

    #[test]
    fn the_delay_doubles_up_to_its_cap() {
        let now = Instant::now();
        let mut b = Backoff::default();
        // Jitter near 1 waits (almost) the whole delay; 0.5 waits three quarters.
        let full: Vec<_> = waits(&mut b, now, 9, 1.0);
        assert_eq!(
            full,
            [
                ms(500),
                ms(1_000),
                ms(2_000),
                ms(4_000),
                ms(8_000),
                ms(16_000),
                ms(30_000),
                ms(30_000),
                ms(30_000)
            ]
        );
    }

    #[test]
    fn jitter_keeps_the_wait_between_half_the_delay_and_the_delay() {
        let now = Instant::now();
        let mut b = Backoff::default();
        assert_eq!(waits(&mut b, now, 1, 0.0), [ms(250)]);
        let mut b = Backoff::default();
        assert_eq!(waits(&mut b, now, 1, 0.5), [ms(375)]);
        let mut b = Backoff::default();
        let almost = waits(&mut b, now, 1, 0.999_999)[0];
        assert!(almost < ms(500) && almost > ms(499), "{almost:?}");
        // Out of range or not a number, it stays within the bounds.
        for jitter in [-1.0, 7.0, f64::NAN, f64::INFINITY] {
            let mut b = Backoff::default();
            let wait = waits(&mut b, now, 1, jitter)[0];
            assert!((ms(250)..=ms(500)).contains(&wait), "{jitter}: {wait:?}");
        }
        // At the cap too.
        let mut b = Backoff::default();
        let capped = waits(&mut b, now, 10, 0.0);
        assert_eq!(capped[9], ms(15_000));
    }

    #[test]
    fn an_attempt_that_lasted_over_30_s_starts_the_delay_over() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert_eq!(waits(&mut b, t0, 4, 1.0).last(), Some(&ms(4_000)));
        // Exactly 30 s is not enough: the delay goes on growing.
        b.started(t0);
        assert_eq!(b.ended(t0 + STABLE, 1.0), ms(8_000));
        // Longer is: back to the first delay, then growing again.
        let t1 = t0 + Duration::from_secs(60);
        b.started(t1);
        assert_eq!(b.ended(t1 + STABLE + ms(1), 1.0), ms(500));
        let t2 = t1 + Duration::from_secs(40);
        assert_eq!(waits(&mut b, t2, 2, 1.0), [ms(1_000), ms(2_000)]);
        // A short attempt after a long one does not reset it.
        b.started(t2);
        assert_eq!(b.ended(t2 + ms(10), 1.0), ms(4_000));
    }

    #[test]
    fn an_end_without_a_start_does_not_reset() {
        let now = Instant::now();
        let mut b = Backoff::default();
        assert_eq!(b.ended(now, 1.0), ms(500));
        assert_eq!(b.ended(now + Duration::from_secs(3600), 1.0), ms(1_000));
    }
}
