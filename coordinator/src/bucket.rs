//! A token bucket: a rate with a burst, for the limits on what one peer may send
//! (messages on an agent's control channel, bytes through the relay). Pure: the
//! caller passes `now`.

use std::time::Duration;

use tokio::time::Instant;

/// `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }

    /// Takes `n` tokens if the bucket holds them.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt if need be; returns how long the caller
    /// should wait before sending more (zero while the bucket is not in debt). A
    /// take larger than the burst is allowed once the bucket is full, so a large
    /// unit (a relay frame) always gets through eventually.
    pub fn take_or_wait(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 20.0, t0);
        for _ in 0..20 {
            assert!(b.try_take(1.0, t0));
        }
        assert!(!b.try_take(1.0, t0));
        // A tenth of a second gives one token back.
        assert!(b.try_take(1.0, t0 + Duration::from_millis(100)));
        assert!(!b.try_take(1.0, t0 + Duration::from_millis(100)));
        // Never more than the burst, however long it rested.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..20 {
            assert!(b.try_take(1.0, later));
        }
        assert!(!b.try_take(1.0, later));
    }

    #[test]
    fn debt_is_paid_back_in_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 1000.0, t0);
        assert_eq!(b.take_or_wait(1000.0, t0), Duration::ZERO);
        // 500 more: half a second of debt.
        assert_eq!(b.take_or_wait(500.0, t0), Duration::from_millis(500));
        let paid = t0 + Duration::from_millis(500);
        assert_eq!(b.take_or_wait(0.0, paid), Duration::ZERO);
    }
}
