//! App health checks (Coder's rules): every app with a `healthcheck` is fetched every
//! `interval` seconds; any HTTP response below 500 is a success; one success makes it
//! healthy, `threshold` consecutive failures unhealthy, and before either it is
//! initializing. Apps without a health check are disabled.

use std::collections::HashMap;
use std::time::Duration;

use mesh::Name;
use mesh::api::{App, AppHealth};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::WelcomeRx;
use crate::reports::Reports;
use crate::schedule::PeriodicSchedule;

/// Longest wait for an answer; shorter when the interval is.
const CHECK_TIMEOUT_MAX: Duration = Duration::from_secs(10);

/// One app's health from its checks' results: a pure state machine.
#[derive(Debug, Clone)]
pub(crate) struct HealthTracker {
    threshold: u32,
    failures: u32,
    health: AppHealth,
}

impl HealthTracker {
    pub(crate) fn new(threshold: u32) -> Self {
        Self {
            // A threshold of 0 would make an app unhealthy before any failure.
            threshold: threshold.max(1),
            failures: 0,
            health: AppHealth::Initializing,
        }
    }

    #[cfg(test)]
    pub(crate) fn health(&self) -> AppHealth {
        self.health
    }

    /// Records a check's result; returns the new health if it changed.
    pub(crate) fn record(&mut self, success: bool) -> Option<AppHealth> {
        let next = if success {
            self.failures = 0;
            AppHealth::Healthy
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.threshold {
                AppHealth::Unhealthy
            } else {
                // Below the threshold a failure changes nothing: healthy stays healthy.
                self.health
            }
        };
        (next != self.health).then(|| {
            self.health = next;
            next
        })
    }
}

/// How one app is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    pub slug: Name,
    pub url: String,
    pub interval: Duration,
    pub threshold: u32,
}

impl Check {
    /// The check an app's spec asks for, if any.
    pub(crate) fn of(app: &App) -> Option<Self> {
        let hc = app.healthcheck.as_ref()?;
        Some(Self {
            slug: app.slug.clone(),
            url: hc.url.clone(),
            // An interval of 0 would check in a busy loop.
            interval: Duration::from_secs(hc.interval.max(1)),
            threshold: hc.threshold,
        })
    }

    fn timeout(&self) -> Duration {
        self.interval.min(CHECK_TIMEOUT_MAX)
    }
}

/// Why the health checker could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckerError {
    /// The HTTP client could not be built (no TLS backend or resolver).
    #[error("cannot build the health check client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Why one health check failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    /// The app answered with a server error.
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    /// The request failed (refused, timed out, bad TLS).
    #[error("{}", netcheck::error_chain(.0))]
    Request(reqwest::Error),
    /// The probe's task panicked.
    #[error("the check failed: {0}")]
    Panicked(tokio::task::JoinError),
}

/// Checks a set of apps, each on its own schedule, one request per app at a time.
pub(crate) struct AppHealthChecker {
    client: reqwest::Client,
    checks: HashMap<Name, (Check, HealthTracker)>,
    schedule: PeriodicSchedule<Name>,
}

impl AppHealthChecker {
    /// # Errors
    /// The HTTP client cannot be built (no TLS backend or resolver).
    pub(crate) fn new(checks: Vec<Check>) -> Result<Self, CheckerError> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls((*trust::get().client_config()).clone())
            // The app is in the workspace: no proxy from the environment in between.
            .no_proxy()
            // A redirect is an answer below 500 already; following it would check
            // something else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(CheckerError::Client)?;
        let schedule = PeriodicSchedule::new(
            checks.iter().map(|c| (c.slug.clone(), c.interval)),
            Instant::now(),
        );
        let checks = checks
            .into_iter()
            .map(|c| {
                let tracker = HealthTracker::new(c.threshold);
                (c.slug.clone(), (c, tracker))
            })
            .collect();
        Ok(Self {
            client,
            checks,
            schedule,
        })
    }

    /// Checks until dropped, calling `changed` with every app whose health changes.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the requests in flight.
    pub(crate) async fn run(self, changed: impl FnMut(&Name, AppHealth)) {
        let client = self.client.clone();
        self.run_with(changed, move |check| {
            let request = client.get(&check.url).timeout(check.timeout());
            async move {
                match request.send().await {
                    Ok(resp) if resp.status().as_u16() < 500 => Ok(()),
                    Ok(resp) => Err(ProbeError::Status(resp.status())),
                    Err(e) => Err(ProbeError::Request(e)),
                }
            }
        })
        .await;
    }

    /// [`Self::run`] with the probe passed in, so a test can make one fail or panic.
    ///
    /// A probe that panics counts as a failed check, and its app stays on the
    /// schedule: the task's id, not its output, says which app it probed.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the probes in flight.
    async fn run_with<F, P>(mut self, mut changed: impl FnMut(&Name, AppHealth), mut probe: F)
    where
        F: FnMut(&Check) -> P,
        P: Future<Output = Result<(), ProbeError>> + Send + 'static,
    {
        let mut probes = JoinSet::new();
        let mut probing: HashMap<tokio::task::Id, Name> = HashMap::new();
        loop {
            for slug in self.schedule.take_due(Instant::now()) {
                let Some((check, _)) = self.checks.get(&slug) else {
                    continue;
                };
                let handle = probes.spawn(probe(check));
                probing.insert(handle.id(), slug);
            }
            let due = self.schedule.poll_timeout();
            tokio::select! {
                Some(done) = probes.join_next_with_id() => {
                    let (id, result) = match done {
                        Ok((id, result)) => (id, result),
                        Err(e) => (e.id(), Err(ProbeError::Panicked(e))),
                    };
                    let Some(slug) = probing.remove(&id) else { continue };
                    self.schedule.finished(&slug, Instant::now());
                    if let Err(e) = &result {
                        tracing::debug!(app = %slug, "health check failed: {e}");
                    }
                    if let Some((_, tracker)) = self.checks.get_mut(&slug)
                        && let Some(health) = tracker.record(result.is_ok())
                    {
                        tracing::info!(app = %slug, %health, "app health changed");
                        changed(&slug, health);
                    }
                }
                () = crate::sleep_until(due) => {}
            }
        }
    }
}

/// Checks the apps of the current manifest and reports their health, starting over
/// whenever a welcome brings different apps.
pub(crate) async fn run(welcome: WelcomeRx, reports: Reports) {
    crate::follow_manifest(
        welcome,
        |m| &m.apps,
        |apps| {
            let reports = reports.clone();
            async move {
                let checks: Vec<_> = apps.iter().filter_map(Check::of).collect();
                reports.set_apps(apps.iter().map(|app| {
                    let health = match app.healthcheck {
                        Some(_) => AppHealth::Initializing,
                        None => AppHealth::Disabled,
                    };
                    (app.slug.clone(), health)
                }));
                match AppHealthChecker::new(checks) {
                    Ok(c) => c.run(|slug, health| reports.app_health(slug, health)).await,
                    Err(e) => {
                        tracing::warn!("{e}; apps stay initializing");
                        std::future::pending().await
                    }
                }
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU16, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn one_success_is_healthy_threshold_failures_unhealthy() {
        let mut t = HealthTracker::new(3);
        assert_eq!(t.health(), AppHealth::Initializing);
        // Failures below the threshold leave it initializing.
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.health(), AppHealth::Initializing);
        assert_eq!(t.record(true), Some(AppHealth::Healthy));
        assert_eq!(t.record(true), None);
        // A success resets the count: two failures, a success, two failures stay healthy.
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.health(), AppHealth::Healthy);
        // The threshold-th consecutive failure flips it.
        assert_eq!(t.record(false), Some(AppHealth::Unhealthy));
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), Some(AppHealth::Healthy));
    }

    #[test]
    fn threshold_failures_from_the_start_are_unhealthy() {
        let mut t = HealthTracker::new(2);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(AppHealth::Unhealthy));
        let mut t = HealthTracker::new(0);
        assert_eq!(t.record(false), Some(AppHealth::Unhealthy));
    }

    #[test]
    fn apps_without_a_check_have_none() {
        let app: App = serde_json::from_str(
            r#"{"slug":"web","url":"http://127.0.0.1:1","healthcheck":{"url":"http://127.0.0.1:1/h","interval":0,"threshold":2}}"#,
        )
        .unwrap();
        let check = Check::of(&app).unwrap();
        assert_eq!(check.interval, Duration::from_secs(1));
        assert_eq!(check.timeout(), Duration::from_secs(1));
        let plain: App = serde_json::from_str(r#"{"slug":"web","url":"http://x"}"#).unwrap();
        assert_eq!(Check::of(&plain), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_panics_counts_as_a_failure_and_the_app_is_probed_again() {
        let slug = Name::new("web").unwrap();
        let checker = AppHealthChecker::new(vec![Check {
            slug: slug.clone(),
            url: "http://127.0.0.1:1/health".into(),
            interval: Duration::from_secs(1),
            threshold: 1,
        }])
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut probes = 0u32;
        let checking = tokio::spawn(checker.run_with(
            move |slug, health| {
                let _ = tx.send((slug.clone(), health));
            },
            move |_| {
                probes += 1;
                let first = probes == 1;
                async move {
                    assert!(!first, "the first probe panics");
                    Ok(())
                }
            },
        ));
        assert_eq!(
            rx.recv().await.unwrap(),
            (slug.clone(), AppHealth::Unhealthy)
        );
        assert_eq!(rx.recv().await.unwrap(), (slug, AppHealth::Healthy));
        checking.abort();
    }

    /// A bare HTTP/1.1 server answering every request with the status in `status`.
    async fn serve(listener: TcpListener, status: Arc<AtomicU16>) {
        while let Ok((mut conn, _)) = listener.accept().await {
            let status = status.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status} Test\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    }

    #[tokio::test]
    async fn an_app_going_up_and_down_turns_healthy_and_unhealthy() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let server = tokio::spawn(serve(listener, status.clone()));
        let slug = Name::new("web").unwrap();
        let checker = AppHealthChecker::new(vec![Check {
            slug: slug.clone(),
            url: format!("http://{addr}/health"),
            interval: Duration::from_millis(20),
            threshold: 2,
        }])
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let checking = tokio::spawn(checker.run(move |slug, health| {
            let _ = tx.send((slug.clone(), health));
        }));

        assert_eq!(rx.recv().await.unwrap(), (slug.clone(), AppHealth::Healthy));
        status.store(500, Ordering::SeqCst);
        assert_eq!(
            rx.recv().await.unwrap(),
            (slug.clone(), AppHealth::Unhealthy)
        );
        // Any answer below 500 is a success.
        status.store(404, Ordering::SeqCst);
        assert_eq!(rx.recv().await.unwrap(), (slug.clone(), AppHealth::Healthy));
        // Nothing listens any more: refused connections are failures.
        server.abort();
        let _ = server.await;
        assert_eq!(
            rx.recv().await.unwrap(),
            (slug.clone(), AppHealth::Unhealthy)
        );
        // And back.
        status.store(200, Ordering::SeqCst);
        let listener = TcpListener::bind(addr).await.unwrap();
        let server = tokio::spawn(serve(listener, status));
        assert_eq!(rx.recv().await.unwrap(), (slug, AppHealth::Healthy));
        checking.abort();
        server.abort();
    }
}
