//! What the agent, the CLI and the coordinator share: validated names, timestamps, the
//! wire types of the HTTP API and of the agent's control channel, node identities,
//! signed connection tickets, ALPN names, the framing of mesh streams, the control
//! channel's codec and client, the error-chain printer, the one place iroh endpoints
//! are built, the splice of forwarded TCP connections, and the port specs of `myco
//! port-forward`.
//!
//! Architecture Invariant: message types and ticket checks here are plain data and
//! pure functions (time is passed in); only `identity` (a key file), `frame` (generic
//! stream framing), `control_channel` (the control channel's WebSocket), `endpoint`
//! (binding an iroh endpoint) and `splice` (forwarding's byte pump, used by agent and
//! client alike) touch I/O.

pub mod alpn;
pub mod api;
pub mod control;
pub mod control_channel;
pub mod endpoint;
pub mod error;
pub mod forward_spec;
pub mod frame;
#[doc(hidden)]
pub mod fuzz_cases;
pub mod identity;
pub mod limits;
pub mod name;
pub mod sign;
pub mod splice;
pub mod ssh;
pub mod ticket;
pub mod time;

pub use iroh::{EndpointAddr, EndpointId, RelayUrl, SecretKey};
pub use name::{Name, NameError, WorkspaceRef, WorkspaceRefError};
pub use time::Timestamp;
