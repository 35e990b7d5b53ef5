//! What Myco's clients trust when they speak TLS (`https://`, `wss://`, the relay):
//! the system's root certificates, found as OpenSSL and curl find them (the
//! platform's store, or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set), plus the CAs of
//! `--ca-cert-file` for a private CA. One [`Trust`] per process, set up from the
//! command line with [`init`] before the first client is built, and handed to each
//! client: reqwest, tokio-tungstenite and iroh's relay client all take the same
//! rustls configuration, so they cannot disagree on whom they trust.
//!
//! The lowest crate of the workspace beside `netcheck`, so every client can use it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The trust of this process; see [`init`] and [`get`].
static TRUST: OnceLock<Trust> = OnceLock::new();

/// Whom a process's TLS clients trust.
#[derive(Debug, Clone)]
pub struct Trust {
    roots: Vec<CertificateDer<'static>>,
    config: Arc<rustls::ClientConfig>,
    /// What the roots came from, for error messages.
    sources: String,
}

/// The CA file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Unreadable, or no PEM certificate in it.
    #[error("cannot use the CA file {path}: {reason}; give a PEM file of CA certificates")]
    CaFile { path: PathBuf, reason: String },
    /// A certificate in it is not one rustls accepts as a root.
    #[error("the CA file {path} holds a certificate that cannot be a root: {reason}")]
    BadRoot { path: PathBuf, reason: String },
}

impl Trust {
    /// The system's roots plus, when given, the CA certificates in `ca_cert_file`.
    /// Failing to read some of the system's certificates is logged, not fatal: a
    /// private CA still works.
    ///
    /// # Errors
    /// [`TrustError`]: `ca_cert_file` cannot be read or holds no usable certificate.
    pub fn load(ca_cert_file: Option<&Path>) -> Result<Self, TrustError> {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!("a system root certificate was skipped: {e}");
        }
        let mut roots: Vec<CertificateDer<'static>> = native.certs;
        let system = roots.len();
        let mut sources = match std::env::var("SSL_CERT_FILE") {
            Ok(f) if !f.is_empty() => format!("SSL_CERT_FILE={f} ({system} certificates)"),
            _ => format!("the system's roots ({system} certificates)"),
        };
        if let Some(path) = ca_cert_file {
            let err = |reason: String| TrustError::CaFile {
                path: path.to_owned(),
                reason,
            };
            let extra = CertificateDer::pem_file_iter(path)
                .map_err(|e| err(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(e.to_string()))?;
            if extra.is_empty() {
                return Err(err("no certificate in it".into()));
            }
            sources.push_str(&format!(" and --ca-cert-file {}", path.display()));
            roots.extend(extra);
        }
        let mut store = RootCertStore::empty();
        let (_, skipped) = store.add_parsable_certificates(roots.iter().cloned());
        if let Some(path) = ca_cert_file
            && skipped > 0
            && store.is_empty()
        {
            return Err(TrustError::BadRoot {
                path: path.to_owned(),
                reason: "rustls could not parse it".into(),
            });
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError::BadRoot {
            path: ca_cert_file.map(Path::to_owned).unwrap_or_default(),
            reason: e.to_string(),
        })?
        .with_root_certificates(store)
        .with_no_client_auth();
        Ok(Self {
            roots,
            config: Arc::new(config),
            sources,
        })
    }

    /// The rustls client configuration every TLS client of the process uses.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// The root certificates, for clients that build their own verifier (iroh's
    /// relay client).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// What the roots came from, e.g. "the system's roots (146 certificates) and
    /// --ca-cert-file ca.pem".
    pub fn sources(&self) -> &str {
        &self.sources
    }
}

/// Sets this process's trust from `--ca-cert-file`; call once, before any client is
/// built. Later calls keep the first.
///
/// # Errors
/// [`TrustError`], from [`Trust::load`].
pub fn init(ca_cert_file: Option<&Path>) -> Result<&'static Trust, TrustError> {
    if let Some(t) = TRUST.get() {
        return Ok(t);
    }
    let trust = Trust::load(ca_cert_file)?;
    Ok(TRUST.get_or_init(|| trust))
}

/// This process's trust: what [`init`] set, else the system's roots alone.
pub fn get() -> &'static Trust {
    TRUST.get_or_init(|| {
        // Without a CA file `load` can only fail if ring lacked TLS 1.2 and 1.3.
        #[allow(clippy::expect_used)]
        Trust::load(None).expect("the ring provider supports TLS 1.2 and 1.3")
    })
}

/// One line for a TLS failure talking to `host`, when `error`'s chain is one:
/// which name was checked, why it failed, and which CAs were trusted.
pub fn explain(host: &str, error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if let Some(why) = certificate_error(e) {
            return Some(describe(host, why));
        }
        cur = e.source();
    }
    None
}

/// The certificate error in `e`, looking inside I/O errors too: their `source()`
/// skips the error they wrap, which is where TLS stacks put rustls's.
fn certificate_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::CertificateError> {
    if let Some(rustls::Error::InvalidCertificate(why)) = e.downcast_ref::<rustls::Error>() {
        return Some(why);
    }
    let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    certificate_error(inner)
}

fn describe(host: &str, why: &rustls::CertificateError) -> String {
    let sources = get().sources();
    let reason = match why {
        rustls::CertificateError::UnknownIssuer => {
            "it is signed by a CA that is not trusted here".to_owned()
        }
        rustls::CertificateError::NotValidForName
        | rustls::CertificateError::NotValidForNameContext { .. } => {
            format!("it is not valid for the name {host}")
        }
        rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
            "it has expired".to_owned()
        }
        other => format!("{other:?}"),
    };
    format!(
        "the TLS certificate of {host} was refused: {reason} (trusted: {sources}); for a private CA pass --ca-cert-file or set SSL_CERT_FILE"
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_ca_file_adds_its_roots_and_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        let base = Trust::load(None).unwrap();
        let t = Trust::load(Some(&path)).unwrap();
        assert_eq!(t.roots().len(), base.roots().len() + 1);
        assert!(t.sources().contains("ca.pem"), "{}", t.sources());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = Trust::load(Some(&path)).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = Trust::load(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
