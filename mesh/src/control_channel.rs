//! The control channel on the wire, for both ends: the WebSocket URL derived from the
//! coordinator's, the agent's connect (agent token as bearer, the trust roots), and
//! messages as JSON text frames with a size bound per direction. The agent, `myco
//! scaletest` and the tests' fake coordinators all speak it through [`ControlSocket`].
//!
//! The codec ([`control_url`], [`encode`], [`decode`]) is pure; [`connect`] and
//! [`accept`] do the I/O.

use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest, http};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::control::{AgentMessage, CONTROL_PATH, CoordinatorMessage};

/// A message of the control channel, and the largest one its receiver takes.
pub trait ControlMessage: Serialize + DeserializeOwned {
    /// Largest encoded message, in bytes.
    const MAX: usize;
}

impl ControlMessage for AgentMessage {
    /// The coordinator's bound ([`crate::limits::MESSAGE_MAX`]).
    const MAX: usize = crate::limits::MESSAGE_MAX;
}

impl ControlMessage for CoordinatorMessage {
    /// tungstenite's default, which agents always took: a welcome carries the whole
    /// manifest, scripts included.
    const MAX: usize = 64 << 20;
}

/// Why a coordinator URL gives no control channel URL.
#[derive(Debug, thiserror::Error)]
pub enum ControlUrlError {
    /// The URL is not an http(s) URL.
    #[error("bad coordinator URL {0:?}; write it like http://127.0.0.1:3000")]
    Scheme(String),
}

/// The control channel's WebSocket URL for a coordinator at `coordinator` (`http://` ->
/// `ws://`, `https://` -> `wss://`).
///
/// # Errors
/// [`ControlUrlError::Scheme`]: `coordinator` is not an http(s) URL.
pub fn control_url(coordinator: &str) -> Result<String, ControlUrlError> {
    let base = coordinator.trim_end_matches('/');
    if let Some(rest) = base.strip_prefix("http://") {
        Ok(format!("ws://{rest}{CONTROL_PATH}"))
    } else if let Some(rest) = base.strip_prefix("https://") {
        Ok(format!("wss://{rest}{CONTROL_PATH}"))
    } else {
        Err(ControlUrlError::Scheme(coordinator.to_owned()))
    }
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The message did not serialize.
    #[error("cannot encode the control message: {0}")]
    Json(#[from] serde_json::Error),
    /// The message is larger than its receiver takes.
    #[error("the control message is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
}

/// Why a received frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The frame is larger than this side takes.
    #[error("a control message of {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// The frame is not a message of this direction (another version's, or garbage).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Encodes `msg` as the text of one frame.
///
/// # Errors
/// [`EncodeError`]: it does not serialize, or is over `T::MAX`.
pub fn encode<T: ControlMessage>(msg: &T) -> Result<String, EncodeError> {
    let text = serde_json::to_string(msg)?;
    if text.len() > T::MAX {
        return Err(EncodeError::TooLarge {
            len: text.len(),
            max: T::MAX,
        });
    }
    Ok(text)
}

/// Decodes one frame's text.
///
/// # Errors
/// [`DecodeError`]: it is over `T::MAX`, or not a `T`.
pub fn decode<T: ControlMessage>(text: &str) -> Result<T, DecodeError> {
    if text.len() > T::MAX {
        return Err(DecodeError::TooLarge {
            len: text.len(),
            max: T::MAX,
        });
    }
    Ok(serde_json::from_str(text)?)
}

/// What [`ControlSocket::recv`] got.
#[derive(Debug)]
pub enum Received<T> {
    /// A message.
    Message(T),
    /// The peer closed the channel, with the reason its close frame gave if any.
    Closed(Option<String>),
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The WebSocket failed.
    #[error(transparent)]
    Socket(#[from] tungstenite::Error),
}

/// Why nothing could be received.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// A frame came that is not a message of this direction; the channel is still
    /// usable.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The WebSocket failed; the channel is not usable.
    #[error(transparent)]
    Socket(#[from] tungstenite::Error),
}

/// One end of a control channel over `S`, sending `Tx` and receiving `Rx`.
pub struct ControlSocket<S, Tx, Rx> {
    ws: WebSocketStream<S>,
    _messages: PhantomData<fn(Tx) -> Rx>,
}

/// The agent's end.
pub type ControlClient = ControlSocket<MaybeTlsStream<TcpStream>, AgentMessage, CoordinatorMessage>;
/// The coordinator's end, as a fake coordinator in a test holds it.
pub type ControlServer<S> = ControlSocket<S, CoordinatorMessage, AgentMessage>;

impl<S, Tx, Rx> ControlSocket<S, Tx, Rx>
where
    S: AsyncRead + AsyncWrite + Unpin,
    Tx: ControlMessage,
    Rx: ControlMessage,
{
    fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            _messages: PhantomData,
        }
    }

    /// Sends one message.
    ///
    /// # Errors
    /// [`SendError`]: the message is over its bound, or the socket failed.
    ///
    /// # Cancel safety
    /// Not cancel safe: a message cancelled mid-way may be half written, which ends
    /// the channel.
    pub async fn send(&mut self, msg: &Tx) -> Result<(), SendError> {
        let text = encode(msg)?;
        Ok(self.ws.send(Message::Text(text.into())).await?)
    }

    /// Receives the next message, or the channel's end; ping, pong and binary frames
    /// are skipped.
    ///
    /// # Errors
    /// [`RecvError::Decode`]: a frame that is not an `Rx` (the channel goes on);
    /// [`RecvError::Socket`]: the socket failed.
    ///
    /// # Cancel safety
    /// Cancel safe: a frame is taken from the socket whole, and only when this
    /// returns it.
    pub async fn recv(&mut self) -> Result<Received<Rx>, RecvError> {
        loop {
            match self.ws.next().await {
                None => return Ok(Received::Closed(None)),
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Received::Closed(close_reason(frame)));
                }
                Some(Ok(Message::Text(text))) => return Ok(Received::Message(decode(&text)?)),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// Closes the channel (no reason given) and waits for the peer's close.
    ///
    /// # Errors
    /// The socket failed.
    ///
    /// # Cancel safety
    /// Cancel safe: the close frame is queued first, and a later call goes on.
    pub async fn close(&mut self) -> Result<(), tungstenite::Error> {
        self.ws.close(None).await
    }
}

/// The reason a close frame gives, if any.
fn close_reason(frame: Option<CloseFrame>) -> Option<String> {
    frame
        .map(|f| f.reason.to_string())
        .filter(|r| !r.is_empty())
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The coordinator URL is not an http(s) URL.
    #[error(transparent)]
    Url(#[from] ControlUrlError),
    /// The derived WebSocket URL does not parse.
    #[error("bad coordinator URL {url}: {source}")]
    BadRequest {
        url: String,
        #[source]
        source: tungstenite::Error,
    },
    /// The token holds characters an HTTP header cannot.
    #[error("the agent token holds characters a header cannot")]
    BadToken,
    /// The coordinator refused the token (401), with its message.
    #[error("the coordinator refused the agent token ({0})")]
    Refused(String),
    /// The coordinator's host did not resolve to an address of the source's family.
    #[error("cannot resolve the coordinator's host {0}")]
    Resolve(String),
    /// The TCP connection from a given source address failed.
    #[error("cannot connect: {0}")]
    Tcp(#[from] std::io::Error),
    /// The connection or the WebSocket handshake failed.
    #[error(transparent)]
    Handshake(tungstenite::Error),
}

/// Opens the agent's control channel to the coordinator at `coordinator` (its http(s)
/// URL) with `token` as bearer, trusting [`trust::get`]'s roots; from `source`, if
/// given (a loopback address for `myco scaletest`, which spreads thousands of
/// channels over many).
///
/// # Errors
/// [`ConnectError`]: a bad URL or token, the coordinator refused the token, or the
/// connection failed.
///
/// # Cancel safety
/// Cancel safe: dropping it drops the half-open connection.
pub async fn connect(
    coordinator: &str,
    token: &str,
    source: Option<IpAddr>,
) -> Result<ControlClient, ConnectError> {
    let url = control_url(coordinator)?;
    let mut request =
        url.as_str()
            .into_client_request()
            .map_err(|source| ConnectError::BadRequest {
                url: url.clone(),
                source,
            })?;
    let auth = http::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ConnectError::BadToken)?;
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, auth);
    let config = Some(WebSocketConfig::default().max_message_size(Some(CoordinatorMessage::MAX)));
    let tls = Some(tokio_tungstenite::Connector::Rustls(
        trust::get().client_config(),
    ));
    let connected = match source {
        None => tokio_tungstenite::connect_async_tls_with_config(request, config, true, tls).await,
        Some(source) => {
            let tcp = connect_from(&request, source).await?;
            tokio_tungstenite::client_async_tls_with_config(request, tcp, config, tls).await
        }
    };
    match connected {
        Ok((ws, _)) => Ok(ControlSocket::new(ws)),
        Err(tungstenite::Error::Http(resp)) if resp.status() == http::StatusCode::UNAUTHORIZED => {
            let message = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice::<crate::api::ErrorBody>(b).ok())
                .map(|b| b.message)
                .unwrap_or_else(|| "401".into());
            Err(ConnectError::Refused(message))
        }
        Err(e) => Err(ConnectError::Handshake(e)),
    }
}

/// A TCP connection to the request's host from `source`.
async fn connect_from(
    request: &tungstenite::handshake::client::Request,
    source: IpAddr,
) -> Result<TcpStream, ConnectError> {
    let uri = request.uri();
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    let server = tokio::net::lookup_host((host, port))
        .await?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .ok_or_else(|| ConnectError::Resolve(host.to_owned()))?;
    let socket = match server {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(server).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Takes a control channel's WebSocket handshake on `stream`, as the coordinator does
/// (without its authentication): for fake coordinators in tests.
///
/// # Errors
/// The handshake failed.
///
/// # Cancel safety
/// Cancel safe: dropping it drops the stream mid-handshake.
pub async fn accept<S>(stream: S) -> Result<ControlServer<S>, tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default().max_message_size(Some(AgentMessage::MAX));
    let ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    Ok(ControlSocket::new(ws))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn control_url_follows_the_scheme() {
        assert_eq!(
            control_url("http://127.0.0.1:3000").unwrap(),
            "ws://127.0.0.1:3000/api/v1/agent/control"
        );
        assert_eq!(
            control_url("https://myco.example.com/").unwrap(),
            "wss://myco.example.com/api/v1/agent/control"
        );
        let e = control_url("ftp://x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad coordinator URL \"ftp://x\"; write it like http://127.0.0.1:3000"
        );
        assert!(control_url("127.0.0.1:3000").is_err());
    }

    #[test]
    fn messages_round_trip() {
        let text = encode(&AgentMessage::Heartbeat).unwrap();
        assert_eq!(text, r#"{"type":"heartbeat"}"#);
        assert!(matches!(
            decode::<AgentMessage>(&text).unwrap(),
            AgentMessage::Heartbeat
        ));
        let revoke = CoordinatorMessage::Revoke {
            token_ids: vec!["t1".into()],
        };
        let CoordinatorMessage::Revoke { token_ids } =
            decode::<CoordinatorMessage>(&encode(&revoke).unwrap()).unwrap()
        else {
            panic!("not a revoke")
        };
        assert_eq!(token_ids, ["t1"]);
    }

    #[test]
    fn oversized_messages_are_refused_both_ways() {
        let line = crate::api::LogLine {
            at: crate::Timestamp::now(),
            source: crate::api::LogSource::Startup,
            text: "x".repeat(AgentMessage::MAX),
        };
        let big = AgentMessage::Logs { lines: vec![line] };
        assert!(matches!(
            encode(&big),
            Err(EncodeError::TooLarge { max, .. }) if max == AgentMessage::MAX
        ));
        let text = serde_json::to_string(&big).unwrap();
        assert!(matches!(
            decode::<AgentMessage>(&text),
            Err(DecodeError::TooLarge { len, .. }) if len == text.len()
        ));
    }

    #[test]
    fn a_message_of_the_other_direction_does_not_decode() {
        assert!(matches!(
            decode::<CoordinatorMessage>(r#"{"type":"heartbeat"}"#),
            Err(DecodeError::Json(_))
        ));
    }

    #[tokio::test]
    async fn client_and_server_speak_over_a_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut server = accept(tcp).await.unwrap();
            let Received::Message(AgentMessage::Heartbeat) = server.recv().await.unwrap() else {
                panic!("no heartbeat")
            };
            server
                .send(&CoordinatorMessage::Revoke {
                    token_ids: Vec::new(),
                })
                .await
                .unwrap();
            server.recv().await.unwrap()
        });
        let mut client = connect(&url, "myco_token", Some([127, 0, 0, 1].into()))
            .await
            .unwrap();
        client.send(&AgentMessage::Heartbeat).await.unwrap();
        let Received::Message(CoordinatorMessage::Revoke { .. }) = client.recv().await.unwrap()
        else {
            panic!("no revoke")
        };
        client.close().await.unwrap();
        assert!(matches!(server.await.unwrap(), Received::Closed(None)));
    }
}
