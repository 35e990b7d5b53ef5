//! Runs netcheck when the agent starts and again when its network changes, and reports
//! each result on the control channel; `myco show` and `myco ping` use it to explain
//! why a connection is not direct.
//!
//! "Network changed" is taken from the mesh endpoint: iroh watches the interfaces and
//! re-learns its public addresses, and the agent's published direct addresses change
//! when either does. The task awaits the endpoint's address watcher (and, before the
//! endpoint is built, the building), so it wakes on a change instead of polling.
//! Checks are at least `spacing` apart (`--netcheck-min-interval`), so a flapping
//! address cannot keep the agent probing. [`NetcheckPlan`] decides, with time passed in.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use iroh::Watcher;
use mesh::Timestamp;
use mesh::api::NetcheckResult;
use tokio::time::Instant;

use crate::reports::Reports;
use crate::{EndpointCell, WelcomeRx};

/// The endpoint's direct addresses.
type Addrs = BTreeSet<SocketAddr>;
/// What a check probes: the coordinator's relay and its QUIC address discovery.
type Targets = (iroh::RelayUrl, Option<mesh::control::RelayQuic>);

/// When netcheck is due, from what the last check saw: a pure state machine.
#[derive(Debug)]
struct NetcheckPlan<T> {
    /// The targets of the last check.
    checked: Option<T>,
    /// The endpoint's direct addresses after the last check, or when first seen.
    addrs: Option<Addrs>,
    /// When the last check started.
    last_run: Option<Instant>,
    /// The least time from one check's start to the next's.
    spacing: Duration,
}

impl<T: PartialEq> NetcheckPlan<T> {
    fn new(spacing: Duration) -> Self {
        Self {
            checked: None,
            addrs: None,
            last_run: None,
            spacing,
        }
    }

    /// Why a check is due for `targets` with the endpoint's direct addresses `addrs`
    /// (None before it is built), if one is: the first check, other targets, or other
    /// addresses than the last check saw. Addresses seen for the first time are kept
    /// as the ones to compare with, and are no change.
    fn reason(&mut self, targets: &T, addrs: Option<&Addrs>) -> Option<&'static str> {
        let reason = match &self.checked {
            None => Some("start"),
            Some(checked) if checked != targets => Some("coordinator changed"),
            Some(_) => match (&self.addrs, addrs) {
                (Some(seen), Some(now)) if seen != now => Some("network change"),
                _ => None,
            },
        };
        if self.addrs.is_none() {
            self.addrs = addrs.cloned();
        }
        reason
    }

    /// The earliest a check may start: `spacing` after the last one started.
    fn not_before(&self) -> Option<Instant> {
        self.last_run.map(|at| at + self.spacing)
    }

    /// A check started at `now`.
    fn started(&mut self, now: Instant) {
        self.last_run = Some(now);
    }

    /// The check of `targets` finished; `addrs` are the endpoint's direct addresses
    /// now, so a change during the check's own wait does not call for another.
    fn finished(&mut self, targets: T, addrs: Option<Addrs>) {
        self.checked = Some(targets);
        self.addrs = addrs;
    }
}

/// Checks the network when the plan says so, and reports it.
struct Netchecker {
    plan: NetcheckPlan<Targets>,
    endpoint: EndpointCell,
    reports: Reports,
    opts: netcheck::Options,
}

impl Netchecker {
    /// Runs a check of `targets` if one is due, after waiting out the spacing.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-check, the check is lost.
    async fn check_if_due(&mut self, targets: Targets) {
        let Some(reason) = self
            .plan
            .reason(&targets, direct_addrs(&self.endpoint).as_ref())
        else {
            return;
        };
        // No deadline is no wait here, where `crate::sleep_until(None)` would wait forever.
        if let Some(at) = self.plan.not_before() {
            tokio::time::sleep_until(at).await;
        }
        self.plan.started(Instant::now());
        let t = mesh::endpoint::netcheck_targets(&targets.0, targets.1.as_ref());
        let report = netcheck::run(&t, &self.opts).await;
        tracing::info!(reason, summary = %report.summary(), "netcheck");
        self.reports.netcheck(NetcheckResult {
            checked_at: Timestamp::now(),
            reason: reason.to_owned(),
            report,
        });
        self.plan.finished(targets, direct_addrs(&self.endpoint));
    }
}

pub(crate) async fn run(
    mut welcome: WelcomeRx,
    endpoint: EndpointCell,
    reports: Reports,
    opts: netcheck::Options,
    spacing: Duration,
) {
    let mut checker = Netchecker {
        plan: NetcheckPlan::new(spacing),
        endpoint: endpoint.clone(),
        reports,
        opts,
    };
    // Before the endpoint is built only a welcome can call for a check.
    let ep = loop {
        if let Some(targets) = targets(&mut welcome) {
            checker.check_if_due(targets).await;
        }
        tokio::select! {
            r = welcome.changed() => if r.is_err() { return },
            ep = endpoint.wait() => break ep,
        }
    };
    let mut addrs = ep.endpoint.watch_addr();
    // A closed watcher (the endpoint closing at shutdown) changes no more.
    let mut watching = true;
    loop {
        if let Some(targets) = targets(&mut welcome) {
            checker.check_if_due(targets).await;
        }
        tokio::select! {
            r = welcome.changed() => if r.is_err() { return },
            r = addrs.updated(), if watching => { watching = r.is_ok() }
        }
    }
}

/// The targets of the last welcome, once there is one; marks it seen.
fn targets(welcome: &mut WelcomeRx) -> Option<Targets> {
    welcome
        .borrow_and_update()
        .as_ref()
        .map(|w| (w.relay_url.clone(), w.relay_quic.clone()))
}

/// The agent's published direct addresses, once its endpoint exists.
fn direct_addrs(endpoint: &EndpointCell) -> Option<Addrs> {
    endpoint
        .get()
        .map(|ep| ep.endpoint.addr().ip_addrs().copied().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(ports: &[u16]) -> Addrs {
        ports
            .iter()
            .map(|p| SocketAddr::from(([192, 0, 2, 1], *p)))
            .collect()
    }

    #[test]
    fn the_first_welcome_calls_for_a_check_and_other_targets_for_another() {
        let mut plan = NetcheckPlan::new(Duration::from_secs(30));
        // Before the endpoint is built.
        assert_eq!(plan.reason(&"relay-a", None), Some("start"));
        let t0 = Instant::now();
        assert_eq!(plan.not_before(), None);
        plan.started(t0);
        plan.finished("relay-a", None);
        assert_eq!(plan.reason(&"relay-a", None), None);
        assert_eq!(plan.reason(&"relay-b", None), Some("coordinator changed"));
        assert_eq!(plan.not_before(), Some(t0 + Duration::from_secs(30)));
    }

    #[test]
    fn addresses_seen_first_are_no_change_and_other_ones_are() {
        let mut plan = NetcheckPlan::new(Duration::from_secs(1));
        assert_eq!(plan.reason(&1, None), Some("start"));
        let t0 = Instant::now();
        plan.started(t0);
        // The endpoint was not built yet when the check finished.
        plan.finished(1, None);
        // Its first addresses are what later ones are compared with.
        assert_eq!(plan.reason(&1, Some(&addrs(&[1]))), None);
        assert_eq!(plan.reason(&1, Some(&addrs(&[1]))), None);
        assert_eq!(
            plan.reason(&1, Some(&addrs(&[1, 2]))),
            Some("network change")
        );
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(plan.not_before(), Some(t0 + Duration::from_secs(1)));
        plan.started(t1);
        // Addresses as they were after the check: the change it saw is taken in.
        plan.finished(1, Some(addrs(&[2])));
        assert_eq!(plan.reason(&1, Some(&addrs(&[2]))), None);
        assert_eq!(plan.not_before(), Some(t1 + Duration::from_secs(1)));
        // The endpoint's addresses gone from view count as no change either.
        assert_eq!(plan.reason(&1, None), None);
        // Other targets win over a network change.
        assert_eq!(
            plan.reason(&2, Some(&addrs(&[3]))),
            Some("coordinator changed")
        );
    }
}
