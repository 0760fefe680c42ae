//! TLS for exports that leave the host: the server's side of `NBD_OPT_STARTTLS`, with rustls.
//!
//! A server with TLS runs in the protocol's FORCEDTLS mode: until the client upgrades, every
//! option but `STARTTLS` and `ABORT` is answered `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME` (which
//! cannot be refused politely) ends the connection. After the upgrade the negotiation starts
//! afresh, as the protocol requires.
//!
//! Certificates only: rustls has no external pre-shared keys, so the PSK mode of qemu-nbd and
//! nbdkit (GnuTLS) is not offered.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

/// Why a TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    /// rustls refused the certificate and key.
    #[error("certificate and key: {0}")]
    Config(#[from] rustls::Error),
}

/// A server certificate and key, ready to accept TLS connections.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads a PEM certificate chain (the server's certificate first) and its PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let pem_err = |path: &Path, reason: String| TlsError::Pem {
            path: path.display().to_string(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err(cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_err(cert, e.to_string()))?;
        if certs.is_empty() {
            return Err(pem_err(cert, "no certificate in the file".into()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The acceptor that upgrades a connection.
    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}
