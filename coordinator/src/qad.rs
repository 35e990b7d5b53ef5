//! QUIC address discovery (QAD): iroh-relay's QUIC server on its own UDP port tells
//! each peer the address its packets arrive from, so a peer behind NAT learns its
//! public address and can hole-punch. QUIC needs TLS: the operator's certificate
//! (`--tls-cert-file`/`--tls-key-file`, reloaded on SIGHUP with the HTTP listener's),
//! or a self-signed one generated in the data dir. Peers pin whatever certificate the
//! coordinator tells them on the control channel or with a connection ticket, so no
//! public CA is involved.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iroh_relay::server::{QuicConfig, Server, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::tls::CurrentCert;

/// File names of the generated certificate and key inside the data dir.
pub const CERT_FILE: &str = "relay-tls.crt";
pub const KEY_FILE: &str = "relay-tls.key";

/// Why TLS material or the QAD server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QadError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read TLS {what} {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// Generating or writing the self-signed certificate failed.
    #[error("cannot create a self-signed certificate in {path}: {reason}")]
    Generate { path: PathBuf, reason: String },
    /// rustls refused the certificate and key.
    #[error("the TLS certificate and key do not fit together: {0}")]
    Tls(String),
    /// The UDP port could not be bound.
    #[error("cannot start QUIC address discovery on {addr}: {reason}; pick another {flag}")]
    Spawn {
        addr: SocketAddr,
        reason: String,
        flag: &'static str,
    },
}

/// The certificate chain and key the QAD server presents.
pub struct TlsMaterial {
    pub certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl TlsMaterial {
    /// The operator's PEM files, or the self-signed pair in `data_dir` (made on first
    /// use for `host`, the access URL's host, plus `localhost` and 127.0.0.1).
    pub fn load(
        cert: Option<&Path>,
        key: Option<&Path>,
        data_dir: &Path,
        host: &str,
    ) -> Result<Self, QadError> {
        let (cert_path, key_path) = match (cert, key) {
            (Some(c), Some(k)) => (c.to_owned(), k.to_owned()),
            _ => {
                let c = data_dir.join(CERT_FILE);
                let k = data_dir.join(KEY_FILE);
                if !c.exists() || !k.exists() {
                    generate(&c, &k, host)?;
                }
                (c, k)
            }
        };
        let pem = |what, path: &Path, e: rustls_pki_types::pem::Error| QadError::Pem {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let certs = CertificateDer::pem_file_iter(&cert_path)
            .map_err(|e| pem("certificate", &cert_path, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem("certificate", &cert_path, e))?;
        if certs.is_empty() {
            return Err(QadError::Pem {
                what: "certificate",
                path: cert_path,
                reason: "no certificate in it".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| pem("key", &key_path, e))?;
        Ok(Self { certs, key })
    }

    /// The chain and its signing key as rustls serves them; refused when the key
    /// does not fit the certificate.
    pub fn certified_key(&self) -> Result<rustls::sign::CertifiedKey, QadError> {
        let signer = rustls::crypto::ring::sign::any_supported_type(&self.key)
            .map_err(|e| QadError::Tls(e.to_string()))?;
        let key = rustls::sign::CertifiedKey::new(self.certs.clone(), signer);
        key.keys_match().map_err(|e| QadError::Tls(e.to_string()))?;
        Ok(key)
    }
}

fn generate(cert: &Path, key: &Path, host: &str) -> Result<(), QadError> {
    let fail = |reason: String| QadError::Generate {
        path: cert.to_owned(),
        reason,
    };
    let mut names = vec![
        host.to_owned(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ];
    names.dedup();
    let made = rcgen::generate_simple_self_signed(names).map_err(|e| fail(e.to_string()))?;
    let write = |path: &Path, text: String, mode: u32| -> Result<(), QadError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .map_err(|e| fail(e.to_string()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| fail(e.to_string()))
    };
    write(key, made.signing_key.serialize_pem(), 0o600)?;
    write(cert, made.cert.pem(), 0o644)?;
    tracing::info!(path = %cert.display(), "generated a self-signed relay certificate");
    Ok(())
}

/// Where QAD listens and the certificate it serves now, as clients learn them (in
/// the agents' welcome, a ticket, netcheck's targets): read per message, so a
/// certificate reloaded on SIGHUP is what the next client pins.
#[derive(Debug, Clone)]
pub struct QadInfo {
    pub port: u16,
    pub probe_port: u16,
    pub cert: Arc<CurrentCert>,
}

impl QadInfo {
    pub fn relay_quic(&self) -> mesh::control::RelayQuic {
        mesh::control::RelayQuic {
            port: self.port,
            probe_port: Some(self.probe_port),
            cert_der_hex: self.cert.leaf_hex(),
        }
    }
}

/// The running QAD servers: the relay's, and a second one on another port so netcheck
/// can tell whether a NAT's mapping varies by destination.
pub struct QadServer {
    server: Server,
    probe: Server,
    pub addr: SocketAddr,
    pub probe_addr: SocketAddr,
}

impl QadServer {
    /// QAD connections served so far, on both ports.
    pub fn connections(&self) -> u64 {
        self.server.metrics().server.qad_connections.get()
            + self.probe.metrics().server.qad_connections.get()
    }
}

/// Starts iroh-relay's QUIC server twice (QAD only; the relay itself runs in our
/// router): on `bind` for the mesh and on `probe_bind` for netcheck's second probe.
pub async fn start(
    bind: SocketAddr,
    probe_bind: SocketAddr,
    tls: &Arc<CurrentCert>,
) -> Result<QadServer, QadError> {
    let (server, addr) = start_one(bind, tls, "--relay-quic-address").await?;
    let (probe, probe_addr) = start_one(probe_bind, tls, "--relay-quic-probe-address").await?;
    Ok(QadServer {
        server,
        probe,
        addr,
        probe_addr,
    })
}

async fn start_one(
    bind: SocketAddr,
    tls: &Arc<CurrentCert>,
    flag: &'static str,
) -> Result<(Server, SocketAddr), QadError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QadError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(tls.clone());
    let mut quic = QuicConfig::new(bind);
    quic.server_config = Some(server_config);
    let mut config = ServerConfig::default();
    config.quic = Some(quic);
    let server = Server::spawn(config).await.map_err(|e| QadError::Spawn {
        addr: bind,
        reason: e.to_string(),
        flag,
    })?;
    let addr = server.quic_addr().ok_or_else(|| QadError::Spawn {
        addr: bind,
        reason: "the QUIC server did not report its address".into(),
        flag,
    })?;
    Ok((server, addr))
}
