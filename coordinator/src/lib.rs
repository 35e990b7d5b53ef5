//! The coordinator (`myco server`): an axum HTTP API over an embedded redb store.
//!
//! Entry points: [`Coordinator::bind`] opens the store and binds the listener,
//! [`Coordinator::serve`] answers requests until its shutdown future resolves.

mod api;
mod auth;
mod autostop;
mod bucket;
mod builds;
mod control;
mod error;
mod http;
pub mod ledger;
pub mod metrics;
pub mod provision;
mod qad;
mod quota;
mod registry;
mod relay;
pub mod schedule;
mod server;
pub mod status;
pub mod store;
mod tasks;
mod throttle;
mod tls;

pub use api::{Route, route_table};
pub use control::HEARTBEAT_INTERVAL;
pub use quota::Quotas;
pub use server::{Coordinator, ServerConfig, ServerError};
pub use throttle::LoginLimits;
pub use tls::TlsReloader;
