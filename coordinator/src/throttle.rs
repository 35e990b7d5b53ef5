//! What guards password checks, the one costly thing an unauthenticated caller can
//! ask for: attempts are rate limited per source address and per username (token
//! buckets of `governor`, keyed), and argon2 runs on at most one thread per core, a
//! caller waiting a bounded time for one. Whoever is over gets `429` with
//! `Retry-After`, so a login flood neither guesses passwords fast nor starves
//! heartbeats and the rest of the API of CPU.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// How long a request waits for a free argon2 thread before it is told to retry.
const HASH_WAIT: Duration = Duration::from_secs(5);

/// Login and first-user attempts allowed, each a minute, and the burst that many.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    pub per_ip_per_minute: NonZeroU32,
    pub per_user_per_minute: NonZeroU32,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            per_ip_per_minute: NonZeroU32::new(30).unwrap_or(NonZeroU32::MIN),
            per_user_per_minute: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// The login rate limits and the argon2 thread budget, shared by every request.
pub(crate) struct Throttle {
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    per_user: DefaultKeyedRateLimiter<String>,
    hashing: Semaphore,
    hash_wait: Duration,
    clock: DefaultClock,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("ips", &self.per_ip.len())
            .field("users", &self.per_user.len())
            .field("hashers_free", &self.hashing.available_permits())
            .finish()
    }
}

impl Throttle {
    /// `hashers`: argon2 computations at once (the cores, at least one).
    pub(crate) fn new(limits: LoginLimits, hashers: usize) -> Self {
        Self {
            per_ip: RateLimiter::keyed(Quota::per_minute(limits.per_ip_per_minute)),
            per_user: RateLimiter::keyed(Quota::per_minute(limits.per_user_per_minute)),
            hashing: Semaphore::new(hashers.max(1)),
            hash_wait: HASH_WAIT,
            clock: DefaultClock::default(),
        }
    }

    /// Takes one attempt from the budgets of `ip` (its /64 for IPv6, which one
    /// host is given whole) and of `username`; `429` when either is spent.
    pub(crate) fn attempt(&self, ip: Option<IpAddr>, username: &str) -> Result<(), ApiError> {
        if let Some(ip) = ip
            && let Err(not_until) = self.per_ip.check_key(&source_key(ip))
        {
            let wait = not_until.wait_time_from(self.clock.now());
            tracing::warn!(%ip, "login attempts from this address are rate limited");
            return Err(ApiError::too_many_requests(
                "too many login attempts from your address",
                "wait and try again",
                wait,
            ));
        }
        if let Err(not_until) = self.per_user.check_key(&username.to_owned()) {
            let wait = not_until.wait_time_from(self.clock.now());
            tracing::warn!(
                user = username,
                "login attempts for this user are rate limited"
            );
            return Err(ApiError::too_many_requests(
                format!("too many login attempts for user {username}"),
                "wait and try again",
                wait,
            ));
        }
        Ok(())
    }

    /// Runs `f` (argon2 work) on a blocking thread once one of the hashing permits
    /// is free; `429` when none frees within [`HASH_WAIT`].
    ///
    /// # Cancel safety
    /// Called by handlers under the request deadline. Dropped while waiting for a
    /// permit, nothing happened. Dropped while `f` runs, `f` still runs to its end on
    /// the blocking pool, but the permit is given back at once, so for that while
    /// one more hash may run than the budget says.
    pub(crate) async fn hash<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = tokio::time::timeout(self.hash_wait, self.hashing.acquire())
            .await
            .map_err(|_| {
                ApiError::too_many_requests(
                    "the coordinator is busy checking passwords",
                    "try again in a moment",
                    Duration::from_secs(1),
                )
            })?
            .map_err(|_| ApiError::internal("the coordinator is shutting down", ""))?;
        let out = tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ApiError::internal("a password check failed", e.to_string()))?;
        drop(permit);
        out
    }

    /// Forgets addresses and users whose budgets are full again; run now and then so
    /// the tables hold only recent callers.
    pub(crate) fn retain_recent(&self) {
        self.per_ip.retain_recent();
        self.per_user.retain_recent();
        self.per_ip.shrink_to_fit();
        self.per_user.shrink_to_fit();
    }
}

/// The rate-limit key of an address: IPv4 whole, IPv6 by its /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits(ip: u32, user: u32) -> LoginLimits {
        LoginLimits {
            per_ip_per_minute: NonZeroU32::new(ip).unwrap(),
            per_user_per_minute: NonZeroU32::new(user).unwrap(),
        }
    }

    #[test]
    fn an_address_gets_its_burst_then_429_with_a_wait() {
        let t = Throttle::new(limits(3, 100), 1);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for n in 0..3 {
            t.attempt(Some(ip), &format!("user{n}")).unwrap();
        }
        let e = t.attempt(Some(ip), "user9").unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert!(e.retry_after().unwrap() > Duration::ZERO);
        // Another address is not affected.
        t.attempt(Some("192.0.2.2".parse().unwrap()), "user9")
            .unwrap();
    }

    #[test]
    fn a_username_is_limited_whatever_the_address() {
        let t = Throttle::new(limits(100, 2), 1);
        t.attempt(Some("192.0.2.1".parse().unwrap()), "alice")
            .unwrap();
        t.attempt(Some("192.0.2.2".parse().unwrap()), "alice")
            .unwrap();
        let e = t
            .attempt(Some("192.0.2.3".parse().unwrap()), "alice")
            .unwrap_err();
        assert!(e.message().contains("alice"), "{e:?}");
        t.attempt(Some("192.0.2.3".parse().unwrap()), "bob")
            .unwrap();
    }

    #[test]
    fn ipv6_addresses_of_one_prefix_share_a_budget() {
        let t = Throttle::new(limits(1, 100), 1);
        t.attempt(Some("2001:db8::1".parse().unwrap()), "a")
            .unwrap();
        assert!(
            t.attempt(Some("2001:db8::2".parse().unwrap()), "b")
                .is_err()
        );
        t.attempt(Some("2001:db8:0:1::1".parse().unwrap()), "c")
            .unwrap();
        // An IPv4-mapped address counts as the IPv4 one.
        t.attempt(Some("::ffff:192.0.2.7".parse().unwrap()), "d")
            .unwrap();
        assert!(t.attempt(Some("192.0.2.7".parse().unwrap()), "e").is_err());
    }

    #[tokio::test]
    async fn hashing_waits_for_a_free_thread() {
        let t = std::sync::Arc::new(Throttle::new(LoginLimits::default(), 1));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let busy = {
            let t = t.clone();
            tokio::spawn(async move {
                t.hash(move || {
                    rx.recv().unwrap();
                    Ok(1)
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        while t.hashing.available_permits() != 0 {
            tokio::task::yield_now().await;
        }
        // With the only thread taken, a second check waits (here: until released).
        let second = {
            let t = t.clone();
            tokio::spawn(async move { t.hash(|| Ok(2)).await })
        };
        tx.send(()).unwrap();
        assert_eq!(busy.await.unwrap().unwrap(), 1);
        assert_eq!(second.await.unwrap().unwrap(), 2);
    }

    #[tokio::test]
    async fn hashing_saturated_is_429_not_a_queue() {
        let mut t = Throttle::new(LoginLimits::default(), 1);
        t.hash_wait = Duration::from_millis(50);
        let t = std::sync::Arc::new(t);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let busy = {
            let t = t.clone();
            tokio::spawn(async move {
                t.hash(move || {
                    rx.recv().unwrap();
                    Ok(())
                })
                .await
            })
        };
        while t.hashing.available_permits() != 0 {
            tokio::task::yield_now().await;
        }
        let e = t.hash(|| Ok(())).await.unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert!(e.retry_after().is_some());
        tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
    }
}
