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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

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

/// What the probes saw, before any verdict: [`Report::from_observations`]'s input, so
/// the verdicts (NAT or not, symmetric, hairpinning, UDP blocked) are tested without a
/// network, as Tailscale tests its probe plan.
#[derive(Debug)]
struct Observations {
    /// QAD over IPv4, or why that family could not be probed at all.
    v4: Result<Observed, String>,
    /// QAD over IPv6, or why that family could not be probed at all.
    v6: Result<Observed, String>,
    /// Which port-mapping protocols the gateway answers; `None` when not asked.
    port_mapping: Result<Option<PortMapping>, String>,
    /// Each relay's URL and its HTTP `/ping` round trip in ms, in the targets' order.
    relay_http: Vec<(String, Result<f64, String>)>,
}

/// The port-mapping protocols the gateway answered.
#[derive(Debug, Clone, Copy)]
struct PortMapping {
    upnp: bool,
    nat_pmp: bool,
    pcp: bool,
}

impl Report {
    /// The verdicts, a pure function of what the probes saw: the public address is the
    /// first answer's; a NAT is there when it is not the address the route leaves
    /// from; the mapping varies by destination (a symmetric NAT) when two answers of
    /// one family differ, the first family with two answers deciding; UDP works when
    /// any QAD probe got an answer. `took_ms` is left for the caller.
    fn from_observations(seen: Observations) -> Report {
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
fn relay_latencies(
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
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn probe(self) -> &'static str {
        match self {
            Family::V4 => probe::UDP_V4,
            Family::V6 => probe::UDP_V6,
        }
    }

    fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    fn holds(self, ip: IpAddr) -> bool {
        match self {
            Family::V4 => ip.is_ipv4(),
            Family::V6 => ip.is_ipv6(),
        }
    }
}

/// One QAD answer.
#[derive(Debug, Clone)]
struct Answer {
    relay: String,
    public: SocketAddr,
    rtt: Duration,
}

/// What one family's QAD probes found.
#[derive(Debug, Default)]
struct Observed {
    answers: Vec<Answer>,
    /// Destinations that did not answer, with why.
    failures: Vec<String>,
    /// The local address the route to the first relay leaves from.
    local_ip: Option<IpAddr>,
    hairpin: Option<bool>,
    hairpin_failure: Option<String>,
}

/// The QAD destinations of one family: (relay URL, TLS name, address, certificate).
fn qad_destinations(
    family: Family,
    targets: &Targets,
    resolved: &[(String, Vec<IpAddr>)],
) -> Vec<(String, String, SocketAddr, Vec<u8>)> {
    let mut out = Vec::new();
    for relay in &targets.relays {
        let Some(qad) = &relay.qad else { continue };
        let Some((host, ips)) = resolved
            .iter()
            .find(|(url, _)| *url == relay.url)
            .and_then(|(_, ips)| Some((tls_name(&relay.url)?, ips)))
        else {
            continue;
        };
        let Some(ip) = ips.iter().copied().find(|ip| family.holds(*ip)) else {
            continue;
        };
        for port in &qad.ports {
            out.push((
                relay.url.clone(),
                host.clone(),
                SocketAddr::new(ip, *port),
                qad.cert_der.clone(),
            ));
        }
    }
    out
}

/// The host of a relay URL, as the QAD server's certificate names it.
fn tls_name(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    Some(match url.host()? {
        url::Host::Domain(d) => d.to_owned(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => ip.to_string(),
    })
}

/// The addresses of every relay's host (IP literals as they are, names looked up).
async fn resolve(targets: &Targets) -> Vec<(String, Result<Vec<IpAddr>, String>)> {
    let mut out = Vec::new();
    for relay in &targets.relays {
        let result = match reqwest::Url::parse(&relay.url) {
            Err(e) => Err(format!("bad relay URL {}: {e}", relay.url)),
            Ok(url) => match url.host() {
                None => Err(format!("relay URL {} has no host", relay.url)),
                Some(url::Host::Ipv4(ip)) => Ok(vec![IpAddr::V4(ip)]),
                Some(url::Host::Ipv6(ip)) => Ok(vec![IpAddr::V6(ip)]),
                Some(url::Host::Domain(d)) => tokio::net::lookup_host((d, 0))
                    .await
                    .map(|addrs| addrs.map(|a| a.ip()).collect())
                    .map_err(|e| format!("cannot resolve {d}: {e}")),
            },
        };
        out.push((relay.url.clone(), result));
    }
    out
}

/// QAD over one family: every destination from one socket, then hairpinning (IPv4).
async fn udp_family(
    family: Family,
    targets: &Targets,
    timeout: Duration,
) -> Result<Observed, String> {
    if !targets.relays.iter().any(|r| r.qad.is_some()) {
        return Err("no relay offers QUIC address discovery".into());
    }
    let mut resolved = Vec::new();
    for (url, r) in resolve(targets).await {
        match r {
            Ok(ips) => resolved.push((url, ips)),
            Err(reason) => return Err(reason),
        }
    }
    let dests = qad_destinations(family, targets, &resolved);
    let Some(first) = dests.first().map(|d| d.2) else {
        return Err(format!("no relay has an {} address", family.name()));
    };
    let socket = std::net::UdpSocket::bind(SocketAddr::new(family.unspecified(), 0))
        .map_err(|e| format!("cannot open an {} UDP socket: {e}", family.name()))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("cannot set up the UDP socket: {e}"))?;
    let hairpin_socket = socket
        .try_clone()
        .map_err(|e| format!("cannot set up the UDP socket: {e}"))?;
    let endpoint = noq::Endpoint::new(
        noq::EndpointConfig::default(),
        None,
        socket,
        Arc::new(noq::TokioRuntime),
    )
    .map_err(|e| format!("cannot start QUIC on the UDP socket: {e}"))?;

    let mut observed = Observed {
        local_ip: route_source(first),
        ..Observed::default()
    };
    // All at once (one socket, so the comparison still holds): a blocked network costs
    // one timeout, not one per destination.
    let probes = dests.into_iter().map(|(relay, host, addr, cert)| {
        let endpoint = &endpoint;
        async move {
            let outcome = tokio::time::timeout(timeout, qad(endpoint, &host, addr, &cert)).await;
            (relay, addr, outcome)
        }
    });
    for (relay, addr, outcome) in futures_util::future::join_all(probes).await {
        match outcome {
            Ok(Ok((public, rtt))) => observed.answers.push(Answer { relay, public, rtt }),
            Ok(Err(e)) => observed.failures.push(format!("{addr}: {e}")),
            Err(_) => observed.failures.push(format!(
                "{addr}: no answer within {timeout:?} (UDP blocked?)"
            )),
        }
    }
    endpoint.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    drop(endpoint);

    if family == Family::V4 {
        match observed.answers.first().map(|a| a.public) {
            Some(public) if observed.local_ip.is_some_and(|l| l != public.ip()) => {
                match hairpin(hairpin_socket, public, timeout.min(Duration::from_secs(1))).await {
                    Ok(works) => observed.hairpin = Some(works),
                    Err(e) => observed.hairpin_failure = Some(e),
                }
            }
            // Not behind a NAT (or unknown): there is nothing to hairpin through.
            _ => {}
        }
    }
    Ok(observed)
}

/// One QAD exchange: the public address the server saw and the handshake's RTT.
async fn qad(
    endpoint: &noq::Endpoint,
    host: &str,
    addr: SocketAddr,
    cert_der: &[u8],
) -> Result<(SocketAddr, Duration), String> {
    // As the mesh does: the pinned certificate (often self-signed), and the roots
    // every client of this process trusts, for an operator's certificate that a CA
    // signed (a pinned leaf that is not self-signed anchors nothing).
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(cert_der.to_vec()))
        .map_err(|e| format!("the relay's QAD certificate is unusable: {e}"))?;
    roots.add_parsable_certificates(trust::get().roots().iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = iroh_relay::quic::QuicClient::new(endpoint.clone(), tls);
    let conn = client
        .create_conn(addr, host)
        .await
        .map_err(|e| format!("QUIC handshake failed: {e}"))?;
    let mut reports = conn.observed_external_addr();
    let public = reports
        .next()
        .await
        .ok_or_else(|| "the server reported no address".to_owned())?;
    let public = SocketAddr::new(public.ip().to_canonical(), public.port());
    let rtt = conn.rtt(noq::PathId::ZERO).unwrap_or_default();
    conn.close(
        iroh_relay::quic::QUIC_ADDR_DISC_CLOSE_CODE,
        iroh_relay::quic::QUIC_ADDR_DISC_CLOSE_REASON,
    );
    Ok((public, rtt))
}

/// The local address the kernel would send from to reach `to` (no packet is sent).
fn route_source(to: SocketAddr) -> Option<IpAddr> {
    let family = if to.is_ipv4() { Family::V4 } else { Family::V6 };
    let s = std::net::UdpSocket::bind(SocketAddr::new(family.unspecified(), 0)).ok()?;
    s.connect(to).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// Sends a random token from the probed socket to its own public address and waits for
/// it: it comes back only when the NAT hairpins.
async fn hairpin(
    socket: std::net::UdpSocket,
    public: SocketAddr,
    wait: Duration,
) -> Result<bool, String> {
    let socket = tokio::net::UdpSocket::from_std(socket)
        .map_err(|e| format!("cannot reuse the probed socket: {e}"))?;
    let mut token = [0u8; 16];
    getrandom::fill(&mut token).map_err(|e| format!("no randomness: {e}"))?;
    let deadline = tokio::time::Instant::now() + wait;
    // Sent three times over the wait: the QUIC endpoint that owned this socket may
    // still read (and drop) the first, and UDP may lose one.
    let mut resend = tokio::time::interval(wait / 3);
    let mut buf = [0u8; 2048];
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return Ok(false),
            _ = resend.tick() => {
                socket
                    .send_to(&token, public)
                    .await
                    .map_err(|e| format!("cannot send to {public}: {e}"))?;
            }
            got = socket.recv_from(&mut buf) => match got {
                Err(e) => return Err(format!("receive failed: {e}")),
                // Late QUIC packets from the QAD servers share this socket; skip them.
                Ok((n, _)) if buf[..n] == token => return Ok(true),
                Ok(_) => {}
            },
        }
    }
}

/// Which port-mapping protocols the default gateway answers; `None` when not asked.
async fn port_mapping(opts: &Options) -> Result<Option<PortMapping>, String> {
    if !opts.port_mapping {
        return Ok(None);
    }
    let client = portmapper::Client::new(portmapper::Config::default());
    match tokio::time::timeout(opts.timeout, client.probe()).await {
        Err(_) => Err(format!(
            "the gateway did not answer within {:?}",
            opts.timeout
        )),
        Ok(Err(_)) => Err("the port-mapping probe stopped".into()),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Ok(Ok(out))) => Ok(Some(PortMapping {
            upnp: out.upnp,
            nat_pmp: out.nat_pmp,
            pcp: out.pcp,
        })),
    }
}

/// Each relay's `/ping` over HTTP: one request to open the connection, then one timed.
async fn relays_over_http(
    targets: &Targets,
    timeout: Duration,
) -> Vec<(String, Result<f64, String>)> {
    // Each request carries `timeout` (`relay_ping`).
    let client = match reqwest::Client::builder()
        .use_preconfigured_tls((*trust::get().client_config()).clone())
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            return targets
                .relays
                .iter()
                .map(|r| (r.url.clone(), Err(format!("no HTTP client: {e}"))))
                .collect();
        }
    };
    let mut out = Vec::new();
    for relay in &targets.relays {
        out.push((
            relay.url.clone(),
            http_ping(&client, &relay.url, timeout).await,
        ));
    }
    out
}

async fn http_ping(
    client: &reqwest::Client,
    relay: &str,
    timeout: Duration,
) -> Result<f64, String> {
    let url = url::Url::parse(relay).map_err(|e| format!("bad relay URL: {e}"))?;
    // The first request opens the connection; the second one is timed.
    relay_ping(client, &url, timeout).await?;
    relay_ping(client, &url, timeout).await.map(millis)
}

/// An error and its causes on one line, `a: b: c`, less the repeats: a cause whose whole
/// text already ends the line adds nothing (iroh's connect errors wrap one another
/// transparently, which printed "timed out: timed out: timed out"). reqwest's errors say
/// only "error sending request", and the cause (refused, timed out) is in their sources.
///
/// The workspace's one error-chain printer, with [`root_cause`]; everything above this
/// crate reaches both as `mesh::error`. They live here because netcheck is the lowest
/// crate that prints a chain (its report's failure reasons) and cannot see `mesh`.
/// For an `anyhow::Error`, pass `e.as_ref()`: its sources are `{:#}`'s chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if line != text && !line.ends_with(&format!(": {text}")) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// The innermost cause alone ("Connection refused (os error 111)"), for a message that
/// already says what failed in its own words and wants only the why.
pub fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// One timed GET of a relay's `/ping` (iroh's relay server answers it), to the end of
/// the answer, on `client`'s connection (the first call on a client also pays for
/// opening it). The agent's stats use it too. Errors name their causes.
///
/// # Errors
/// The request failed or timed out, or the relay did not answer 2xx.
pub async fn relay_ping(
    client: &reqwest::Client,
    relay: &url::Url,
    timeout: Duration,
) -> Result<Duration, String> {
    let url = relay
        .join("ping")
        .map_err(|e| format!("no ping URL for {relay}: {e}"))?;
    let started = Instant::now();
    let resp = client
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    if !resp.status().is_success() {
        return Err(format!("the relay answered {}", resp.status()));
    }
    let _ = resp.bytes().await;
    Ok(started.elapsed())
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

    /// An error with a chosen text and cause, for the printers' tests.
    #[derive(Debug)]
    struct Chained(&'static str, Option<Box<Chained>>);

    impl std::fmt::Display for Chained {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Chained {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    fn chain(texts: &[&'static str]) -> Chained {
        let mut e = None;
        for t in texts.iter().rev() {
            e = Some(Chained(t, e.map(Box::new)));
        }
        e.unwrap()
    }

    #[test]
    fn error_chain_joins_causes_and_drops_repeats() {
        let e = chain(&["error sending request", "client error (Connect)", "refused"]);
        assert_eq!(
            error_chain(&e),
            "error sending request: client error (Connect): refused"
        );
        let e = chain(&["cannot connect: timed out", "timed out", "timed out"]);
        assert_eq!(error_chain(&e), "cannot connect: timed out");
        // Only a whole cause is dropped, not a word that happens to end the line.
        let e = chain(&["cannot write x", "x"]);
        assert_eq!(error_chain(&e), "cannot write x: x");
        assert_eq!(error_chain(&chain(&["alone"])), "alone");
    }

    #[test]
    fn root_cause_is_the_innermost_text() {
        let e = chain(&["error sending request", "client error (Connect)", "refused"]);
        assert_eq!(root_cause(&e), "refused");
        assert_eq!(root_cause(&chain(&["alone"])), "alone");
    }

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
