//! The one place iroh endpoints are built, so no build of ours can reach n0's public
//! services: `presets::Minimal` (a crypto provider and nothing else), a relay map
//! holding only our coordinator's relay, no pkarr or DNS address lookup (peers'
//! addresses come from the coordinator, through a [`MemoryLookup`]), no captive-portal
//! check, and the port mapper on or off as configured.

use std::net::SocketAddr;

use iroh::address_lookup::MemoryLookup;
use iroh::endpoint::{
    AckFrequencyConfig, BindError, PortmapperConfig, QuicTransportConfig, presets,
};
use iroh::{Endpoint, NetReportConfig, RelayConfig, RelayMap, RelayMode, RelayUrl, SecretKey};

/// What netcheck probes: our coordinator's relay and both its QAD ports.
pub fn netcheck_targets(
    relay_url: &RelayUrl,
    relay_quic: Option<&crate::control::RelayQuic>,
) -> netcheck::Targets {
    let qad = relay_quic.and_then(|q| {
        Some(netcheck::Qad {
            ports: std::iter::once(q.port).chain(q.probe_port).collect(),
            cert_der: hex::decode(&q.cert_der_hex).ok()?,
        })
    });
    netcheck::Targets {
        relays: vec![netcheck::Relay {
            url: relay_url.to_string(),
            qad,
        }],
    }
}

/// How to build an endpoint.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    pub secret_key: SecretKey,
    /// Our coordinator's relay, the only one.
    pub relay_url: RelayUrl,
    /// Use the relay only: no UDP sockets, so no direct path can form.
    pub relay_only: bool,
    /// Bind UDP here instead of on every interface (tests bind loopback).
    pub bind_addr: Option<SocketAddr>,
    /// Ask the gateway for a port mapping (UPnP, NAT-PMP, PCP).
    pub portmapper: bool,
    /// Protocols this endpoint accepts; empty for a dial-only client.
    pub alpns: Vec<Vec<u8>>,
    /// Sent to the relay as a bearer token: agents send their agent token, so the
    /// relay admits them whether or not their control channel is up yet.
    pub relay_token: Option<String>,
    /// The coordinator's QUIC address discovery, pinned to the certificate it named.
    pub relay_quic: Option<crate::control::RelayQuic>,
}

/// A bound endpoint and the address book the coordinator feeds.
#[derive(Debug, Clone)]
pub struct MeshEndpoint {
    pub endpoint: Endpoint,
    pub lookup: MemoryLookup,
}

/// Why an endpoint could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The bind address is not usable.
    #[error("bad mesh bind address {0}")]
    BindAddr(SocketAddr),
    /// The relay certificate the coordinator named is not hex.
    #[error("the coordinator sent a malformed relay certificate")]
    Cert,
    /// Binding the UDP sockets or starting the endpoint failed.
    #[error("cannot start the mesh endpoint: {0}")]
    Bind(#[from] BindError),
}

/// The QUIC transport settings we use everywhere: noq's defaults, except how often the
/// peer acknowledges. Larger windows bought nothing measurable in the sweep in ARCHITECTURE.md (Decisions),
/// and a 4 MiB stream window with a 16 MiB connection window made bulk downloads abort
/// here with "too many gaps in stream buffer" (noq's assembler limit).
///
/// By default a QUIC receiver acknowledges every second packet at once. A keystroke
/// and its echo are one packet each way, so every other keystroke made one side send
/// an ACK-only packet before it handed the data on, in the middle of the round trip.
/// With the ACK frequency extension (draft-ietf-quic-ack-frequency, which noq speaks
/// and which every Myco peer offers) we ask the peer to wait for more than
/// [`ACK_AFTER_PACKETS`] packets or its max ACK delay (25 ms) instead: keystrokes get
/// their ACKs from the timer, off the critical path, unless more than 4 come within it
/// (a key every 6 ms). 10 cost bulk uploads about 5-10% in bench/ssh.sh; 4 showed no
/// cost beyond the noise (BENCHMARKS.md, issue 4).
pub fn transport_config() -> QuicTransportConfig {
    let mut ack = AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(ACK_AFTER_PACKETS.into());
    QuicTransportConfig::builder()
        .ack_frequency_config(Some(ack))
        .build()
}

/// How many ack-eliciting packets the peer may receive before it must acknowledge.
const ACK_AFTER_PACKETS: u32 = 4;

/// ring's provider with AES-128-GCM as the first TLS 1.3 suite, so the mesh's QUIC
/// encrypts with it (ring and rustls put AES-256-GCM first): ten AES rounds a block
/// instead of fourteen, on every byte each end sends and receives (BENCHMARKS.md,
/// "The IDE path"). It is TLS 1.3's mandatory suite and QUIC's initial one.
fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    std::sync::Arc::new(provider)
}

/// Builds and binds an endpoint.
///
/// # Errors
/// [`EndpointError`] when the sockets cannot be bound.
///
/// # Cancel safety
/// Cancel safe: dropping the future drops the half-built endpoint and its sockets.
pub async fn bind(opts: EndpointOptions) -> Result<MeshEndpoint, EndpointError> {
    let lookup = MemoryLookup::new();
    let quic = opts
        .relay_quic
        .as_ref()
        .map(|q| iroh_relay::RelayQuicConfig::new(q.port));
    let mut relay = RelayConfig::new(opts.relay_url.clone(), quic);
    if let Some(t) = opts.relay_token {
        relay = relay.with_auth_token(t);
    }
    let relay_map = RelayMap::from(relay);
    let mut net_report = NetReportConfig::default();
    net_report.captive_portal_check = false;
    let mut builder = Endpoint::builder(presets::Minimal)
        .secret_key(opts.secret_key)
        .relay_mode(RelayMode::Custom(relay_map))
        .address_lookup(lookup.clone())
        .net_report_config(net_report)
        .transport_config(transport_config())
        .crypto_provider(crypto_provider())
        .alpns(opts.alpns);
    builder = builder.portmapper_config(if opts.portmapper {
        PortmapperConfig::default()
    } else {
        PortmapperConfig::Disabled
    });
    // The roots every client of this process trusts (a relay on https), and the QAD
    // certificate the coordinator vouched for (pinned, often self-signed).
    let mut roots = trust::get().roots().to_vec();
    if let Some(q) = &opts.relay_quic {
        let der = hex::decode(&q.cert_der_hex).map_err(|_| EndpointError::Cert)?;
        roots.push(rustls_pki_types::CertificateDer::from(der));
    }
    builder = builder.ca_tls_config(iroh::tls::CaTlsConfig::custom_roots(roots));
    if opts.relay_only {
        builder = builder.clear_ip_transports();
    } else if let Some(addr) = opts.bind_addr {
        builder = builder
            .clear_ip_transports()
            .bind_addr(addr)
            .map_err(|_| EndpointError::BindAddr(addr))?;
    }
    let endpoint = builder.bind().await?;
    Ok(MeshEndpoint { endpoint, lookup })
}

#[cfg(test)]
mod tests {
    use rustls::CipherSuite;

    #[test]
    fn quic_offers_aes_128_gcm_first_and_keeps_the_other_suites() {
        let suites: Vec<CipherSuite> = super::crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(suites[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
        let ring = rustls::crypto::ring::default_provider();
        assert_eq!(suites.len(), ring.cipher_suites.len());
        assert!(suites.contains(&CipherSuite::TLS13_AES_256_GCM_SHA384));
        assert!(suites.contains(&CipherSuite::TLS13_CHACHA20_POLY1305_SHA256));
    }
}
