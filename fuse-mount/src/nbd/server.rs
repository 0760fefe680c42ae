//! The NBD server: listeners, connections, and the transmission phase.
//!
//! # Concurrency
//!
//! ```text
//!  socket ──► reader task ──(parse, budget)──► spawn_blocking(device I/O) ──► mpsc ──► writer task ──► socket
//! ```
//!
//! * One reader task per connection parses requests in order. It reads a WRITE's payload only
//!   after reserving its bytes from the connection's budget ([`MAX_CONNECTION_INFLIGHT_BYTES`])
//!   and the server's ([`MAX_SERVER_INFLIGHT_BYTES`]), and at most [`MAX_INFLIGHT_REQUESTS`]
//!   requests of a connection run at once: a client that sends faster than the disk answers is
//!   slowed down, never buffered without bound.
//! * Requests run on tokio's blocking pool (device I/O is synchronous and never runs on the
//!   async threads), so requests of one connection are served concurrently. Small READs and
//!   WRITEs (up to [`MAX_BATCHED_BYTES`]) and BLOCK_STATUS requests that arrive together (already
//!   in the read buffer) run as one batch of at most [`MAX_BATCH`], one after the other on one
//!   pool thread, their replies handed to the writer together: per request, the hand-offs
//!   between threads cost more than a 4 KiB read from the page cache (strace of random 4 KiB
//!   reads: 4.4 system calls per request, 3 of them futex, before; 1.3 after). A batch starts
//!   before the reader waits for anything, so batching adds no latency.
//! * Replies go through a channel to one writer task per connection, which writes each reply
//!   whole (replies never interleave) and flushes when the channel is empty, so a burst of small
//!   replies leaves in few packets. A reply keeps its budget reservation until it is written.
//! * Every connection of an export shares one device, so a FLUSH on any connection flushes
//!   everything any connection wrote: that is what `NBD_FLAG_CAN_MULTI_CONN` promises.
//!
//! # Failure
//!
//! A request the client got wrong (out of range, unknown command or flag, a write to a read-only
//! export) gets an error reply and the connection goes on. A broken stream (wrong magic, a WRITE
//! payload over [`proto::MAX_IO`]) ends that connection only. A device error becomes `EIO` (or
//! `ENOSPC`, `EPERM`, `EINVAL` where it says so); a panic in a device is caught and answered
//! with `EIO`. Log lines name the connection, its peer, and what was wrong.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use image_format::{BlockDevice, BlockDeviceMut, Caps, ExtentKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::handshake::{self, Negotiated, Outcome, TlsMode};
use super::pool::{BufferPool, Reply};
use super::proto::{
    self, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE,
    Command, Request, errno,
};
use super::tls::{Tls, TlsStream};

/// Most requests of one connection being served at once.
pub const MAX_INFLIGHT_REQUESTS: u32 = 64;
/// Most payload bytes (WRITE data being written, READ data waiting to be sent) one connection
/// holds at once. At least one maximal request must fit.
pub const MAX_CONNECTION_INFLIGHT_BYTES: u32 = 2 * proto::MAX_IO;
/// Most payload bytes all connections together hold at once.
pub const MAX_SERVER_INFLIGHT_BYTES: u32 = 16 * proto::MAX_IO;
/// Most connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: u32 = 256;
/// Time a client has to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most chunks in one structured READ reply (data and holes); past that, the rest of the range
/// is sent as data.
pub const MAX_READ_FRAGMENTS: usize = 64;
/// Smallest structured READ whose zero ranges are sent as holes: below it, looking up the
/// allocation costs more than sending the zeros.
pub const MIN_HOLE_SCAN: u32 = 64 * 1024;
/// Most requests run together as one batch.
pub const MAX_BATCH: usize = 16;
/// READs and WRITEs moving more bytes than this run alone (in parallel with others).
pub const MAX_BATCHED_BYTES: u32 = 64 * 1024;
/// Most descriptors in one BLOCK_STATUS reply.
pub const MAX_STATUS_DESCRIPTORS: usize = 1024;
/// Most `block_status` calls made for one request (a device may answer in small pieces).
pub const MAX_STATUS_CALLS: usize = 16 * 1024;
/// Most error lines logged per connection; a misbehaving client cannot flood the log.
pub const MAX_LOGGED_ERRORS: u32 = 20;
/// Most bytes of free buffers kept for reuse (see [`super::pool`]).
pub const POOLED_BYTES: usize = 64 << 20;
/// Buffer of the reply writer.
const WRITE_BUFFER: usize = 256 * 1024;
/// Buffer of the request reader.
const READ_BUFFER: usize = 256 * 1024;
/// Piece size for writing zeros when a hole is not allowed.
const ZERO_PIECE: usize = 1 << 20;
/// Bytes a reply needs beyond its data: headers of the chunks of a fragmented READ.
const REPLY_OVERHEAD: u32 = (MAX_READ_FRAGMENTS * 32) as u32;

/// One export: a name, a device to read, and optionally the same device to write.
#[derive(Clone)]
pub struct Export {
    /// The name clients ask for.
    pub name: String,
    /// Free text shown by `nbdinfo --list` and the like.
    pub description: String,
    /// The device read by clients.
    pub device: Arc<dyn BlockDevice>,
    /// The device written by clients (the same device as `device`); `None` for a read-only
    /// export.
    pub writable: Option<Arc<dyn BlockDeviceMut>>,
    /// Called when the last connection to the export ends after its client sent
    /// `NBD_CMD_DISC` (see [`Export::with_on_idle`]).
    on_idle: Option<OnIdle>,
    /// Connections in the transmission phase (shared by clones of the export).
    active: Arc<AtomicUsize>,
}

/// A callback of [`Export::with_on_idle`]. It runs on the blocking pool; the connection that
/// triggered it ends once it returns.
pub type OnIdle = Arc<dyn Fn() + Send + Sync>;

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.device.size())
            .field("writable", &self.writable.is_some())
            .finish()
    }
}

impl Export {
    /// A read-only export of `device`.
    pub fn read_only(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            device,
            writable: None,
            on_idle: None,
            active: Arc::default(),
        }
    }

    /// A writable export of `device`.
    pub fn writable(name: impl Into<String>, device: Arc<dyn BlockDeviceMut>) -> Self {
        let read: Arc<dyn BlockDevice> = device.clone();
        Export {
            name: name.into(),
            description: String::new(),
            device: read,
            writable: Some(device),
            on_idle: None,
            active: Arc::default(),
        }
    }

    /// Calls `f` each time the export's last connection ends cleanly: its client sent
    /// `NBD_CMD_DISC`, every request it made has been answered, and no other connection to the
    /// export is in the transmission phase. A connection that breaks without DISC never
    /// calls it. (A writable volume commits from here.)
    pub fn with_on_idle(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_idle = Some(Arc::new(f));
        self
    }

    /// Sets the description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.device.size()
    }

    /// The capabilities the export offers: the device's, less writing when the export is
    /// read-only.
    pub fn caps(&self) -> Caps {
        match &self.writable {
            Some(w) => w.caps(),
            None => self.device.caps().without(
                Caps::WRITE | Caps::FLUSH | Caps::FUA | Caps::DISCARD | Caps::WRITE_ZEROES,
            ),
        }
    }

    fn can_write(&self) -> bool {
        self.writable.is_some() && self.caps().contains(Caps::WRITE)
    }

    /// The transmission flags, one per capability:
    ///
    /// | capability | flag |
    /// |---|---|
    /// | no `WRITE` (or a read-only export) | `READ_ONLY` |
    /// | `FLUSH` | `SEND_FLUSH`, and `SEND_FUA` (a FUA write is followed by a flush) |
    /// | `FUA` | `SEND_FUA` |
    /// | `DISCARD` | `SEND_TRIM` |
    /// | `WRITE_ZEROES` | `SEND_WRITE_ZEROES`, `SEND_FAST_ZERO` |
    /// | `MULTI_CONN`, or a read-only export | `CAN_MULTI_CONN` |
    ///
    /// plus `SEND_CACHE` (a no-op), and `SEND_DF` once structured replies are negotiated.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let caps = self.caps();
        let mut flags = proto::TF_HAS_FLAGS | proto::TF_SEND_CACHE;
        if self.can_write() {
            if caps.contains(Caps::FLUSH) {
                flags |= proto::TF_SEND_FLUSH | proto::TF_SEND_FUA;
            }
            if caps.contains(Caps::FUA) {
                flags |= proto::TF_SEND_FUA;
            }
            if caps.contains(Caps::DISCARD) {
                flags |= proto::TF_SEND_TRIM;
            }
            if caps.contains(Caps::WRITE_ZEROES) {
                flags |= proto::TF_SEND_WRITE_ZEROES | proto::TF_SEND_FAST_ZERO;
            }
            if caps.contains(Caps::MULTI_CONN) {
                flags |= proto::TF_CAN_MULTI_CONN;
            }
        } else {
            // Nothing is written, so nothing can be inconsistent between connections.
            flags |= proto::TF_READ_ONLY | proto::TF_CAN_MULTI_CONN;
        }
        if structured {
            flags |= proto::TF_SEND_DF;
        }
        flags
    }
}

/// The exports of a server, by name. The empty name selects the first export (the default).
#[derive(Debug)]
pub struct Exports(Vec<Arc<Export>>);

impl Exports {
    /// The export a client asks for by `name`.
    pub fn find(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return self.0.first();
        }
        self.0.iter().find(|e| e.name == name)
    }

    /// Every export, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.0.iter()
    }
}

/// Why a server could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Two exports share a name.
    #[error("two exports are named {0:?}")]
    DuplicateName(String),
    /// An export name the protocol cannot carry.
    #[error("export name {0:?} is not usable (empty, over 4096 bytes, or with NUL)")]
    BadName(String),
    /// No exports.
    #[error("no exports")]
    NoExports,
}

/// Where log lines go.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// Options of a server.
#[derive(Clone)]
pub struct ServerOptions {
    /// Receives one line per event worth telling (a connection broken by its client, a device
    /// error). Default: standard error, prefixed `vmnest nbd: `.
    pub log: Log,
    /// TLS: when set, clients must upgrade with `NBD_OPT_STARTTLS` before anything else.
    pub tls: Option<Tls>,
}

impl fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerOptions").finish_non_exhaustive()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            log: Arc::new(|line: &str| eprintln!("vmnest nbd: {line}")),
            tls: None,
        }
    }
}

struct Shared {
    exports: Exports,
    log: Log,
    pool: Arc<BufferPool>,
    tls: Option<Tls>,
    budget: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    next_id: AtomicU64,
}

/// An NBD server over a set of exports. Cheap to clone; clones serve the same exports.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.shared.exports)
            .finish()
    }
}

impl Server {
    /// A server of `exports` with default options.
    pub fn new(exports: Vec<Export>) -> Result<Self, ServerError> {
        Self::with_options(exports, ServerOptions::default())
    }

    /// A server of `exports`.
    pub fn with_options(exports: Vec<Export>, options: ServerOptions) -> Result<Self, ServerError> {
        if exports.is_empty() {
            return Err(ServerError::NoExports);
        }
        for (i, e) in exports.iter().enumerate() {
            if e.name.is_empty() || e.name.len() > proto::MAX_STRING || e.name.contains('\0') {
                return Err(ServerError::BadName(e.name.clone()));
            }
            if exports[..i].iter().any(|o| o.name == e.name) {
                return Err(ServerError::DuplicateName(e.name.clone()));
            }
        }
        Ok(Server {
            shared: Arc::new(Shared {
                exports: Exports(exports.into_iter().map(Arc::new).collect()),
                log: options.log,
                pool: Arc::new(BufferPool::new(POOLED_BYTES)),
                tls: options.tls,
                budget: Arc::new(Semaphore::new(MAX_SERVER_INFLIGHT_BYTES as usize)),
                connections: Arc::new(Semaphore::new(MAX_CONNECTIONS as usize)),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// The exports served.
    pub fn exports(&self) -> &Exports {
        &self.shared.exports
    }

    /// Listens on `addr` and serves until an accept error that is not transient.
    pub async fn serve_tcp(&self, addr: SocketAddr) -> io::Result<()> {
        let listener = TcpListener::bind(addr).await?;
        self.serve_tcp_listener(listener).await
    }

    /// Serves connections accepted from `listener` (bind port 0 and read `local_addr` to learn
    /// the port).
    pub async fn serve_tcp_listener(&self, listener: TcpListener) -> io::Result<()> {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // Replies are written whole; waiting to coalesce them only adds latency.
                    let _ = stream.set_nodelay(true);
                    self.spawn_connection(peer.to_string(), stream);
                }
                Err(e) => self.accept_failed(e).await?,
            }
        }
    }

    /// Listens on a Unix socket at `path` (which must not exist) and serves.
    pub async fn serve_unix(&self, path: &Path) -> io::Result<()> {
        let listener = UnixListener::bind(path)?;
        self.serve_unix_listener(listener).await
    }

    /// Serves connections accepted from a Unix socket listener.
    pub async fn serve_unix_listener(&self, listener: UnixListener) -> io::Result<()> {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    self.spawn_connection("unix".to_string(), stream);
                }
                Err(e) => self.accept_failed(e).await?,
            }
        }
    }

    /// Transient accept errors (a client gone before accept, too many open files) are logged
    /// and retried after a pause; others end the serve loop.
    async fn accept_failed(&self, e: io::Error) -> io::Result<()> {
        (self.shared.log)(&format!("accept failed: {e}"));
        match e.kind() {
            io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock => Ok(()),
            _ if e.raw_os_error() == Some(24) || e.raw_os_error() == Some(23) => {
                // EMFILE / ENFILE: wait for connections to close.
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(())
            }
            _ => Err(e),
        }
    }

    fn spawn_connection<S: Connection>(&self, peer: String, stream: S) {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            id,
            peer,
            log: Arc::clone(&self.shared.log),
        };
        let Ok(slot) = Arc::clone(&self.shared.connections).try_acquire_owned() else {
            conn.log(format_args!(
                "refused: already serving {MAX_CONNECTIONS} connections"
            ));
            return;
        };
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(shared, conn, stream).await;
        });
    }
}

/// Identifies a connection in log lines.
#[derive(Clone)]
struct Conn {
    id: u64,
    peer: String,
    log: Log,
}

impl Conn {
    fn log(&self, what: fmt::Arguments<'_>) {
        (self.log)(&format!("connection {} ({}): {what}", self.id, self.peer));
    }
}

/// A byte stream a connection runs on, and how to split it into halves that a reader task and
/// a writer task own.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The read half.
    type Read: AsyncRead + Unpin + Send + 'static;
    /// The write half.
    type Write: AsyncWrite + Unpin + Send + 'static;
    /// Splits the stream.
    fn split(self) -> (Self::Read, Self::Write);
}

impl Connection for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Connection for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl<S: Connection> Connection for TlsStream<S> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// How the handshake of one connection ended.
enum Handshake<S: Connection> {
    Plain(S, Negotiated),
    Tls(Box<TlsStream<S>>, Negotiated),
    Closed,
}

/// Greeting, option haggling, and the TLS upgrade when the client asks for it.
async fn handshake<S: Connection>(
    shared: &Shared,
    mut stream: S,
) -> Result<Handshake<S>, handshake::HandshakeError> {
    let flags = handshake::greet(&mut stream).await?;
    let mode = if shared.tls.is_some() {
        TlsMode::Required
    } else {
        TlsMode::Off
    };
    match handshake::haggle(&mut stream, &shared.exports, flags, mode).await? {
        Outcome::Transmission(n) => Ok(Handshake::Plain(stream, n)),
        Outcome::Closed => Ok(Handshake::Closed),
        Outcome::StartTls => {
            let Some(tls) = &shared.tls else {
                return Err(handshake::HandshakeError::Protocol(
                    "STARTTLS acknowledged without TLS".into(),
                ));
            };
            let mut stream = tls
                .accept(stream)
                .await
                .map_err(handshake::HandshakeError::Tls)?;
            match handshake::haggle(&mut stream, &shared.exports, flags, TlsMode::Active).await? {
                Outcome::Transmission(n) => Ok(Handshake::Tls(Box::new(stream), n)),
                Outcome::Closed | Outcome::StartTls => Ok(Handshake::Closed),
            }
        }
    }
}

async fn serve_connection<S: Connection>(shared: Arc<Shared>, conn: Conn, stream: S) {
    let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&shared, stream)).await;
    match result {
        Err(_) => conn.log(format_args!(
            "handshake not finished in {}s; closing",
            HANDSHAKE_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => conn.log(format_args!("handshake failed: {e}; closing")),
        Ok(Ok(Handshake::Closed)) => {}
        Ok(Ok(Handshake::Plain(stream, n))) => transmission(shared, conn, n, stream).await,
        Ok(Ok(Handshake::Tls(stream, n))) => transmission(shared, conn, n, *stream).await,
    }
}

/// A reply on its way to the writer task, with the budget it holds until written.
struct Outgoing {
    reply: Reply,
    _budget: Budget,
}

/// Reservations held by one request: its slot among the in-flight requests and its bytes.
struct Budget {
    _slot: OwnedSemaphorePermit,
    _conn_bytes: Option<OwnedSemaphorePermit>,
    _server_bytes: Option<OwnedSemaphorePermit>,
}

/// What a request's execution needs, shared by the requests of one connection.
struct Context {
    conn: Conn,
    export: Arc<Export>,
    structured: bool,
    allocation_context: bool,
    flags: u16,
    logged_errors: AtomicU64,
    pool: Arc<BufferPool>,
}

impl Context {
    fn log_error(&self, what: fmt::Arguments<'_>) {
        let n = self.logged_errors.fetch_add(1, Ordering::Relaxed);
        if n < u64::from(MAX_LOGGED_ERRORS) {
            self.conn.log(what);
        } else if n == u64::from(MAX_LOGGED_ERRORS) {
            self.conn.log(format_args!("further errors not logged"));
        }
    }
}

async fn transmission<S: Connection>(
    shared: Arc<Shared>,
    conn: Conn,
    negotiated: Negotiated,
    stream: S,
) {
    let (reader, writer) = stream.split();
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let Negotiated {
        export,
        structured,
        allocation_context,
        flags,
    } = negotiated;
    let ctx = Arc::new(Context {
        conn: conn.clone(),
        export,
        structured,
        allocation_context,
        flags,
        logged_errors: AtomicU64::new(0),
        pool: Arc::clone(&shared.pool),
    });
    ctx.export.active.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = mpsc::unbounded_channel::<Vec<Outgoing>>();
    let writer_conn = conn.clone();
    let pool = Arc::clone(&shared.pool);
    let writer_task = tokio::spawn(async move {
        if let Err(e) = write_replies(writer, rx, &pool).await {
            writer_conn.log(format_args!("writing replies failed: {e}"));
        }
    });
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS as usize));
    let conn_bytes = Arc::new(Semaphore::new(MAX_CONNECTION_INFLIGHT_BYTES as usize));

    // Small requests that arrive together run together: one trip to the blocking pool and one
    // wake of the writer per batch instead of per request (random 4 KiB reads spent most of their
    // server time in those hand-offs).
    let mut batch: Vec<Job> = Vec::new();
    let mut disconnected = false;
    loop {
        if reader.buffer().len() < proto::REQUEST_LEN {
            // The next read may wait: start what has been collected first.
            dispatch(&ctx, &tx, &mut batch);
        }
        let mut header = [0u8; proto::REQUEST_LEN];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                // A client may hang up without DISC; nothing to report.
                break;
            }
            Err(e) => {
                conn.log(format_args!("reading a request failed: {e}"));
                break;
            }
        }
        let request = match proto::parse_request(&header) {
            Ok(r) => r,
            Err(e) => {
                conn.log(format_args!("{e}; closing"));
                break;
            }
        };
        if request.command == Command::Disc {
            disconnected = true;
            break;
        }
        if request.payload_len() > proto::MAX_IO {
            // The payload cannot be skipped without reading it: end the connection (the
            // protocol allows a hard disconnect for a payload this large).
            conn.log(format_args!(
                "WRITE of {} bytes exceeds the {}-byte cap; closing",
                request.len,
                proto::MAX_IO
            ));
            break;
        }
        let data_bytes = match request.command {
            Command::Read if request.len <= proto::MAX_IO => request.len + REPLY_OVERHEAD,
            Command::Write => request.len,
            _ => 0,
        };
        let budget = match try_reserve(&slots, &conn_bytes, &shared.budget, data_bytes) {
            Some(b) => b,
            None => {
                // Waiting for budget that the collected requests may hold: start them first.
                dispatch(&ctx, &tx, &mut batch);
                match reserve(&slots, &conn_bytes, &shared.budget, data_bytes).await {
                    Some(b) => b,
                    None => break,
                }
            }
        };
        let payload = if request.command == Command::Write {
            // Capped by MAX_IO above, and reserved from the budgets.
            let len = request.len as usize;
            let mut buf = shared.pool.take(len);
            if reader.buffer().len() < len {
                dispatch(&ctx, &tx, &mut batch);
            }
            if let Err(e) = reader.read_exact(&mut buf[..len]).await {
                conn.log(format_args!(
                    "reading the {}-byte payload of a WRITE failed: {e}",
                    request.len
                ));
                break;
            }
            buf
        } else {
            Vec::new()
        };
        if tx.is_closed() {
            break;
        }
        let job = Job {
            request,
            payload,
            budget,
        };
        let quick = matches!(
            request.command,
            Command::Read | Command::Write | Command::BlockStatus | Command::Cache
        ) && data_bytes <= MAX_BATCHED_BYTES;
        if !quick {
            // Large reads and writes (the copy dominates, not the hand-off) and requests that
            // may take long (FLUSH, TRIM and WRITE_ZEROES of any length) run on their own, in
            // parallel with the rest.
            dispatch(&ctx, &tx, &mut vec![job]);
        } else {
            batch.push(job);
            if batch.len() >= MAX_BATCH {
                dispatch(&ctx, &tx, &mut batch);
            }
        }
    }
    dispatch(&ctx, &tx, &mut batch);
    // Requests still running hold senders; the writer ends after their replies are sent.
    drop(tx);
    let _ = writer_task.await;
    let left = ctx.export.active.fetch_sub(1, Ordering::SeqCst) - 1;
    if let (true, 0, Some(on_idle)) = (disconnected, left, ctx.export.on_idle.clone()) {
        // Replies are all written (the writer has ended), so every request is done.
        if tokio::task::spawn_blocking(move || on_idle())
            .await
            .is_err()
        {
            conn.log(format_args!("the export's on-idle action panicked"));
        }
    }
}

/// A request waiting to run, with its WRITE payload and its budget.
struct Job {
    request: Request,
    payload: Vec<u8>,
    budget: Budget,
}

/// Runs the jobs of `batch` (leaving it empty) on the blocking pool, one after the other, and
/// sends their replies to the writer together.
fn dispatch(ctx: &Arc<Context>, tx: &mpsc::UnboundedSender<Vec<Outgoing>>, batch: &mut Vec<Job>) {
    if batch.is_empty() {
        return;
    }
    let jobs = std::mem::take(batch);
    let ctx = Arc::clone(ctx);
    let tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let mut replies = Vec::with_capacity(jobs.len());
        for job in jobs {
            let len = job.payload.len().min(job.request.payload_len() as usize);
            let reply = execute_guarded(&ctx, &job.request, &job.payload[..len]);
            ctx.pool.give(job.payload);
            replies.push(Outgoing {
                reply,
                _budget: job.budget,
            });
        }
        // The writer is gone only when the connection is broken; the replies are moot then.
        let _ = tx.send(replies);
    });
}

/// [`reserve`] without waiting: `None` when a budget is exhausted.
fn try_reserve(
    slots: &Arc<Semaphore>,
    conn_bytes: &Arc<Semaphore>,
    server_bytes: &Arc<Semaphore>,
    bytes: u32,
) -> Option<Budget> {
    let slot = Arc::clone(slots).try_acquire_owned().ok()?;
    let (conn, server) = if bytes > 0 {
        (
            Some(Arc::clone(conn_bytes).try_acquire_many_owned(bytes).ok()?),
            Some(
                Arc::clone(server_bytes)
                    .try_acquire_many_owned(bytes)
                    .ok()?,
            ),
        )
    } else {
        (None, None)
    };
    Some(Budget {
        _slot: slot,
        _conn_bytes: conn,
        _server_bytes: server,
    })
}

async fn reserve(
    slots: &Arc<Semaphore>,
    conn_bytes: &Arc<Semaphore>,
    server_bytes: &Arc<Semaphore>,
    bytes: u32,
) -> Option<Budget> {
    let slot = Arc::clone(slots).acquire_owned().await.ok()?;
    let (conn, server) = if bytes > 0 {
        (
            Some(
                Arc::clone(conn_bytes)
                    .acquire_many_owned(bytes)
                    .await
                    .ok()?,
            ),
            Some(
                Arc::clone(server_bytes)
                    .acquire_many_owned(bytes)
                    .await
                    .ok()?,
            ),
        )
    } else {
        (None, None)
    };
    Some(Budget {
        _slot: slot,
        _conn_bytes: conn,
        _server_bytes: server,
    })
}

async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Vec<Outgoing>>,
    pool: &BufferPool,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, writer);
    while let Some(first) = rx.recv().await {
        for out in first {
            w.write_all(out.reply.bytes()).await?;
            pool.give(out.reply.into_buffer());
        }
        while let Ok(next) = rx.try_recv() {
            for out in next {
                w.write_all(out.reply.bytes()).await?;
                pool.give(out.reply.into_buffer());
            }
        }
        w.flush().await?;
    }
    w.shutdown().await
}

/// Runs a request, turning a panic in a device into an `EIO` reply.
fn execute_guarded(ctx: &Context, request: &Request, payload: &[u8]) -> Reply {
    let run = std::panic::AssertUnwindSafe(|| execute(ctx, request, payload));
    match std::panic::catch_unwind(run) {
        Ok(bytes) => bytes,
        Err(_) => {
            ctx.log_error(format_args!(
                "{} at {:#x}+{} panicked in the device",
                request.command, request.offset, request.len
            ));
            error_reply(ctx, request.handle, errno::EIO, "internal error")
        }
    }
}

/// A failed request: the error value and a message for the client and the log.
struct Failure {
    errno: u32,
    message: String,
}

fn fail(errno: u32, message: impl Into<String>) -> Failure {
    Failure {
        errno,
        message: message.into(),
    }
}

/// Maps a device error to an NBD error value.
fn device_failure(what: &str, e: image_format::Error) -> Failure {
    use image_format::Error as E;
    let errno = match &e {
        E::OutOfRange { .. } | E::InvalidArgument { .. } => errno::EINVAL,
        E::ReadOnly { .. } => errno::EPERM,
        E::Unsupported { .. } => errno::ENOTSUP,
        E::Io { source, .. } if source.raw_os_error() == Some(28) => errno::ENOSPC,
        E::Io { source, .. } if source.raw_os_error() == Some(122) => errno::ENOSPC,
        _ => errno::EIO,
    };
    fail(errno, format!("{what}: {e}"))
}

fn execute(ctx: &Context, request: &Request, payload: &[u8]) -> Reply {
    let result = match check_flags(ctx, request) {
        Ok(()) => match request.command {
            Command::Read => return read(ctx, request),
            Command::Write => write(ctx, request, payload),
            Command::Flush => flush(ctx),
            Command::Trim => trim(ctx, request),
            Command::WriteZeroes => write_zeroes(ctx, request),
            Command::BlockStatus => return block_status(ctx, request),
            Command::Cache => in_range(ctx, request, errno::EINVAL),
            Command::Disc => Ok(()),
            Command::Unknown(code) => Err(fail(errno::EINVAL, format!("unknown command {code}"))),
        },
        Err(f) => Err(f),
    };
    match result {
        Ok(()) => {
            let mut out = Vec::with_capacity(proto::SIMPLE_REPLY_LEN);
            proto::put_simple_reply(&mut out, 0, request.handle);
            out.into()
        }
        Err(f) => failure_reply(ctx, request, f),
    }
}

fn failure_reply(ctx: &Context, request: &Request, f: Failure) -> Reply {
    ctx.log_error(format_args!(
        "{} at {:#x}+{}: {} (error {})",
        request.command, request.offset, request.len, f.message, f.errno
    ));
    error_reply(ctx, request.handle, f.errno, &f.message)
}

fn error_reply(ctx: &Context, handle: u64, error: u32, message: &str) -> Reply {
    let mut out = Vec::new();
    if ctx.structured {
        proto::put_error_chunk(&mut out, handle, error, message);
    } else {
        proto::put_simple_reply(&mut out, error, handle);
    }
    out.into()
}

/// Flags must belong to the command and to what was advertised.
fn check_flags(ctx: &Context, r: &Request) -> Result<(), Failure> {
    let stray = r.flags & !r.command.allowed_flags();
    if stray != 0 {
        return Err(fail(
            errno::EINVAL,
            format!("flags {stray:#x} are not valid for {}", r.command),
        ));
    }
    let need = [
        (CMD_FLAG_FUA, proto::TF_SEND_FUA, "FUA"),
        (CMD_FLAG_DF, proto::TF_SEND_DF, "DF"),
        (CMD_FLAG_FAST_ZERO, proto::TF_SEND_FAST_ZERO, "FAST_ZERO"),
    ];
    for (flag, advertised, name) in need {
        if r.flags & flag != 0 && ctx.flags & advertised == 0 {
            return Err(fail(
                errno::EINVAL,
                format!("flag {name} was not advertised"),
            ));
        }
    }
    Ok(())
}

/// The request's range lies inside the export; `errno` otherwise.
fn in_range(ctx: &Context, r: &Request, errno: u32) -> Result<(), Failure> {
    let size = ctx.export.size();
    match r.end() {
        Some(end) if end <= size => Ok(()),
        _ => Err(fail(
            errno,
            format!(
                "range {:#x}+{} exceeds the {size}-byte export",
                r.offset, r.len
            ),
        )),
    }
}

fn writable(ctx: &Context) -> Result<&Arc<dyn BlockDeviceMut>, Failure> {
    match &ctx.export.writable {
        Some(w) if ctx.flags & proto::TF_READ_ONLY == 0 => Ok(w),
        _ => Err(fail(errno::EPERM, "the export is read-only")),
    }
}

fn after_write(r: &Request, dev: &Arc<dyn BlockDeviceMut>) -> Result<(), Failure> {
    if r.flags & CMD_FLAG_FUA != 0 {
        dev.flush()
            .map_err(|e| device_failure("flush for FUA", e))?;
    }
    Ok(())
}

fn write(ctx: &Context, r: &Request, payload: &[u8]) -> Result<(), Failure> {
    let dev = writable(ctx)?;
    in_range(ctx, r, errno::ENOSPC)?;
    dev.write_at(payload, r.offset)
        .map_err(|e| device_failure("write", e))?;
    after_write(r, dev)
}

fn flush(ctx: &Context) -> Result<(), Failure> {
    if ctx.flags & proto::TF_SEND_FLUSH == 0 {
        // Read-only exports hold no unwritten data: there is nothing to flush.
        return if ctx.export.writable.is_none() {
            Ok(())
        } else {
            Err(fail(errno::EINVAL, "FLUSH was not advertised"))
        };
    }
    writable(ctx)?
        .flush()
        .map_err(|e| device_failure("flush", e))
}

fn trim(ctx: &Context, r: &Request) -> Result<(), Failure> {
    let dev = writable(ctx)?;
    if ctx.flags & proto::TF_SEND_TRIM == 0 {
        return Err(fail(errno::EINVAL, "TRIM was not advertised"));
    }
    in_range(ctx, r, errno::EINVAL)?;
    if r.len > 0 {
        dev.discard(r.offset, u64::from(r.len))
            .map_err(|e| device_failure("discard", e))?;
    }
    after_write(r, dev)
}

fn write_zeroes(ctx: &Context, r: &Request) -> Result<(), Failure> {
    let dev = writable(ctx)?;
    if ctx.flags & proto::TF_SEND_WRITE_ZEROES == 0 {
        return Err(fail(errno::EINVAL, "WRITE_ZEROES was not advertised"));
    }
    in_range(ctx, r, errno::ENOSPC)?;
    let len = u64::from(r.len);
    if len == 0 {
        return Ok(());
    }
    if r.flags & CMD_FLAG_FAST_ZERO != 0 {
        // Fast only when there is nothing to do: the range already reads as zeros (and may
        // stay a hole). Otherwise fail at once, as the protocol asks, so the client writes.
        let already_zero =
            r.flags & CMD_FLAG_NO_HOLE == 0 && reads_as_zero(ctx, r.offset, len).unwrap_or(false);
        if already_zero {
            return after_write(r, dev);
        }
        return Err(fail(
            errno::ENOTSUP,
            "zeroing this range is no faster than writing it",
        ));
    }
    if r.flags & CMD_FLAG_NO_HOLE != 0 {
        // Allocate: write real zeros rather than let the device punch a hole.
        let zeros = vec![0u8; ZERO_PIECE.min(r.len as usize)];
        let mut pos = r.offset;
        let end = r.offset + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            dev.write_at(&zeros[..n], pos)
                .map_err(|e| device_failure("write zeroes", e))?;
            pos += n as u64;
        }
    } else {
        dev.write_zeroes(r.offset, len)
            .map_err(|e| device_failure("write zeroes", e))?;
    }
    after_write(r, dev)
}

/// True when `block_status` says the whole range reads as zeros (within [`MAX_STATUS_CALLS`]).
fn reads_as_zero(ctx: &Context, offset: u64, len: u64) -> image_format::Result<bool> {
    let dev = &ctx.export.device;
    if !dev.caps().contains(Caps::EXTENTS) {
        return Ok(false);
    }
    let end = offset + len;
    let mut pos = offset;
    for _ in 0..MAX_STATUS_CALLS {
        if pos >= end {
            return Ok(true);
        }
        let e = dev.block_status(pos, end - pos)?;
        if !e.kind.reads_as_zero() || e.len == 0 {
            return Ok(false);
        }
        pos = pos.saturating_add(e.len);
    }
    Ok(false)
}

/// One piece of a READ: data to send, or a range that reads as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    offset: u64,
    len: u64,
    zero: bool,
}

/// The pieces of `[offset, offset + len)`, at most [`MAX_READ_FRAGMENTS`] (the last one then
/// covers the rest as data).
fn read_pieces(dev: &dyn BlockDevice, offset: u64, len: u64) -> image_format::Result<Vec<Piece>> {
    let end = offset + len;
    let mut pieces: Vec<Piece> = Vec::new();
    let mut pos = offset;
    while pos < end {
        if pieces.len() + 1 >= MAX_READ_FRAGMENTS {
            pieces.push(Piece {
                offset: pos,
                len: end - pos,
                zero: false,
            });
            break;
        }
        let e = dev.block_status(pos, end - pos)?;
        let n = e.len.min(end - pos).max(1);
        let zero = e.kind != ExtentKind::Data;
        match pieces.last_mut() {
            Some(last) if last.zero == zero => last.len += n,
            _ => pieces.push(Piece {
                offset: pos,
                len: n,
                zero,
            }),
        }
        pos += n;
    }
    Ok(pieces)
}

fn read(ctx: &Context, r: &Request) -> Reply {
    if r.len > proto::MAX_IO {
        let f = fail(
            errno::EINVAL,
            format!(
                "READ of {} bytes exceeds the {}-byte cap",
                r.len,
                proto::MAX_IO
            ),
        );
        return failure_reply(ctx, r, f);
    }
    if let Err(f) = in_range(ctx, r, errno::EINVAL) {
        return failure_reply(ctx, r, f);
    }
    let dev = &ctx.export.device;
    let len = r.len as usize;
    if !ctx.structured {
        let mut out = Reply::in_buffer(ctx.pool.take(proto::SIMPLE_REPLY_LEN + len));
        let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
        proto::write_simple_reply(&mut header, 0, r.handle);
        out.put(&header);
        if let Err(e) = dev.read_at(out.space(len), r.offset) {
            return failure_reply(ctx, r, device_failure("read", e));
        }
        return out;
    }
    if len == 0 {
        let mut out = Vec::new();
        proto::put_none_chunk(&mut out, r.handle);
        return out.into();
    }
    let pieces = if r.flags & CMD_FLAG_DF == 0
        && r.len >= MIN_HOLE_SCAN
        && dev.caps().contains(Caps::EXTENTS)
    {
        match read_pieces(dev.as_ref(), r.offset, u64::from(r.len)) {
            Ok(p) => p,
            Err(e) => return failure_reply(ctx, r, device_failure("block status", e)),
        }
    } else {
        vec![Piece {
            offset: r.offset,
            len: u64::from(r.len),
            zero: false,
        }]
    };
    let data_bytes: usize = pieces
        .iter()
        .filter(|p| !p.zero)
        .map(|p| p.len as usize)
        .sum();
    let headers = pieces.len() * (proto::CHUNK_HEADER_LEN + proto::OFFSET_DATA_PREFIX + 4);
    let mut out = Reply::in_buffer(ctx.pool.take(headers + data_bytes));
    let last = pieces.len() - 1;
    let mut header = [0u8; proto::CHUNK_HEADER_LEN];
    for (i, p) in pieces.iter().enumerate() {
        let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
        if p.zero {
            let mut hole = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 12);
            proto::put_hole_chunk(&mut hole, flags, r.handle, p.offset, p.len as u32);
            out.put(&hole);
            continue;
        }
        proto::write_chunk_header(
            &mut header,
            flags,
            proto::chunk::OFFSET_DATA,
            r.handle,
            (p.len as u32) + proto::OFFSET_DATA_PREFIX as u32,
        );
        out.put(&header);
        out.put(&p.offset.to_be_bytes());
        if let Err(e) = dev.read_at(out.space(p.len as usize), p.offset) {
            return failure_reply(ctx, r, device_failure("read", e));
        }
    }
    out
}

/// The `base:allocation` flags of an extent kind.
fn allocation_flags(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Data => 0,
        ExtentKind::Zero => proto::STATE_ZERO,
        ExtentKind::Unallocated => proto::STATE_HOLE | proto::STATE_ZERO,
    }
}

fn block_status(ctx: &Context, r: &Request) -> Reply {
    if !ctx.allocation_context {
        let f = fail(
            errno::EINVAL,
            "BLOCK_STATUS without a negotiated base:allocation context",
        );
        return failure_reply(ctx, r, f);
    }
    if r.len == 0 {
        return failure_reply(ctx, r, fail(errno::EINVAL, "BLOCK_STATUS of 0 bytes"));
    }
    if let Err(f) = in_range(ctx, r, errno::EINVAL) {
        return failure_reply(ctx, r, f);
    }
    match status_descriptors(
        ctx.export.device.as_ref(),
        r.offset,
        r.len,
        r.flags & CMD_FLAG_REQ_ONE != 0,
    ) {
        Ok(descriptors) => {
            let mut out = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 4 + 8 * descriptors.len());
            proto::put_block_status_chunk(
                &mut out,
                r.handle,
                handshake::BASE_ALLOCATION_ID,
                &descriptors,
            );
            out.into()
        }
        Err(e) => failure_reply(ctx, r, device_failure("block status", e)),
    }
}

/// `(length, flags)` descriptors from `offset`, covering at most `len` bytes, neighbours of the
/// same flags merged, at most [`MAX_STATUS_DESCRIPTORS`] (one with `req_one`).
fn status_descriptors(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u32,
    req_one: bool,
) -> image_format::Result<Vec<(u32, u32)>> {
    if !dev.caps().contains(Caps::EXTENTS) {
        // Status 0 ("allocated, contents unknown") is always a correct answer.
        return Ok(vec![(len, 0)]);
    }
    let end = offset + u64::from(len);
    let max = if req_one { 1 } else { MAX_STATUS_DESCRIPTORS };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    for _ in 0..MAX_STATUS_CALLS {
        if pos >= end {
            break;
        }
        let e = dev.block_status(pos, end - pos)?;
        // Bounded by the remaining length, which fits in 32 bits.
        let n = e.len.clamp(1, end - pos);
        let flags = allocation_flags(e.kind);
        let full = out.len() == max;
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += n as u32,
            _ if full => break,
            _ => out.push((n as u32, flags)),
        }
        pos += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_format::{Extent, blockdev::check_range, blockdev::check_status_range};
    use std::sync::Mutex;

    /// Size of the test disk, and of its quarters.
    const DISK: usize = 256 * 1024;
    const Q: u32 = (DISK / 4) as u32;

    /// A memory disk whose second quarter is a hole, third quarter known zeros.
    struct MemDisk {
        data: Mutex<Vec<u8>>,
        flushes: AtomicU64,
    }

    impl MemDisk {
        fn new(size: usize) -> Arc<Self> {
            let mut data = vec![0u8; size];
            for (i, b) in data.iter_mut().enumerate().take(size / 4) {
                *b = (i % 251) as u8 + 1;
            }
            for (i, b) in data.iter_mut().enumerate().skip(3 * size / 4) {
                *b = (i % 13) as u8 + 1;
            }
            Arc::new(MemDisk {
                data: Mutex::new(data),
                flushes: AtomicU64::new(0),
            })
        }
    }

    impl BlockDevice for MemDisk {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn caps(&self) -> Caps {
            Caps::WRITE | Caps::FLUSH | Caps::WRITE_ZEROES | Caps::DISCARD | Caps::EXTENTS
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> image_format::Result<()> {
            let data = self.data.lock().unwrap();
            check_range(off, buf.len() as u64, data.len() as u64)?;
            buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        fn block_status(&self, off: u64, len: u64) -> image_format::Result<Extent> {
            let size = self.size();
            check_status_range(off, len, size)?;
            let q = size / 4;
            let (kind, until) = match off / q {
                0 => (ExtentKind::Data, q),
                1 => (ExtentKind::Unallocated, 2 * q),
                2 => (ExtentKind::Zero, 3 * q),
                _ => (ExtentKind::Data, size),
            };
            Ok(Extent::new(kind, (until - off).min(len)))
        }
    }

    impl BlockDeviceMut for MemDisk {
        fn write_at(&self, buf: &[u8], off: u64) -> image_format::Result<()> {
            let mut data = self.data.lock().unwrap();
            check_range(off, buf.len() as u64, data.len() as u64)?;
            data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes(&self, off: u64, len: u64) -> image_format::Result<()> {
            self.write_at(&vec![0; len as usize], off)
        }
        fn discard(&self, off: u64, len: u64) -> image_format::Result<()> {
            self.write_zeroes(off, len)
        }
        fn flush(&self) -> image_format::Result<()> {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    fn context(structured: bool, writable: bool) -> (Context, Arc<MemDisk>) {
        let disk = MemDisk::new(DISK);
        let export = if writable {
            Export::writable("d", disk.clone())
        } else {
            Export::read_only("d", disk.clone())
        };
        let flags = export.transmission_flags(structured);
        let ctx = Context {
            conn: Conn {
                id: 1,
                peer: "test".into(),
                log: Arc::new(|_| {}),
            },
            export: Arc::new(export),
            structured,
            allocation_context: structured,
            flags,
            logged_errors: AtomicU64::new(0),
            pool: Arc::new(BufferPool::new(1 << 20)),
        };
        (ctx, disk)
    }

    fn req(command: Command, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            handle: 42,
            offset,
            len,
        }
    }

    /// Runs a request and returns the reply's bytes.
    fn exec(ctx: &Context, r: &Request, payload: &[u8]) -> Vec<u8> {
        execute(ctx, r, payload).bytes().to_vec()
    }

    fn simple_error(reply: &[u8]) -> u32 {
        assert_eq!(&reply[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        u32::from_be_bytes(reply[4..8].try_into().unwrap())
    }

    /// `(flags, type, payload)` of each chunk of a structured reply.
    fn chunks(mut reply: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
        let mut out = Vec::new();
        while !reply.is_empty() {
            assert_eq!(&reply[..4], &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
            let flags = u16::from_be_bytes(reply[4..6].try_into().unwrap());
            let kind = u16::from_be_bytes(reply[6..8].try_into().unwrap());
            assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 42);
            let len = u32::from_be_bytes(reply[16..20].try_into().unwrap()) as usize;
            out.push((flags, kind, reply[20..20 + len].to_vec()));
            reply = &reply[20 + len..];
        }
        out
    }

    #[test]
    fn simple_read_returns_the_bytes() {
        let (ctx, disk) = context(false, false);
        let reply = exec(&ctx, &req(Command::Read, 0, 100, 50), &[]);
        assert_eq!(simple_error(&reply), 0);
        assert_eq!(&reply[16..], &disk.data.lock().unwrap()[100..150]);
    }

    #[test]
    fn read_past_the_end_is_einval() {
        let (ctx, _) = context(false, false);
        let reply = exec(&ctx, &req(Command::Read, 0, DISK as u64 - 10, 20), &[]);
        assert_eq!(reply.len(), 16);
        assert_eq!(simple_error(&reply), errno::EINVAL);
    }

    #[test]
    fn read_with_overflowing_range_is_einval() {
        let (ctx, _) = context(true, false);
        let reply = exec(&ctx, &req(Command::Read, 0, u64::MAX - 1, 20), &[]);
        let c = chunks(&reply);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].1, proto::chunk::ERROR);
        assert_eq!(&c[0].2[..4], &errno::EINVAL.to_be_bytes());
    }

    #[test]
    fn oversized_read_is_refused_without_allocating() {
        let (ctx, _) = context(false, false);
        let reply = exec(&ctx, &req(Command::Read, 0, 0, u32::MAX), &[]);
        assert_eq!(simple_error(&reply), errno::EINVAL);
    }

    #[test]
    fn structured_read_sends_holes_for_zero_extents() {
        let (ctx, disk) = context(true, false);
        let q = Q as u64;
        let reply = exec(
            &ctx,
            &req(Command::Read, 0, q - 8, (2 * q + 16) as u32),
            &[],
        );
        let c = chunks(&reply);
        assert_eq!(c.len(), 3, "data, hole, data");
        assert_eq!(c[0].1, proto::chunk::OFFSET_DATA);
        assert_eq!(&c[0].2[..8], &(q - 8).to_be_bytes());
        assert_eq!(
            &c[0].2[8..],
            &disk.data.lock().unwrap()[(q - 8) as usize..q as usize]
        );
        assert_eq!(c[1].1, proto::chunk::OFFSET_HOLE);
        assert_eq!(&c[1].2[8..], &((2 * q) as u32).to_be_bytes());
        assert_eq!(c[2].1, proto::chunk::OFFSET_DATA);
        assert_eq!(c[2].0, proto::REPLY_FLAG_DONE);
        assert_eq!(c[0].0 | c[1].0, 0);
    }

    #[test]
    fn structured_read_with_df_is_one_data_chunk() {
        let (ctx, _) = context(true, false);
        let reply = exec(&ctx, &req(Command::Read, CMD_FLAG_DF, 0, DISK as u32), &[]);
        let c = chunks(&reply);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].2.len(), 8 + DISK);
    }

    #[test]
    fn write_to_a_read_only_export_is_eperm() {
        let (ctx, _) = context(false, false);
        let reply = exec(&ctx, &req(Command::Write, 0, 0, 4), &[1, 2, 3, 4]);
        assert_eq!(simple_error(&reply), errno::EPERM);
    }

    #[test]
    fn write_past_the_end_is_enospc() {
        let (ctx, _) = context(false, true);
        let reply = exec(&ctx, &req(Command::Write, 0, DISK as u64 - 2, 4), &[1; 4]);
        assert_eq!(simple_error(&reply), errno::ENOSPC);
    }

    #[test]
    fn fua_write_lands_and_flushes() {
        let (ctx, disk) = context(false, true);
        let reply = exec(&ctx, &req(Command::Write, CMD_FLAG_FUA, 10, 4), &[9; 4]);
        assert_eq!(simple_error(&reply), 0);
        assert_eq!(&disk.data.lock().unwrap()[10..14], &[9; 4]);
        assert_eq!(disk.flushes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn fast_zero_fails_on_data_and_succeeds_on_a_hole() {
        let (ctx, disk) = context(false, true);
        let on_data = exec(
            &ctx,
            &req(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 512),
            &[],
        );
        assert_eq!(simple_error(&on_data), errno::ENOTSUP);
        assert_ne!(
            disk.data.lock().unwrap()[0],
            0,
            "a failed fast zero leaves data alone"
        );
        let on_hole = exec(
            &ctx,
            &req(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, u64::from(Q), 512),
            &[],
        );
        assert_eq!(simple_error(&on_hole), 0);
    }

    #[test]
    fn write_zeroes_with_no_hole_zeroes_the_range() {
        let (ctx, disk) = context(false, true);
        let reply = exec(
            &ctx,
            &req(Command::WriteZeroes, CMD_FLAG_NO_HOLE, 1, 3000),
            &[],
        );
        assert_eq!(simple_error(&reply), 0);
        let data = disk.data.lock().unwrap();
        assert!(data[1..3001].iter().all(|&b| b == 0));
        assert_ne!(data[3001], 0);
    }

    #[test]
    fn flags_not_belonging_to_the_command_are_einval() {
        let (ctx, _) = context(false, true);
        let reply = exec(&ctx, &req(Command::Write, CMD_FLAG_REQ_ONE, 0, 1), &[0]);
        assert_eq!(simple_error(&reply), errno::EINVAL);
    }

    #[test]
    fn unknown_commands_are_einval() {
        let (ctx, _) = context(false, false);
        let reply = exec(&ctx, &req(Command::Unknown(77), 0, 0, 0), &[]);
        assert_eq!(simple_error(&reply), errno::EINVAL);
    }

    #[test]
    fn block_status_maps_kinds_to_allocation_flags() {
        let (ctx, _) = context(true, false);
        let reply = exec(&ctx, &req(Command::BlockStatus, 0, 0, DISK as u32), &[]);
        let c = chunks(&reply);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].1, proto::chunk::BLOCK_STATUS);
        let p = &c[0].2;
        let d: Vec<(u32, u32)> = p[4..]
            .chunks(8)
            .map(|x| {
                (
                    u32::from_be_bytes(x[..4].try_into().unwrap()),
                    u32::from_be_bytes(x[4..].try_into().unwrap()),
                )
            })
            .collect();
        let q = Q;
        assert_eq!(
            d,
            vec![
                (q, 0),
                (q, proto::STATE_HOLE | proto::STATE_ZERO),
                (q, proto::STATE_ZERO),
                (q, 0)
            ]
        );
    }

    #[test]
    fn block_status_req_one_is_one_descriptor_within_the_request() {
        let (ctx, _) = context(true, false);
        let reply = exec(
            &ctx,
            &req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 100, 100_000),
            &[],
        );
        let c = chunks(&reply);
        assert_eq!(c[0].2.len(), 4 + 8);
        assert_eq!(&c[0].2[4..8], &(Q - 100).to_be_bytes());
    }

    #[test]
    fn block_status_without_a_context_is_einval() {
        let (mut ctx, _) = context(true, false);
        ctx.allocation_context = false;
        let reply = exec(&ctx, &req(Command::BlockStatus, 0, 0, 512), &[]);
        let c = chunks(&reply);
        assert_eq!(c[0].1, proto::chunk::ERROR);
    }

    #[test]
    fn read_only_exports_advertise_multi_conn_and_no_writes() {
        let (ctx, _) = context(false, false);
        assert_ne!(ctx.flags & proto::TF_READ_ONLY, 0);
        assert_ne!(ctx.flags & proto::TF_CAN_MULTI_CONN, 0);
        assert_eq!(ctx.flags & proto::TF_SEND_WRITE_ZEROES, 0);
        let (ctx, _) = context(true, true);
        assert_eq!(ctx.flags & proto::TF_READ_ONLY, 0);
        assert_ne!(ctx.flags & proto::TF_SEND_TRIM, 0);
        assert_ne!(ctx.flags & proto::TF_SEND_DF, 0);
    }

    #[test]
    fn server_refuses_duplicate_and_empty_names() {
        let disk = MemDisk::new(4096);
        let a = Export::read_only("a", disk.clone());
        assert!(matches!(
            Server::new(vec![a.clone(), a.clone()]),
            Err(ServerError::DuplicateName(_))
        ));
        assert!(matches!(
            Server::new(vec![Export::read_only("", disk)]),
            Err(ServerError::BadName(_))
        ));
        let server = Server::new(vec![a]).unwrap();
        assert_eq!(server.exports().find("").unwrap().name, "a");
        assert!(server.exports().find("b").is_none());
    }

    /// A client over a Unix socket that writes 4 bytes at 0 with `NBD_OPT_EXPORT_NAME`.
    async fn client(path: &Path) -> tokio::net::UnixStream {
        let mut c = tokio::net::UnixStream::connect(path).await.unwrap();
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).await.unwrap();
        c.write_u32(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
            .await
            .unwrap();
        c.write_u64(proto::IHAVEOPT).await.unwrap();
        c.write_u32(1).await.unwrap();
        c.write_u32(1).await.unwrap();
        c.write_all(b"d").await.unwrap();
        let mut info = [0u8; 10];
        c.read_exact(&mut info).await.unwrap();
        c
    }

    async fn request(c: &mut tokio::net::UnixStream, command: u16, payload: &[u8]) {
        c.write_u32(proto::REQUEST_MAGIC).await.unwrap();
        c.write_u16(0).await.unwrap();
        c.write_u16(command).await.unwrap();
        c.write_u64(7).await.unwrap();
        c.write_u64(0).await.unwrap();
        c.write_u32(payload.len() as u32).await.unwrap();
        c.write_all(payload).await.unwrap();
        if command != 2 {
            let mut reply = [0u8; 16];
            c.read_exact(&mut reply).await.unwrap();
            assert_eq!(&reply[4..8], &[0; 4], "request {command} failed");
        }
    }

    #[test]
    fn on_idle_runs_when_the_last_connection_disconnects_cleanly() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = std::env::temp_dir().join(format!("vmnest-onidle-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("sock");
            let disk = MemDisk::new(DISK);
            let calls = Arc::new(AtomicU64::new(0));
            let seen = calls.clone();
            let probe = disk.clone();
            let export = Export::writable("d", disk.clone()).with_on_idle(move || {
                // Every write of the connection is done before the action runs.
                assert_eq!(&probe.data.lock().unwrap()[..4], b"abcd");
                seen.fetch_add(1, Ordering::SeqCst);
            });
            let server = Server::with_options(
                vec![export],
                ServerOptions {
                    log: Arc::new(|_| {}),
                    tls: None,
                },
            )
            .unwrap();
            let listener = UnixListener::bind(&path).unwrap();
            tokio::spawn(async move { server.serve_unix_listener(listener).await });
            let settle = || tokio::time::sleep(Duration::from_millis(200));
            let mut a = client(&path).await;
            let mut b = client(&path).await;
            request(&mut a, 1, b"abcd").await;
            request(&mut a, 2, &[]).await;
            settle().await;
            assert_eq!(calls.load(Ordering::SeqCst), 0, "b is still connected");
            request(&mut b, 3, &[]).await;
            drop(b);
            settle().await;
            assert_eq!(calls.load(Ordering::SeqCst), 0, "b hung up without DISC");
            let mut c = client(&path).await;
            request(&mut c, 2, &[]).await;
            for _ in 0..50 {
                if calls.load(Ordering::SeqCst) > 0 {
                    break;
                }
                settle().await;
            }
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            let _ = std::fs::remove_dir_all(&dir);
        });
    }
}
