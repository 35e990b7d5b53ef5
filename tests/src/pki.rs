//! Certificates for TLS tests: a private CA and a server certificate it signed.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A private CA named `name` and a server certificate it signed for `names` (DNS
/// names or IP addresses), written as PEM files in `dir`:
/// `(NAME-ca.pem, NAME-server.pem, NAME-server.key)`.
pub fn private_ca(dir: &Path, name: &str, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    make(dir, name, names, false)
}

/// [`private_ca`], but the server certificate expired in 2021: what a coordinator
/// serves when its renewal came too late.
pub fn private_ca_expired(dir: &Path, name: &str, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    make(dir, name, names, true)
}

fn make(dir: &Path, name: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("Myco test CA {name}"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    if expired {
        leaf.not_before = rcgen::date_time_ymd(2020, 1, 1);
        leaf.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-server.pem")),
        dir.join(format!("{name}-server.key")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}
