//! The error type of the store. Errors about stored bytes name the object (pack, index, map node,
//! manifest) and the offset in it.

use std::path::PathBuf;

/// Result alias for the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system failed an I/O request.
    #[error("{}: {op}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A stored object breaks the format's rules, or its checksum does not match.
    #[error("corrupt {object} at offset {offset:#x}: {reason}")]
    Corrupt {
        object: String,
        offset: u64,
        reason: String,
    },
    /// A chunk the caller asked for is not in the store.
    #[error("chunk {0} is not in the store")]
    MissingChunk(crate::chunk::ChunkId),
    /// A request that makes no sense.
    #[error("{0}")]
    InvalidArgument(String),
    /// A remote (object storage or another directory) failed a request, after retries.
    /// `object` is the remote's label and the key; never a credential.
    #[error("remote {object}: {reason}")]
    Remote { object: String, reason: String },
    /// The passphrase or key file given does not unlock an encrypted store (the store named).
    #[error("wrong passphrase or key file for store {0}")]
    WrongKey(String),
}

impl Error {
    /// The same error with `note` added to its reason (which snapshot or chunk it concerns).
    pub fn noted(self, note: &str) -> Self {
        match self {
            Error::Corrupt {
                object,
                offset,
                reason,
            } => Error::Corrupt {
                object,
                offset,
                reason: format!("{reason} ({note})"),
            },
            Error::Remote { object, reason } => Error::Remote {
                object,
                reason: format!("{reason} ({note})"),
            },
            Error::MissingChunk(id) => {
                Error::InvalidArgument(format!("chunk {id} is not in the store ({note})"))
            }
            other => other,
        }
    }

    /// A corruption of `object` at `offset`.
    pub fn corrupt(object: impl Into<String>, offset: u64, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.into(),
            offset,
            reason: reason.into(),
        }
    }
}

impl From<Error> for image_format::Error {
    /// A store error seen through the block-device traits (a stored disk, an import): the
    /// object's name takes the place of the file name.
    fn from(e: Error) -> Self {
        match e {
            Error::Io { path, op, source } => image_format::Error::Io {
                path,
                op,
                offset: 0,
                source,
            },
            Error::Corrupt {
                object,
                offset,
                reason,
            } => image_format::Error::Corrupt {
                path: object.into(),
                structure: "store object",
                offset,
                reason,
            },
            Error::MissingChunk(id) => image_format::Error::Corrupt {
                path: Default::default(),
                structure: "store",
                offset: 0,
                reason: format!("chunk {id} is not in the store"),
            },
            Error::WrongKey(store) => image_format::Error::InvalidArgument {
                path: store.into(),
                reason: "wrong passphrase or key file".into(),
            },
            Error::InvalidArgument(reason) => image_format::Error::InvalidArgument {
                path: Default::default(),
                reason,
            },
            Error::Remote { object, reason } => image_format::Error::Io {
                path: object.into(),
                op: "remote request",
                offset: 0,
                source: std::io::Error::other(reason),
            },
        }
    }
}
