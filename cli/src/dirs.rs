//! Where myco keeps its files by default (XDG base directories), and how it writes
//! the private ones.

use std::path::PathBuf;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;

/// `$VAR/NAME` when `VAR` (e.g. `XDG_DATA_HOME`) is set, else `$HOME/HOME_REL/NAME`
/// (e.g. `~/.local/share/NAME`). `flag` names the option to pass when HOME is unset.
pub fn xdg_dir(var: &str, home_rel: &str, name: &str, flag: &str) -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join(name));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .with_context(|| {
            format!("cannot find a default directory: HOME is not set; pass {flag}")
        })?;
    Ok(PathBuf::from(home).join(home_rel).join(name))
}

/// Replaces `path` with `bytes` atomically (a fresh temp file beside it, synced, then
/// renamed), readable by the owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("myco-tmp");
    // A leftover temp file might have looser permissions; never reuse it.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
