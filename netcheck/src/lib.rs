//! Network diagnostics for `myco netcheck` and the agent: UDP reachability over IPv4 and
//! IPv6, the public (reflexive) address and whether its mapping varies by destination,
//! hairpinning, which port-mapping protocols the gateway answers, and each relay's
//! latency. It knows nothing of the coordinator beyond the [`Targets`] it is given.
//!
//! [`run`] always returns a [`Report`]: every probe is bounded by [`Options::timeout`],
//! and a probe that fails leaves its field unknown (`None`) and a [`Failure`] naming it
//! and why.
//!
//! The public address comes from QUIC address discovery (QAD, iroh-relay's successor of
//! STUN): a QUIC handshake with the relay's QAD server, which reports the source address
//! it saw. All QAD probes of one address family go out of one UDP socket, so two QAD
//! ports seeing different addresses means the NAT maps per destination (a symmetric NAT,
//! which defeats hole punching). Hairpinning is then tested by sending from that same
//! socket to its own public address.
//!
//! Behind NAT means the public IP is not the local address the route to the relay
//! leaves from. The port-mapping probe is n0's `portmapper` (the one inside iroh's
//! endpoint) asking the default gateway whether UPnP, NAT-PMP and PCP answer. A
//! relay's latency is the best of its QAD handshake's round trip and a `GET /ping` on
//! a warm HTTP connection; the preferred relay is the fastest. The probes only
//! observe (`udp`, `relays`); the verdicts are drawn by the pure
//! `Report::from_observations` (`verdict`), tested without a network.
//!
//! `myco ping` runs it (2 s, no port mapping) when a connection ends relayed, reads the
//! agent's last report from the coordinator, and names the cause: UDP blocked on
//! either side, or a NAT whose mapping varies by destination on either side. Not
//! probed: captive portals (the coordinator's relay is the only thing the mesh talks
//! to).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

mod error;
mod relays;
mod udp;
mod verdict;

pub use error::{error_chain, root_cause};
pub use relays::relay_ping;
use relays::relays_over_http;
use udp::{Family, port_mapping, udp_family};
use verdict::Observations;

/// What to probe.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub relays: Vec<Relay>,
}

/// One relay.
#[derive(Debug, Clone)]
pub struct Relay {
    /// The relay's URL (`http://` or `https://`); its host is also the QAD host.
    pub url: String,
    /// The relay's QUIC address discovery, when it serves it.
    pub qad: Option<Qad>,
}

/// A relay's QUIC address discovery.
#[derive(Debug, Clone)]
pub struct Qad {
    /// UDP ports on the relay's host. Two or more let the report tell whether the
    /// mapping varies by destination.
    pub ports: Vec<u16>,
    /// The certificate (DER) the QAD server presents, trusted as a root.
    pub cert_der: Vec<u8>,
}

/// How to probe.
#[derive(Debug, Clone)]
pub struct Options {
    /// The longest any one probe may take.
    pub timeout: Duration,
    /// Ask the gateway whether UPnP, NAT-PMP and PCP answer.
    pub port_mapping: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(3),
            port_mapping: true,
        }
    }
}

/// Probe names used in [`Failure::probe`].
pub mod probe {
    pub const UDP_V4: &str = "udp_v4";
    pub const UDP_V6: &str = "udp_v6";
    pub const MAPPING: &str = "mapping_varies_by_dest";
    pub const HAIRPIN: &str = "hairpinning";
    pub const PORT_MAPPING: &str = "port_mapping";
    pub const RELAY: &str = "relay_latency";
}

/// What the probes found. `None` means unknown: the probe failed (see `failures`) or
/// does not apply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    /// A QAD probe got an answer over UDP, on either family.
    pub udp: bool,
    /// UDP over IPv4 works.
    pub ipv4: bool,
    /// UDP over IPv6 works.
    pub ipv6: bool,
    /// The public IPv4 address and port the relay saw.
    pub global_v4: Option<SocketAddr>,
    /// The public IPv6 address and port the relay saw.
    pub global_v6: Option<SocketAddr>,
    /// The public IPv4 address is not this host's own: a NAT translates.
    pub behind_nat: Option<bool>,
    /// Two destinations saw different public addresses for one local socket.
    pub mapping_varies_by_dest: Option<bool>,
    /// A packet sent to our own public address came back through the NAT.
    pub hairpinning: Option<bool>,
    pub upnp: Option<bool>,
    pub nat_pmp: Option<bool>,
    pub pcp: Option<bool>,
    /// Every relay that answered, fastest first.
    pub relays: Vec<RelayLatency>,
    /// The fastest relay's URL.
    pub preferred_relay: Option<String>,
    /// Each probe that failed, with why.
    pub failures: Vec<Failure>,
    /// How long the whole check took.
    pub took_ms: u64,
}

/// One relay's round trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayLatency {
    pub url: String,
    /// The best of the round trips below, in milliseconds.
    pub latency_ms: f64,
    /// Over QUIC (the QAD handshake's RTT), when UDP works.
    #[serde(default)]
    pub quic_ms: Option<f64>,
    /// An HTTP request to the relay's `/ping` on a warm connection.
    #[serde(default)]
    pub http_ms: Option<f64>,
}

/// A probe that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// One of [`probe`]'s names.
    pub probe: String,
    pub reason: String,
}

impl Report {
    fn fail(&mut self, probe: &str, reason: impl Into<String>) {
        self.failures.push(Failure {
            probe: probe.to_owned(),
            reason: reason.into(),
        });
    }

    /// Why a probe failed, if it did.
    pub fn failure(&self, probe: &str) -> Option<&str> {
        self.failures
            .iter()
            .find(|f| f.probe == probe)
            .map(|f| f.reason.as_str())
    }

    /// One line for listings: UDP, the public address, the NAT's kind, the relay.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.udp {
            parts.push("UDP blocked".to_owned());
        } else {
            match self.global_v4.or(self.global_v6) {
                Some(a) => parts.push(format!("UDP ok, public {a}")),
                None => parts.push("UDP ok".to_owned()),
            }
        }
        match (self.behind_nat, self.mapping_varies_by_dest) {
            (_, Some(true)) => parts.push("NAT maps per destination (symmetric)".to_owned()),
            (Some(true), Some(false)) => parts.push("NAT, endpoint-independent".to_owned()),
            (Some(true), None) => parts.push("NAT".to_owned()),
            (Some(false), _) => parts.push("no NAT".to_owned()),
            (None, _) => {}
        }
        let mapping: Vec<&str> = [
            (self.upnp, "UPnP"),
            (self.nat_pmp, "NAT-PMP"),
            (self.pcp, "PCP"),
        ]
        .iter()
        .filter(|(on, _)| *on == Some(true))
        .map(|(_, name)| *name)
        .collect();
        if !mapping.is_empty() {
            parts.push(format!("port mapping {}", mapping.join("+")));
        }
        if let Some(r) = self.relays.first() {
            parts.push(format!("relay {:.1} ms", r.latency_ms));
        }
        parts.join(", ")
    }
}

/// Runs every probe and returns the report; never fails, never takes much longer than
/// a few times `opts.timeout`. The probes only observe; [`Report::from_observations`]
/// draws the verdicts.
///
/// # Cancel safety
/// Cancel safe: the probes only observe, and dropping the future closes their sockets.
pub async fn run(targets: &Targets, opts: &Options) -> Report {
    let started = Instant::now();
    let (v4, v6, port_mapping, relay_http) = tokio::join!(
        udp_family(Family::V4, targets, opts.timeout),
        udp_family(Family::V6, targets, opts.timeout),
        port_mapping(opts),
        relays_over_http(targets, opts.timeout),
    );
    let mut report = Report::from_observations(Observations {
        v4,
        v6,
        port_mapping,
        relay_http,
    });
    report.took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP port that nothing answers on: bound, never read.
    fn silent_udp() -> (std::net::UdpSocket, u16) {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        (s, port)
    }

    #[tokio::test]
    async fn a_report_comes_back_when_nothing_answers() {
        let (_a, pa) = silent_udp();
        let (_b, pb) = silent_udp();
        // A closed TCP port for the relay's HTTP side.
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let http_port = http.local_addr().unwrap().port();
        drop(http);
        let targets = Targets {
            relays: vec![Relay {
                url: format!("http://127.0.0.1:{http_port}/"),
                qad: Some(Qad {
                    ports: vec![pa, pb],
                    cert_der: vec![1, 2, 3],
                }),
            }],
        };
        let opts = Options {
            timeout: Duration::from_millis(300),
            port_mapping: false,
        };
        let r = run(&targets, &opts).await;
        assert!(!r.udp && !r.ipv4 && !r.ipv6, "{r:?}");
        assert_eq!(r.global_v4, None);
        assert_eq!(r.mapping_varies_by_dest, None);
        assert!(r.relays.is_empty());
        assert!(r.failure(probe::UDP_V4).is_some(), "{r:?}");
        assert!(r.failure(probe::UDP_V6).unwrap().contains("IPv6"), "{r:?}");
        assert!(r.failure(probe::MAPPING).is_some(), "{r:?}");
        assert!(r.failure(probe::RELAY).is_some(), "{r:?}");
        assert_eq!(r.upnp, None);
        assert!(r.summary().starts_with("UDP blocked"), "{}", r.summary());
        // The report survives a round trip through JSON, as it travels to the coordinator.
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[tokio::test]
    async fn no_targets_is_a_failure_not_an_error() {
        let r = run(
            &Targets::default(),
            &Options {
                timeout: Duration::from_millis(100),
                port_mapping: false,
            },
        )
        .await;
        assert!(!r.udp);
        assert_eq!(
            r.failure(probe::UDP_V4),
            Some("no relay offers QUIC address discovery")
        );
    }
}
