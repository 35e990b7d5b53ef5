//! The UDP probes: QUIC address discovery against every relay's QAD ports from one
//! socket per address family, hairpinning, and the gateway's port-mapping protocols.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::verdict::PortMapping;
use crate::{Options, Targets, probe};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub(crate) fn probe(self) -> &'static str {
        match self {
            Family::V4 => probe::UDP_V4,
            Family::V6 => probe::UDP_V6,
        }
    }

    pub(crate) fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    pub(crate) fn holds(self, ip: IpAddr) -> bool {
        match self {
            Family::V4 => ip.is_ipv4(),
            Family::V6 => ip.is_ipv6(),
        }
    }
}

/// One QAD answer.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) relay: String,
    pub(crate) public: SocketAddr,
    pub(crate) rtt: Duration,
}

/// What one family's QAD probes found.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    pub(crate) answers: Vec<Answer>,
    /// Destinations that did not answer, with why.
    pub(crate) failures: Vec<String>,
    /// The local address the route to the first relay leaves from.
    pub(crate) local_ip: Option<IpAddr>,
    pub(crate) hairpin: Option<bool>,
    pub(crate) hairpin_failure: Option<String>,
}

/// The QAD destinations of one family: (relay URL, TLS name, address, certificate).
pub(crate) fn qad_destinations(
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
pub(crate) fn tls_name(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    Some(match url.host()? {
        url::Host::Domain(d) => d.to_owned(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => ip.to_string(),
    })
}

/// The addresses of every relay's host (IP literals as they are, names looked up).
pub(crate) async fn resolve(targets: &Targets) -> Vec<(String, Result<Vec<IpAddr>, String>)> {
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
pub(crate) async fn udp_family(
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
pub(crate) async fn qad(
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
pub(crate) fn route_source(to: SocketAddr) -> Option<IpAddr> {
    let family = if to.is_ipv4() { Family::V4 } else { Family::V6 };
    let s = std::net::UdpSocket::bind(SocketAddr::new(family.unspecified(), 0)).ok()?;
    s.connect(to).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// Sends a random token from the probed socket to its own public address and waits for
/// it: it comes back only when the NAT hairpins.
pub(crate) async fn hairpin(
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
pub(crate) async fn port_mapping(opts: &Options) -> Result<Option<PortMapping>, String> {
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
