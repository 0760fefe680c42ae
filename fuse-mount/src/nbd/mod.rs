//! An NBD server over any [`image_format::BlockDevice`], written from the protocol's own
//! specification (NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! * [`proto`]: the wire format, pure and bounded (fuzzed).
//! * [`handshake`]: fixed newstyle option haggling.
//! * [`server`]: listeners, connections, and the transmission phase (concurrency and limits are
//!   documented there).
//! * [`tls`]: `NBD_OPT_STARTTLS` with rustls (certificates) or OpenSSL (pre-shared keys).
//! * [`psk`]: the pre-shared key file (qemu's `keys.psk` format).
//! * [`pool`]: reusable reply and payload buffers.
//!
//! ```no_run
//! # async fn demo(device: std::sync::Arc<dyn image_format::BlockDevice>) -> std::io::Result<()> {
//! use fuse_mount::nbd::{Export, Server};
//! let server = Server::new(vec![Export::read_only("disk", device)]).expect("exports");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! println!("nbd://{}/disk", listener.local_addr()?);
//! server.serve_tcp_listener(listener).await
//! # }
//! ```

pub mod handshake;
pub mod pool;
pub mod proto;
pub mod psk;
pub mod server;
pub mod tls;

pub use psk::{KeyFileError, PskKeys};
pub use server::{Connection, Export, Exports, Log, Server, ServerError, ServerOptions};
pub use tls::{Tls, TlsError, TlsStream};
