//! TLS for the HTTP listener (API, agents' control channel, relay, `/metrics`) and
//! QUIC address discovery: the operator's certificate and key (PEM), served by
//! rustls, and read again on SIGHUP without dropping a connection (certificates are
//! renewed every 60-90 days). Both listeners resolve the certificate through one
//! [`CurrentCert`], so a reload reaches both at once. A reload that fails keeps the
//! certificate being served and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::qad::{QadError, TlsMaterial};

/// The certificate served now; swapped whole by [`TlsReloader::reload`].
#[derive(Debug)]
pub(crate) struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    pub(crate) fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self(RwLock::new(Arc::new(key))))
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The leaf certificate, DER in hex: what clients pin for QAD.
    pub(crate) fn leaf_hex(&self) -> String {
        self.get().cert.first().map(hex::encode).unwrap_or_default()
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// Reads the certificate files again; kept by `myco server` for its SIGHUP handler.
#[derive(Debug, Clone)]
pub struct TlsReloader {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: Arc<CurrentCert>,
}

impl TlsReloader {
    /// Serves the files' certificate from the next handshake on; on an error the old
    /// one stays.
    ///
    /// # Errors
    /// [`QadError`]: the files cannot be read, or the key does not fit.
    pub fn reload(&self) -> Result<(), QadError> {
        let key = certified_key(&self.cert_file, &self.key_file)?;
        *self
            .current
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
        Ok(())
    }
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, QadError> {
    let material = TlsMaterial::load(Some(cert), Some(key), Path::new(""), "")?;
    material.certified_key()
}

/// The HTTP listener's acceptor, serving `current`, and the handle that reloads it
/// from the files.
pub(crate) fn acceptor(
    cert_file: &Path,
    key_file: &Path,
    current: Arc<CurrentCert>,
) -> Result<(tokio_rustls::TlsAcceptor, TlsReloader), QadError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| QadError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_cert_resolver(current.clone());
    // HTTP/1.1 only: WebSocket upgrades (control channel, relay) need it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        TlsReloader {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current,
        },
    ))
}
