//! TLS for exports that leave the host: the server's side of `NBD_OPT_STARTTLS`, with a
//! certificate (rustls) or with pre-shared keys (OpenSSL, interoperating with the PSK mode of
//! qemu-nbd, qemu-img and libnbd, which use GnuTLS).
//!
//! A server with TLS runs in the protocol's FORCEDTLS mode: until the client upgrades, every
//! option but `STARTTLS` and `ABORT` is answered `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME` (which
//! cannot be refused politely) ends the connection. After the upgrade the negotiation starts
//! afresh, as the protocol requires. The handshake does not know which engine upgraded the
//! stream: both give a [`TlsStream`].
//!
//! PSK: rustls has no external pre-shared keys, so this mode uses the system's OpenSSL. TLS 1.3
//! (what GnuTLS clients negotiate) looks the client's identity up through OpenSSL's PSK server
//! callback, which OpenSSL also consults for TLS 1.3 external PSKs (with SHA-256, the hash GnuTLS
//! uses for them); TLS 1.2 is offered with the (EC)DHE-PSK AEAD suites for older clients. No
//! session tickets are issued. An identity without a key fails the handshake; the log names
//! the identity (escaped, cut short), never a key.

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use openssl::ex_data::Index;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslSessionCacheMode, SslVersion,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

use super::psk::{KeyFileError, PskKeys};

/// TLS 1.2 suites offered with PSK: forward-secret (ECDHE) key exchange only; ChaCha20-Poly1305
/// first, then AES-CBC with SHA-2 MACs (OpenSSL has no ECDHE-PSK suite with AES-GCM).
const PSK_TLS12_CIPHERS: &str =
    "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256";
/// The longest part of a refused identity that a log line shows.
const SHOWN_IDENTITY: usize = 64;

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
    /// The PSK key file was refused.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// OpenSSL refused the PSK configuration.
    #[error("OpenSSL: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// A TLS configuration, ready to accept connections.
#[derive(Clone)]
pub struct Tls {
    engine: Engine,
}

#[derive(Clone)]
enum Engine {
    Certificate(TlsAcceptor),
    Psk(SslContext),
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.engine {
            Engine::Certificate(_) => "certificate",
            Engine::Psk(_) => "psk",
        };
        f.debug_struct("Tls")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

/// What the PSK callback leaves on a connection: the identity the client offered (as a log
/// line shows it) and whether it has a key, so that a failed handshake can say why.
struct Offered {
    identity: String,
    known: bool,
}

/// The ex-data slot for [`Offered`], made once per process.
fn offered_index() -> Result<Index<Ssl, Offered>, openssl::error::ErrorStack> {
    static INDEX: OnceLock<Index<Ssl, Offered>> = OnceLock::new();
    if let Some(index) = INDEX.get() {
        return Ok(*index);
    }
    let index = Ssl::new_ex_index::<Offered>()?;
    // A racing thread may have set another slot: either one works, both are valid.
    Ok(*INDEX.get_or_init(|| index))
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
            engine: Engine::Certificate(TlsAcceptor::from(Arc::new(config))),
        })
    }

    /// Accepts clients that prove they hold the key of one of the identities in `keys`.
    pub fn from_psk(keys: PskKeys) -> Result<Self, TlsError> {
        let offered = offered_index()?;
        let mut builder = SslContextBuilder::new(SslMethod::tls_server())?;
        builder.set_min_proto_version(Some(SslVersion::TLS1_2))?;
        builder.set_cipher_list(PSK_TLS12_CIPHERS)?;
        builder.set_options(
            SslOptions::NO_TICKET
                | SslOptions::NO_RENEGOTIATION
                | SslOptions::CIPHER_SERVER_PREFERENCE,
        );
        builder.set_num_tickets(0)?;
        builder.set_session_cache_mode(SslSessionCacheMode::OFF);
        builder.set_psk_server_callback(move |ssl, identity, out| {
            let identity = identity.unwrap_or_default();
            let key = keys.find(identity).filter(|key| key.len() <= out.len());
            ssl.set_ex_data(
                offered,
                Offered {
                    identity: shown_identity(identity),
                    known: key.is_some(),
                },
            );
            Ok(match key {
                Some(key) => {
                    out[..key.len()].copy_from_slice(key);
                    key.len()
                }
                // Zero bytes of key: OpenSSL fails the handshake.
                None => 0,
            })
        });
        Ok(Tls {
            engine: Engine::Psk(builder.build()),
        })
    }

    /// Runs the server's side of the TLS handshake on `stream`.
    pub(crate) async fn accept<S>(&self, stream: S) -> Result<TlsStream<S>, String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match &self.engine {
            Engine::Certificate(acceptor) => match acceptor.accept(stream).await {
                Ok(s) => Ok(TlsStream::Rustls(Box::new(s))),
                Err(e) => Err(e.to_string()),
            },
            Engine::Psk(context) => {
                let ssl = Ssl::new(context).map_err(|e| e.to_string())?;
                let mut s = Box::pin(
                    tokio_openssl::SslStream::new(ssl, stream).map_err(|e| e.to_string())?,
                );
                match s.as_mut().accept().await {
                    Ok(()) => Ok(TlsStream::OpenSsl(s)),
                    Err(e) => {
                        let offered = offered_index()
                            .ok()
                            .and_then(|index| s.ssl().ex_data(index));
                        Err(match offered {
                            Some(Offered {
                                identity,
                                known: false,
                            }) => format!("unknown PSK identity {identity}"),
                            Some(Offered {
                                identity,
                                known: true,
                            }) => format!(
                                "PSK identity {identity}: the client's key differs, or it \
                                 failed otherwise ({e})"
                            ),
                            None => e.to_string(),
                        })
                    }
                }
            }
        }
    }
}

/// A client's identity as a log line shows it: quoted, escaped, at most [`SHOWN_IDENTITY`]
/// characters.
fn shown_identity(identity: &[u8]) -> String {
    let text = String::from_utf8_lossy(identity);
    let mut shown: String = text.chars().take(SHOWN_IDENTITY).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

/// A connection after `STARTTLS`, whichever engine encrypts it.
#[derive(Debug)]
pub enum TlsStream<S> {
    /// Upgraded by rustls (a certificate).
    Rustls(Box<tokio_rustls::server::TlsStream<S>>),
    /// Upgraded by OpenSSL (pre-shared keys).
    OpenSsl(Pin<Box<tokio_openssl::SslStream<S>>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsStream::Rustls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            TlsStream::OpenSsl(s) => s.as_mut().poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TlsStream::Rustls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            TlsStream::OpenSsl(s) => s.as_mut().poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TlsStream::Rustls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            TlsStream::OpenSsl(s) => s.as_mut().poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            TlsStream::Rustls(s) => s.is_write_vectored(),
            TlsStream::OpenSsl(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsStream::Rustls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            TlsStream::OpenSsl(s) => s.as_mut().poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsStream::Rustls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            TlsStream::OpenSsl(s) => s.as_mut().poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::ssl::{SslConnector, SslVerifyMode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn server() -> Tls {
        let text = format!("qemu:{KEY}\nalice:{}\n", "ab".repeat(16));
        let keys = PskKeys::parse(Path::new("keys.psk"), text.as_bytes()).unwrap();
        Tls::from_psk(keys).unwrap()
    }

    /// An OpenSSL client offering `identity` with `key`, at most TLS `version`.
    fn client(identity: &str, key: Vec<u8>, version: SslVersion) -> Ssl {
        let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
        b.set_verify(SslVerifyMode::NONE);
        b.set_max_proto_version(Some(version)).unwrap();
        b.set_cipher_list(PSK_TLS12_CIPHERS).unwrap();
        let identity = identity.to_string();
        b.set_psk_client_callback(move |_, _hint, id_out, key_out| {
            id_out[..identity.len()].copy_from_slice(identity.as_bytes());
            id_out[identity.len()] = 0;
            key_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        b.build()
            .configure()
            .unwrap()
            .into_ssl("localhost")
            .unwrap()
    }

    /// Runs both sides over an in-memory pipe; the server echoes one message when it accepts.
    async fn exchange(ssl: Ssl) -> (Result<(), String>, Result<Vec<u8>, String>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let tls = server();
        let serving = async move {
            let mut s = tls.accept(a).await?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            s.write_all(&buf).await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())
        };
        let connecting = async move {
            let mut c = Box::pin(tokio_openssl::SslStream::new(ssl, b).unwrap());
            c.as_mut().connect().await.map_err(|e| e.to_string())?;
            c.write_all(b"hello").await.map_err(|e| e.to_string())?;
            let mut back = c.ssl().version_str().as_bytes().to_vec();
            let mut echoed = [0u8; 5];
            c.read_exact(&mut echoed).await.map_err(|e| e.to_string())?;
            back.extend_from_slice(&echoed);
            Ok(back)
        };
        tokio::join!(serving, connecting)
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn psk_clients_with_the_right_key_connect_over_tls_1_3_and_1_2() {
        for (version, name) in [
            (SslVersion::TLS1_3, "TLSv1.3"),
            (SslVersion::TLS1_2, "TLSv1.2"),
        ] {
            let want = format!("{name}hello").into_bytes();
            let (served, got) = exchange(client("qemu", hex(KEY), version)).await;
            served.unwrap();
            assert_eq!(got.unwrap(), want);
            let (served, got) = exchange(client("alice", vec![0xab; 16], version)).await;
            served.unwrap();
            assert_eq!(got.unwrap(), want);
        }
    }

    #[tokio::test]
    async fn a_wrong_key_or_an_unknown_identity_fails_and_says_which() {
        for version in [SslVersion::TLS1_3, SslVersion::TLS1_2] {
            let mut wrong = hex(KEY);
            wrong[0] ^= 1;
            let (served, got) = exchange(client("qemu", wrong, version)).await;
            let e = served.unwrap_err();
            assert!(
                e.starts_with("PSK identity \"qemu\": the client's key"),
                "{e}"
            );
            assert!(!e.contains(&KEY[..8]), "{e}");
            assert!(got.is_err());
            let (served, got) = exchange(client("mallory", hex(KEY), version)).await;
            assert_eq!(served.unwrap_err(), "unknown PSK identity \"mallory\"");
            assert!(got.is_err());
        }
    }

    #[tokio::test]
    async fn a_client_without_a_psk_is_refused() {
        let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
        b.set_verify(SslVerifyMode::NONE);
        let ssl = b
            .build()
            .configure()
            .unwrap()
            .into_ssl("localhost")
            .unwrap();
        let (served, got) = exchange(ssl).await;
        assert!(served.is_err());
        assert!(got.is_err());
    }

    #[test]
    fn refused_identities_are_quoted_escaped_and_cut() {
        assert_eq!(shown_identity(b"qemu"), "\"qemu\"");
        assert_eq!(shown_identity(b"a\nb\x1b"), "\"a\\nb\\u{1b}\"");
        let long = shown_identity(&[b'x'; 300]);
        assert_eq!(long, format!("\"{}…\"", "x".repeat(64)));
        assert_eq!(shown_identity(&[0xff]), "\"\u{fffd}\"");
    }
}
