//! The verdicts: what the probes saw ([`Observations`]) turned into a [`Report`], a
//! pure function tested without a network.

use std::time::Duration;

use crate::udp::{Answer, Family, Observed};
use crate::{Failure, RelayLatency, Report, probe};

/// What the probes saw, before any verdict: [`Report::from_observations`]'s input, so
/// the verdicts (NAT or not, symmetric, hairpinning, UDP blocked) are tested without a
/// network, as Tailscale tests its probe plan.
#[derive(Debug)]
pub(crate) struct Observations {
    /// QAD over IPv4, or why that family could not be probed at all.
    pub(crate) v4: Result<Observed, String>,
    /// QAD over IPv6, or why that family could not be probed at all.
    pub(crate) v6: Result<Observed, String>,
    /// Which port-mapping protocols the gateway answers; `None` when not asked.
    pub(crate) port_mapping: Result<Option<PortMapping>, String>,
    /// Each relay's URL and its HTTP `/ping` round trip in ms, in the targets' order.
    pub(crate) relay_http: Vec<(String, Result<f64, String>)>,
}

/// The port-mapping protocols the gateway answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PortMapping {
    pub(crate) upnp: bool,
    pub(crate) nat_pmp: bool,
    pub(crate) pcp: bool,
}

impl Report {
    /// The verdicts, a pure function of what the probes saw: the public address is the
    /// first answer's; a NAT is there when it is not the address the route leaves
    /// from; the mapping varies by destination (a symmetric NAT) when two answers of
    /// one family differ, the first family with two answers deciding; UDP works when
    /// any QAD probe got an answer. `took_ms` is left for the caller.
    pub(crate) fn from_observations(seen: Observations) -> Report {
        let mut report = Report::default();
        let mut answers = Vec::new();
        for (family, result) in [(Family::V4, seen.v4), (Family::V6, seen.v6)] {
            let observed = match result {
                Ok(o) => o,
                Err(reason) => {
                    report.fail(family.probe(), reason);
                    continue;
                }
            };
            let first = observed.answers.first().map(|a| a.public);
            match family {
                Family::V4 => {
                    report.ipv4 = first.is_some();
                    report.global_v4 = first;
                    report.behind_nat = first.zip(observed.local_ip).map(|(p, l)| p.ip() != l);
                    report.hairpinning = observed.hairpin;
                    if let Some(reason) = observed.hairpin_failure {
                        report.fail(probe::HAIRPIN, reason);
                    }
                }
                Family::V6 => {
                    report.ipv6 = first.is_some();
                    report.global_v6 = first;
                }
            }
            for reason in observed.failures {
                report.fail(family.probe(), reason);
            }
            if report.mapping_varies_by_dest.is_none() {
                match observed.answers.as_slice() {
                    [] => {}
                    [_] => report.fail(
                        probe::MAPPING,
                        format!(
                            "only one destination answered over {}; two QAD ports are needed to compare mappings",
                            family.name()
                        ),
                    ),
                    [a, rest @ ..] => {
                        report.mapping_varies_by_dest =
                            Some(rest.iter().any(|b| b.public != a.public));
                    }
                }
            }
            answers.extend(observed.answers);
        }
        report.udp = report.ipv4 || report.ipv6;
        if !report.udp
            && report.mapping_varies_by_dest.is_none()
            && report.failure(probe::MAPPING).is_none()
        {
            report.fail(probe::MAPPING, "no QAD answer over UDP to compare");
        }

        match seen.port_mapping {
            Ok(Some(p)) => {
                report.upnp = Some(p.upnp);
                report.nat_pmp = Some(p.nat_pmp);
                report.pcp = Some(p.pcp);
            }
            Ok(None) => {}
            Err(reason) => report.fail(probe::PORT_MAPPING, reason),
        }

        report.relays = relay_latencies(&answers, seen.relay_http, &mut report.failures);
        report.preferred_relay = report.relays.first().map(|r| r.url.clone());
        report
    }
}

/// Each relay's best round trip, fastest relay first; relays with neither a QUIC nor
/// an HTTP answer are left out (their HTTP failure is recorded).
pub(crate) fn relay_latencies(
    answers: &[Answer],
    http: Vec<(String, Result<f64, String>)>,
    failures: &mut Vec<Failure>,
) -> Vec<RelayLatency> {
    let mut out = Vec::new();
    for (url, http) in http {
        let quic_ms = answers
            .iter()
            .filter(|a| a.relay == url)
            .map(|a| millis(a.rtt))
            .min_by(f64::total_cmp);
        let http_ms = match http {
            Ok(ms) => Some(ms),
            Err(reason) => {
                failures.push(Failure {
                    probe: probe::RELAY.to_owned(),
                    reason: format!("{url}: {reason}"),
                });
                None
            }
        };
        let best = [quic_ms, http_ms]
            .into_iter()
            .flatten()
            .min_by(f64::total_cmp);
        if let Some(latency_ms) = best {
            out.push(RelayLatency {
                url,
                latency_ms,
                quic_ms,
                http_ms,
            });
        }
    }
    out.sort_by(|a, b| a.latency_ms.total_cmp(&b.latency_ms));
    out
}

/// Milliseconds, to the microsecond.
pub(crate) fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    const RELAY: &str = "https://relay.example/";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// One family's QAD probes: the local address, then what each port saw.
    fn observed(local: &str, publics: &[&str]) -> Observed {
        Observed {
            answers: publics
                .iter()
                .map(|p| Answer {
                    relay: RELAY.to_owned(),
                    public: addr(p),
                    rtt: Duration::from_millis(20),
                })
                .collect(),
            local_ip: Some(local.parse().unwrap()),
            ..Observed::default()
        }
    }

    /// Nothing answered over UDP on this family: every destination timed out.
    fn silent(dests: &[&str]) -> Observed {
        Observed {
            failures: dests
                .iter()
                .map(|d| format!("{d}: no answer within 3s (UDP blocked?)"))
                .collect(),
            local_ip: Some("192.168.1.10".parse().unwrap()),
            ..Observed::default()
        }
    }

    fn seen(v4: Result<Observed, String>, v6: Result<Observed, String>) -> Observations {
        Observations {
            v4,
            v6,
            port_mapping: Ok(None),
            relay_http: vec![(RELAY.to_owned(), Ok(30.0))],
        }
    }

    fn no_v6() -> Result<Observed, String> {
        Err("no relay has an IPv6 address".to_owned())
    }

    #[test]
    fn two_ports_seeing_two_mappings_is_a_symmetric_nat() {
        let v4 = observed("192.168.1.10", &["203.0.113.7:40001", "203.0.113.7:40002"]);
        let r = Report::from_observations(seen(Ok(v4), no_v6()));
        assert!(r.udp && r.ipv4 && !r.ipv6, "{r:?}");
        assert_eq!(r.global_v4, Some(addr("203.0.113.7:40001")));
        assert_eq!(r.behind_nat, Some(true));
        assert_eq!(r.mapping_varies_by_dest, Some(true));
        assert_eq!(r.failure(probe::MAPPING), None);
        assert!(
            r.summary().contains("NAT maps per destination (symmetric)"),
            "{}",
            r.summary()
        );
    }

    #[test]
    fn two_ports_seeing_one_mapping_is_an_endpoint_independent_nat() {
        let mut v4 = observed("192.168.1.10", &["203.0.113.7:40001", "203.0.113.7:40001"]);
        v4.hairpin = Some(false);
        let r = Report::from_observations(seen(Ok(v4), no_v6()));
        assert_eq!(r.behind_nat, Some(true));
        assert_eq!(r.mapping_varies_by_dest, Some(false));
        assert_eq!(r.hairpinning, Some(false));
        assert_eq!(
            r.summary(),
            "UDP ok, public 203.0.113.7:40001, NAT, endpoint-independent, relay 20.0 ms"
        );
    }

    #[test]
    fn the_public_address_being_our_own_is_no_nat() {
        let v4 = observed("198.51.100.4", &["198.51.100.4:5000", "198.51.100.4:5000"]);
        let r = Report::from_observations(seen(Ok(v4), no_v6()));
        assert_eq!(r.behind_nat, Some(false));
        assert_eq!(r.mapping_varies_by_dest, Some(false));
        // Nothing to hairpin through, so the probe did not run: unknown, not a failure.
        assert_eq!(r.hairpinning, None);
        assert_eq!(r.failure(probe::HAIRPIN), None);
        assert!(r.summary().contains("no NAT"), "{}", r.summary());
    }

    #[test]
    fn hairpinning_is_what_the_probe_saw() {
        let mut v4 = observed("10.0.0.2", &["203.0.113.7:40001", "203.0.113.7:40001"]);
        v4.hairpin = Some(true);
        let r = Report::from_observations(seen(Ok(v4), no_v6()));
        assert_eq!(r.hairpinning, Some(true));

        let mut v4 = observed("10.0.0.2", &["203.0.113.7:40001", "203.0.113.7:40001"]);
        v4.hairpin_failure = Some("cannot send to 203.0.113.7:40001: denied".to_owned());
        let r = Report::from_observations(seen(Ok(v4), no_v6()));
        assert_eq!(r.hairpinning, None);
        assert_eq!(
            r.failure(probe::HAIRPIN),
            Some("cannot send to 203.0.113.7:40001: denied")
        );
    }

    #[test]
    fn no_answer_on_either_family_is_udp_blocked() {
        let v4 = silent(&["192.0.2.1:7842", "192.0.2.1:7843"]);
        let v6 = silent(&["[2001:db8::1]:7842"]);
        let mut seen = seen(Ok(v4), Ok(v6));
        seen.relay_http = vec![(RELAY.to_owned(), Ok(41.5))];
        let r = Report::from_observations(seen);
        assert!(!r.udp && !r.ipv4 && !r.ipv6, "{r:?}");
        assert_eq!(r.global_v4, None);
        assert_eq!(r.behind_nat, None);
        assert_eq!(r.mapping_varies_by_dest, None);
        assert_eq!(r.hairpinning, None);
        assert_eq!(
            r.failure(probe::MAPPING),
            Some("no QAD answer over UDP to compare")
        );
        assert!(
            r.failure(probe::UDP_V4).unwrap().contains("UDP blocked?"),
            "{r:?}"
        );
        // Each destination's failure is kept.
        let v4_failures = r.failures.iter().filter(|f| f.probe == probe::UDP_V4);
        assert_eq!(v4_failures.count(), 2);
        // The relay still answers over HTTP, so it is still measured.
        assert_eq!(r.preferred_relay.as_deref(), Some(RELAY));
        assert_eq!(r.summary(), "UDP blocked, relay 41.5 ms");
    }

    #[test]
    fn one_answering_port_cannot_tell_the_mapping() {
        let v4 = observed("192.168.1.10", &["203.0.113.7:40001"]);
        let r = Report::from_observations(seen(Ok(v4), no_v6()));
        assert!(r.udp);
        assert_eq!(r.behind_nat, Some(true));
        assert_eq!(r.mapping_varies_by_dest, None);
        assert!(
            r.failure(probe::MAPPING)
                .unwrap()
                .starts_with("only one destination answered over IPv4"),
            "{r:?}"
        );
        assert!(r.summary().contains(", NAT,"), "{}", r.summary());
    }

    #[test]
    fn ipv6_alone_decides_udp_and_the_mapping() {
        let v4 = Err("cannot open an IPv4 UDP socket: unreachable".to_owned());
        let v6 = observed(
            "2001:db8::10",
            &["[2001:db8::10]:5000", "[2001:db8::10]:5000"],
        );
        let r = Report::from_observations(seen(v4, Ok(v6)));
        assert!(r.udp && !r.ipv4 && r.ipv6, "{r:?}");
        assert_eq!(r.global_v6, Some(addr("[2001:db8::10]:5000")));
        // A NAT is judged on IPv4 only.
        assert_eq!(r.behind_nat, None);
        assert_eq!(r.mapping_varies_by_dest, Some(false));
        assert_eq!(
            r.failure(probe::UDP_V4),
            Some("cannot open an IPv4 UDP socket: unreachable")
        );
    }

    #[test]
    fn relays_are_ranked_by_their_best_round_trip() {
        let mut v4 = observed("192.168.1.10", &["203.0.113.7:1", "203.0.113.7:1"]);
        v4.answers[1].rtt = Duration::from_millis(12);
        let mut seen = seen(Ok(v4), no_v6());
        seen.relay_http = vec![
            (RELAY.to_owned(), Ok(30.0)),
            ("https://far.example/".to_owned(), Ok(5.0)),
            (
                "https://down.example/".to_owned(),
                Err("connection refused".to_owned()),
            ),
        ];
        seen.port_mapping = Ok(Some(PortMapping {
            upnp: true,
            nat_pmp: false,
            pcp: true,
        }));
        let r = Report::from_observations(seen);
        let urls: Vec<&str> = r.relays.iter().map(|l| l.url.as_str()).collect();
        assert_eq!(urls, ["https://far.example/", RELAY]);
        assert_eq!(r.relays[1].quic_ms, Some(12.0));
        assert_eq!(r.relays[1].http_ms, Some(30.0));
        assert_eq!(r.relays[1].latency_ms, 12.0);
        assert_eq!(r.preferred_relay.as_deref(), Some("https://far.example/"));
        assert_eq!(
            r.failure(probe::RELAY),
            Some("https://down.example/: connection refused")
        );
        assert_eq!(
            (r.upnp, r.nat_pmp, r.pcp),
            (Some(true), Some(false), Some(true))
        );
        assert!(
            r.summary().contains("port mapping UPnP+PCP"),
            "{}",
            r.summary()
        );
    }

    #[test]
    fn a_port_mapping_probe_that_fails_leaves_the_protocols_unknown() {
        let mut seen = seen(no_v6(), no_v6());
        seen.port_mapping = Err("the gateway did not answer within 3s".to_owned());
        let r = Report::from_observations(seen);
        assert_eq!((r.upnp, r.nat_pmp, r.pcp), (None, None, None));
        assert_eq!(
            r.failure(probe::PORT_MAPPING),
            Some("the gateway did not answer within 3s")
        );
    }
}
