//! The relay's, QAD's and the HTTP listener's own counters, read when a scrape
//! encodes the registry.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

/// Where the relay's and QAD's own counters come from.
pub struct RelaySources {
    pub relay: Arc<iroh_relay::server::Metrics>,
    pub qad: Arc<crate::qad::QadServer>,
    /// The HTTP listener's own counters (connections refused over the caps).
    pub http: Arc<crate::http::HttpCounters>,
}

/// The registry's collector of what [`RelaySources`] count, read at each scrape.
pub(super) struct RelayCollector(pub(super) RelaySources);

impl std::fmt::Debug for RelayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayCollector").finish_non_exhaustive()
    }
}

impl Collector for RelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = &self.0.relay;
        let counters = [
            (
                "relay_bytes_sent",
                "Bytes the relay sent to clients",
                r.bytes_sent.get(),
            ),
            (
                "relay_bytes_recv",
                "Bytes the relay received from clients",
                r.bytes_recv.get(),
            ),
            (
                "relay_packets_sent",
                "Packets the relay sent to clients",
                r.send_packets_sent.get(),
            ),
            (
                "relay_packets_recv",
                "Packets the relay received from clients",
                r.send_packets_recv.get(),
            ),
            (
                "relay_accepts",
                "Relay client connections accepted",
                r.accepts.get(),
            ),
            (
                "relay_disconnects",
                "Relay client connections ended",
                r.disconnects.get(),
            ),
            (
                "relay_qad_connections",
                "QUIC address discovery connections served",
                self.0.qad.connections(),
            ),
            (
                "http_refused_connections",
                "HTTP connections closed at accept: over --max-connections or --max-connections-per-ip",
                self.0
                    .http
                    .refused_connections
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(m)?;
        }
        Ok(())
    }
}
