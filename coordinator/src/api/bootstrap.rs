//! Getting the agent into a workspace image, as Coder's bootstrap does: the
//! coordinator serves agent binaries (`GET /bin/myco-linux-ARCH`, with a `.sha256`
//! beside each) and an init script (`GET /api/v1/init-script/linux/ARCH`) that
//! downloads one, checks it, caches it and runs it with this coordinator's URL.
//! Both are public: the binary is no secret, and the token comes from the workspace's
//! environment (`MYCO_AGENT_TOKEN` or `MYCO_AGENT_TOKEN_FILE`), never from here.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::AppState;
use crate::error::{ApiError, ApiResult};

/// The architecture names of `uname -m` (and Rust's) and ours. The init script's URL
/// takes either, so one line (`.../linux/$(uname -m)`) fits every machine.
const ARCHES: &[(&str, &str)] = &[
    ("x86_64", "amd64"),
    ("aarch64", "arm64"),
    ("armv7l", "armv7"),
];

/// Where agent binaries come from: the operator's `--agent-binary-dir`, else, for
/// this machine's architecture, the agent-only build installed beside the running
/// `myco` as `myco-agent` (a fifth smaller; BENCHMARKS.md), else the running `myco`
/// itself (one binary is coordinator and agent).
#[derive(Debug, Clone)]
pub struct AgentBinaries {
    dir: Option<PathBuf>,
    /// The running binary and the name it is served as.
    own: Option<(String, PathBuf)>,
    /// Checksums by path, with the length and mtime they were made for.
    sums: Arc<Mutex<Sums>>,
}

/// A file's SHA-256 (hex) by path, with the length and mtime it was computed for.
type Sums = std::collections::HashMap<PathBuf, (u64, std::time::SystemTime, String)>;

/// The file name of the agent-only build (`cargo build -p cli --no-default-features`)
/// when it is installed beside `myco`.
pub const AGENT_ONLY_NAME: &str = "myco-agent";

impl AgentBinaries {
    pub fn new(dir: Option<PathBuf>) -> Self {
        let own_arch = ARCHES
            .iter()
            .find(|(machine, _)| *machine == std::env::consts::ARCH)
            .map(|(_, arch)| *arch);
        Self::with_exe(dir, own_arch, std::env::current_exe().ok())
    }

    /// [`AgentBinaries::new`] for a given running binary `exe` of architecture `arch`.
    fn with_exe(dir: Option<PathBuf>, arch: Option<&str>, exe: Option<PathBuf>) -> Self {
        let own = arch.zip(exe).map(|(a, exe)| {
            let small = exe.with_file_name(AGENT_ONLY_NAME);
            let served = if small.is_file() { small } else { exe };
            (format!("myco-linux-{a}"), served)
        });
        Self {
            dir,
            own,
            sums: Arc::default(),
        }
    }

    /// The file served as `name` (`myco-linux-ARCH`), if there is one.
    fn path(&self, name: &str) -> Option<PathBuf> {
        if !name.starts_with("myco-linux-") || name.contains(['/', '\\']) || name.contains("..") {
            return None;
        }
        if let Some(dir) = &self.dir {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
        match &self.own {
            Some((own, exe)) if own == name => Some(exe.clone()),
            _ => None,
        }
    }

    /// The names served, for a 404 that says what exists.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .dir
            .as_deref()
            .and_then(|d| std::fs::read_dir(d).ok())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("myco-linux-") && !n.ends_with(".sha256"))
            .collect();
        if let Some((own, _)) = &self.own {
            names.push(own.clone());
        }
        names.sort();
        names.dedup();
        names
    }

    /// The file's SHA-256 in hex, computed once per length and mtime.
    fn sha256(&self, path: &Path) -> std::io::Result<String> {
        let meta = std::fs::metadata(path)?;
        let stamp = (meta.len(), meta.modified()?);
        if let Some((len, mtime, sum)) = self.lock().get(path)
            && (*len, *mtime) == stamp
        {
            return Ok(sum.clone());
        }
        let mut file = std::fs::File::open(path)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        let sum = hex::encode(hasher.finalize());
        self.lock()
            .insert(path.to_owned(), (stamp.0, stamp.1, sum.clone()));
        Ok(sum)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sums> {
        // A cache of complete entries: a panic elsewhere cannot corrupt it.
        self.sums
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn unknown(binaries: &AgentBinaries, what: &str) -> ApiError {
    let names = binaries.names();
    ApiError::not_found(
        format!("no agent binary {what}"),
        if names.is_empty() {
            "this coordinator serves none; put myco-linux-ARCH files in --agent-binary-dir"
                .to_owned()
        } else {
            format!("this coordinator serves {}", names.join(", "))
        },
    )
}

/// `GET /bin/{file}`: an agent binary, or its `.sha256` (`HASH  NAME`, as
/// `sha256sum` writes and checks it).
pub(super) async fn binary(
    State(state): State<AppState>,
    UrlPath(file): UrlPath<String>,
) -> ApiResult<Response> {
    let binaries = state.agent_binaries.clone();
    if let Some(name) = file.strip_suffix(".sha256") {
        let path = binaries
            .path(name)
            .ok_or_else(|| unknown(&binaries, name))?;
        let b = binaries.clone();
        let sum = super::blocking(move || {
            b.sha256(&path)
                .map_err(|e| ApiError::internal("cannot read the agent binary", e.to_string()))
        })
        .await?;
        return Ok((
            [(header::CONTENT_TYPE, "text/plain")],
            format!("{sum}  {name}\n"),
        )
            .into_response());
    }
    let path = binaries
        .path(&file)
        .ok_or_else(|| unknown(&binaries, &file))?;
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal("cannot open the agent binary", e.to_string()))?;
    let len = f
        .metadata()
        .await
        .map_err(|e| ApiError::internal("cannot read the agent binary", e.to_string()))?
        .len();
    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024))
        .into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, len.into());
    Ok(resp)
}

/// `GET /api/v1/init-script/linux/{arch}`: the POSIX `sh` script a workspace image
/// or VM runs to get and start its agent.
pub(super) async fn init_script(
    State(state): State<AppState>,
    UrlPath(arch): UrlPath<String>,
) -> ApiResult<Response> {
    let arch = ARCHES
        .iter()
        .find(|(machine, _)| *machine == arch)
        .map_or(arch.as_str(), |(_, ours)| ours);
    let name = format!("myco-linux-{arch}");
    if state.agent_binaries.path(&name).is_none() {
        return Err(unknown(&state.agent_binaries, &name));
    }
    let script = render_script(&state.access_url, arch);
    Ok(([(header::CONTENT_TYPE, "text/x-shellscript")], script).into_response())
}

/// The init script for `arch` against the coordinator at `url`. Values are baked in
/// single-quoted; a URL is made of characters that need no more quoting than that
/// (`url` comes from `--access-url`, checked when the server starts).
fn render_script(url: &str, arch: &str) -> String {
    let quoted = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    INIT_SCRIPT
        .replace("@URL@", &quoted(url))
        .replace("@ARCH@", &quoted(arch))
        .replace(
            "@ARCHES@",
            &ARCHES
                .iter()
                .map(|(m, a)| format!("{m}) want={a} ;;"))
                .collect::<Vec<_>>()
                .join(" "),
        )
}

/// The script: POSIX sh, no bashisms, so busybox ash and dash run it.
const INIT_SCRIPT: &str = r#"#!/bin/sh
# Myco agent bootstrap: downloads this coordinator's agent, checks it, caches it and
# runs it. The agent token comes from MYCO_AGENT_TOKEN or MYCO_AGENT_TOKEN_FILE.
set -u
MYCO_URL=@URL@
ARCH=@ARCH@
BIN_NAME="myco-linux-$ARCH"

say() { echo "myco-init: $*" >&2; }

# On a failure the workspace stays up so someone can look inside (as Coder's does).
fail() {
  say "$*"
  say "the agent is not running; this process stays alive so the workspace can be inspected"
  while :; do sleep 3600; done
}

case "$(uname -m)" in
  @ARCHES@
  *) want="" ;;
esac
if [ -n "$want" ] && [ "$want" != "$ARCH" ]; then
  say "warning: this machine is $(uname -m) but the script is for $ARCH"
fi

if [ -z "${MYCO_AGENT_TOKEN:-}" ] && [ -z "${MYCO_AGENT_TOKEN_FILE:-}" ]; then
  fail "no agent token: set MYCO_AGENT_TOKEN or MYCO_AGENT_TOKEN_FILE (myco create prints it)"
fi

# wget's own timeout (-T) crashes Debian's static busybox 1.35; `timeout` bounds it
# where there is one.
limit=""
if command -v timeout >/dev/null 2>&1; then
  limit="timeout 600"
fi
if command -v curl >/dev/null 2>&1; then
  fetch() { curl -fsSL --connect-timeout 10 -o "$2" "$1"; }
elif command -v wget >/dev/null 2>&1; then
  fetch() { $limit wget -q -O "$2" "$1"; }
elif command -v busybox >/dev/null 2>&1; then
  fetch() { $limit busybox wget -q -O "$2" "$1"; }
else
  fail "neither curl nor wget nor busybox is installed; install one of them"
fi

if command -v sha256sum >/dev/null 2>&1; then
  sum_of() { sha256sum "$1" | cut -d' ' -f1; }
elif command -v busybox >/dev/null 2>&1; then
  sum_of() { busybox sha256sum "$1" | cut -d' ' -f1; }
elif command -v shasum >/dev/null 2>&1; then
  sum_of() { shasum -a 256 "$1" | cut -d' ' -f1; }
else
  fail "no sha256sum to check the agent with; install coreutils or busybox"
fi

CACHE="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/myco"
if ! mkdir -p "$CACHE" 2>/dev/null; then
  CACHE="/tmp/myco-agent-$(id -u)"
  mkdir -p "$CACHE" || fail "cannot create a cache directory ($CACHE)"
fi
chmod 700 "$CACHE" 2>/dev/null
BIN="$CACHE/$BIN_NAME"

# The coordinator may not be up yet (a VM booting with it): retry with backoff.
delay=1
while :; do
  if fetch "$MYCO_URL/bin/$BIN_NAME.sha256" "$CACHE/$BIN_NAME.sha256.tmp"; then
    break
  fi
  say "cannot reach $MYCO_URL (retrying in ${delay}s)"
  sleep "$delay"
  [ "$delay" -lt 30 ] && delay=$((delay * 2))
done
want_sum=$(cut -d' ' -f1 "$CACHE/$BIN_NAME.sha256.tmp")
rm -f "$CACHE/$BIN_NAME.sha256.tmp"
[ -n "$want_sum" ] || fail "$MYCO_URL/bin/$BIN_NAME.sha256 is empty"

if [ -x "$BIN" ] && [ "$(sum_of "$BIN")" = "$want_sum" ]; then
  say "using the cached agent $BIN"
else
  delay=1
  while :; do
    if fetch "$MYCO_URL/bin/$BIN_NAME" "$BIN.tmp"; then
      got=$(sum_of "$BIN.tmp")
      [ "$got" = "$want_sum" ] && break
      say "the download's checksum $got is not $want_sum"
    else
      say "cannot download $MYCO_URL/bin/$BIN_NAME"
    fi
    rm -f "$BIN.tmp"
    say "retrying in ${delay}s"
    sleep "$delay"
    [ "$delay" -lt 30 ] && delay=$((delay * 2))
  done
  chmod 755 "$BIN.tmp" && mv -f "$BIN.tmp" "$BIN" || fail "cannot install the agent at $BIN"
fi

export MYCO_AGENT_URL="$MYCO_URL"
exec "$BIN" agent
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_bakes_in_the_url_quoted() {
        let s = render_script("https://myco.example.com", "amd64");
        assert!(s.contains("MYCO_URL='https://myco.example.com'"));
        assert!(s.contains("ARCH='amd64'"));
        assert!(s.contains("x86_64) want=amd64 ;;"));
        let s = render_script("http://x/'; rm -rf /", "amd64");
        assert!(s.contains(r"MYCO_URL='http://x/'\''; rm -rf /'"), "{s}");
    }

    #[test]
    fn the_agent_only_build_beside_myco_is_served_before_myco() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let exe = dir.path().join("myco");
        std::fs::write(&exe, b"full").unwrap_or_default();
        let b = AgentBinaries::with_exe(None, Some("amd64"), Some(exe.clone()));
        assert_eq!(b.path("myco-linux-amd64"), Some(exe));
        let small = dir.path().join(AGENT_ONLY_NAME);
        std::fs::write(&small, b"small").unwrap_or_default();
        let b = AgentBinaries::with_exe(None, Some("amd64"), Some(dir.path().join("myco")));
        assert_eq!(b.path("myco-linux-amd64"), Some(small));
        assert_eq!(b.names(), ["myco-linux-amd64"]);
    }

    #[test]
    fn only_agent_binaries_are_served() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("myco-linux-riscv64"), b"x").unwrap_or_default();
        std::fs::write(dir.path().join("secret"), b"x").unwrap_or_default();
        let b = AgentBinaries::new(Some(dir.path().to_owned()));
        assert!(b.path("myco-linux-riscv64").is_some());
        assert!(b.path("secret").is_none());
        assert!(b.path("myco-linux-../secret").is_none());
        assert!(b.names().contains(&"myco-linux-riscv64".to_owned()));
    }
}
