//! Runs netcheck when the agent starts and again when its network changes, and reports
//! each result on the control channel; `myco show` and `myco ping` use it to explain
//! why a connection is not direct.
//!
//! "Network changed" is taken from the mesh endpoint: iroh watches the interfaces and
//! re-learns its public addresses, and the agent's published direct addresses change
//! when either does. Checks are at least `spacing` apart (`--netcheck-min-interval`),
//! so a flapping address cannot keep the agent probing.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use mesh::Timestamp;
use mesh::api::NetcheckResult;

use crate::reports::Reports;
use crate::{EndpointCell, WelcomeRx};

/// How often the endpoint's addresses are compared once it exists.
const POLL: Duration = Duration::from_secs(2);

pub(crate) async fn run(
    mut welcome: WelcomeRx,
    endpoint: EndpointCell,
    reports: Reports,
    opts: netcheck::Options,
    spacing: Duration,
) {
    let mut checked: Option<(iroh::RelayUrl, Option<mesh::control::RelayQuic>)> = None;
    let mut addrs: Option<BTreeSet<SocketAddr>> = None;
    let mut last_run: Option<tokio::time::Instant> = None;
    loop {
        let targets = welcome
            .borrow_and_update()
            .as_ref()
            .map(|w| (w.relay_url.clone(), w.relay_quic.clone()));
        let Some(targets) = targets else {
            if welcome.changed().await.is_err() {
                return;
            }
            continue;
        };
        let now_addrs = direct_addrs(&endpoint);
        let reason = if checked.as_ref() != Some(&targets) {
            Some(if checked.is_none() {
                "start"
            } else {
                "coordinator changed"
            })
        } else if now_addrs.is_some() && addrs.is_some() && now_addrs != addrs {
            Some("network change")
        } else {
            None
        };
        if addrs.is_none() {
            addrs = now_addrs.clone();
        }
        if let Some(reason) = reason {
            if let Some(at) = last_run {
                tokio::time::sleep_until(at + spacing).await;
            }
            last_run = Some(tokio::time::Instant::now());
            let t = mesh::endpoint::netcheck_targets(&targets.0, targets.1.as_ref());
            let report = netcheck::run(&t, &opts).await;
            tracing::info!(reason, summary = %report.summary(), "netcheck");
            reports.netcheck(NetcheckResult {
                checked_at: Timestamp::now(),
                reason: reason.to_owned(),
                report,
            });
            checked = Some(targets);
            // Addresses as they are after the check, so the check's own wait does not
            // count as a change.
            addrs = direct_addrs(&endpoint);
            continue;
        }
        tokio::select! {
            r = welcome.changed() => if r.is_err() { return },
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// The agent's published direct addresses, once its endpoint exists.
fn direct_addrs(endpoint: &EndpointCell) -> Option<BTreeSet<SocketAddr>> {
    endpoint
        .get()
        .map(|ep| ep.endpoint.addr().ip_addrs().copied().collect())
}
