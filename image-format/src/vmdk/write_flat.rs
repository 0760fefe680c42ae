//! The monolithicFlat writer: a text descriptor `NAME.vmdk` naming one raw extent
//! `NAME-flat.vmdk` of the disk's full size, written sparse (holes where the source has none).
//!
//! Both files are written under temporary names. `finish` moves the extent into place first and
//! the descriptor last, so a reader that opens the descriptor always finds a complete extent; a
//! crash in between leaves at worst an extent file with no descriptor naming it.

use std::path::{Path, PathBuf};

use crate::create::{ImageWriter, Prepared, TempOutput, WriteOrder};
use crate::error::Result;

use super::descriptor::ExtentType;
use super::header::SECTOR;
use super::write::{DescriptorSpec, ExtentSpec, Identity, Params, encode_descriptor};

/// The extent file name for descriptor file name `name`: `disk.vmdk` -> `disk-flat.vmdk`,
/// `disk` -> `disk-flat.vmdk`, `disk.img` -> `disk-flat.img`.
pub fn flat_name(name: &str) -> String {
    match name.rfind('.').filter(|&i| i > 0) {
        Some(i) => format!("{}-flat{}", &name[..i], &name[i..]),
        None => format!("{name}-flat.vmdk"),
    }
}

/// Writes a new monolithicFlat VMDK.
#[derive(Debug)]
pub struct FlatWriter {
    extent: TempOutput,
    descriptor_out: TempOutput,
    descriptor: String,
    size: u64,
}

impl FlatWriter {
    /// Starts the descriptor at `path` (file name `name`) and its extent beside it.
    pub fn create(
        path: &Path,
        name: &str,
        params: &Params,
        ids: &Identity,
    ) -> Result<Box<dyn ImageWriter>> {
        let flat = flat_name(name);
        let extent_path: PathBuf = path.with_file_name(&flat);
        let descriptor = encode_descriptor(&DescriptorSpec {
            ids: *ids,
            create_type: params.subformat.create_type(),
            extents: vec![ExtentSpec {
                kind: ExtentType::Flat,
                sectors: params.capacity,
                file: flat,
            }],
            adapter: params.adapter,
            hw_version: params.hw_version.clone(),
        });
        let size = params.capacity * SECTOR;
        let extent = TempOutput::create_with(&extent_path, params.durable)?;
        extent.set_len(size)?;
        let descriptor_out = TempOutput::create_with(path, params.durable)?;
        Ok(Box::new(FlatWriter {
            extent,
            descriptor_out,
            descriptor,
            size,
        }))
    }
}

impl ImageWriter for FlatWriter {
    fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        // The file system block: the smallest hole the extent can keep.
        4096
    }

    fn order(&self) -> WriteOrder {
        WriteOrder::Any
    }

    fn commit(&self, prepared: Prepared) -> Result<()> {
        prepared.write_plain(self.extent.file(), self.size)
    }

    fn write_zeroes(&self, _off: u64, _len: u64) -> Result<()> {
        // The new extent is all holes and ranges are never committed twice: already zeros.
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let FlatWriter {
            extent,
            descriptor_out,
            descriptor,
            ..
        } = *self;
        descriptor_out
            .file()
            .write_all_at(descriptor.as_bytes(), 0)?;
        extent.commit()?;
        descriptor_out.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_extent_names_follow_vmwares_pattern() {
        assert_eq!(flat_name("disk.vmdk"), "disk-flat.vmdk");
        assert_eq!(flat_name("disk"), "disk-flat.vmdk");
        assert_eq!(flat_name("a.b.img"), "a.b-flat.img");
        assert_eq!(flat_name(".hidden"), ".hidden-flat.vmdk");
    }
}
