//! An agent's connection status as a pure function of its stored connection times, the
//! timeouts and one `now` (Coder's rules; ARCHITECTURE.md, decision 6). Nothing here reads a clock: the
//! caller takes `now` once per scrape or listing and judges every agent against it, so
//! how long the judging takes cannot change the verdicts (Coder's seed bug).

use std::time::Duration;

use mesh::Timestamp;

pub use mesh::api::AgentStatus;
use mesh::api::AppHealth;

/// The stored times the status is derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionTimes {
    pub created_at: Timestamp,
    pub first_connected_at: Option<Timestamp>,
    /// Refreshed by every heartbeat.
    pub last_connected_at: Option<Timestamp>,
    /// Written when a control channel ends.
    pub disconnected_at: Option<Timestamp>,
}

impl ConnectionTimes {
    pub fn from_stored(created_at: Timestamp, c: &crate::store::StoredConnection) -> Self {
        Self {
            created_at,
            first_connected_at: c.first_connected_at,
            last_connected_at: c.last_connected_at,
            disconnected_at: c.disconnected_at,
        }
    }
}

/// An app's health: as its agent last reported it, else `initializing` for an app
/// with a health check and `disabled` for one without.
pub fn app_health(has_check: bool, reported: Option<AppHealth>) -> AppHealth {
    reported.unwrap_or(if has_check {
        AppHealth::Initializing
    } else {
        AppHealth::Disabled
    })
}

/// The timeouts the status is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusPolicy {
    /// How long a new agent may take to connect at all; `None`: forever.
    pub connection_timeout: Option<Duration>,
    /// How long a connected agent may go unheard (default: 2 heartbeat intervals).
    pub inactive_timeout: Duration,
}

impl StatusPolicy {
    /// The inactive timeout that goes with a heartbeat interval: two intervals, so one
    /// late or lost heartbeat does not make an agent look disconnected.
    pub fn for_heartbeat(heartbeat: Duration, connection_timeout: Option<Duration>) -> Self {
        Self {
            connection_timeout,
            inactive_timeout: heartbeat.saturating_mul(2),
        }
    }
}

/// The status of an agent with these times at `now`. A timeout is exceeded only when
/// strictly more time than it has passed.
pub fn agent_status(t: &ConnectionTimes, policy: &StatusPolicy, now: Timestamp) -> AgentStatus {
    let Some(first) = t.first_connected_at else {
        return match policy.connection_timeout {
            Some(limit) if now.since(t.created_at) > limit => AgentStatus::Timeout,
            _ => AgentStatus::Connecting,
        };
    };
    let last = t.last_connected_at.unwrap_or(first);
    if t.disconnected_at.is_some_and(|d| d >= last) {
        return AgentStatus::Disconnected;
    }
    if now.since(last) > policy.inactive_timeout {
        return AgentStatus::Disconnected;
    }
    AgentStatus::Connected
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A virtual clock in whole seconds from an arbitrary origin.
    fn at(s: u64) -> Timestamp {
        Timestamp::from_unix_millis(1_800_000_000_000 + s * 1000)
    }

    fn ms_after(t: Timestamp, ms: u64) -> Timestamp {
        t.saturating_add(Duration::from_millis(ms))
    }

    const POLICY: StatusPolicy = StatusPolicy {
        connection_timeout: Some(Duration::from_secs(120)),
        inactive_timeout: Duration::from_secs(30),
    };

    fn times(first: Option<u64>, last: Option<u64>, disconnected: Option<u64>) -> ConnectionTimes {
        ConnectionTimes {
            created_at: at(0),
            first_connected_at: first.map(at),
            last_connected_at: last.map(at),
            disconnected_at: disconnected.map(at),
        }
    }

    #[test]
    fn every_branch() {
        use AgentStatus::*;
        let no_timeout = StatusPolicy {
            connection_timeout: None,
            ..POLICY
        };
        #[rustfmt::skip]
        let table: &[(&str, ConnectionTimes, StatusPolicy, Timestamp, AgentStatus)] = &[
            ("new, within the connection timeout", times(None, None, None), POLICY, at(60), Connecting),
            ("new, past the connection timeout", times(None, None, None), POLICY, at(121), Timeout),
            ("new, no connection timeout", times(None, None, None), no_timeout, at(100_000), Connecting),
            ("heard from just now", times(Some(10), Some(100), None), POLICY, at(100), Connected),
            ("heard from within the inactive timeout", times(Some(10), Some(100), None), POLICY, at(129), Connected),
            ("silent past the inactive timeout", times(Some(10), Some(100), None), POLICY, at(131), Disconnected),
            ("channel ended after the last heartbeat", times(Some(10), Some(100), Some(105)), POLICY, at(106), Disconnected),
            ("channel ended at the last heartbeat", times(Some(10), Some(100), Some(100)), POLICY, at(101), Disconnected),
            ("reconnected after a disconnect", times(Some(10), Some(200), Some(150)), POLICY, at(201), Connected),
            ("reconnected, then silent", times(Some(10), Some(200), Some(150)), POLICY, at(231), Disconnected),
            ("first connection only, no heartbeat yet", times(Some(10), None, None), POLICY, at(20), Connected),
            ("first connection only, silent", times(Some(10), None, None), POLICY, at(41), Disconnected),
            ("a clock that went backwards reads as just heard", times(Some(10), Some(100), None), POLICY, at(50), Connected),
            ("an old agent past the connection timeout that did connect", times(Some(500), Some(1000), None), POLICY, at(1010), Connected),
        ];
        for (what, t, policy, now, want) in table {
            assert_eq!(agent_status(t, policy, *now), *want, "{what}");
        }
    }

    #[test]
    fn boundaries_are_exclusive() {
        let t = times(Some(10), Some(100), None);
        let exactly = ms_after(at(100), 30_000);
        assert_eq!(agent_status(&t, &POLICY, exactly), AgentStatus::Connected);
        assert_eq!(
            agent_status(&t, &POLICY, ms_after(exactly, 1)),
            AgentStatus::Disconnected
        );
        let new = times(None, None, None);
        let limit = ms_after(at(0), 120_000);
        assert_eq!(agent_status(&new, &POLICY, limit), AgentStatus::Connecting);
        assert_eq!(
            agent_status(&new, &POLICY, ms_after(limit, 1)),
            AgentStatus::Timeout
        );
    }

    #[test]
    fn the_inactive_timeout_is_two_heartbeats() {
        let p = StatusPolicy::for_heartbeat(Duration::from_secs(15), None);
        assert_eq!(p.inactive_timeout, Duration::from_secs(30));
    }

    #[test]
    fn names_match_the_api() {
        for s in [
            AgentStatus::Connecting,
            AgentStatus::Connected,
            AgentStatus::Disconnected,
            AgentStatus::Timeout,
        ] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}
