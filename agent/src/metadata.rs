//! Metadata items: each item's script runs every `interval` seconds with its
//! `timeout`; its value is the trimmed stdout cut at [`METADATA_VALUE_MAX`] bytes,
//! with an error when the script failed, timed out or could not start.

use std::collections::BTreeSet;
use std::time::Duration;

use mesh::api::{METADATA_VALUE_MAX, MetadataSpec, MetadataValue};
use mesh::{Name, Timestamp};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::WelcomeRx;
use crate::reports::Reports;
use crate::schedule::PeriodicSchedule;
use crate::script::{GroupKiller, ScriptOutcome, shell_command};

/// Output kept from a run before trimming; the rest is read and dropped, so the
/// script is not killed by a closed pipe.
const OUTPUT_KEPT: usize = 4 * METADATA_VALUE_MAX;
/// The part of stderr quoted in an error.
const ERROR_DETAIL_MAX: usize = 200;

/// Trims `output` and cuts it at [`METADATA_VALUE_MAX`] bytes, at a character boundary.
pub(crate) fn value_of(output: &str) -> String {
    cut(output.trim(), METADATA_VALUE_MAX).to_owned()
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Runs one item's script once.
pub(crate) async fn collect(key: Name, script: &str, timeout: Duration) -> MetadataValue {
    let (stdout, error) = match capture(script, timeout).await {
        Ok(out) => (out, None),
        Err((out, why)) => (out, Some(why)),
    };
    MetadataValue {
        key,
        value: value_of(&stdout),
        error,
        collected_at: Timestamp::now(),
    }
}

/// The script's stdout, or that and why it failed.
async fn capture(script: &str, timeout: Duration) -> Result<String, (String, String)> {
    let mut child = shell_command(script)
        .await
        .spawn()
        .map_err(|e| (String::new(), format!("cannot start the script: {e}")))?;
    let mut group = GroupKiller::new(child.id());
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (out, err, status) = tokio::join!(read_kept(stdout), read_kept(stderr), child.wait());
        (out, err, status)
    };
    let (out, err, status) = match tokio::time::timeout(timeout, run).await {
        Ok(done) => done,
        Err(_) => {
            group.kill();
            return Err((
                String::new(),
                format!("timed out after {} s", timeout.as_secs_f64()),
            ));
        }
    };
    group.disarm();
    let outcome = match status {
        Ok(status) => ScriptOutcome::from_status(status),
        Err(e) => ScriptOutcome::Failed(format!("cannot wait for the script: {e}")),
    };
    if outcome.succeeded() {
        return Ok(out);
    }
    let detail = cut(err.trim(), ERROR_DETAIL_MAX);
    let why = if detail.is_empty() {
        outcome.to_string()
    } else {
        format!("{outcome}: {detail}")
    };
    Err((out, why))
}

/// Reads a pipe to its end, keeping the first [`OUTPUT_KEPT`] bytes.
async fn read_kept<R: AsyncRead + Unpin>(pipe: Option<R>) -> String {
    let Some(mut pipe) = pipe else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = OUTPUT_KEPT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// An item's interval and timeout as durations (0 s would run in a busy loop).
fn interval(spec: &MetadataSpec) -> Duration {
    Duration::from_secs(spec.interval.max(1))
}

fn timeout(spec: &MetadataSpec) -> Duration {
    Duration::from_secs(spec.timeout.max(1))
}

/// Runs every item on its own schedule until dropped, calling `done` with each
/// result.
///
/// # Cancel safety
/// Dropping the future kills the scripts that run.
pub(crate) async fn collect_all(items: Vec<MetadataSpec>, mut done: impl FnMut(MetadataValue)) {
    let mut schedule = PeriodicSchedule::new(
        items.iter().map(|i| (i.key.clone(), interval(i))),
        Instant::now(),
    );
    let mut runs = JoinSet::new();
    loop {
        for key in schedule.take_due(Instant::now()) {
            let Some(spec) = items.iter().find(|i| i.key == key) else {
                continue;
            };
            let (script, timeout) = (spec.script.clone(), timeout(spec));
            runs.spawn(async move { collect(key, &script, timeout).await });
        }
        let due = schedule.poll_timeout();
        tokio::select! {
            Some(finished) = runs.join_next() => {
                let Ok(value) = finished else { continue };
                schedule.finished(&value.key, Instant::now());
                if let Some(e) = &value.error {
                    tracing::debug!(key = %value.key, "metadata script failed: {e}");
                }
                done(value);
            }
            () = crate::sleep_until(due) => {}
        }
    }
}

/// Collects the metadata items of the current manifest and reports them, starting
/// over whenever a welcome brings different items.
pub(crate) async fn run(welcome: WelcomeRx, reports: Reports) {
    crate::follow_manifest(
        welcome,
        |m| &m.metadata,
        |items| {
            let reports = reports.clone();
            async move {
                let keys: BTreeSet<Name> = items.iter().map(|i| i.key.clone()).collect();
                reports.retain_metadata(&keys);
                collect_all(items, |value| reports.metadata(value)).await;
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_trimmed_and_cut_at_a_char_boundary() {
        assert_eq!(value_of("  42\n"), "42");
        let long = "a".repeat(METADATA_VALUE_MAX + 10);
        assert_eq!(value_of(&long).len(), METADATA_VALUE_MAX);
        // 'é' is 2 bytes: an odd limit falls inside one and backs off to its start.
        let accents = format!("a{}", "é".repeat(METADATA_VALUE_MAX));
        let v = value_of(&accents);
        assert_eq!(v.len(), METADATA_VALUE_MAX - 1);
        assert!(v.ends_with('é'));
    }

    fn key() -> Name {
        Name::new("item").unwrap()
    }

    #[tokio::test]
    async fn a_script_gives_its_trimmed_output() {
        let v = collect(
            key(),
            "echo '  hello  '; echo noise >&2",
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(v.value, "hello");
        assert_eq!(v.error, None);
    }

    #[tokio::test]
    async fn failures_keep_the_output_and_say_why() {
        let v = collect(
            key(),
            "echo half; echo 'no disk' >&2; exit 2",
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(v.value, "half");
        assert_eq!(v.error.as_deref(), Some("exit status 2: no disk"));

        let v = collect(key(), "sleep 600", Duration::from_secs(1)).await;
        assert_eq!(v.value, "");
        assert_eq!(v.error.as_deref(), Some("timed out after 1 s"));
    }

    #[tokio::test]
    async fn long_output_is_cut_without_killing_the_script() {
        let v = collect(
            key(),
            "head -c 100000 /dev/zero | tr '\\0' x; echo; echo done >&2",
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(v.error, None);
        assert_eq!(v.value, "x".repeat(METADATA_VALUE_MAX));
    }

    #[tokio::test]
    async fn items_run_again_every_interval() {
        let dir = tempfile::tempdir().unwrap();
        let counter = dir.path().join("runs");
        let spec = MetadataSpec {
            key: key(),
            display_name: None,
            script: format!("echo run >> {0}; wc -l < {0}", counter.display()),
            interval: 1,
            timeout: 10,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let collecting = tokio::spawn(collect_all(vec![spec], move |v| {
            let _ = tx.send(v);
        }));
        assert_eq!(rx.recv().await.unwrap().value, "1");
        assert_eq!(rx.recv().await.unwrap().value, "2");
        collecting.abort();
    }
}
