//! The relay, mounted in the coordinator's axum router at `/relay` (iroh's relay
//! protocol over a WebSocket) and `/ping` (the latency probe).
//!
//! Access control admits only endpoint ids the coordinator knows: agents with a live
//! control channel and clients that asked for a ticket (until it expires). See
//! [`MeshRegistry`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use iroh_relay::http::{CLIENT_AUTH_HEADER, ProtocolVersion};
use iroh_relay::protos::handshake;
use iroh_relay::protos::streams::StreamError;
use iroh_relay::server::client::Config as ClientConfig;
use iroh_relay::server::clients::Clients;
use iroh_relay::server::streams::RelayedStream;
use iroh_relay::server::{Access, AccessControl, ClientRequest, DynAccessControl, Metrics};
use iroh_relay::{ExportKeyingMaterial, KeyCache};
use n0_error::AnyError;
use n0_future::{Sink, Stream};

use crate::bucket::TokenBucket;
use crate::registry::MeshRegistry;
use crate::store::{Store, TokenKind};

/// How long a relay client has to finish the handshake (prove its key, be admitted)
/// after the WebSocket upgrade.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest WebSocket message a client may send: iroh-relay's own frame limit
/// (`MAX_FRAME_SIZE`, private to the crate; a frame carries at most one packet of
/// `MAX_PACKET_SIZE`, 64 KiB).
const MAX_FRAME: usize = 1024 * 1024;

/// What each relay client may send, in bytes a second; 0 for no limit.
#[derive(Debug, Clone, Copy)]
pub struct RelayClientLimit {
    pub bytes_per_second: u64,
}

impl RelayClientLimit {
    /// The burst: a second's worth, and never less than one whole frame.
    fn burst(self) -> f64 {
        (self.bytes_per_second as f64).max(MAX_FRAME as f64)
    }
}

/// Everything the relay routes share.
#[derive(Clone, Debug)]
pub struct RelayState {
    key_cache: KeyCache,
    access: Arc<dyn DynAccessControl>,
    pub metrics: Arc<Metrics>,
    clients: Clients,
    limit: RelayClientLimit,
}

impl RelayState {
    pub fn new(registry: MeshRegistry, store: Arc<Store>, limit: RelayClientLimit) -> Self {
        Self {
            key_cache: KeyCache::new(4096),
            access: Arc::new(RegistryAccess { registry, store }),
            metrics: Arc::new(Metrics::default()),
            clients: Clients::default(),
            limit,
        }
    }

    /// Disconnects `endpoints` from the relay now (their access was revoked); they
    /// are refused if they come back, since the registry no longer admits them.
    pub fn disconnect(&self, endpoints: &[iroh::EndpointId]) {
        for id in endpoints {
            if self.clients.disconnect(*id, None) {
                tracing::info!(endpoint = %id.fmt_short(), "relay client disconnected: access revoked");
            }
        }
    }
}

/// Admits endpoints the registry knows and agents presenting a valid agent token;
/// refuses others with a reason.
#[derive(Debug)]
struct RegistryAccess {
    registry: MeshRegistry,
    store: Arc<Store>,
}

impl RegistryAccess {
    /// Whether `token` is a current agent token. An agent's relay connection can come
    /// before its control channel registers it (at start, or when both reconnect after
    /// a coordinator restart), so its token admits it on its own.
    async fn is_agent_token(&self, token: &str) -> bool {
        let (store, token) = (self.store.clone(), token.to_owned());
        tokio::task::spawn_blocking(move || {
            matches!(crate::auth::find_token(&store, &token),
                Ok(Some(t)) if matches!(t.kind, TokenKind::Agent { .. }))
        })
        .await
        .unwrap_or(false)
    }
}

impl AccessControl for RegistryAccess {
    async fn on_connect(&self, request: &ClientRequest) -> Access {
        let id = request.endpoint_id();
        let admitted = self.registry.relay_allowed(id, mesh::Timestamp::now())
            || match request.auth_token() {
                Some(t) => self.is_agent_token(&t).await,
                None => false,
            };
        if admitted {
            Access::Allow
        } else {
            tracing::info!(endpoint = %id.fmt_short(), "relay refused an unknown endpoint");
            Access::Deny {
                reason: Some(format!(
                    "endpoint {} is unknown to this coordinator; agents need a live control channel and clients a connection ticket",
                    id.fmt_short()
                )),
            }
        }
    }
}

/// `GET /relay`: upgrades to a WebSocket and hands it to iroh-relay's client registry.
///
/// # Cancel safety
/// Cancel safe (it runs under the request deadline): it only checks the request and
/// answers the upgrade. The relayed connection runs in the task axum spawns once the
/// upgrade completes, which the deadline does not bound.
pub async fn relay_handler(State(state): State<RelayState>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
        Ok(ws) => ws,
        Err(rejection) => {
            return crate::error::ApiError::bad_request(
                "the relay speaks iroh's relay protocol over a WebSocket",
                rejection.body_text(),
            )
            .into_response();
        }
    };
    let auth_header = parts.headers.get(CLIENT_AUTH_HEADER).cloned();
    ws.protocols([ProtocolVersion::V2.to_str()])
        .max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .on_upgrade(move |socket| async move {
            if let Err(e) = serve_relay_client(socket, state, parts, auth_header).await {
                tracing::debug!("relay client ended: {e:#}");
            }
        })
}

/// `GET /ping`: the relay latency probe.
pub async fn ping_handler() -> StatusCode {
    StatusCode::OK
}

async fn serve_relay_client(
    socket: WebSocket,
    state: RelayState,
    parts: axum::http::request::Parts,
    auth_header: Option<axum::http::HeaderValue>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut io = WsBytes {
        ws: Box::pin(socket),
        bucket: (state.limit.bytes_per_second > 0).then(|| {
            TokenBucket::new(
                state.limit.bytes_per_second as f64,
                state.limit.burst(),
                tokio::time::Instant::now(),
            )
        }),
        wait: None,
    };
    let handshake = async {
        let auth = handshake::serverside(&mut io, auth_header).await?;
        let request = ClientRequest::new(auth.client_key, ProtocolVersion::V2, parts);
        let guard = auth
            .authorize_with(&request, &state.access, &mut io)
            .await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(guard)
    };
    let guard = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| format!("no relay handshake within {HANDSHAKE_TIMEOUT:?}"))??;
    let stream = RelayedStream::new(io, state.key_cache.clone());
    state.clients.register(
        ClientConfig::new(guard, stream, ProtocolVersion::V2),
        state.metrics.clone(),
    );
    Ok(())
}

/// axum's WebSocket seen as the stream and sink of binary messages iroh-relay wants,
/// reading no faster than the client's byte rate allows.
struct WsBytes {
    ws: Pin<Box<WebSocket>>,
    bucket: Option<TokenBucket>,
    /// Set while the client is over its rate: nothing is read until it fires.
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stream for WsBytes {
    type Item = Result<Bytes, StreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(wait) = self.wait.as_mut() {
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.wait = None;
        }
        loop {
            match self.ws.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(Message::Binary(b)))) => {
                    if let Some(bucket) = self.bucket.as_mut() {
                        // Over the rate, the next read waits; TCP's window then
                        // slows the client down.
                        let wait = bucket.take_or_wait(b.len() as f64, tokio::time::Instant::now());
                        if !wait.is_zero() {
                            self.wait = Some(Box::pin(tokio::time::sleep(wait)));
                        }
                    }
                    return Poll::Ready(Some(Ok(b)));
                }
                Poll::Ready(Some(Ok(Message::Close(_)))) | Poll::Ready(None) => {
                    return Poll::Ready(None);
                }
                // Pings are answered by axum; text frames are not part of the protocol.
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(AnyError::from_std(e)))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Sink<Bytes> for WsBytes {
    type Error = StreamError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        self.ws.as_mut().poll_ready(cx).map_err(AnyError::from_std)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Bytes) -> Result<(), StreamError> {
        self.ws
            .as_mut()
            .start_send(Message::Binary(item))
            .map_err(AnyError::from_std)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        self.ws.as_mut().poll_flush(cx).map_err(AnyError::from_std)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        self.ws.as_mut().poll_close(cx).map_err(AnyError::from_std)
    }
}

/// The API listener is plain HTTP here, so there is no TLS keying material to bind
/// the handshake to; iroh-relay then falls back to its challenge-response handshake.
impl ExportKeyingMaterial for WsBytes {
    fn export_keying_material<T: AsMut<[u8]>>(
        &self,
        _: T,
        _: &[u8],
        _: Option<&[u8]>,
    ) -> Option<T> {
        None
    }
}
