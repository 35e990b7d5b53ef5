//! The saved login session: `session.json` in the config dir, mode 0600.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::Globals;

const SESSION_FILE: &str = "session.json";

#[derive(Clone, Serialize, Deserialize)]
pub struct SavedSession {
    pub url: String,
    pub username: String,
    pub token: String,
}

/// The config dir: `--config-dir`, else `$XDG_CONFIG_HOME/myco`, else `~/.config/myco`.
pub fn config_dir(globals: &Globals) -> anyhow::Result<PathBuf> {
    match &globals.config_dir {
        Some(d) => Ok(d.clone()),
        None => crate::dirs::xdg_dir("XDG_CONFIG_HOME", ".config", "myco", "--config-dir"),
    }
}

pub fn load(dir: &Path) -> anyhow::Result<Option<SavedSession>> {
    let path = dir.join(SESSION_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| {
                format!(
                    "session file {} is unreadable; run `myco login URL` again",
                    path.display()
                )
            })
            .map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes the session with mode 0600 (dir 0700), replacing any old one atomically.
pub fn save(dir: &Path, session: &SavedSession) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the config dir {}", dir.display()))?;
    crate::dirs::write_private(
        &dir.join(SESSION_FILE),
        &serde_json::to_vec_pretty(session)?,
    )
}

/// Deletes the session file. Returns whether there was one.
pub fn remove(dir: &Path) -> anyhow::Result<bool> {
    let path = dir.join(SESSION_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot delete {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn saved_session_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("cfg");
        let s = SavedSession {
            url: "http://x".into(),
            username: "a".into(),
            token: "t".into(),
        };
        save(&cfg, &s).unwrap();
        save(&cfg, &s).unwrap();
        let mode = std::fs::metadata(cfg.join(SESSION_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(&cfg).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
        assert_eq!(load(&cfg).unwrap().unwrap().token, "t");
        assert!(remove(&cfg).unwrap());
        assert!(load(&cfg).unwrap().is_none());
    }
}
