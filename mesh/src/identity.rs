//! A node's ed25519 identity, kept in a key file (hex, mode 0600) and created on first use;
//! and the private dirs (0700) and files (0600) such secrets live in.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use iroh::SecretKey;

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or creating the file failed.
    #[error("cannot use key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is readable by other users, so the key may be known to them.
    #[error("key file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    /// The file does not hold a 32-byte hex key.
    #[error(
        "key file {0} is not a myco key (want 64 hex characters); move it away to get a new identity"
    )]
    Malformed(PathBuf),
}

/// Loads the key at `path`, or creates one there (and its parent dirs, mode 0700).
///
/// # Errors
/// See [`IdentityError`]; a file others can read is refused, as OpenSSH does.
pub fn load_or_create(path: &Path) -> Result<SecretKey, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::TooOpen {
                    path: path.to_owned(),
                    mode,
                });
            }
            let bytes = hex::decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| IdentityError::Malformed(path.to_owned()))?;
            Ok(SecretKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io)?;
            }
            let key = SecretKey::generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(format!("{}\n", hex::encode(key.to_bytes())).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Makes `path` a directory only its owner can enter (0700), creating it and its
/// missing parents. One that exists with any group or other bit set is narrowed to
/// its owner bits, whatever the umask or whoever made it; the old mode is returned
/// then, for the caller to log.
///
/// # Errors
/// The directory cannot be created, or its mode read or changed (it is not ours).
pub fn private_dir(path: &Path) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    narrow(path, 0o700)
}

/// Makes `path` a file only its owner can read or write (0600), creating it empty
/// when missing (never truncating). One that exists with any group or other bit set
/// is narrowed; the old mode is returned then, for the caller to log.
///
/// # Errors
/// The file cannot be created, or its mode read or changed (it is not ours).
pub fn private_file(path: &Path) -> std::io::Result<Option<u32>> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    narrow(path, 0o600)
}

/// Drops every group and other bit of `path`'s mode (and, for safety, any owner bit
/// `allowed` lacks); returns the old mode when it changed.
fn narrow(path: &Path, allowed: u32) -> std::io::Result<Option<u32>> {
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if mode & !allowed == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & allowed))?;
    Ok(Some(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(IdentityError::TooOpen { .. })
        ));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "nope").unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(IdentityError::Malformed(_))
        ));
    }

    #[test]
    fn private_dirs_and_files_are_narrowed_whatever_made_them() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;

        // New: created private.
        let data = dir.path().join("a/data");
        assert_eq!(private_dir(&data).unwrap(), None);
        assert_eq!(mode(&data), 0o700);
        let file = data.join("store");
        assert_eq!(private_file(&file).unwrap(), None);
        assert_eq!(mode(&file), 0o600);

        // Made open by someone else: narrowed, and the old mode told.
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&file, "kept").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(private_dir(&data).unwrap(), Some(0o755));
        assert_eq!(mode(&data), 0o700);
        assert_eq!(private_file(&file).unwrap(), Some(0o666));
        assert_eq!(mode(&file), 0o600);
        // Never truncated.
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept");
        // Already private: left alone.
        assert_eq!(private_dir(&data).unwrap(), None);
        assert_eq!(private_file(&file).unwrap(), None);
    }
}
