//! Each relay's latency over HTTP (`/ping`), for relays whose QAD port is not
//! reachable and for `myco ping`'s relay leg.

use std::time::{Duration, Instant};

use crate::verdict::millis;
use crate::{Targets, error_chain};

/// Each relay's `/ping` over HTTP: one request to open the connection, then one timed.
pub(crate) async fn relays_over_http(
    targets: &Targets,
    timeout: Duration,
) -> Vec<(String, Result<f64, String>)> {
    // Each request carries `timeout` (`relay_ping`).
    let client = match reqwest::Client::builder()
        .use_preconfigured_tls((*trust::get().client_config()).clone())
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            return targets
                .relays
                .iter()
                .map(|r| (r.url.clone(), Err(format!("no HTTP client: {e}"))))
                .collect();
        }
    };
    let mut out = Vec::new();
    for relay in &targets.relays {
        out.push((
            relay.url.clone(),
            http_ping(&client, &relay.url, timeout).await,
        ));
    }
    out
}

pub(crate) async fn http_ping(
    client: &reqwest::Client,
    relay: &str,
    timeout: Duration,
) -> Result<f64, String> {
    let url = url::Url::parse(relay).map_err(|e| format!("bad relay URL: {e}"))?;
    // The first request opens the connection; the second one is timed.
    relay_ping(client, &url, timeout).await?;
    relay_ping(client, &url, timeout).await.map(millis)
}

/// One timed GET of a relay's `/ping` (iroh's relay server answers it), to the end of
/// the answer, on `client`'s connection (the first call on a client also pays for
/// opening it). The agent's stats use it too. Errors name their causes.
///
/// # Errors
/// The request failed or timed out, or the relay did not answer 2xx.
///
/// # Cancel safety
/// Cancel safe: dropping the future drops the request; the client stays usable.
pub async fn relay_ping(
    client: &reqwest::Client,
    relay: &url::Url,
    timeout: Duration,
) -> Result<Duration, String> {
    let url = relay
        .join("ping")
        .map_err(|e| format!("no ping URL for {relay}: {e}"))?;
    let started = Instant::now();
    let resp = client
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    if !resp.status().is_success() {
        return Err(format!("the relay answered {}", resp.status()));
    }
    let _ = resp.bytes().await;
    Ok(started.elapsed())
}
