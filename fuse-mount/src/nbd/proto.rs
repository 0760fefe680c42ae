//! The NBD wire format: pure, bounded parsing of what a client sends (option requests during the
//! handshake, command requests during transmission) and encoding of what the server answers.
//!
//! No I/O happens here: every function works on byte slices, so the parsers are tested on byte
//! arrays and fuzzed (`fuzz/fuzz_targets/nbd_proto.rs`). Every length a client sends is checked
//! against a named cap before anything is allocated for it, and all arithmetic on client values
//! is checked.
//!
//! Numbers are big-endian (network order) throughout, as the protocol specifies
//! (NetworkBlockDevice/nbd `doc/proto.md`).

use std::fmt;

// ---------------------------------------------------------------------------------------------
// Magics
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, sent by the server after [`NBD_MAGIC`] and by the client
/// before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (`NBD_REQUEST_MAGIC`).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (`NBD_STRUCTURED_REPLY_MAGIC`).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Caps on what a client may send
// ---------------------------------------------------------------------------------------------

/// Longest string (export name, metadata context query) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Longest option payload the server reads; a longer one ends the connection. The largest
/// legitimate option (a metadata context request with a few queries) is far smaller.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Most metadata context queries in one option.
pub const MAX_META_QUERIES: u32 = 128;
/// Most information requests in one `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const MAX_INFO_REQUESTS: u16 = 256;
/// Largest READ or WRITE payload: 32 MiB, as qemu-nbd (the protocol says anything below 2^25
/// SHOULD NOT be considered a denial of service). Also the advertised maximum block size.
pub const MAX_IO: u32 = 32 << 20;
/// Largest error message the server sends in an error reply or chunk.
pub const MAX_ERROR_MESSAGE: usize = 1024;

// ---------------------------------------------------------------------------------------------
// Sizes of fixed-layout messages
// ---------------------------------------------------------------------------------------------

/// Bytes of an option request header: magic, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of a transmission request header (compact headers).
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes an `NBD_REPLY_TYPE_OFFSET_DATA` chunk carries before its data: the offset.
pub const OFFSET_DATA_PREFIX: usize = 8;

// ---------------------------------------------------------------------------------------------
// Handshake flags
// ---------------------------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the client may ask not to receive the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle negotiation.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; any other bit ends the connection.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits, sent with the export's size)
// ---------------------------------------------------------------------------------------------

/// Always set.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Writes fail with `EPERM`.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// `NBD_CMD_TRIM` is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) are supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported on reads (structured replies only).
pub const TF_SEND_DF: u16 = 1 << 7;
/// Several connections may share the export: flushes are visible to all of them.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_CACHE` is understood.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Options, option replies, information types
// ---------------------------------------------------------------------------------------------

/// Option codes.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    /// Bit 31 marks errors.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Information types of `NBD_REP_INFO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

// ---------------------------------------------------------------------------------------------
// Commands, command flags, reply chunk types, errors, block status flags
// ---------------------------------------------------------------------------------------------

/// Command flag: force unit access (persist before replying).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag on WRITE_ZEROES: do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag on READ: send at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag on BLOCK_STATUS: exactly one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag on WRITE_ZEROES: fail with `ENOTSUP` unless faster than writing.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: this is the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured reply chunk types.
pub mod chunk {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Error values of replies.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation`: the block is a hole (not allocated).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the block reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

// ---------------------------------------------------------------------------------------------
// Parse errors
// ---------------------------------------------------------------------------------------------

/// Why bytes from a client could not be parsed. The message says what was wrong, for the log
/// line and for the error reply the client gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

fn bad(msg: impl Into<String>) -> ParseError {
    ParseError(msg.into())
}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader {
            bytes,
            pos: 0,
            what,
        }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], ParseError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let out = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            None => Err(bad(format!(
                "{}: {field} of {n} bytes at byte {} runs past the {}-byte payload",
                self.what,
                self.pos,
                self.bytes.len()
            ))),
        }
    }

    fn u16(&mut self, field: &str) -> Result<u16, ParseError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &str) -> Result<u32, ParseError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length-prefixed (32-bit) string of at most [`MAX_STRING`] bytes of UTF-8 without NUL.
    fn string32(&mut self, field: &str) -> Result<String, ParseError> {
        let len = self.u32(field)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_STRING)
            .ok_or_else(|| {
                bad(format!(
                    "{}: {field} of {len} bytes exceeds {MAX_STRING}",
                    self.what
                ))
            })?;
        let bytes = self.take(len, field)?;
        text(bytes, self.what, field)
    }

    fn rest(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn finish(&self) -> Result<(), ParseError> {
        if self.rest() == 0 {
            Ok(())
        } else {
            Err(bad(format!(
                "{}: {} unexpected trailing bytes",
                self.what,
                self.rest()
            )))
        }
    }
}

/// Validates a protocol string: UTF-8, no NUL, at most [`MAX_STRING`] bytes.
fn text(bytes: &[u8], what: &str, field: &str) -> Result<String, ParseError> {
    if bytes.len() > MAX_STRING {
        return Err(bad(format!(
            "{what}: {field} of {} bytes exceeds {MAX_STRING}",
            bytes.len()
        )));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| bad(format!("{what}: {field} is not UTF-8")))?;
    if s.contains('\0') {
        return Err(bad(format!("{what}: {field} contains NUL")));
    }
    Ok(s.to_string())
}

// ---------------------------------------------------------------------------------------------
// Option requests
// ---------------------------------------------------------------------------------------------

/// The fixed header of an option request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code.
    pub option: u32,
    /// Bytes of option data that follow (checked against [`MAX_OPTION_DATA`]).
    pub len: u32,
}

/// Parses an option header; a wrong magic or a payload over [`MAX_OPTION_DATA`] is an error
/// (the server then ends the connection: it cannot find the next option otherwise, and will not
/// read an unbounded payload).
pub fn parse_option_header(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ParseError> {
    let mut r = Reader::new(bytes, "option header");
    let magic = u64::from(r.u32("magic")?) << 32 | u64::from(r.u32("magic")?);
    if magic != IHAVEOPT {
        return Err(bad(format!(
            "option header: magic {magic:#018x} is not IHAVEOPT"
        )));
    }
    let option = r.u32("option")?;
    let len = r.u32("length")?;
    if len > MAX_OPTION_DATA {
        return Err(bad(format!(
            "option {option}: {len} bytes of data exceed the {MAX_OPTION_DATA}-byte cap"
        )));
    }
    Ok(OptionHeader { option, len })
}

/// An export query of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name ("" for the default export).
    pub name: String,
    /// The `NBD_INFO_*` types the client asks for.
    pub requests: Vec<u16>,
}

/// A metadata context request (`NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export name.
    pub name: String,
    /// The queries, each `namespace:leaf`.
    pub queries: Vec<String>,
}

/// A parsed option request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionRequest {
    /// `NBD_OPT_EXPORT_NAME`: enter transmission (no error reply possible).
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaRequest),
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Any other option code.
    Unknown(u32),
}

/// Parses the data of option `option`. Errors become `NBD_REP_ERR_INVALID` replies.
pub fn parse_option(option: u32, data: &[u8]) -> Result<OptionRequest, ParseError> {
    let no_data = |req: OptionRequest, name: &str| {
        if data.is_empty() {
            Ok(req)
        } else {
            Err(bad(format!(
                "{name}: takes no data, got {} bytes",
                data.len()
            )))
        }
    };
    match option {
        opt::EXPORT_NAME => Ok(OptionRequest::ExportName(text(
            data,
            "NBD_OPT_EXPORT_NAME",
            "export name",
        )?)),
        // The spec asks servers to ignore data sent with ABORT.
        opt::ABORT => Ok(OptionRequest::Abort),
        opt::LIST => no_data(OptionRequest::List, "NBD_OPT_LIST"),
        opt::STARTTLS => no_data(OptionRequest::StartTls, "NBD_OPT_STARTTLS"),
        opt::INFO => Ok(OptionRequest::Info(parse_info(data, "NBD_OPT_INFO")?)),
        opt::GO => Ok(OptionRequest::Go(parse_info(data, "NBD_OPT_GO")?)),
        opt::STRUCTURED_REPLY => {
            no_data(OptionRequest::StructuredReply, "NBD_OPT_STRUCTURED_REPLY")
        }
        opt::LIST_META_CONTEXT => Ok(OptionRequest::ListMetaContext(parse_meta(
            data,
            "NBD_OPT_LIST_META_CONTEXT",
        )?)),
        opt::SET_META_CONTEXT => Ok(OptionRequest::SetMetaContext(parse_meta(
            data,
            "NBD_OPT_SET_META_CONTEXT",
        )?)),
        opt::EXTENDED_HEADERS => {
            no_data(OptionRequest::ExtendedHeaders, "NBD_OPT_EXTENDED_HEADERS")
        }
        other => Ok(OptionRequest::Unknown(other)),
    }
}

fn parse_info(data: &[u8], what: &'static str) -> Result<InfoRequest, ParseError> {
    let mut r = Reader::new(data, what);
    let name = r.string32("export name")?;
    let count = r.u16("number of information requests")?;
    if count > MAX_INFO_REQUESTS {
        return Err(bad(format!(
            "{what}: {count} information requests exceed {MAX_INFO_REQUESTS}"
        )));
    }
    let mut requests = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        requests.push(r.u16("information request")?);
    }
    r.finish()?;
    Ok(InfoRequest { name, requests })
}

fn parse_meta(data: &[u8], what: &'static str) -> Result<MetaRequest, ParseError> {
    let mut r = Reader::new(data, what);
    let name = r.string32("export name")?;
    let count = r.u32("number of queries")?;
    if count > MAX_META_QUERIES {
        return Err(bad(format!(
            "{what}: {count} queries exceed {MAX_META_QUERIES}"
        )));
    }
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(r.string32("query")?);
    }
    r.finish()?;
    Ok(MetaRequest { name, queries })
}

// ---------------------------------------------------------------------------------------------
// Transmission requests
// ---------------------------------------------------------------------------------------------

/// A command type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// Any other command code.
    Unknown(u16),
}

impl Command {
    fn from_code(code: u16) -> Self {
        match code {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The command flags that mean something for this command (FUA is accepted on every
    /// command, as the protocol requires once it is advertised).
    pub fn allowed_flags(self) -> u16 {
        CMD_FLAG_FUA
            | match self {
                Command::Read => CMD_FLAG_DF,
                Command::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Read => f.write_str("READ"),
            Command::Write => f.write_str("WRITE"),
            Command::Disc => f.write_str("DISC"),
            Command::Flush => f.write_str("FLUSH"),
            Command::Trim => f.write_str("TRIM"),
            Command::Cache => f.write_str("CACHE"),
            Command::WriteZeroes => f.write_str("WRITE_ZEROES"),
            Command::BlockStatus => f.write_str("BLOCK_STATUS"),
            Command::Unknown(c) => write!(f, "command {c}"),
        }
    }
}

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's handle, echoed in the reply.
    pub handle: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length of the range (and of the payload that follows a WRITE).
    pub len: u32,
}

impl Request {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.len
        } else {
            0
        }
    }

    /// The end of the range, or `None` when `offset + len` overflows.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.len))
    }
}

/// Parses a request header. Only a wrong magic is an error (the stream cannot be trusted after
/// it); unknown commands and flags are reported to the client by the server with `EINVAL`.
pub fn parse_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request, ParseError> {
    let mut r = Reader::new(bytes, "request");
    let magic = r.u32("magic")?;
    if magic != REQUEST_MAGIC {
        return Err(bad(format!(
            "request: magic {magic:#010x} is not NBD_REQUEST_MAGIC"
        )));
    }
    let flags = r.u16("flags")?;
    let command = Command::from_code(r.u16("type")?);
    let handle = u64::from(r.u32("handle")?) << 32 | u64::from(r.u32("handle")?);
    let offset = u64::from(r.u32("offset")?) << 32 | u64::from(r.u32("offset")?);
    let len = r.u32("length")?;
    Ok(Request {
        flags,
        command,
        handle,
        offset,
        len,
    })
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// The greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Appends an option reply with `data` (its length is capped by the callers: names and
/// messages are at most [`MAX_STRING`] bytes).
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error reply to `option` whose data is `message`, cut to [`MAX_ERROR_MESSAGE`]
/// bytes on a character boundary.
pub fn put_option_error(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    put_option_reply(out, option, reply, truncate(message).as_bytes());
}

/// `NBD_REP_SERVER` data: the name, then a description for humans.
pub fn server_reply_data(name: &str, description: &str) -> Vec<u8> {
    let name = cap_string(name);
    let description = cap_string(description);
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(description.as_bytes());
    data
}

/// `NBD_INFO_EXPORT` data.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..].copy_from_slice(&flags.to_be_bytes());
    out
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` data.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let text = cap_string(text);
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// `NBD_INFO_BLOCK_SIZE` data.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..].copy_from_slice(&maximum.to_be_bytes());
    out
}

/// `NBD_REP_META_CONTEXT` data.
pub fn meta_context_data(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes unless the
/// client set `NBD_FLAG_C_NO_ZEROES`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// Writes a simple reply header into `out` (16 bytes).
pub fn write_simple_reply(out: &mut [u8; SIMPLE_REPLY_LEN], error: u32, handle: u64) {
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
}

/// Appends a simple reply header.
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, handle: u64) {
    let mut header = [0u8; SIMPLE_REPLY_LEN];
    write_simple_reply(&mut header, error, handle);
    out.extend_from_slice(&header);
}

/// Writes a structured chunk header into `out` (20 bytes).
pub fn write_chunk_header(
    out: &mut [u8; CHUNK_HEADER_LEN],
    flags: u16,
    kind: u16,
    handle: u64,
    len: u32,
) {
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..].copy_from_slice(&len.to_be_bytes());
}

/// Appends a structured chunk header.
pub fn put_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, len: u32) {
    let mut header = [0u8; CHUNK_HEADER_LEN];
    write_chunk_header(&mut header, flags, kind, handle, len);
    out.extend_from_slice(&header);
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn put_hole_chunk(out: &mut Vec<u8>, flags: u16, handle: u64, offset: u64, len: u32) {
    put_chunk_header(out, flags, chunk::OFFSET_HOLE, handle, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk (always final) with `message` cut to
/// [`MAX_ERROR_MESSAGE`] bytes.
pub fn put_error_chunk(out: &mut Vec<u8>, handle: u64, error: u32, message: &str) {
    let message = truncate(message);
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        chunk::ERROR,
        handle,
        6 + message.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Appends an `NBD_REPLY_TYPE_NONE` chunk (always final).
pub fn put_none_chunk(out: &mut Vec<u8>, handle: u64) {
    put_chunk_header(out, REPLY_FLAG_DONE, chunk::NONE, handle, 0);
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (final) for context `context` with
/// descriptors `(length, flags)`.
pub fn put_block_status_chunk(
    out: &mut Vec<u8>,
    handle: u64,
    context: u32,
    descriptors: &[(u32, u32)],
) {
    let len = 4 + 8 * descriptors.len();
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        chunk::BLOCK_STATUS,
        handle,
        u32::try_from(len).unwrap_or(u32::MAX),
    );
    out.extend_from_slice(&context.to_be_bytes());
    for &(length, flags) in descriptors {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

/// `s` cut to at most [`MAX_STRING`] bytes on a character boundary.
fn cap_string(s: &str) -> &str {
    cut(s, MAX_STRING)
}

/// `s` cut to at most [`MAX_ERROR_MESSAGE`] bytes on a character boundary.
fn truncate(s: &str) -> &str {
    cut(s, MAX_ERROR_MESSAGE)
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option_header(option: u32, len: u32) -> [u8; OPTION_HEADER_LEN] {
        let mut h = [0u8; OPTION_HEADER_LEN];
        h[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&option.to_be_bytes());
        h[12..].copy_from_slice(&len.to_be_bytes());
        h
    }

    /// `NBD_OPT_GO` data: name length, name, info count, info types.
    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn option_header_parses_code_and_length() {
        let h = parse_option_header(&option_header(opt::GO, 10)).unwrap();
        assert_eq!(
            h,
            OptionHeader {
                option: opt::GO,
                len: 10
            }
        );
    }

    #[test]
    fn option_header_with_wrong_magic_is_refused() {
        let mut h = option_header(opt::GO, 10);
        h[0] ^= 1;
        assert!(parse_option_header(&h).is_err());
    }

    #[test]
    fn option_header_with_oversized_data_is_refused() {
        let err = parse_option_header(&option_header(opt::GO, MAX_OPTION_DATA + 1)).unwrap_err();
        assert!(err.0.contains("cap"), "{err}");
    }

    #[test]
    fn go_parses_name_and_information_requests() {
        let req = parse_option(opt::GO, &go_data("disk", &[info::NAME, info::BLOCK_SIZE])).unwrap();
        assert_eq!(
            req,
            OptionRequest::Go(InfoRequest {
                name: "disk".into(),
                requests: vec![info::NAME, info::BLOCK_SIZE],
            })
        );
    }

    #[test]
    fn go_whose_name_length_runs_past_the_data_is_invalid() {
        let mut d = go_data("disk", &[]);
        d[3] = 200;
        assert!(parse_option(opt::GO, &d).is_err());
    }

    #[test]
    fn go_with_a_name_longer_than_the_string_cap_is_invalid() {
        let name = "x".repeat(MAX_STRING + 1);
        assert!(parse_option(opt::INFO, &go_data(&name, &[])).is_err());
    }

    #[test]
    fn go_with_trailing_bytes_is_invalid() {
        let mut d = go_data("disk", &[]);
        d.push(0);
        assert!(parse_option(opt::GO, &d).is_err());
    }

    #[test]
    fn go_with_an_information_count_past_the_data_is_invalid() {
        let mut d = go_data("", &[]);
        let n = d.len();
        d[n - 2..].copy_from_slice(&5u16.to_be_bytes());
        assert!(parse_option(opt::GO, &d).is_err());
    }

    #[test]
    fn export_name_must_be_utf8_without_nul() {
        assert!(parse_option(opt::EXPORT_NAME, b"a\0b").is_err());
        assert!(parse_option(opt::EXPORT_NAME, &[0xff, 0xfe]).is_err());
        assert_eq!(
            parse_option(opt::EXPORT_NAME, b"disk").unwrap(),
            OptionRequest::ExportName("disk".into())
        );
    }

    #[test]
    fn options_without_data_refuse_data() {
        assert!(parse_option(opt::LIST, b"x").is_err());
        assert!(parse_option(opt::STRUCTURED_REPLY, b"x").is_err());
        assert_eq!(
            parse_option(opt::STRUCTURED_REPLY, b"").unwrap(),
            OptionRequest::StructuredReply
        );
        assert_eq!(
            parse_option(opt::ABORT, b"ignored").unwrap(),
            OptionRequest::Abort
        );
    }

    #[test]
    fn meta_context_parses_queries() {
        let req = parse_option(
            opt::SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation", "qemu:dirty-bitmap:x"]),
        )
        .unwrap();
        assert_eq!(
            req,
            OptionRequest::SetMetaContext(MetaRequest {
                name: "disk".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
            })
        );
    }

    #[test]
    fn meta_context_with_too_many_queries_is_invalid_before_allocating() {
        let mut d = meta_data("disk", &[]);
        let n = d.len();
        d[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = parse_option(opt::LIST_META_CONTEXT, &d).unwrap_err();
        assert!(err.0.contains("queries exceed"), "{err}");
    }

    #[test]
    fn meta_context_with_a_query_past_the_data_is_invalid() {
        let mut d = meta_data("disk", &["base:allocation"]);
        d.truncate(d.len() - 3);
        assert!(parse_option(opt::SET_META_CONTEXT, &d).is_err());
    }

    #[test]
    fn unknown_options_parse_as_unknown() {
        assert_eq!(
            parse_option(0x1234, b"whatever").unwrap(),
            OptionRequest::Unknown(0x1234)
        );
    }

    fn request_bytes(flags: u16, kind: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&handle.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn request_parses_every_field() {
        let r = parse_request(&request_bytes(CMD_FLAG_FUA, 1, 0xdead_beef, 4096, 512)).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                command: Command::Write,
                handle: 0xdead_beef,
                offset: 4096,
                len: 512
            }
        );
        assert_eq!(r.payload_len(), 512);
    }

    #[test]
    fn request_with_wrong_magic_is_refused() {
        let mut b = request_bytes(0, 0, 1, 0, 512);
        b[3] ^= 0xff;
        assert!(parse_request(&b).is_err());
    }

    #[test]
    fn request_end_overflow_is_none() {
        let r = parse_request(&request_bytes(0, 0, 1, u64::MAX, 2)).unwrap();
        assert_eq!(r.end(), None);
    }

    #[test]
    fn only_writes_carry_payload() {
        let r = parse_request(&request_bytes(0, 0, 1, 0, 1 << 30)).unwrap();
        assert_eq!(r.payload_len(), 0);
    }

    #[test]
    fn unknown_commands_parse_as_unknown() {
        let r = parse_request(&request_bytes(0, 99, 1, 0, 0)).unwrap();
        assert_eq!(r.command, Command::Unknown(99));
    }

    #[test]
    fn error_chunk_message_is_capped() {
        let mut out = Vec::new();
        put_error_chunk(&mut out, 7, errno::EIO, &"é".repeat(MAX_ERROR_MESSAGE));
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert_eq!(out.len(), CHUNK_HEADER_LEN + len);
        assert!(len - 6 <= MAX_ERROR_MESSAGE);
        assert!(std::str::from_utf8(&out[26..]).is_ok());
    }

    #[test]
    fn block_status_chunk_layout() {
        let mut out = Vec::new();
        put_block_status_chunk(&mut out, 9, 1, &[(4096, 0), (512, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(out.len(), 20 + 4 + 16);
        assert_eq!(&out[6..8], &chunk::BLOCK_STATUS.to_be_bytes());
        assert_eq!(&out[16..20], &20u32.to_be_bytes());
        assert_eq!(&out[28..32], &0u32.to_be_bytes());
        assert_eq!(&out[36..40], &3u32.to_be_bytes());
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        assert_eq!(export_name_reply(1, 1, false).len(), 134);
        assert_eq!(export_name_reply(1, 1, true).len(), 10);
    }
}
