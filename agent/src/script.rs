//! Runs workspace scripts (startup, shutdown, metadata) through `$SHELL -c`, each in
//! a process group of its own, without the agent's credentials, with a timeout that
//! kills the whole group.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest line of script output kept, in bytes; the rest of a longer line is dropped.
/// The coordinator refuses longer ones.
pub(crate) const LINE_MAX: usize = mesh::limits::LOG_LINE_MAX;

/// How long output is still awaited after the script exits, so the lines it wrote
/// last are logged before its outcome. Longer only when a background process it
/// started holds the pipes open; that output goes on being logged afterwards.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);

/// `$SHELL -c SCRIPT` in the home dir, in its own process group, with no stdin and
/// without the variables no workspace process may inherit (the agent's token). The
/// account is read afresh for every script, off the runtime thread
/// ([`crate::account`] says why).
///
/// # Cancel safety
/// Dropping the future abandons the account lookup; nothing has started yet.
pub(crate) async fn shell_command(script: &str) -> tokio::process::Command {
    let mut cmd = crate::account::Account::lookup()
        .await
        .command(&["-c", script]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a timeout reaches `a | b` and whatever else it started.
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// How a script ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScriptOutcome {
    /// It exited with this status code.
    Exited(i32),
    /// A signal it did not handle killed it.
    Signaled(i32),
    /// It could not be started (or waited for).
    Failed(String),
    /// It outran its timeout and its process group was killed.
    TimedOut,
    /// The agent was told to stop again while it ran, and killed its process group.
    CutShort,
}

impl ScriptOutcome {
    pub(crate) fn from_status(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Exited(code),
            (None, Some(signal)) => Self::Signaled(signal),
            (None, None) => Self::Failed("the script ended with no exit status".into()),
        }
    }

    pub(crate) fn succeeded(&self) -> bool {
        *self == Self::Exited(0)
    }
}

impl std::fmt::Display for ScriptOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(code) => write!(f, "exit status {code}"),
            Self::Signaled(signal) => match Signal::try_from(*signal) {
                Ok(s) => write!(f, "killed by {s}"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            Self::Failed(why) => f.write_str(why),
            Self::TimedOut => f.write_str("timed out"),
            Self::CutShort => f.write_str("cut short: the agent was told to stop again"),
        }
    }
}

/// Kills a script's process group when dropped, unless disarmed: a script abandoned
/// mid-run (the agent shutting down during its startup script) takes everything it
/// started with it. Armed only while the group leader is unreaped, so its id cannot
/// have been reused by another group.
pub(crate) struct GroupKiller(Option<Pid>);

impl GroupKiller {
    pub(crate) fn new(pid: Option<u32>) -> Self {
        Self(pid.and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw))
    }

    /// SIGKILL to the whole group: a script past its timeout had its chance.
    pub(crate) fn kill(&mut self) {
        if let Some(pgid) = self.0.take()
            && let Err(e) = killpg(pgid, Signal::SIGKILL)
        {
            tracing::debug!(%pgid, "cannot kill the script's process group: {e}");
        }
    }

    /// The script exited by itself: what it left running in the background stays.
    pub(crate) fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// [`run_lingering`]'s outcome alone: what the script left running is read no further.
#[cfg(test)]
pub(crate) async fn run<F>(script: &str, timeout: Duration, sink: F) -> ScriptOutcome
where
    F: FnMut(String) + Send + 'static,
{
    run_lingering(script, timeout, sink).await.0
}

/// Runs `script` with `$SHELL -c`, handing every line of its stdout and stderr to
/// `sink` as it comes (interleaved, each cut at [`LINE_MAX`] bytes).
///
/// Returns when the script exits or its timeout kills its process group, with the
/// reading of what background processes write later, which reaches `sink` for as long
/// as the caller keeps the returned [`Lingering`].
///
/// # Cancel safety
/// Dropping the future kills the script's process group and stops the reading.
pub(crate) async fn run_lingering<F>(
    script: &str,
    timeout: Duration,
    sink: F,
) -> (ScriptOutcome, Lingering)
where
    F: FnMut(String) + Send + 'static,
{
    let mut cmd = shell_command(script).await;
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let why = format!(
                "cannot start {}: {e}",
                cmd.as_std().get_program().to_string_lossy()
            );
            return (ScriptOutcome::Failed(why), Lingering(None));
        }
    };
    let mut group = GroupKiller::new(child.id());
    // Owned here, then by the returned `Lingering`.
    let mut reader = Lingering(Some(tokio::spawn(read_lines(
        child.stdout.take(),
        child.stderr.take(),
        sink,
    ))));
    let outcome = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            group.disarm();
            ScriptOutcome::from_status(status)
        }
        Ok(Err(e)) => {
            group.kill();
            ScriptOutcome::Failed(format!("cannot wait for the script: {e}"))
        }
        Err(_) => {
            group.kill();
            let _ = child.wait().await;
            ScriptOutcome::TimedOut
        }
    };
    // The reader goes on if background processes keep the pipes open: the caller
    // decides for how long.
    if let Some(handle) = reader.0.as_mut()
        && tokio::time::timeout(OUTPUT_DRAIN, handle).await.is_ok()
    {
        reader.0 = None;
    }
    (outcome, reader)
}

/// The output of a script's background processes (a server the startup script left
/// running), still read and logged after the script ended, for as long as its owner
/// keeps this: dropping it stops the reading, [`Lingering::finish`] waits until the
/// pipes close.
#[must_use = "dropping it stops reading what the script left running"]
pub(crate) struct Lingering(Option<tokio::task::JoinHandle<()>>);

impl Lingering {
    /// Reads on until every process holding the script's pipes has closed them.
    ///
    /// # Cancel safety
    /// Dropping the future stops the reading.
    pub(crate) async fn finish(mut self) {
        if let Some(handle) = self.0.as_mut() {
            let _ = handle.await;
            self.0 = None;
        }
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        if let Some(handle) = &self.0 {
            handle.abort();
        }
    }
}

/// Reads stdout and stderr until both end, splitting them into lines for `sink`.
async fn read_lines<O, E, F>(mut stdout: Option<O>, mut stderr: Option<E>, mut sink: F)
where
    O: AsyncRead + Unpin,
    E: AsyncRead + Unpin,
    F: FnMut(String),
{
    let (mut out_buf, mut err_buf) = (vec![0u8; 8192], vec![0u8; 8192]);
    let (mut out_lines, mut err_lines) = (LineSplitter::new(LINE_MAX), LineSplitter::new(LINE_MAX));
    let mut lines = Vec::new();
    loop {
        tokio::select! {
            n = read_some(&mut stdout, &mut out_buf), if stdout.is_some() => {
                feed(&mut out_lines, &out_buf, n, &mut lines);
                if n == 0 {
                    stdout = None;
                }
            }
            n = read_some(&mut stderr, &mut err_buf), if stderr.is_some() => {
                feed(&mut err_lines, &err_buf, n, &mut lines);
                if n == 0 {
                    stderr = None;
                }
            }
            else => return,
        }
        for line in lines.drain(..) {
            sink(line);
        }
    }
}

/// Bytes read, 0 at the end (or on an error, which ends the stream as well).
async fn read_some<R: AsyncRead + Unpin>(reader: &mut Option<R>, buf: &mut [u8]) -> usize {
    match reader {
        Some(r) => r.read(buf).await.unwrap_or(0),
        None => 0,
    }
}

fn feed(splitter: &mut LineSplitter, buf: &[u8], n: usize, lines: &mut Vec<String>) {
    if n == 0 {
        lines.extend(splitter.finish());
    } else {
        splitter.push(&buf[..n], lines);
    }
}

/// Splits a byte stream into lines of at most `max` bytes (before lossy UTF-8
/// decoding); the rest of a longer line is dropped and the line marked as cut, so a
/// script printing without newlines cannot grow the agent's memory.
pub(crate) struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
    /// Dropping the rest of a line that was cut.
    skipping: bool,
}

impl LineSplitter {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            skipping: false,
        }
    }

    /// Adds `data`, appending every line it completes to `out`.
    pub(crate) fn push(&mut self, mut data: &[u8], out: &mut Vec<String>) {
        while !data.is_empty() {
            let newline = data.iter().position(|&b| b == b'\n');
            if self.skipping {
                match newline {
                    Some(i) => {
                        data = &data[i + 1..];
                        self.skipping = false;
                    }
                    None => return,
                }
                continue;
            }
            let end = newline.unwrap_or(data.len());
            let room = self.max - self.buf.len();
            if end > room {
                self.buf.extend_from_slice(&data[..room]);
                out.push(self.take(true));
                self.skipping = true;
                data = &data[room..];
                continue;
            }
            self.buf.extend_from_slice(&data[..end]);
            match newline {
                Some(i) => {
                    out.push(self.take(false));
                    data = &data[i + 1..];
                }
                None => data = &[],
            }
        }
    }

    /// The last line, if the stream ended without a newline.
    pub(crate) fn finish(&mut self) -> Option<String> {
        let skipped = std::mem::take(&mut self.skipping);
        (!self.buf.is_empty() && !skipped).then(|| self.take(false))
    }

    fn take(&mut self, cut: bool) -> String {
        let mut line = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        if line.ends_with('\r') {
            line.pop();
        }
        if cut {
            line.push_str(&format!(" [line cut at {} bytes]", self.max));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&str]) -> Vec<String> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c.as_bytes(), &mut out);
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn lines_split_across_chunks_and_crlf() {
        assert_eq!(split(100, &["a", "b\nc\r\n", "\nd"]), ["ab", "c", "", "d"]);
        assert_eq!(split(100, &["x\n"]), ["x"]);
        assert!(split(100, &[]).is_empty());
    }

    #[test]
    fn long_lines_are_cut_and_the_rest_dropped() {
        // Exactly the limit is kept whole, even when its newline comes later.
        assert_eq!(split(4, &["abcd", "\nef"]), ["abcd", "ef"]);
        assert_eq!(
            split(4, &["abcdefgh", "ijk\nlm\n"]),
            ["abcd [line cut at 4 bytes]", "lm"]
        );
        assert_eq!(split(4, &["ab", "cdefgh"]), ["abcd [line cut at 4 bytes]"]);
    }

    fn pid_gone(pid: i32) -> bool {
        // A zombie waits for whoever adopted it to reap it; it runs nothing any more.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn a_failing_script_reports_its_status_and_output() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let outcome = run(
            "echo one; echo two >&2; printf 'no newline'; exit 3",
            Duration::from_secs(60),
            move |line| {
                let _ = tx.send(line);
            },
        )
        .await;
        assert_eq!(outcome, ScriptOutcome::Exited(3));
        assert_eq!(outcome.to_string(), "exit status 3");
        let mut lines = Vec::new();
        while let Some(line) = rx.recv().await {
            lines.push(line);
        }
        lines.sort();
        assert_eq!(lines, ["no newline", "one", "two"]);
    }

    #[tokio::test]
    async fn a_script_past_its_timeout_is_killed_with_its_group() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let run = tokio::spawn(run(
            "sleep 600 & echo $!; wait",
            Duration::from_secs(1),
            move |line| {
                let _ = tx.send(line);
            },
        ));
        let pid: i32 = rx.recv().await.unwrap().parse().unwrap();
        assert!(
            !pid_gone(pid),
            "the script's child should run until the timeout"
        );
        assert_eq!(run.await.unwrap(), ScriptOutcome::TimedOut);
        // SIGKILL is delivered at once, but the process is torn down asynchronously.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !pid_gone(pid) {
            assert!(std::time::Instant::now() < deadline, "{pid} still runs");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn scripts_do_not_inherit_the_agent_token() {
        let cmd = shell_command("true").await;
        let removed: Vec<_> = cmd
            .as_std()
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_owned())
            .collect();
        for name in ["MYCO_AGENT_TOKEN", "MYCO_AGENT_URL", "MYCO_TOKEN"] {
            assert!(removed.iter().any(|r| r == name), "{name} is inherited");
        }
    }

    #[test]
    fn outcomes_read_as_sentences() {
        assert!(ScriptOutcome::Exited(0).succeeded());
        assert!(!ScriptOutcome::Exited(1).succeeded());
        assert!(!ScriptOutcome::TimedOut.succeeded());
        assert_eq!(ScriptOutcome::Signaled(9).to_string(), "killed by SIGKILL");
    }
}
