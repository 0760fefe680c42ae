//! What a virtual disk is, and every on-disk layout of one.
//!
//! * [`blockdev`]: the [`BlockDevice`] / [`BlockDeviceMut`] traits everything else codes against.
//! * [`image`]: an opened image ([`Image`]): a block device that can describe and check itself.
//! * [`registry`]: scored probing and opening with the backing chain resolved, under the path
//!   and chain-depth rules documented there.
//! * one module per format, each split into pure parsing of headers and tables, the mapping from
//!   guest offsets to host offsets, and the I/O that executes a mapping.
//!
//! Untrusted bytes are parsed with bounds ([`bytes::Fields`]); no header value sizes an allocation
//! without a named cap; every error names the file and the offset ([`Error`]).

pub mod blockdev;
pub mod bytes;
pub mod compare;
#[cfg(test)]
mod crash_test;
pub mod create;
pub mod error;
pub mod file;
pub mod image;
pub mod parallels;
pub mod qcow2;
pub mod raw;
pub mod registry;
#[doc(hidden)]
pub mod scratch;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use blockdev::{BlockDevice, BlockDeviceMut, Caps, Extent, ExtentKind, HostLocation};
pub use create::{CreateOptions, ImageWriter, Prepared, Unit, WriteOrder};
pub use error::{Error, Result};
pub use image::{CheckProblem, CheckReport, Image, ImageInfo, SnapshotInfo};
pub use registry::{Driver, OpenOptions, Registry};

/// A registry with every driver of this crate.
pub fn default_registry() -> Registry {
    // Order breaks ties between equal probe scores: the first registered wins.
    Registry::new(vec![
        Box::new(qcow2::Qcow2Driver),
        Box::new(vhdx::VhdxDriver),
        Box::new(vmdk::VmdkDriver),
        Box::new(vhd::VhdDriver),
        Box::new(parallels::ParallelsDriver),
        Box::new(raw::RawDriver),
    ])
}

/// Opens `path` with the default registry.
pub fn open(path: &std::path::Path, options: &OpenOptions) -> Result<std::sync::Arc<dyn Image>> {
    default_registry().open(path, options)
}
