//! The coordinator's HTTP listener: accepts connections up to a cap, gives each one
//! a deadline for its request headers, tells handlers the peer's address, and on
//! shutdown lets requests in flight finish.
//!
//! axum's own `serve` has no header-read timeout and no connection cap, so a client
//! that opens connections and sends its headers a byte a minute (slowloris) would
//! hold the listener; hyper's HTTP/1 server has both knobs, so we drive it directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

use crate::tasks::TaskGroup;

/// Limits of one HTTP listener.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Reverse proxies (nginx, Caddy) whose `X-Forwarded-For` is believed: requests
    /// through them are attributed to the client it names, and their own
    /// connections count only against `max_connections`.
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Of those, from one IP address: one client cannot take them all.
    pub max_connections_per_ip: usize,
    /// How long a client has to send a request's headers, on a new connection or
    /// between requests on a kept-alive one.
    pub header_read_timeout: Duration,
}

/// Counters of what the limits turned away, for `/metrics`.
#[derive(Debug, Default)]
pub struct HttpCounters {
    pub refused_connections: AtomicU64,
}

/// Serves `app` on `listener` until `stop` resolves, then waits for the
/// connections' requests in flight (WebSockets are told to close by the app's own
/// shutdown).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    counters: Arc<HttpCounters>,
    stop: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = PerIp::default();
    // Tells every connection to finish its request in flight and close.
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut connections = TaskGroup::new("the HTTP connections");
    tokio::pin!(stop);
    let mut refused_logged = tokio::time::Instant::now() - Duration::from_secs(60);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        connections.reap();
        let proxy = is_trusted(&limits.trusted_proxies, peer.ip());
        let admitted = permits.clone().try_acquire_owned().ok().and_then(|p| {
            if proxy {
                return Some((p, None));
            }
            per_ip
                .take(peer.ip(), limits.max_connections_per_ip)
                .map(|ip| (p, Some(ip)))
        });
        let Some(permit) = admitted else {
            counters.refused_connections.fetch_add(1, Ordering::Relaxed);
            if refused_logged.elapsed() > Duration::from_secs(10) {
                refused_logged = tokio::time::Instant::now();
                tracing::warn!(
                    %peer,
                    max = limits.max_connections,
                    max_per_ip = limits.max_connections_per_ip,
                    "refusing connections: the listener is at its cap (--max-connections, --max-connections-per-ip)"
                );
            }
            drop(tcp);
            continue;
        };
        // Relayed packets and control messages are small writes that must leave at
        // once: without TCP_NODELAY, Nagle's algorithm held them back and relayed
        // throughput sat at ~43 MB/s with idle CPUs (BENCHMARKS.md).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let trusted = limits.trusted_proxies.clone();
        let service = app
            .clone()
            .map_request(move |mut req: hyper::Request<Incoming>| {
                let client = if proxy {
                    forwarded_client(peer, req.headers(), &trusted)
                } else {
                    peer
                };
                req.extensions_mut().insert(ConnectInfo(client));
                req.map(axum::body::Body::new)
            });
        let closing = closing_rx.clone();
        let tls = tls.clone();
        let limits = limits.clone();
        connections.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(tcp, peer, service, limits, closing).await,
                Some(acceptor) => {
                    // The handshake gets the header deadline too: a client that opens
                    // TLS a byte a minute holds a slot no longer than one that sends
                    // headers so.
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => serve_connection(tls, peer, service, limits, closing).await,
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "no TLS handshake in time"),
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    connections.join_all().await;
    Ok(())
}

/// Serves HTTP/1.1 (with upgrades) on one accepted connection, plain or TLS, until
/// it ends or the listener closes.
async fn serve_connection<I, S>(
    io: I,
    peer: SocketAddr,
    service: S,
    limits: HttpLimits,
    mut closing: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            hyper::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    {
        {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(true);
            let conn = builder
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                    return;
                }
                _ = closing.wait_for(|c| *c) => conn.as_mut().graceful_shutdown(),
            }
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
            drop(closing);
        }
    }
}

fn is_trusted(proxies: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    proxies.iter().any(|net| net.contains(&ip))
}

/// The client a trusted proxy forwarded for: the rightmost `X-Forwarded-For` entry
/// that is not itself a trusted proxy (what a client writes to the left of it is
/// its own claim); the proxy itself when the header is missing or unreadable.
fn forwarded_client(
    peer: SocketAddr,
    headers: &hyper::HeaderMap,
    trusted: &[ipnet::IpNet],
) -> SocketAddr {
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for entry in text.rsplit(',') {
            let Ok(ip) = entry.trim().parse::<std::net::IpAddr>() else {
                return client;
            };
            client = SocketAddr::new(ip, 0);
            if !is_trusted(trusted, ip) {
                return client;
            }
        }
    }
    client
}

/// Connections open per IP address.
#[derive(Debug, Default, Clone)]
struct PerIp(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>);

/// One connection counted against its IP; uncounted when dropped.
struct IpSlot {
    table: PerIp,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        // Plain counters, each update complete: a panic elsewhere cannot corrupt them.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self, ip: std::net::IpAddr, max: usize) -> Option<IpSlot> {
        let mut table = self.lock();
        let n = table.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut table = self.table.lock();
        if let Some(n) = table.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                table.remove(&self.ip);
            }
        }
    }
}

/// The peer address a request came from, as [`serve`] recorded it.
pub fn peer_of(extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(values: &[&str]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_client_is_the_rightmost_address_no_trusted_proxy_wrote() {
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let trusted: Vec<ipnet::IpNet> = vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        let ip = |h: &[&str]| {
            forwarded_client(proxy, &headers(h), &trusted)
                .ip()
                .to_string()
        };
        // What the client wrote itself (the left) is not believed.
        assert_eq!(ip(&["6.6.6.6, 192.0.2.7"]), "192.0.2.7");
        // Proxies in a chain are skipped.
        assert_eq!(ip(&["192.0.2.7, 10.1.2.3"]), "192.0.2.7");
        assert_eq!(ip(&["192.0.2.7", "10.1.2.3"]), "192.0.2.7");
        // Nothing, or garbage: the proxy itself.
        assert_eq!(ip(&[]), "127.0.0.1");
        assert_eq!(ip(&["not an address"]), "127.0.0.1");
        assert!(is_trusted(&trusted, "::ffff:10.9.9.9".parse().unwrap()));
        assert!(!is_trusted(&trusted, "192.0.2.7".parse().unwrap()));
    }
}
