//! The relay, mounted in the coordinator's axum router at `/relay` (iroh's relay
//! protocol over a WebSocket) and `/ping` (the latency probe).
//!
//! Access control admits only endpoint ids the coordinator knows: agents with a live
//! control channel and clients that asked for a ticket (until it expires). See
//! [`MeshRegistry`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

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

use crate::registry::MeshRegistry;
use crate::store::{Store, TokenKind};

/// Everything the relay routes share.
#[derive(Clone, Debug)]
pub struct RelayState {
    key_cache: KeyCache,
    access: Arc<dyn DynAccessControl>,
    pub metrics: Arc<Metrics>,
    clients: Clients,
}

impl RelayState {
    pub fn new(registry: MeshRegistry, store: Arc<Store>) -> Self {
        Self {
            key_cache: KeyCache::new(4096),
            access: Arc::new(RegistryAccess { registry, store }),
            metrics: Arc::new(Metrics::default()),
            clients: Clients::default(),
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
    let mut io = WsBytes(Box::pin(socket));
    let auth = handshake::serverside(&mut io, auth_header).await?;
    let request = ClientRequest::new(auth.client_key, ProtocolVersion::V2, parts);
    let guard = auth
        .authorize_with(&request, &state.access, &mut io)
        .await?;
    let stream = RelayedStream::new(io, state.key_cache.clone());
    state.clients.register(
        ClientConfig::new(guard, stream, ProtocolVersion::V2),
        state.metrics.clone(),
    );
    Ok(())
}

/// axum's WebSocket seen as the stream and sink of binary messages iroh-relay wants.
struct WsBytes(Pin<Box<WebSocket>>);

impl Stream for WsBytes {
    type Item = Result<Bytes, StreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match self.0.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(Message::Binary(b)))) => return Poll::Ready(Some(Ok(b))),
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
        self.0.as_mut().poll_ready(cx).map_err(AnyError::from_std)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Bytes) -> Result<(), StreamError> {
        self.0
            .as_mut()
            .start_send(Message::Binary(item))
            .map_err(AnyError::from_std)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        self.0.as_mut().poll_flush(cx).map_err(AnyError::from_std)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        self.0.as_mut().poll_close(cx).map_err(AnyError::from_std)
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
