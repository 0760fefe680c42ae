//! An opened image: a [`BlockDevice`] that can also describe and check itself.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::blockdev::{BlockDevice, BlockDeviceMut};
use crate::error::{Error, Result};

/// An image opened by a format driver, with its backing chain resolved.
pub trait Image: BlockDevice {
    /// The format driver's name (`raw`, `qcow2`, `vmdk`, `vpc`, `vhdx`).
    fn format(&self) -> &'static str;

    /// What `vmnest info` prints. The chain below is described by each backing image's own info.
    fn info(&self) -> Result<ImageInfo>;

    /// Structural consistency, as `vmnest check` reports it. Formats without checks return
    /// [`Error::Unsupported`], which the CLI maps onto qemu-img's exit code 63.
    fn check(&self) -> Result<CheckReport> {
        Err(Error::unsupported(format!(
            "consistency checks for the {} format",
            self.format()
        )))
    }

    /// The next image of the backing chain, if any.
    fn backing(&self) -> Option<&Arc<dyn Image>> {
        None
    }

    /// True when the driver can write images of this format in place (given a writable open);
    /// exports ask before opening a file for writing.
    fn writes_in_place(&self) -> bool {
        false
    }

    /// The same image as a device that can be written, when its driver writes in place and it
    /// was opened writable (`OpenOptions::writable`); `None` otherwise. Exports (NBD, FUSE)
    /// use it to serve an image read-write.
    fn into_mut_device(self: Arc<Self>) -> Option<Arc<dyn BlockDeviceMut>> {
        None
    }
}

/// A description of one image of a chain, for `vmnest info`.
///
/// Serialized with qemu-img's key names where the meaning is the same (`virtual-size`,
/// `actual-size`, `cluster-size`, `dirty-flag`, `backing-filename`, ...), so scripts written for
/// `qemu-img info --output=json` read it unchanged.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The path the image was opened by.
    pub filename: PathBuf,
    /// Driver name, as qemu-img names formats (`vpc` for VHD).
    pub format: String,
    /// The variant: `monolithicSparse`, `dynamic`, `v3`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subformat: Option<String>,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Host bytes allocated by every file of this image (not its backing chain).
    pub actual_size: u64,
    /// Allocation unit: cluster (qcow2), grain (VMDK), block (VHD, VHDX).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// The image says it was not closed cleanly (qcow2 dirty bit, VHDX log to replay).
    #[serde(rename = "dirty-flag")]
    pub dirty: bool,
    /// The backing/parent file as the image records it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// The backing file's format, as recorded or probed.
    #[serde(
        skip_serializing_if = "Option::is_none",
        rename = "backing-filename-format"
    )]
    pub backing_format: Option<String>,
    /// Every host file the image consists of (descriptor and extents for VMDK).
    pub files: Vec<PathBuf>,
    /// Internal snapshots (qcow2).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// Fields only this format has, as `qemu-img info` prints under "Format specific information".
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub format_specific: serde_json::Map<String, serde_json::Value>,
}

impl ImageInfo {
    /// Info with the host allocation of `files` filled in.
    pub fn new(filename: PathBuf, format: &str, virtual_size: u64, files: Vec<PathBuf>) -> Self {
        ImageInfo {
            actual_size: crate::file::allocated_bytes_of(&files),
            filename,
            format: format.to_string(),
            virtual_size,
            files,
            ..Default::default()
        }
    }

    /// Adds one format-specific field.
    pub fn specific(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.format_specific.insert(key.to_string(), value.into());
    }
}

/// An internal snapshot of a qcow2 image.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u64,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<u64>,
}

/// One problem found by a check.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CheckProblem {
    /// The structure at fault (`refcount block`, `L2 table`, `BAT`, ...).
    pub structure: String,
    /// Its byte offset in the file, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// What is wrong.
    pub message: String,
}

/// The outcome of [`Image::check`].
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// Corruptions: the image may read wrong data.
    pub corruptions: Vec<CheckProblem>,
    /// Leaks: space allocated but not used; harmless for reading.
    pub leaks: Vec<CheckProblem>,
    /// Allocation units in use, when the format counts them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocated_clusters: Option<u64>,
    /// Allocation units the disk has, when the format counts them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_clusters: Option<u64>,
    /// End of the last used byte of the image file, as qemu-img's "Image end offset".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_end_offset: Option<u64>,
}

impl CheckReport {
    /// Records a corruption.
    pub fn corruption(&mut self, structure: &str, offset: Option<u64>, message: impl Into<String>) {
        self.corruptions.push(CheckProblem {
            structure: structure.to_string(),
            offset,
            message: message.into(),
        });
    }

    /// Records a leak.
    pub fn leak(&mut self, structure: &str, offset: Option<u64>, message: impl Into<String>) {
        self.leaks.push(CheckProblem {
            structure: structure.to_string(),
            offset,
            message: message.into(),
        });
    }

    /// The exit code qemu-img check documents: 0 clean, 2 corrupt, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if !self.corruptions.is_empty() {
            2
        } else if !self.leaks.is_empty() {
            3
        } else {
            0
        }
    }
}
