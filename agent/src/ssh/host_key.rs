//! The agent's SSH host key: one Ed25519 key in the data dir, made on first start.

use std::path::{Path, PathBuf};

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, ssh_key::LineEnding};

/// File name of the host key in the agent's data dir.
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// Why the agent's SSH host key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// The key file exists but cannot be read or parsed.
    #[error("cannot read SSH host key {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: russh::keys::ssh_key::Error,
    },
    /// The system gave no randomness for a new key.
    #[error("no randomness for an SSH host key: {0}")]
    Random(getrandom::Error),
    /// The new key cannot be put in OpenSSH's format.
    #[error("cannot encode SSH host key: {0}")]
    Encode(russh::keys::ssh_key::Error),
    /// The new key's file cannot be created or written.
    #[error("cannot write SSH host key {}: {error}", path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Loads the agent's SSH host key, or creates it (OpenSSH format, mode 0600).
///
/// # Errors
/// The key file exists but cannot be read or parsed, or cannot be written.
pub fn load_or_create_host_key(dir: &Path) -> Result<PrivateKey, HostKeyError> {
    let path = dir.join(HOST_KEY_FILE);
    if path.exists() {
        return PrivateKey::read_openssh_file(&path).map_err(|error| HostKeyError::Read {
            path: path.clone(),
            error,
        });
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(HostKeyError::Random)?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(HostKeyError::Encode)?;
    let write_error = |error| HostKeyError::Write {
        path: path.clone(),
        error,
    };
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(write_error)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(write_error)?;
    Ok(key)
}
