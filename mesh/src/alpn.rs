//! ALPN names of the protocols agents serve on the mesh. A connection speaks exactly
//! one; bumping the trailing version is how a protocol changes incompatibly.

/// Ping: ticket handshake, then timestamped echoes on one stream.
pub const PING: &[u8] = b"myco/ping/1";
/// Speedtest: ticket handshake, then bulk data one way for a fixed time.
pub const SPEEDTEST: &[u8] = b"myco/speedtest/1";

/// SSH: ticket handshake, then the SSH byte stream on the same QUIC stream.
pub const SSH: &[u8] = b"myco/ssh/1";

/// Port forwarding: ticket handshake on the first stream, which then stays open as the
/// session's anchor; each forwarded TCP connection or UDP source is a new stream
/// opened by the client with a [`crate::control::ForwardRequest`].
pub const FORWARD: &[u8] = b"myco/forward/1";

/// Every ALPN an agent accepts.
pub fn agent_alpns() -> Vec<Vec<u8>> {
    vec![
        PING.to_vec(),
        SPEEDTEST.to_vec(),
        SSH.to_vec(),
        FORWARD.to_vec(),
    ]
}

/// QUIC application close codes an agent uses when it refuses a connection; the
/// reason bytes carry a sentence for the user.
pub mod close {
    /// The ticket was missing, malformed, forged, expired or for someone else.
    pub const TICKET_REFUSED: u32 = 0x4d01;
    /// The peer broke the protocol (bad frame, unknown request).
    pub const PROTOCOL: u32 = 0x4d02;
    /// The agent is shutting down.
    pub const SHUTDOWN: u32 = 0x4d03;
    /// An SSH connection had no traffic for the agent's `--ssh-idle-timeout`.
    pub const IDLE: u32 = 0x4d04;
    /// The coordinator revoked the user or the token the connection's ticket was
    /// issued to (a user disabled or deleted, a token revoked, a logout).
    pub const REVOKED: u32 = 0x4d05;
}
