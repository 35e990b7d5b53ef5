//! The agent's lifecycle (Coder's states) as a pure state machine driven by its
//! startup and shutdown scripts, and the tasks that run those scripts.
//!
//! ```text
//! created -> starting -> ready | start_error | start_timeout
//!    (any state) -> shutting_down -> off | shutdown_error | shutdown_timeout
//! ```
//!
//! The startup script runs once, on the first welcome, in a task of its own (SSH keeps
//! being served). On SIGTERM/SIGINT a running startup script's group is killed, the
//! shutdown script runs with the control channel still up, and the agent waits a
//! little for the report queue to drain; a second signal kills the shutdown script's
//! group at once (reported as shutdown_error, "cut short", in its log) and the agent
//! stops the same way. How a script runs (`$SHELL -c`, its own process group, output
//! as capped lines, a timeout that kills the group) is `script.rs`'s.

use std::time::Duration;

use mesh::Timestamp;
use mesh::api::{LifecycleState, LogLine, LogSource, Script};

use crate::WelcomeRx;
use crate::reports::Reports;
use crate::script::{self, ScriptOutcome};

/// What moves the lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LifecycleEvent {
    /// The first welcome came: the startup script (if any) begins.
    StartupBegan,
    StartupEnded(ScriptOutcome),
    /// The agent was asked to stop: the shutdown script (if any) begins.
    ShutdownBegan,
    ShutdownEnded(ScriptOutcome),
}

/// The current state and when it was entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lifecycle {
    pub state: LifecycleState,
    pub changed_at: Timestamp,
}

impl Lifecycle {
    pub(crate) fn new(now: Timestamp) -> Self {
        Self {
            state: LifecycleState::Created,
            changed_at: now,
        }
    }

    /// Applies `event`; returns whether the state changed. Events that do not fit the
    /// current state are ignored: a startup script's result that arrives after the
    /// shutdown began must not bring the agent back to `ready`.
    pub(crate) fn apply(&mut self, event: &LifecycleEvent, now: Timestamp) -> bool {
        let Some(next) = next_state(self.state, event) else {
            return false;
        };
        if next == self.state {
            return false;
        }
        self.state = next;
        self.changed_at = now;
        true
    }
}

fn next_state(state: LifecycleState, event: &LifecycleEvent) -> Option<LifecycleState> {
    use LifecycleState as S;
    let stopping = matches!(
        state,
        S::ShuttingDown | S::Off | S::ShutdownError | S::ShutdownTimeout
    );
    match event {
        LifecycleEvent::StartupBegan => (state == S::Created).then_some(S::Starting),
        LifecycleEvent::StartupEnded(outcome) => (state == S::Starting).then(|| match outcome {
            o if o.succeeded() => S::Ready,
            ScriptOutcome::TimedOut => S::StartTimeout,
            _ => S::StartError,
        }),
        LifecycleEvent::ShutdownBegan => (!stopping).then_some(S::ShuttingDown),
        LifecycleEvent::ShutdownEnded(outcome) => {
            (state == S::ShuttingDown).then(|| match outcome {
                o if o.succeeded() => S::Off,
                ScriptOutcome::TimedOut => S::ShutdownTimeout,
                _ => S::ShutdownError,
            })
        }
    }
}

/// Waits for the first welcome, then runs its startup script (if any) and reports
/// the lifecycle and the script's output. The agent serves the mesh meanwhile.
///
/// # Cancel safety
/// Dropping the future kills a running startup script's process group.
pub(crate) async fn startup(mut welcome: WelcomeRx, reports: Reports) {
    let script = match welcome.wait_for(Option::is_some).await {
        Ok(w) => w.as_ref().and_then(|w| w.manifest.startup_script.clone()),
        // The control channel is gone for good; the agent is stopping.
        Err(_) => return,
    };
    reports.lifecycle(LifecycleEvent::StartupBegan);
    let (outcome, lingering) = match script {
        Some(script) => {
            // Stopping the agent drops this task, which kills the script.
            run_logged(
                &script,
                LogSource::Startup,
                &reports,
                std::future::pending(),
            )
            .await
        }
        None => (ScriptOutcome::Exited(0), None),
    };
    reports.lifecycle(LifecycleEvent::StartupEnded(outcome));
    // What the script left running goes on being logged while this task lives: until
    // the agent stops (which drops it) or those processes close their output.
    if let Some(lingering) = lingering {
        lingering.finish().await;
    }
}

/// Runs the shutdown script of the last welcome (if any), reporting the lifecycle and
/// the script's output. Bounded by the script's timeout, and cut short (its process
/// group killed) when `hurry` resolves first.
pub(crate) async fn shutdown(
    welcome: &WelcomeRx,
    reports: &Reports,
    hurry: impl std::future::Future<Output = ()>,
) {
    let script = welcome
        .borrow()
        .as_ref()
        .and_then(|w| w.manifest.shutdown_script.clone());
    reports.lifecycle(LifecycleEvent::ShutdownBegan);
    let outcome = match script {
        // Output left behind by the shutdown script is not waited for: the agent stops.
        Some(script) => {
            run_logged(&script, LogSource::Shutdown, reports, hurry)
                .await
                .0
        }
        None => ScriptOutcome::Exited(0),
    };
    reports.lifecycle(LifecycleEvent::ShutdownEnded(outcome));
}

/// Runs a script, sending its output to the coordinator's log, plus one line saying
/// how it ended when that was not a success. When `hurry` resolves first the script's
/// process group is killed and it ends [`ScriptOutcome::CutShort`]. Also returns the
/// reading of what the script left running, if it left something.
async fn run_logged(
    script: &Script,
    source: LogSource,
    reports: &Reports,
    hurry: impl std::future::Future<Output = ()>,
) -> (ScriptOutcome, Option<script::Lingering>) {
    let name = match source {
        LogSource::Startup => "startup",
        LogSource::Shutdown => "shutdown",
    };
    tracing::info!("running the {name} script");
    let sink = {
        let reports = reports.clone();
        move |text| {
            reports.log(LogLine {
                at: Timestamp::now(),
                source,
                text,
            });
        }
    };
    let timeout = Duration::from_secs(script.timeout);
    let (outcome, lingering) = tokio::select! {
        (outcome, lingering) = script::run_lingering(&script.run, timeout, sink) => (outcome, Some(lingering)),
        // Dropping the run kills the script's process group.
        () = hurry => (ScriptOutcome::CutShort, None),
    };
    if outcome.succeeded() {
        tracing::info!("the {name} script succeeded");
    } else {
        let why = match &outcome {
            ScriptOutcome::TimedOut => {
                format!("timed out after {} s and was killed", script.timeout)
            }
            other => other.to_string(),
        };
        tracing::warn!("the {name} script failed: {why}");
        reports.log(LogLine {
            at: Timestamp::now(),
            source,
            text: format!("myco: the {name} script failed: {why}"),
        });
    }
    (outcome, lingering)
}

#[cfg(test)]
mod tests {
    use super::*;
    use LifecycleState as S;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    fn from(state: S, event: LifecycleEvent) -> Option<S> {
        let mut l = Lifecycle {
            state,
            changed_at: at(1),
        };
        let changed = l.apply(&event, at(2));
        assert_eq!(changed, l.changed_at == at(2));
        changed.then_some(l.state)
    }

    #[test]
    fn startup_transitions() {
        use LifecycleEvent::*;
        assert_eq!(from(S::Created, StartupBegan), Some(S::Starting));
        assert_eq!(
            from(S::Starting, StartupEnded(ScriptOutcome::Exited(0))),
            Some(S::Ready)
        );
        assert_eq!(
            from(S::Starting, StartupEnded(ScriptOutcome::Exited(3))),
            Some(S::StartError)
        );
        assert_eq!(
            from(S::Starting, StartupEnded(ScriptOutcome::Signaled(9))),
            Some(S::StartError)
        );
        assert_eq!(
            from(
                S::Starting,
                StartupEnded(ScriptOutcome::Failed("no shell".into()))
            ),
            Some(S::StartError)
        );
        assert_eq!(
            from(S::Starting, StartupEnded(ScriptOutcome::TimedOut)),
            Some(S::StartTimeout)
        );
    }

    #[test]
    fn shutdown_transitions() {
        use LifecycleEvent::*;
        for state in [
            S::Created,
            S::Starting,
            S::Ready,
            S::StartError,
            S::StartTimeout,
        ] {
            assert_eq!(from(state, ShutdownBegan), Some(S::ShuttingDown), "{state}");
        }
        assert_eq!(
            from(S::ShuttingDown, ShutdownEnded(ScriptOutcome::Exited(0))),
            Some(S::Off)
        );
        assert_eq!(
            from(S::ShuttingDown, ShutdownEnded(ScriptOutcome::Exited(1))),
            Some(S::ShutdownError)
        );
        assert_eq!(
            from(S::ShuttingDown, ShutdownEnded(ScriptOutcome::TimedOut)),
            Some(S::ShutdownTimeout)
        );
        assert_eq!(
            from(S::ShuttingDown, ShutdownEnded(ScriptOutcome::CutShort)),
            Some(S::ShutdownError)
        );
    }

    #[test]
    fn events_out_of_place_are_ignored() {
        use LifecycleEvent::*;
        let ok = || ScriptOutcome::Exited(0);
        // A startup result after the shutdown began does not revive the agent.
        assert_eq!(from(S::ShuttingDown, StartupEnded(ok())), None);
        assert_eq!(from(S::Off, StartupEnded(ok())), None);
        // The startup script runs once.
        assert_eq!(from(S::Ready, StartupBegan), None);
        assert_eq!(from(S::Ready, StartupEnded(ok())), None);
        // A second shutdown does not restart it.
        for state in [
            S::ShuttingDown,
            S::Off,
            S::ShutdownError,
            S::ShutdownTimeout,
        ] {
            assert_eq!(from(state, ShutdownBegan), None, "{state}");
        }
        assert_eq!(from(S::Ready, ShutdownEnded(ok())), None);
    }

    #[test]
    fn every_state_is_reachable() {
        use LifecycleEvent::*;
        let mut seen = std::collections::HashSet::from([S::Created]);
        let outcomes = [
            ScriptOutcome::Exited(0),
            ScriptOutcome::Exited(1),
            ScriptOutcome::TimedOut,
        ];
        for o in &outcomes {
            for path in [
                vec![StartupBegan, StartupEnded(o.clone())],
                vec![ShutdownBegan, ShutdownEnded(o.clone())],
            ] {
                let mut l = Lifecycle::new(at(0));
                for (i, e) in path.iter().enumerate() {
                    assert!(l.apply(e, at(i as u64 + 1)));
                    seen.insert(l.state);
                }
            }
        }
        assert_eq!(seen.len(), LifecycleState::ALL.len());
    }
}
