//! rustls configurations from PEM files, for the ractor_cluster link (the gRPC side uses
//! tonic's own TLS settings with the same PEM). One crypto provider (aws-lc-rs) is
//! installed by [`install_crypto_provider`] at start-up.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS configuration cannot be built.
#[derive(Debug)]
pub struct TlsConfigError(pub String);

impl std::fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsConfigError {}

/// Installs aws-lc-rs as the process's rustls provider (a no-op when one is installed).
pub fn install_crypto_provider() {
    let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsConfigError(format!("{what}: no PEM certificate found")));
    }
    Ok(certs)
}

/// A server configuration from a PEM certificate chain and private key.
///
/// # Errors
/// [`TlsConfigError`] naming the input that is not usable.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, TlsConfigError> {
    install_crypto_provider();
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsConfigError(format!("TLS private key: {e}")))?;
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs(cert_pem, "TLS certificate")?, key)
        .map_err(|e| TlsConfigError(format!("TLS certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

/// A client configuration that trusts the CA certificate(s) in `ca_pem`.
///
/// # Errors
/// [`TlsConfigError`] if the CA cannot be read.
pub fn client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, TlsConfigError> {
    install_crypto_provider();
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_pem, "TLS CA")? {
        roots
            .add(cert)
            .map_err(|e| TlsConfigError(format!("TLS CA: {e}")))?;
    }
    Ok(Arc::new(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}
