//! The one error type of `image-format`.
//!
//! Every error that comes from an image's bytes names the file, the structure and the byte offset,
//! so a user can look at the damage with a hex editor. Pure parsers, which see bytes but no path,
//! build errors with an empty path; the driver that called them fills it in with [`Error::in_file`].

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Prints `path: ` when a path is known, nothing otherwise.
struct Prefix<'a>(&'a Path);

impl fmt::Display for Prefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.as_os_str().is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0.display())
        }
    }
}

/// Everything that can go wrong while opening, reading or checking an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system failed an I/O request.
    #[error("{}{op} at offset {offset:#x}", Prefix(path))]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The bytes of a structure break the format's rules.
    #[error("{}corrupt {structure} at offset {offset:#x}: {reason}", Prefix(path))]
    Corrupt {
        path: PathBuf,
        structure: &'static str,
        offset: u64,
        reason: String,
    },
    /// A valid image that uses a feature this driver does not implement.
    #[error("{}unsupported {what}", Prefix(path))]
    Unsupported { path: PathBuf, what: String },
    /// No driver recognised the file.
    #[error("{}unknown image format", Prefix(path))]
    UnknownFormat { path: PathBuf },
    /// A backing file, parent or extent the image names does not exist. Never read as zeros.
    #[error("{}{what} {} cannot be opened", Prefix(path), target.display())]
    MissingFile {
        path: PathBuf,
        what: &'static str,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A backing file, parent or extent path leads out of the image's directory.
    #[error(
        "{}{what} {} lies outside the image's directory {} (allow external paths to follow it)",
        Prefix(path),
        target.display(),
        dir.display()
    )]
    PathOutsideDirectory {
        path: PathBuf,
        what: &'static str,
        target: PathBuf,
        dir: PathBuf,
    },
    /// The backing chain is longer than the cap, or loops.
    #[error("{}backing chain deeper than {max} images (or a loop)", Prefix(path))]
    ChainTooDeep { path: PathBuf, max: usize },
    /// A parent exists but is not the image the child was made from.
    #[error("{}parent {} does not match: {reason}", Prefix(path), parent.display())]
    ParentMismatch {
        path: PathBuf,
        parent: PathBuf,
        reason: String,
    },
    /// A request outside the virtual disk.
    #[error("request of {len} bytes at offset {offset:#x} exceeds the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The image cannot be opened or used for writing.
    #[error("{}{reason}", Prefix(path))]
    ReadOnly { path: PathBuf, reason: String },
    /// The caller asked for something that makes no sense (an unknown format name, say).
    #[error("{}{reason}", Prefix(path))]
    InvalidArgument { path: PathBuf, reason: String },
}

impl Error {
    /// A corruption found by a pure parser; the driver adds the path with [`Error::in_file`].
    pub fn corrupt(structure: &'static str, offset: u64, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            path: PathBuf::new(),
            structure,
            offset,
            reason: reason.into(),
        }
    }

    /// An unsupported feature found by a pure parser.
    pub fn unsupported(what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: PathBuf::new(),
            what: what.into(),
        }
    }

    /// Names `file` as the file the error is about, unless a file is named already.
    pub fn in_file(mut self, file: &Path) -> Self {
        match &mut self {
            Error::Io { path, .. }
            | Error::Corrupt { path, .. }
            | Error::Unsupported { path, .. }
            | Error::UnknownFormat { path }
            | Error::MissingFile { path, .. }
            | Error::PathOutsideDirectory { path, .. }
            | Error::ChainTooDeep { path, .. }
            | Error::ParentMismatch { path, .. }
            | Error::ReadOnly { path, .. }
            | Error::InvalidArgument { path, .. } => {
                if path.as_os_str().is_empty() {
                    *path = file.to_path_buf();
                }
            }
            Error::OutOfRange { .. } => {}
        }
        self
    }

    /// True when the error says the image's bytes are damaged (as opposed to I/O or usage errors).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_error_names_file_structure_and_offset() {
        let err = Error::corrupt("L1 table", 0x30000, "entry beyond end of file")
            .in_file(Path::new("a.qcow2"));
        assert_eq!(
            err.to_string(),
            "a.qcow2: corrupt L1 table at offset 0x30000: entry beyond end of file"
        );
    }

    #[test]
    fn in_file_keeps_the_innermost_path() {
        let err = Error::corrupt("header", 0, "bad magic")
            .in_file(Path::new("base.vmdk"))
            .in_file(Path::new("top.vmdk"));
        assert!(err.to_string().starts_with("base.vmdk: "));
    }
}
