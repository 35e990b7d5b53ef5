//! The agent pins its coordinator: the ticket key of the first welcome (or the one
//! given with `--coordinator-key`) and the QUIC address discovery certificate are
//! kept in `coordinator.pin` in the data dir, and a welcome with another key is
//! refused. So whoever gets between the agent and its coordinator later can neither
//! sign tickets the agent accepts nor swap the key; a renewed QAD certificate is
//! accepted only with the pinned key's signature over it.
//!
//! [`check`] is pure: what is pinned and what the welcome says in, the decision out.
//! [`load`] and [`save`] are the file.

use std::path::{Path, PathBuf};

use iroh::PublicKey;
use mesh::control::RelayQuic;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of the pin in the agent's data dir.
pub const PIN_FILE: &str = "coordinator.pin";

/// What the agent trusts of its coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorPin {
    /// Signs connection tickets.
    pub coordinator_key: PublicKey,
    /// SHA-256 (hex) of the DER of the QAD certificate last accepted.
    #[serde(default)]
    pub qad_cert_sha256: Option<String>,
}

/// Why a welcome was refused. Retrying cannot fix either: it needs the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// The welcome's ticket key is not the pinned one.
    #[error(
        "the coordinator presented ticket key {presented}, but this agent is pinned to {pinned} ({pinned_from}); \
         if the coordinator's key really changed, re-enrol the agent: delete {file} or pass \
         --coordinator-key with the new key (`myco server` prints it), then restart the agent"
    )]
    KeyChanged {
        presented: String,
        pinned: String,
        /// Where the pin came from: the file or the flag.
        pinned_from: String,
        file: String,
    },
    /// The QAD certificate changed without the pinned key's signature over it.
    #[error(
        "the coordinator presented a new QUIC address discovery certificate not signed by its pinned key; \
         if this is expected, delete {file} and restart the agent"
    )]
    QadCertChanged { file: String },
}

/// What to do with a welcome that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinDecision {
    /// Nothing changed.
    Keep,
    /// Write this pin (first welcome, a flag that differs from the file, or a signed
    /// certificate renewal).
    Store(CoordinatorPin),
}

fn cert_sha256(relay_quic: &RelayQuic) -> String {
    let der = hex::decode(&relay_quic.cert_der_hex).unwrap_or_default();
    hex::encode(Sha256::digest(der))
}

/// Judges a welcome's key and QAD certificate against the pin (`stored`, from the
/// file) and the operator's `--coordinator-key` (`flag`, which wins over the file).
///
/// # Errors
/// [`PinError`] when the welcome must be refused.
pub fn check(
    stored: Option<&CoordinatorPin>,
    flag: Option<PublicKey>,
    file: &Path,
    key: PublicKey,
    relay_quic: Option<&RelayQuic>,
    relay_quic_signature: Option<&str>,
) -> Result<PinDecision, PinError> {
    let (expected, source) = match (flag, stored) {
        (Some(k), _) => (Some(k), "--coordinator-key".to_owned()),
        (None, Some(p)) => (Some(p.coordinator_key), file.display().to_string()),
        (None, None) => (None, String::new()),
    };
    if let Some(expected) = expected
        && expected != key
    {
        return Err(PinError::KeyChanged {
            presented: key.to_string(),
            pinned: expected.to_string(),
            pinned_from: source,
            file: file.display().to_string(),
        });
    }
    let cert = relay_quic.map(cert_sha256);
    let same_key = stored.is_some_and(|p| p.coordinator_key == key);
    let old_cert = stored.and_then(|p| p.qad_cert_sha256.as_ref());
    if same_key
        && let (Some(old), Some(new), Some(rq)) = (old_cert, &cert, relay_quic)
        && old != new
    {
        let signed = relay_quic_signature
            .is_some_and(|sig| mesh::sign::verify_qad_cert(&key, &rq.cert_der_hex, sig).is_ok());
        if !signed {
            return Err(PinError::QadCertChanged {
                file: file.display().to_string(),
            });
        }
    }
    let next = CoordinatorPin {
        coordinator_key: key,
        qad_cert_sha256: cert.or_else(|| old_cert.cloned()),
    };
    if stored == Some(&next) {
        Ok(PinDecision::Keep)
    } else {
        Ok(PinDecision::Store(next))
    }
}

/// Why the pin file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PinFileError {
    /// Reading or writing failed.
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a pin.
    #[error("{0} is not a coordinator pin; delete it to pin the coordinator anew")]
    Malformed(PathBuf),
}

/// Reads the pin, `None` when there is none yet.
///
/// # Errors
/// [`PinFileError`]: unreadable, or not a pin.
pub fn load(path: &Path) -> Result<Option<CoordinatorPin>, PinFileError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|_| PinFileError::Malformed(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PinFileError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes the pin (mode 0600) by replacing the file whole, so a crash leaves the
/// old pin or the new one.
///
/// # Errors
/// [`PinFileError::Io`].
pub fn save(path: &Path, pin: &CoordinatorPin) -> Result<(), PinFileError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PinFileError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("pin.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let text = serde_json::to_vec_pretty(pin).unwrap_or_default();
    f.write_all(&text).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iroh::SecretKey;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_bytes(&[n; 32])
    }

    fn rq(cert: &str) -> RelayQuic {
        RelayQuic {
            port: 1,
            probe_port: None,
            cert_der_hex: cert.into(),
        }
    }

    fn file() -> PathBuf {
        PathBuf::from("/data/coordinator.pin")
    }

    #[test]
    fn first_welcome_is_pinned_then_held_to() {
        let k = key(1).public();
        let d = check(None, None, &file(), k, Some(&rq("aa")), None).unwrap();
        let PinDecision::Store(pin) = d else {
            panic!("first welcome not stored: {d:?}")
        };
        assert_eq!(pin.coordinator_key, k);
        assert_eq!(
            check(Some(&pin), None, &file(), k, Some(&rq("aa")), None),
            Ok(PinDecision::Keep)
        );
        let err = check(Some(&pin), None, &file(), key(2).public(), None, None).unwrap_err();
        assert!(matches!(err, PinError::KeyChanged { .. }));
        assert!(
            err.to_string().contains("delete /data/coordinator.pin"),
            "{err}"
        );
    }

    #[test]
    fn the_flag_wins_over_the_file_and_over_trust_on_first_use() {
        let (a, b) = (key(1).public(), key(2).public());
        // Pinned up front: the first welcome must already match.
        assert!(matches!(
            check(None, Some(a), &file(), b, None, None),
            Err(PinError::KeyChanged { .. })
        ));
        // A flag naming a new key re-enrols an agent pinned to an old one.
        let old = CoordinatorPin {
            coordinator_key: a,
            qad_cert_sha256: None,
        };
        assert!(matches!(
            check(Some(&old), Some(b), &file(), b, None, None),
            Ok(PinDecision::Store(p)) if p.coordinator_key == b
        ));
    }

    #[test]
    fn a_new_qad_certificate_needs_the_pinned_keys_signature() {
        let k = key(1);
        let PinDecision::Store(pin) =
            check(None, None, &file(), k.public(), Some(&rq("aa")), None).unwrap()
        else {
            panic!()
        };
        assert!(matches!(
            check(Some(&pin), None, &file(), k.public(), Some(&rq("bb")), None),
            Err(PinError::QadCertChanged { .. })
        ));
        let forged = mesh::sign::qad_cert_signature(&key(9), "bb");
        assert!(matches!(
            check(
                Some(&pin),
                None,
                &file(),
                k.public(),
                Some(&rq("bb")),
                Some(&forged)
            ),
            Err(PinError::QadCertChanged { .. })
        ));
        let signed = mesh::sign::qad_cert_signature(&k, "bb");
        assert!(matches!(
            check(Some(&pin), None, &file(), k.public(), Some(&rq("bb")), Some(&signed)),
            Ok(PinDecision::Store(p)) if p.qad_cert_sha256 != pin.qad_cert_sha256
        ));
    }

    #[test]
    fn the_file_round_trips_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PIN_FILE);
        assert!(load(&path).unwrap().is_none());
        let pin = CoordinatorPin {
            coordinator_key: key(1).public(),
            qad_cert_sha256: Some("ab".into()),
        };
        save(&path, &pin).unwrap();
        assert_eq!(load(&path).unwrap(), Some(pin.clone()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "nope").unwrap();
        assert!(matches!(load(&path), Err(PinFileError::Malformed(_))));
    }
}
