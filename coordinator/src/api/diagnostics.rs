//! What operators and `myco netcheck` read: `/metrics` (admins on the API listener,
//! anyone on a `--prometheus-address` listener), relay statistics (admins) and the
//! netcheck targets (public).
//!
//! `metrics` scrapes and knows nothing of HTTP answers; this module serves its
//! [`ScrapeBody`](crate::metrics::ScrapeBody) and answers a failed scrape as an [`ApiError`], so the dependency
//! goes one way, from `api` to `metrics`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mesh::api;

use super::AppState;
use super::callers::Caller;
use crate::error::{ApiError, ApiResult};
use crate::metrics::{CoordinatorMetrics, Format};
use crate::status::StatusPolicy;
use crate::store::Store;

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
    headers: HeaderMap,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let ms = MetricsState {
        metrics: state.metrics.clone(),
        store: state.store.clone(),
        policy: state.policy,
    };
    Ok(scrape_response(ms, &headers).await)
}

/// What `/metrics` needs.
#[derive(Clone)]
pub(crate) struct MetricsState {
    pub(crate) metrics: CoordinatorMetrics,
    pub(crate) store: Arc<Store>,
    pub(crate) policy: StatusPolicy,
}

/// The router of a `--prometheus-address` listener: `/metrics` and nothing else, no
/// authentication (bind it where only the scraper reaches).
pub(crate) fn prometheus_router(state: MetricsState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(prometheus_metrics))
        .with_state(state)
}

/// `GET /metrics` on a `--prometheus-address` listener.
async fn prometheus_metrics(State(state): State<MetricsState>, headers: HeaderMap) -> Response {
    scrape_response(state, &headers).await
}

/// A scrape answered in the format the request asked for.
async fn scrape_response(state: MetricsState, headers: &HeaderMap) -> Response {
    let format = Format::from_accept(headers);
    let scraped = tokio::task::spawn_blocking(move || {
        state.metrics.scrape(&state.store, &state.policy, format)
    })
    .await;
    match scraped {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, format.content_type())],
            axum::body::Body::new(body),
        )
            .into_response(),
        Ok(Err(e)) => ApiError::from(e).into_response(),
        Err(e) => ApiError::internal("the scrape failed", e.to_string()).into_response(),
    }
}
