//! Running one build: the template's directory unpacked from its archive, its
//! `[provisioner] run` command started with `sh -c` there, its output read line by
//! line, its time limit and cancellation enforced. Used by the coordinator's own
//! provisioners (`builds.rs`); nothing here knows the store.
//!
//! The command learns what to do from its environment: `MYCO_TRANSITION`
//! (`start`, `stop`, `delete`), `MYCO_WORKSPACE_ID`, `MYCO_WORKSPACE_NAME`,
//! `MYCO_WORKSPACE_OWNER`, `MYCO_BUILD_NUMBER`, `MYCO_ACCESS_URL`, `MYCO_STATE_DIR`
//! (a directory kept for the workspace from build to build, removed after it is
//! deleted), and at `start` the agents' new tokens (`MYCO_AGENT_TOKEN` when there is
//! one agent, `MYCO_AGENT_TOKEN_<AGENT>` for each, the name upper-cased with `-` as
//! `_`) and `MYCO_INIT_SCRIPT`, the line that downloads and starts the agent.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mesh::Timestamp;
use mesh::api::Transition;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};

/// How long a command gets between SIGTERM and SIGKILL when it is stopped.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// After the command exits, how long output of what it left running (a machine
/// started in the background that kept the pipe) is still read.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// Everything one build needs.
#[derive(Debug, Clone)]
pub struct BuildInput {
    pub transition: Transition,
    pub workspace_id: String,
    pub workspace_name: String,
    pub owner: String,
    pub number: u64,
    pub access_url: String,
    /// Each agent's name and new token (start builds only).
    pub agent_tokens: Vec<(String, String)>,
    /// The template directory as a tar archive.
    pub archive: Vec<u8>,
    pub run: String,
    pub timeout: Duration,
    /// Unpacked here (made fresh, removed after).
    pub work_dir: PathBuf,
    /// Kept from build to build of the workspace.
    pub state_dir: PathBuf,
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Why, in words for `myco builds`.
    Failed(String),
    Canceled,
}

/// A template archive that cannot be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The archive is not a readable tar file.
    #[error("the template archive is unreadable: {0}")]
    Unreadable(#[source] std::io::Error),
    /// An entry's path cannot be read.
    #[error("a path in the template archive is unreadable: {0}")]
    UnreadablePath(#[source] std::io::Error),
    /// An entry's path is absolute or climbs out with `..`.
    #[error("the template archive names {}, outside its directory", .0.display())]
    Outside(PathBuf),
    /// An entry is a link, a device or anything else but a file or a directory.
    #[error(
        "the template archive holds {}, which is neither a file nor a directory",
        .0.display()
    )]
    NotFileOrDir(PathBuf),
    /// A directory cannot be created under the target.
    #[error("cannot create {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An entry's contents cannot be read from the archive.
    #[error("cannot read {} from the archive: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file cannot be written under the target.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A written file's mode cannot be set.
    #[error("cannot set the mode of {}: {source}", path.display())]
    SetMode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The archive's files written under `dir`: regular files and directories only,
/// each path relative and inside `dir`; anything else (a link, a device, `..`) is
/// refused, naming the entry.
///
/// # Errors
/// See [`UnpackError`]; each names the entry or the I/O failure.
pub fn unpack(archive: &[u8], dir: &Path) -> Result<(), UnpackError> {
    use std::os::unix::fs::PermissionsExt;
    let mut ar = tar::Archive::new(archive);
    let entries = ar.entries().map_err(UnpackError::Unreadable)?;
    for entry in entries {
        let mut entry = entry.map_err(UnpackError::Unreadable)?;
        let path = entry
            .path()
            .map_err(UnpackError::UnreadablePath)?
            .into_owned();
        let mut rel = PathBuf::new();
        for c in path.components() {
            match c {
                Component::Normal(p) => rel.push(p),
                Component::CurDir => {}
                _ => return Err(UnpackError::Outside(path)),
            }
        }
        if rel.as_os_str().is_empty() {
            continue;
        }
        let target = dir.join(&rel);
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
        let create_dir = |path: &Path| {
            std::fs::create_dir_all(path).map_err(|source| UnpackError::CreateDir {
                path: path.to_owned(),
                source,
            })
        };
        if kind.is_dir() {
            create_dir(&target)?;
        } else if kind.is_file() {
            if let Some(parent) = target.parent() {
                create_dir(parent)?;
            }
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(|source| UnpackError::Read {
                    path: rel.clone(),
                    source,
                })?;
            std::fs::write(&target, bytes).map_err(|source| UnpackError::Write {
                path: target.clone(),
                source,
            })?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode | 0o600))
                .map_err(|source| UnpackError::SetMode {
                    path: target.clone(),
                    source,
                })?;
        } else {
            return Err(UnpackError::NotFileOrDir(rel));
        }
    }
    Ok(())
}

/// Every process of a build carries this variable (inherited), naming the build, so
/// what a build left running when its coordinator was killed can be found after.
const BUILD_TAG_VAR: &str = "MYCO_BUILD";

fn build_tag(workspace_id: &str, number: u64) -> String {
    format!("{workspace_id}/{number}")
}

/// Kills (SIGKILL) every process of this user that carries build `number` of
/// `workspace_id`'s tag in its environment: what an interrupted build left
/// running. Returns how many.
pub fn kill_leftovers(workspace_id: &str, number: u64) -> usize {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let needle = format!("{BUILD_TAG_VAR}={}", build_tag(workspace_id, number));
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|p| *p != me)
        else {
            continue;
        };
        // Another user's process cannot be read, and is not ours to kill.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|v| v == needle.as_bytes())
            && let Ok(pid) = i32::try_from(pid)
            && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    killed
}

/// The environment variable of agent `name`'s token.
pub fn token_var(agent: &str) -> String {
    format!(
        "MYCO_AGENT_TOKEN_{}",
        agent.to_ascii_uppercase().replace('-', "_")
    )
}

/// Runs one build to its end. Output lines go to `lines` (cut at
/// [`mesh::api::BUILD_LOG_LINE_MAX`] bytes); `cancel` turning true stops the command
/// (SIGTERM to its process group, SIGKILL after a grace).
///
/// # Cancel safety
/// Not cancel safe: stop a build with `cancel`. Dropped (a build worker aborted at
/// the coordinator's shutdown), the shell gets SIGKILL but what it started in its
/// process group keeps running, and the build is recorded as failed at the next
/// start.
pub async fn run(
    input: BuildInput,
    lines: mpsc::Sender<(Timestamp, String)>,
    mut cancel: watch::Receiver<bool>,
) -> Outcome {
    let say = |text: String| {
        let lines = lines.clone();
        async move {
            let _ = lines.send((Timestamp::now(), text)).await;
        }
    };
    let prepared = {
        let input = input.clone();
        tokio::task::spawn_blocking(move || prepare(&input)).await
    };
    match prepared {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Outcome::Failed(e.to_string()),
        Err(e) => return Outcome::Failed(format!("cannot prepare the build: {e}")),
    }
    say(format!(
        "myco: build {} ({}) of {}/{}: sh -c {:?}",
        input.number,
        input.transition.as_str(),
        input.owner,
        input.workspace_name,
        input.run
    ))
    .await;
    let outcome = run_command(&input, &lines, &mut cancel).await;
    let work_dir = input.work_dir.clone();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(work_dir)).await;
    outcome
}

/// A build's directories that cannot be made ready.
#[derive(Debug, thiserror::Error)]
enum PrepareError {
    /// The work or state directory cannot be created.
    #[error("cannot create {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The template cannot be unpacked into the work directory.
    #[error(transparent)]
    Unpack(#[from] UnpackError),
}

fn prepare(input: &BuildInput) -> Result<(), PrepareError> {
    let _ = std::fs::remove_dir_all(&input.work_dir);
    for dir in [&input.work_dir, &input.state_dir] {
        mesh::identity::private_dir(dir).map_err(|source| PrepareError::CreateDir {
            path: dir.clone(),
            source,
        })?;
    }
    Ok(unpack(&input.archive, &input.work_dir)?)
}

async fn run_command(
    input: &BuildInput,
    lines: &mpsc::Sender<(Timestamp, String)>,
    cancel: &mut watch::Receiver<bool>,
) -> Outcome {
    // The command dies with the coordinator (a killed coordinator leaves no build
    // running unseen; the build is failed when it comes back): util-linux's setpriv
    // sets the parent-death signal and execs sh (Debian's util-linux is essential).
    let mut cmd = match which_setpriv() {
        Some(setpriv) => {
            let mut c = tokio::process::Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--", "sh"]);
            c
        }
        None => tokio::process::Command::new("sh"),
    };
    cmd.arg("-c")
        .arg(&input.run)
        .current_dir(&input.work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    // The coordinator's own settings are not the template's business.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MYCO_") {
            cmd.env_remove(k);
        }
    }
    cmd.env(BUILD_TAG_VAR, build_tag(&input.workspace_id, input.number))
        .env("MYCO_TRANSITION", input.transition.as_str())
        .env("MYCO_WORKSPACE_ID", &input.workspace_id)
        .env("MYCO_WORKSPACE_NAME", &input.workspace_name)
        .env("MYCO_WORKSPACE_OWNER", &input.owner)
        .env("MYCO_BUILD_NUMBER", input.number.to_string())
        .env("MYCO_ACCESS_URL", &input.access_url)
        .env("MYCO_STATE_DIR", &input.state_dir);
    if input.transition == Transition::Start {
        for (agent, token) in &input.agent_tokens {
            cmd.env(token_var(agent), token);
        }
        if let [(_, token)] = input.agent_tokens.as_slice() {
            cmd.env("MYCO_AGENT_TOKEN", token);
        }
        cmd.env("MYCO_INIT_SCRIPT", init_line(&input.access_url));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot start sh: {e}")),
    };
    let pgid = child.id().and_then(|p| i32::try_from(p).ok());
    let (done_tx, done_rx) = watch::channel(false);
    let mut readers = tokio::task::JoinSet::new();
    for out in [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        readers.spawn(read_lines(out, lines.clone(), done_rx.clone()));
    }
    let deadline = tokio::time::sleep(input.timeout);
    tokio::pin!(deadline);
    let outcome = tokio::select! {
        status = child.wait() => match status {
            Ok(s) if s.success() => Outcome::Succeeded,
            Ok(s) => Outcome::Failed(match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                (Some(code), _) => format!("the provisioner command exited with status {code}"),
                (None, Some(sig)) => format!("the provisioner command was killed by signal {sig}"),
                _ => "the provisioner command failed".to_owned(),
            }),
            Err(e) => Outcome::Failed(format!("cannot wait for the provisioner command: {e}")),
        },
        () = &mut deadline => {
            stop(pgid, &mut child).await;
            Outcome::Failed(format!(
                "timed out after {} ([provisioner] timeout); the command was stopped",
                humantime::format_duration(input.timeout)
            ))
        }
        () = cancelled(cancel) => {
            stop(pgid, &mut child).await;
            Outcome::Canceled
        }
    };
    // Output still in the pipes is read to its end; a pipe held open by what the
    // command left running is given up after a moment.
    let drained = tokio::time::timeout(DRAIN_AFTER_EXIT, async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        let _ = done_tx.send(true);
        while readers.join_next().await.is_some() {}
    }
    outcome
}

/// setpriv, where the system has it.
fn which_setpriv() -> Option<&'static Path> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
}

async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// SIGTERM to the command's process group, SIGKILL after [`KILL_GRACE`].
async fn stop(pgid: Option<i32>, child: &mut tokio::process::Child) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if let Some(p) = pgid {
        let _ = killpg(Pid::from_raw(p), Signal::SIGTERM);
    }
    if tokio::time::timeout(KILL_GRACE, child.wait())
        .await
        .is_err()
    {
        if let Some(p) = pgid {
            let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
        }
        let _ = child.wait().await;
    }
}

/// Reads `out` into lines until it ends or `done` turns true; a line longer than
/// the limit is cut and its rest dropped up to the next newline.
async fn read_lines(
    mut out: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    lines: mpsc::Sender<(Timestamp, String)>,
    mut done: watch::Receiver<bool>,
) {
    let max = mesh::api::BUILD_LOG_LINE_MAX;
    let mut line: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = out.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = done.wait_for(|d| *d) => break,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                let text = mesh::api::build_log_text(&line);
                line.clear();
                if lines.send((Timestamp::now(), text)).await.is_err() {
                    return;
                }
            } else if line.len() < max {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        let _ = lines
            .send((Timestamp::now(), mesh::api::build_log_text(&line)))
            .await;
    }
}

/// The `sh` line that fetches the coordinator's init script and runs it, with
/// whichever of curl, wget and busybox the machine has (an image may have only
/// one), as the init script itself then fetches the agent.
fn init_line(access_url: &str) -> String {
    let url = format!("{access_url}/api/v1/init-script/linux/$(uname -m)");
    format!(
        "if command -v curl >/dev/null 2>&1; then curl -fsSL \"{url}\"; \
         elif command -v wget >/dev/null 2>&1; then wget -qO- \"{url}\"; \
         else busybox wget -qO- \"{url}\"; fi | sh"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            // set_path refuses `..`; the raw name field does not, as an attacker's would.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap_or_else(|e| panic!("{e}"));
        }
        b.into_inner().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn only_files_and_dirs_inside_are_unpacked() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ok = archive(&[
            ("template.toml", tar::EntryType::Regular, b"x"),
            ("bin/", tar::EntryType::Directory, b""),
            ("bin/make.sh", tar::EntryType::Regular, b"#!/bin/sh\n"),
        ]);
        unpack(&ok, dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert!(dir.path().join("bin/make.sh").is_file());
        for bad in [
            archive(&[("../escape", tar::EntryType::Regular, b"x")]),
            archive(&[("/etc/x", tar::EntryType::Regular, b"x")]),
            archive(&[("link", tar::EntryType::Symlink, b"")]),
        ] {
            let err = unpack(&bad, dir.path())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("outside") || err.contains("neither"), "{err}");
        }
        assert!(
            !dir.path()
                .parent()
                .unwrap_or(dir.path())
                .join("escape")
                .exists()
        );
    }

    #[test]
    fn agent_token_variables() {
        assert_eq!(token_var("main"), "MYCO_AGENT_TOKEN_MAIN");
        assert_eq!(token_var("db-1"), "MYCO_AGENT_TOKEN_DB_1");
    }
}
