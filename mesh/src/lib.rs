//! What the agent, the CLI and the coordinator share: validated names, timestamps and
//! the wire types of the coordinator's HTTP API. Nothing here does I/O or knows tokio.

pub mod api;
pub mod name;
pub mod time;

pub use name::{Name, NameError, WorkspaceRef, WorkspaceRefError};
pub use time::Timestamp;
