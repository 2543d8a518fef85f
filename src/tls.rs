//! TLS material, read where the config is validated so a bad file is a
//! config error naming its key rather than a panic when pingora starts the
//! listener: a listener's certificate chain and key ([`load_certified_key`]),
//! the certificate resolver that lets SIGHUP swap them for new handshakes
//! ([`ReloadableCert`]), and a CA file for verifying `https://` upstreams
//! ([`load_ca_file`]).
//!
//! The backend is pingora's rustls one (pure Rust, ring as the crypto
//! provider), so no system OpenSSL is involved.

use arc_swap::ArcSwap;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use std::path::Path;
use std::sync::Arc;

/// Why a certificate or key file was refused, and which of the two.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyPairError {
    Cert(String),
    Key(String),
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Read a PEM certificate chain (leaf first) and its private key, and
/// check that the key belongs to the leaf certificate.
pub fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, KeyPairError> {
    let cert_pem = read(cert_file).map_err(KeyPairError::Cert)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            KeyPairError::Cert(format!("{} is not valid PEM: {e}", cert_file.display()))
        })?;
    if certs.is_empty() {
        return Err(KeyPairError::Cert(format!(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in {}",
            cert_file.display()
        )));
    }
    for cert in &certs {
        if let Err(e) = x509_parser::parse_x509_certificate(cert) {
            return Err(KeyPairError::Cert(format!(
                "{} holds a certificate that does not parse: {e}",
                cert_file.display()
            )));
        }
    }
    let key_pem = read(key_file).map_err(KeyPairError::Key)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| KeyPairError::Key(format!("{} is not valid PEM: {e}", key_file.display())))?
        .ok_or_else(|| {
            KeyPairError::Key(format!(
                "no PEM private key (PKCS#8, PKCS#1 or SEC1) in {}",
                key_file.display()
            ))
        })?;
    CertifiedKey::from_der(certs, key, provider()).map_err(|e| {
        let why = match e {
            pingora::tls::RusTlsError::InconsistentKeys(_) => {
                "is not the private key of the (first) certificate in".to_string()
            }
            other => format!("cannot be used ({other}) with the certificate in"),
        };
        KeyPairError::Key(format!(
            "{} {why} {}",
            key_file.display(),
            cert_file.display()
        ))
    })
}

/// The process-wide rustls provider (ring), installed once; pingora uses
/// the same one.
fn provider() -> &'static Arc<CryptoProvider> {
    pingora::tls::install_default_crypto_provider();
    CryptoProvider::get_default().expect("a rustls crypto provider was just installed")
}

/// Read a PEM file of CA certificates (DER of each, in order).
pub fn load_ca_file(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in {}",
            path.display()
        ));
    }
    let mut out = Vec::with_capacity(certs.len());
    for cert in certs {
        // pingora parses these again per connection and panics on garbage.
        if let Err(e) = x509_parser::parse_x509_certificate(&cert) {
            return Err(format!(
                "{} holds a certificate that does not parse: {e}",
                path.display()
            ));
        }
        out.push(cert.to_vec());
    }
    Ok(out)
}

/// The certificate a TLS listener presents, replaceable while it runs:
/// rustls asks the resolver on every handshake, so a swap takes effect for
/// new connections and leaves established ones alone.
#[derive(Debug)]
pub struct ReloadableCert(ArcSwap<CertifiedKey>);

impl ReloadableCert {
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        ReloadableCert(ArcSwap::new(key))
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        self.0.store(key);
    }

    /// The certificate new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.load_full()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}
