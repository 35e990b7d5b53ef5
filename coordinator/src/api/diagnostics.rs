//! What operators and `myco netcheck` read: `/metrics` (admins), relay statistics
//! (admins) and the netcheck targets (public).

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use mesh::api;

use super::AppState;
use super::callers::Caller;
use crate::error::ApiResult;

/// What `myco netcheck` probes: the relay and both QAD ports. Public, like the relay
/// and the QAD ports themselves, so a machine can be checked before anyone logs in.
pub(super) async fn netcheck_targets(State(state): State<AppState>) -> Json<api::NetcheckTargets> {
    Json(api::NetcheckTargets {
        relay_url: state.relay_url.clone(),
        relay_quic: Some(state.relay_quic.relay_quic()),
    })
}

pub(super) async fn relay_stats(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<api::RelayStats>> {
    caller.require_admin()?;
    let m = &state.relay.metrics;
    Ok(Json(api::RelayStats {
        bytes_sent: m.bytes_sent.get(),
        bytes_recv: m.bytes_recv.get(),
        packets_sent: m.send_packets_sent.get(),
        packets_recv: m.send_packets_recv.get(),
        accepts: m.accepts.get(),
        disconnects: m.disconnects.get(),
        qad_connections: state.qad.connections(),
    }))
}

/// `GET /metrics` on the API listener: admins only, since it names every user's
/// workspaces (a `--prometheus-address` listener serves it without a token).
pub(super) async fn metrics(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let ms = crate::metrics::MetricsState {
        metrics: state.metrics.clone(),
        store: state.store.clone(),
        policy: state.policy,
    };
    Ok(crate::metrics::scrape_response(ms, &headers).await)
}
