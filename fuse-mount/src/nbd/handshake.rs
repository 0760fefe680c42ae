//! The fixed newstyle handshake: greeting, client flags, then option haggling until the client
//! picks an export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`), aborts, or breaks a rule.
//!
//! | option | answer |
//! |---|---|
//! | `EXPORT_NAME` | size and transmission flags; an unknown export ends the connection (the option has no error reply) |
//! | `ABORT` | `ACK`, then the connection closes |
//! | `LIST` | one `SERVER` per export, then `ACK` |
//! | `INFO`, `GO` | `INFO` replies (`EXPORT`, `BLOCK_SIZE`, and `NAME` / `DESCRIPTION` when asked), then `ACK`; `ERR_UNKNOWN` for an unknown export |
//! | `STRUCTURED_REPLY` | `ACK` (once) |
//! | `LIST_META_CONTEXT`, `SET_META_CONTEXT` | `base:allocation` when asked for (or, for LIST, for no query or `base:`) |
//! | `STARTTLS` | with TLS configured: `ACK`, then the TLS handshake and a fresh negotiation; without: `ERR_UNSUP` |
//! | `EXTENDED_HEADERS`, anything else | `ERR_UNSUP` (clients fall back) |
//!
//! With TLS configured and not yet started, every option but `STARTTLS` and `ABORT` gets
//! `ERR_TLS_REQD`, and `EXPORT_NAME` ends the connection (FORCEDTLS, see [`super::tls`]).
//!
//! A malformed option gets `ERR_INVALID` and haggling goes on; a wrong magic, an option payload
//! over [`proto::MAX_OPTION_DATA`], unknown client flags, or more than [`MAX_OPTIONS`] options end
//! the connection: the stream cannot be trusted, or the client is wasting the server's time.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{self, OptionRequest, info, opt, rep};
use super::server::{Export, Exports};

/// Most options one connection may send before it must pick an export.
pub const MAX_OPTIONS: usize = 1024;

/// The metadata context id this server gives `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Smallest request size and alignment the server supports (byte granularity: the devices read
/// and write any range).
pub const MIN_BLOCK: u32 = 1;
/// The size at which requests are efficient.
pub const PREFERRED_BLOCK: u32 = 4096;

/// What the handshake agreed on, for the transmission phase.
#[derive(Debug)]
pub struct Negotiated {
    /// The export chosen.
    pub export: Arc<Export>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export (block status allowed).
    pub allocation_context: bool,
    /// The transmission flags sent to the client.
    pub flags: u16,
}

/// How a negotiation ended.
#[derive(Debug)]
pub enum Outcome {
    /// The client chose an export.
    Transmission(Negotiated),
    /// The client aborted (`NBD_OPT_ABORT`) or hung up between options.
    Closed,
    /// `NBD_OPT_STARTTLS` was acknowledged: upgrade the connection, then negotiate again with
    /// [`TlsMode::Active`].
    StartTls,
}

/// Where the connection stands with TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// The server offers no TLS.
    Off,
    /// The server requires TLS and the client has not started it.
    Required,
    /// The connection is encrypted.
    Active,
}

/// A handshake failure: an I/O error or a rule broken by the client. The connection ends.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(String),
    /// The TLS handshake after `STARTTLS` failed (a wrong key, an unknown identity, a client
    /// that does not trust the certificate).
    #[error("TLS: {0}")]
    Tls(String),
}

/// Sends the greeting and reads the client's flags; unknown flags end the connection.
pub async fn greet<S>(stream: &mut S) -> Result<u32, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&proto::greeting()).await?;
    stream.flush().await?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).await?;
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & !proto::KNOWN_CLIENT_FLAGS != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(client_flags)
}

/// Answers options until the client picks an export, aborts, or (with TLS required) asks for
/// `STARTTLS`.
pub async fn haggle<S>(
    stream: &mut S,
    exports: &Exports,
    client_flags: u32,
    tls: TlsMode,
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut state = State {
        exports,
        no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
        tls,
    };
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            // Hanging up between options is how some clients (and probes) leave.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
            Err(e) => return Err(e.into()),
        }
        let header = proto::parse_option_header(&header)
            .map_err(|e| HandshakeError::Protocol(e.to_string()))?;
        // Bounded by MAX_OPTION_DATA (64 KiB).
        let mut data = vec![0u8; header.len as usize];
        stream.read_exact(&mut data).await?;
        let mut out = Vec::new();
        let step =
            if tls == TlsMode::Required && !matches!(header.option, opt::STARTTLS | opt::ABORT) {
                if header.option == opt::EXPORT_NAME {
                    Step::Fail("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server".into())
                } else {
                    proto::put_option_error(
                        &mut out,
                        header.option,
                        rep::ERR_TLS_REQD,
                        "this server requires TLS: send NBD_OPT_STARTTLS first",
                    );
                    Step::Continue
                }
            } else {
                match proto::parse_option(header.option, &data) {
                    Ok(request) => state.answer(header.option, request, &mut out),
                    Err(e) => {
                        proto::put_option_error(&mut out, header.option, rep::ERR_INVALID, &e.0);
                        Step::Continue
                    }
                }
            };
        stream.write_all(&out).await?;
        stream.flush().await?;
        match step {
            Step::Continue => {}
            Step::Close => return Ok(Outcome::Closed),
            Step::StartTls => return Ok(Outcome::StartTls),
            Step::Go(n) => return Ok(Outcome::Transmission(n)),
            Step::Fail(msg) => return Err(HandshakeError::Protocol(msg)),
        }
    }
    Err(HandshakeError::Protocol(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    )))
}

enum Step {
    Continue,
    Close,
    StartTls,
    Go(Negotiated),
    Fail(String),
}

struct State<'a> {
    exports: &'a Exports,
    no_zeroes: bool,
    structured: bool,
    /// The export name of the last successful `SET_META_CONTEXT`, and whether it selected
    /// `base:allocation`.
    meta: Option<(String, bool)>,
    tls: TlsMode,
}

impl State<'_> {
    fn answer(&mut self, option: u32, request: OptionRequest, out: &mut Vec<u8>) -> Step {
        match request {
            OptionRequest::ExportName(name) => match self.exports.find(&name) {
                Some(export) => {
                    let negotiated = self.negotiated(export, &name);
                    out.extend_from_slice(&proto::export_name_reply(
                        negotiated.export.size(),
                        negotiated.flags,
                        self.no_zeroes,
                    ));
                    Step::Go(negotiated)
                }
                None => Step::Fail(format!("NBD_OPT_EXPORT_NAME for unknown export {name:?}")),
            },
            OptionRequest::Abort => {
                proto::put_option_reply(out, option, rep::ACK, &[]);
                Step::Close
            }
            OptionRequest::List => {
                for export in self.exports.iter() {
                    let data = proto::server_reply_data(&export.name, &export.description);
                    proto::put_option_reply(out, option, rep::SERVER, &data);
                }
                proto::put_option_reply(out, option, rep::ACK, &[]);
                Step::Continue
            }
            OptionRequest::Info(req) | OptionRequest::Go(req) => {
                let Some(export) = self.exports.find(&req.name) else {
                    let msg = format!("no export named {:?}", req.name);
                    proto::put_option_error(out, option, rep::ERR_UNKNOWN, &msg);
                    return Step::Continue;
                };
                let negotiated = self.negotiated(export, &req.name);
                let export = &negotiated.export;
                let reply = |out: &mut Vec<u8>, data: &[u8]| {
                    proto::put_option_reply(out, option, rep::INFO, data)
                };
                reply(out, &proto::info_export(export.size(), negotiated.flags));
                if req.requests.contains(&info::NAME) {
                    reply(out, &proto::info_text(info::NAME, &export.name));
                }
                if req.requests.contains(&info::DESCRIPTION) && !export.description.is_empty() {
                    reply(
                        out,
                        &proto::info_text(info::DESCRIPTION, &export.description),
                    );
                }
                // Sent whether asked or not: clients that did not ask may ignore it, and our
                // constraints are the defaults apart from the 32 MiB maximum.
                reply(
                    out,
                    &proto::info_block_size(MIN_BLOCK, PREFERRED_BLOCK, proto::MAX_IO),
                );
                proto::put_option_reply(out, option, rep::ACK, &[]);
                if option == opt::GO {
                    Step::Go(negotiated)
                } else {
                    Step::Continue
                }
            }
            OptionRequest::StructuredReply => {
                if self.structured {
                    proto::put_option_error(
                        out,
                        option,
                        rep::ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    self.structured = true;
                    proto::put_option_reply(out, option, rep::ACK, &[]);
                }
                Step::Continue
            }
            OptionRequest::ListMetaContext(req) | OptionRequest::SetMetaContext(req) => {
                let set = option == opt::SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection even when it fails.
                    self.meta = None;
                }
                if !self.structured {
                    proto::put_option_error(
                        out,
                        option,
                        rep::ERR_INVALID,
                        "metadata contexts need structured replies first",
                    );
                    return Step::Continue;
                }
                if self.exports.find(&req.name).is_none() {
                    let msg = format!("no export named {:?}", req.name);
                    proto::put_option_error(out, option, rep::ERR_UNKNOWN, &msg);
                    return Step::Continue;
                }
                let matches = |q: &str| q == proto::BASE_ALLOCATION || (!set && q == "base:");
                let selected = if set {
                    req.queries.iter().any(|q| matches(q))
                } else {
                    req.queries.is_empty() || req.queries.iter().any(|q| matches(q))
                };
                if selected {
                    // LIST replies carry id 0 ("reserved"); SET gives the real id.
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let data = proto::meta_context_data(id, proto::BASE_ALLOCATION);
                    proto::put_option_reply(out, option, rep::META_CONTEXT, &data);
                }
                if set {
                    self.meta = Some((req.name, selected));
                }
                proto::put_option_reply(out, option, rep::ACK, &[]);
                Step::Continue
            }
            OptionRequest::StartTls => match self.tls {
                TlsMode::Off => {
                    proto::put_option_error(out, option, rep::ERR_UNSUP, "TLS is not offered");
                    Step::Continue
                }
                TlsMode::Required => {
                    proto::put_option_reply(out, option, rep::ACK, &[]);
                    Step::StartTls
                }
                TlsMode::Active => {
                    proto::put_option_error(out, option, rep::ERR_INVALID, "TLS is already on");
                    Step::Continue
                }
            },
            OptionRequest::ExtendedHeaders => {
                proto::put_option_error(
                    out,
                    option,
                    rep::ERR_UNSUP,
                    "extended headers are not supported",
                );
                Step::Continue
            }
            OptionRequest::Unknown(code) => {
                let msg = format!("option {code} is not supported");
                proto::put_option_error(out, option, rep::ERR_UNSUP, &msg);
                Step::Continue
            }
        }
    }

    /// The state for transmission on `export`, reached by the name `name`.
    fn negotiated(&self, export: &Arc<Export>, name: &str) -> Negotiated {
        let allocation_context =
            self.structured && matches!(&self.meta, Some((meta_name, true)) if meta_name == name);
        Negotiated {
            export: Arc::clone(export),
            structured: self.structured,
            allocation_context,
            flags: export.transmission_flags(self.structured),
        }
    }
}
