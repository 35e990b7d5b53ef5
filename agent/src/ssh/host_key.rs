//! The agent's SSH host key: one Ed25519 key in the data dir, made on first start.

use std::path::Path;

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, ssh_key::LineEnding};

/// File name of the host key in the agent's data dir.
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// Loads the agent's SSH host key, or creates it (OpenSSH format, mode 0600).
///
/// # Errors
/// The key file exists but cannot be read or parsed, or cannot be written.
pub fn load_or_create_host_key(dir: &Path) -> Result<PrivateKey, String> {
    let path = dir.join(HOST_KEY_FILE);
    if path.exists() {
        return PrivateKey::read_openssh_file(&path)
            .map_err(|e| format!("cannot read SSH host key {}: {e}", path.display()));
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no randomness for an SSH host key: {e}"))?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| format!("cannot encode SSH host key: {e}"))?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot write SSH host key {}: {e}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .map_err(|e| format!("cannot write SSH host key {}: {e}", path.display()))?;
    Ok(key)
}
