//! VHD images (qemu's "vpc" driver; alias "vhd"): fixed, dynamic and differencing disks read;
//! fixed and dynamic disks created ([`write`]) and written in place (`rw.rs`).
//!
//! Specification: Microsoft, "Virtual Hard Disk Image Format Specification", v1.0, October 2006.
//!
//! # Layout
//!
//! ```text
//! fixed:         | guest data ......................................... | footer |
//! dynamic/diff:  | footer copy | dynamic header | BAT | blocks ...        | footer |
//!                  @0            @footer.data_offset  @table_offset
//! ```
//!
//! * [`header`]: pure parsing of the footer, the dynamic header and parent locators.
//! * [`map`]: the BAT and the mapping of guest offsets to file offsets ([`map::BlockLocation`]).
//! * [`io`](self::io): `read_at` / `block_status`, executing that mapping.
//! * [`check`](self::check): structural checks.
//! * [`write`]: the writer (`convert -O vpc`): options, the size rule it writes, layout.
//! * `rw.rs`: in-place writes to an existing fixed or dynamic disk opened writable.
//!
//! # Decisions
//!
//! * **Which footer.** The footer at the end of the file (or at `len - 511` for pre-2004
//!   Virtual PC images) is preferred; a dynamic disk's copy at offset 0 is used when the end one
//!   is missing or its checksum is bad. When no copy has a valid checksum, opening fails with an
//!   error naming the file and the footer's offset: a footer that does not checksum may carry a
//!   wrong size or type, and reading with it would silently return wrong data. One narrow case
//!   is accepted (see [`header::Integrity::UniqueIdUnchecked`]): a checksum that matches the
//!   footer with its unique id zeroed, i.e. the id was stamped after checksumming; every field
//!   that decides how data is read is still verified, and `check` reports it.
//!   On the dfvfs test images this means: `image.vhd` opens (its only defect is that one, in both
//!   copies; qemu refuses it), `image-differential.vhd` is refused (its disk type was changed
//!   from dynamic to differencing without updating either checksum, and its dynamic header's
//!   checksum is wrong too: nothing in it can be trusted).
//! * **Disk size rule.** CHS geometry size for Virtual PC ("vpc ") and Virtual Server
//!   ("vs  ") images, the current size field for every other creator, and the current size
//!   whenever the geometry is at its 65535/16/255 maximum. See [`header::Footer::size_rule`].
//!   `info` reports the rule used under `size-rule`.
//! * **Sector bitmaps.** Ignored for dynamic disks (allocated blocks are read whole, as qemu
//!   and Hyper-V do); for differencing disks they decide, sector by sector, whether data comes
//!   from this file or from the parent.
//! * **Parents.** Located through the parent locators, relative ones first (W2ru, Wi2r), then
//!   absolute ones (W2ku, Wi2k: only their file name is used, beside the child), then the
//!   header's parent name; see [`header::parent_path_to_relative`]. The first candidate that
//!   exists inside the image's directory is opened through the registry (directory rule, chain
//!   depth cap); a relative locator leading out of the directory is passed over for the next
//!   candidate (files gathered in one directory still open), and reported if nothing is found. A parent whose
//!   footer unique id differs from the one the child records is [`Error::ParentMismatch`]; no
//!   parent at all is [`Error::MissingFile`] naming the preferred candidate. A missing parent is
//!   never read as zeros (qemu does that).
//! * **Caps.** The BAT is loaded at open, bounded by [`header::MAX_TABLE_ENTRIES`] and by the
//!   disk size ([`header::MAX_EXTRA_TABLE_ENTRIES`]); locator data by
//!   [`header::MAX_LOCATOR_BYTES`]; block sizes are powers of two in
//!   [`header::MIN_BLOCK_SIZE`]..=[`header::MAX_BLOCK_SIZE`].
//!
//! # Concurrency
//!
//! Everything but the differencing disks' bitmap cache is immutable after open; that cache is
//! behind a mutex taken only to look up or insert, never across I/O.

mod check;
pub mod header;
mod io;
pub mod map;
#[cfg(test)]
mod overlap_tests;
mod rw;
pub mod write;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::blockdev::BlockDeviceMut;
use crate::create::{CreateOptions, ImageWriter};
use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::image::{CheckReport, Image, ImageInfo};
use crate::registry::{Driver, OpenContext, Probe};

use header::{
    DYN_HEADER_SIZE, DiskType, DynamicHeader, FOOTER_SIZE, Footer, Integrity, MAX_LOCATOR_BYTES,
    OLD_FOOTER_SIZE, PlatformCode, footer_integrity, format_uuid, has_footer_cookie,
    parent_path_to_relative, parse_dynamic_header, parse_footer,
};
use map::BlockMap;

/// The VHD format driver.
#[derive(Debug, Default)]
pub struct VhdDriver;

impl Driver for VhdDriver {
    fn name(&self) -> &'static str {
        "vpc"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["vhd"]
    }

    fn probe(&self, probe: &Probe<'_>) -> u32 {
        // The footer at the end (512 or 511 bytes), or the copy at offset 0 of dynamic disks.
        let tail = probe.tail;
        let candidates = [
            tail.len()
                .checked_sub(FOOTER_SIZE)
                .and_then(|at| tail.get(at..)),
            tail.len()
                .checked_sub(OLD_FOOTER_SIZE)
                .and_then(|at| tail.get(at..)),
            probe.head.get(..FOOTER_SIZE),
        ];
        candidates
            .into_iter()
            .flatten()
            .filter(|bytes| has_footer_cookie(bytes))
            .map(|bytes| {
                let mut footer = [0u8; FOOTER_SIZE];
                footer[..bytes.len()].copy_from_slice(bytes);
                if footer_integrity(&footer).is_some() {
                    100
                } else {
                    60
                }
            })
            .max()
            .unwrap_or(0)
    }

    fn open(&self, ctx: &OpenContext<'_>) -> Result<Arc<dyn Image>> {
        let file = ImageFile::open_with(ctx.path(), ctx.writable())?;
        VhdImage::open(file, ctx).map(|image| Arc::new(image) as Arc<dyn Image>)
    }

    fn create(&self, path: &Path, options: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
        write::create(path, options)
    }
}

/// Where a copy of the footer sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// The last 512 bytes.
    End,
    /// The last 511 bytes (pre-2004 Virtual PC).
    EndOld,
    /// Offset 0 (dynamic and differencing disks).
    Start,
}

/// One copy of the footer as found in the file.
#[derive(Debug)]
pub(crate) struct FooterCopy {
    place: Place,
    offset: u64,
    bytes: [u8; FOOTER_SIZE],
    /// `None`: no cookie there. `Some(Err)`: a cookie, but the footer is invalid.
    parsed: Option<Result<Footer>>,
}

/// Reads every copy of the footer the file may hold.
pub(crate) fn read_footer_copies(file: &ImageFile) -> Result<Vec<FooterCopy>> {
    let len = file.len();
    let read = |place: Place, offset: u64, size: usize| -> Result<FooterCopy> {
        let mut bytes = [0u8; FOOTER_SIZE];
        file.read_exact_at(&mut bytes[..size], offset, "VHD footer")?;
        let parsed = has_footer_cookie(&bytes).then(|| parse_footer(&bytes, offset));
        Ok(FooterCopy {
            place,
            offset,
            bytes,
            parsed,
        })
    };
    let mut copies = Vec::new();
    if len >= FOOTER_SIZE as u64 {
        copies.push(read(Place::End, len - FOOTER_SIZE as u64, FOOTER_SIZE)?);
    }
    let end_has_cookie = copies.first().is_some_and(|c| c.parsed.is_some());
    if !end_has_cookie && len >= OLD_FOOTER_SIZE as u64 {
        copies.push(read(
            Place::EndOld,
            len - OLD_FOOTER_SIZE as u64,
            OLD_FOOTER_SIZE,
        )?);
    }
    if len > FOOTER_SIZE as u64 {
        copies.push(read(Place::Start, 0, FOOTER_SIZE)?);
    }
    Ok(copies)
}

/// Picks the footer to trust among `copies`: valid checksums before the tolerated
/// [`Integrity::UniqueIdUnchecked`], the end before offset 0. The copy at 0 must not describe a
/// fixed disk (a fixed disk's offset 0 is guest data). Returns the chosen copy's index.
pub(crate) fn choose_footer(copies: &[FooterCopy], file_len: u64) -> Result<usize> {
    let usable = |c: &FooterCopy, want: Integrity| match &c.parsed {
        Some(Ok(f)) => {
            f.integrity == want && !(c.place == Place::Start && f.disk_type == DiskType::Fixed)
        }
        _ => false,
    };
    for want in [Integrity::Valid, Integrity::UniqueIdUnchecked] {
        if let Some(i) = copies.iter().position(|c| usable(c, want)) {
            return Ok(i);
        }
    }
    // Nothing usable: report the most telling failure, the end's if it had a cookie.
    for c in copies {
        match &c.parsed {
            Some(Err(err)) => return Err(clone_error(err)),
            Some(Ok(_)) => {
                return Err(Error::corrupt(
                    "VHD footer",
                    c.offset,
                    "the copy at offset 0 describes a fixed disk, whose footer must be at the end of the file",
                ));
            }
            None => {}
        }
    }
    Err(Error::corrupt(
        "VHD footer",
        file_len.saturating_sub(FOOTER_SIZE as u64),
        "no \"conectix\" cookie at the end of the file nor at its start",
    ))
}

/// Errors are not `Clone` (they may hold an `io::Error`); footer errors are always `Corrupt`.
fn clone_error(err: &Error) -> Error {
    match err {
        Error::Corrupt {
            structure,
            offset,
            reason,
            ..
        } => Error::corrupt(structure, *offset, reason.clone()),
        other => Error::corrupt("VHD footer", 0, other.to_string()),
    }
}

/// How the guest data is laid out.
#[derive(Debug)]
pub(crate) enum Layout {
    /// Guest data from offset 0, footer after it.
    Fixed,
    /// Dynamic header, BAT and blocks.
    Sparse {
        header: DynamicHeader,
        header_offset: u64,
        map: BlockMap,
    },
}

/// The parent of a differencing disk.
pub(crate) struct Parent {
    /// The opened parent, `None` when the caller asked not to open backing files.
    image: Option<Arc<dyn Image>>,
    /// The path as the child records it (locator data or parent name).
    recorded: String,
    /// Which record it came from: "W2ru locator", "parent name", ...
    source: String,
}

impl std::fmt::Debug for Parent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parent")
            .field("opened", &self.image.is_some())
            .field("recorded", &self.recorded)
            .field("source", &self.source)
            .finish()
    }
}

/// An open VHD image.
#[derive(Debug)]
pub struct VhdImage {
    file: ImageFile,
    footer: Footer,
    /// Every copy of the footer, and which one is `footer`.
    copies: Vec<FooterCopy>,
    chosen: usize,
    size: u64,
    layout: Layout,
    parent: Option<Parent>,
    bitmaps: Mutex<io::BitmapCache>,
    /// The in-place write state, when opened writable.
    writer: Option<rw::Writer>,
}

impl VhdImage {
    fn open(file: ImageFile, ctx: &OpenContext<'_>) -> Result<Self> {
        let copies = read_footer_copies(&file)?;
        let chosen = choose_footer(&copies, file.len())?;
        let (footer, footer_offset) = match &copies[chosen] {
            FooterCopy {
                parsed: Some(Ok(f)),
                offset,
                ..
            } => (f.clone(), *offset),
            _ => return Err(Error::corrupt("VHD footer", 0, "no usable footer")),
        };
        let size = footer.virtual_size();
        let layout = if footer.disk_type == DiskType::Fixed {
            // The guest data ends where the footer starts.
            if size > footer_offset {
                return Err(Error::corrupt(
                    "VHD footer",
                    footer_offset,
                    format!(
                        "fixed disk of {size} bytes ({} rule) does not fit before the footer at {footer_offset:#x}",
                        footer.size_rule().name()
                    ),
                ));
            }
            Layout::Fixed
        } else {
            let header_offset = footer.data_offset;
            let mut raw = [0u8; DYN_HEADER_SIZE];
            file.read_exact_at(&mut raw, header_offset, "VHD dynamic header")?;
            let header = parse_dynamic_header(&raw, header_offset)?;
            header.check_table(size, header_offset)?;
            // Bounded by MAX_TABLE_ENTRIES (checked above): at most 16 MiB.
            let table_len = usize::try_from(header.table_bytes()).map_err(|_| {
                Error::corrupt("VHD dynamic header", header_offset + 28, "table too large")
            })?;
            // Judge the table's extent before allocating for it.
            if header
                .table_offset
                .checked_add(header.table_bytes())
                .is_none_or(|end| end > file.len())
            {
                return Err(Error::corrupt(
                    "VHD block allocation table",
                    header.table_offset,
                    format!(
                        "{} bytes of table needed but the file ends at {:#x}",
                        header.table_bytes(),
                        file.len()
                    ),
                ));
            }
            let raw_bat =
                file.read_vec(header.table_offset, table_len, "VHD block allocation table")?;
            let map = BlockMap::new(
                BlockMap::decode_bat(&raw_bat),
                u64::from(header.block_size),
                header.bitmap_size(),
                size,
                header.table_offset,
            );
            Layout::Sparse {
                header,
                header_offset,
                map,
            }
        };
        let parent = match (&layout, footer.disk_type) {
            (
                Layout::Sparse {
                    header,
                    header_offset,
                    ..
                },
                DiskType::Differencing,
            ) => Some(open_parent(ctx, &file, header, *header_offset)?),
            _ => None,
        };
        let mut image = VhdImage {
            file,
            footer,
            copies,
            chosen,
            size,
            layout,
            parent,
            bitmaps: Mutex::new(io::BitmapCache::default()),
            writer: None,
        };
        if image.file.is_writable() {
            image.writer = Some(rw::open_writer(&image)?);
        }
        Ok(image)
    }

    /// The footer in use.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
}

/// A place the child says its parent is.
#[derive(Debug)]
struct Candidate {
    /// As recorded.
    recorded: String,
    /// Converted to a path relative to the child's directory.
    relative: String,
    /// "W2ru locator", "parent name", ...
    source: String,
}

/// The parent candidates in order of preference: relative locators (W2ru, Wi2r), absolute ones
/// (W2ku, Wi2k), the parent name. Locators whose data cannot be read or decoded are skipped
/// (they are hints; the parent's identity is checked anyway); `check` reports them.
fn parent_candidates(file: &ImageFile, header: &DynamicHeader) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    let mut push = |recorded: String, source: String| {
        if let Some(relative) = parent_path_to_relative(&recorded)
            && !out.iter().any(|c| c.relative == relative)
        {
            out.push(Candidate {
                recorded,
                relative,
                source,
            });
        }
    };
    for code in [
        PlatformCode::W2ru,
        PlatformCode::Wi2r,
        PlatformCode::W2ku,
        PlatformCode::Wi2k,
    ] {
        for loc in header.locators.iter().filter(|l| l.code == code) {
            if loc.data_length == 0 || loc.data_length > MAX_LOCATOR_BYTES {
                continue;
            }
            let Ok(data) = file.read_vec(
                loc.data_offset,
                loc.data_length as usize,
                "VHD parent locator",
            ) else {
                continue;
            };
            if let Some(path) = code.decode_path(&data) {
                push(path, format!("{} locator", code.name()));
            }
        }
    }
    if !header.parent_name.is_empty() {
        push(header.parent_name.clone(), "parent name".into());
    }
    out
}

/// Finds, checks and opens the parent of a differencing disk.
fn open_parent(
    ctx: &OpenContext<'_>,
    file: &ImageFile,
    header: &DynamicHeader,
    header_offset: u64,
) -> Result<Parent> {
    let candidates = parent_candidates(file, header);
    if candidates.is_empty() {
        return Err(Error::corrupt(
            "VHD dynamic header",
            header_offset + 64,
            "differencing disk without a usable parent locator or parent name",
        ));
    }
    if !ctx.options.open_backing {
        // The chain is recorded, not opened: no file system lookups.
        let cand = &candidates[0];
        return Ok(Parent {
            image: None,
            recorded: cand.recorded.clone(),
            source: cand.source.clone(),
        });
    }
    // The first candidate that exists inside the directory wins. When none does, the error is
    // about the preferred candidate: outside the directory (and not allowed), or missing.
    let mut found = None;
    let mut first_failure: Option<Error> = None;
    for cand in &candidates {
        let path = match ctx.resolve_related("parent", &cand.relative) {
            Ok(path) => path,
            Err(err) => {
                first_failure.get_or_insert(err);
                continue;
            }
        };
        if std::fs::metadata(&path).is_ok() {
            found = Some((cand, path));
            break;
        }
        first_failure.get_or_insert_with(|| Error::MissingFile {
            path: ctx.path().to_path_buf(),
            what: "parent",
            target: path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no parent candidate exists"),
        });
    }
    let Some((cand, path)) = found else {
        return Err(first_failure.unwrap_or_else(|| {
            Error::corrupt(
                "VHD dynamic header",
                header_offset + 64,
                "no parent candidate",
            )
        }));
    };
    check_parent_identity(ctx, &path, header)?;
    let image = ctx.open_backing(&cand.relative, Some("vpc"))?;
    Ok(Parent {
        image: Some(image),
        recorded: cand.recorded.clone(),
        source: cand.source.clone(),
    })
}

/// The parent's footer unique id must be the one the child's dynamic header records.
fn check_parent_identity(
    ctx: &OpenContext<'_>,
    path: &std::path::Path,
    header: &DynamicHeader,
) -> Result<()> {
    let parent_file = ImageFile::open(path)?;
    let copies = read_footer_copies(&parent_file).map_err(|e| e.in_file(path))?;
    let chosen = choose_footer(&copies, parent_file.len()).map_err(|e| e.in_file(path))?;
    let Some(Ok(parent_footer)) = &copies[chosen].parsed else {
        return Err(Error::corrupt("VHD footer", 0, "no usable footer").in_file(path));
    };
    if parent_footer.unique_id != header.parent_unique_id {
        return Err(Error::ParentMismatch {
            path: ctx.path().to_path_buf(),
            parent: path.to_path_buf(),
            reason: format!(
                "the child records parent unique id {}, the parent's footer has {}",
                format_uuid(&header.parent_unique_id),
                format_uuid(&parent_footer.unique_id)
            ),
        });
    }
    Ok(())
}

impl Image for VhdImage {
    fn format(&self) -> &'static str {
        "vpc"
    }

    fn info(&self) -> Result<ImageInfo> {
        let path: PathBuf = self.file.path().to_path_buf();
        let f = &self.footer;
        let mut info = ImageInfo::new(path.clone(), "vpc", self.size, vec![path]);
        info.subformat = Some(f.disk_type.name().to_string());
        if let Layout::Sparse { header, .. } = &self.layout {
            info.cluster_size = Some(u64::from(header.block_size));
        }
        if let Some(parent) = &self.parent {
            info.backing_filename = Some(parent.recorded.clone());
            info.backing_format = Some("vpc".into());
            info.specific("parent-source", parent.source.clone());
        }
        info.specific("creator-app", f.creator_app_str());
        info.specific(
            "creator-version",
            format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xffff),
        );
        info.specific("creator-host-os", f.creator_host_os_str());
        info.specific("disk-type", f.disk_type.name());
        info.specific("size-rule", f.size_rule().name());
        info.specific("current-size", f.current_size);
        info.specific("original-size", f.original_size);
        info.specific("uuid", format_uuid(&f.unique_id));
        info.specific(
            "geometry",
            json!({
                "cylinders": f.geometry.cylinders,
                "heads": f.geometry.heads,
                "sectors": f.geometry.sectors,
            }),
        );
        if let Layout::Sparse { header, .. } = &self.layout
            && f.disk_type == DiskType::Differencing
        {
            info.specific("parent-uuid", format_uuid(&header.parent_unique_id));
        }
        Ok(info)
    }

    fn check(&self) -> Result<CheckReport> {
        Ok(check::check(self))
    }

    fn writes_in_place(&self) -> bool {
        self.footer.disk_type != DiskType::Differencing
    }

    fn into_mut_device(self: Arc<Self>) -> Option<Arc<dyn BlockDeviceMut>> {
        self.mut_device()
    }

    fn backing(&self) -> Option<&Arc<dyn Image>> {
        self.parent.as_ref().and_then(|p| p.image.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd::header::tests::footer_bytes;

    fn copy(place: Place, offset: u64, bytes: [u8; FOOTER_SIZE]) -> FooterCopy {
        FooterCopy {
            place,
            offset,
            bytes,
            parsed: has_footer_cookie(&bytes).then(|| parse_footer(&bytes, offset)),
        }
    }

    fn corrupted(mut bytes: [u8; FOOTER_SIZE]) -> [u8; FOOTER_SIZE] {
        bytes[48] ^= 1; // current size changed after checksumming
        bytes
    }

    fn dynamic() -> [u8; FOOTER_SIZE] {
        footer_bytes(3, b"qemu", 104448, (3, 4, 17))
    }

    #[test]
    fn footer_at_the_end_is_preferred() {
        let copies = [
            copy(Place::End, 0x5000, dynamic()),
            copy(Place::Start, 0, dynamic()),
        ];
        assert_eq!(choose_footer(&copies, 0x5200).unwrap(), 0);
    }

    #[test]
    fn bad_footer_at_the_end_falls_back_to_the_valid_copy_at_zero() {
        let copies = [
            copy(Place::End, 0x5000, corrupted(dynamic())),
            copy(Place::Start, 0, dynamic()),
        ];
        assert_eq!(choose_footer(&copies, 0x5200).unwrap(), 1);
    }

    #[test]
    fn both_footer_copies_bad_is_an_error_naming_the_end_copy() {
        let copies = [
            copy(Place::End, 0x5000, corrupted(dynamic())),
            copy(Place::Start, 0, corrupted(dynamic())),
        ];
        let err = choose_footer(&copies, 0x5200).unwrap_err().to_string();
        assert!(
            err.contains("corrupt VHD footer at offset 0x5040: checksum"),
            "{err}"
        );
    }

    #[test]
    fn copy_at_zero_of_a_fixed_disk_is_not_trusted() {
        let fixed = footer_bytes(2, b"qemu", 104448, (3, 4, 17));
        let copies = [
            copy(Place::End, 0x5000, [0; FOOTER_SIZE]),
            copy(Place::Start, 0, fixed),
        ];
        let err = choose_footer(&copies, 0x5200).unwrap_err().to_string();
        assert!(err.contains("describes a fixed disk"), "{err}");
    }

    #[test]
    fn no_cookie_anywhere_is_an_error() {
        let copies = [
            copy(Place::End, 0x5000, [0; FOOTER_SIZE]),
            copy(Place::Start, 0, [0; FOOTER_SIZE]),
        ];
        let err = choose_footer(&copies, 0x5200).unwrap_err().to_string();
        assert!(err.contains("no \"conectix\" cookie"), "{err}");
    }

    #[test]
    fn valid_copy_wins_over_one_checksummed_without_its_unique_id() {
        let mut stamped = dynamic();
        stamped[68..84].fill(0);
        let sum = header::checksum(&stamped, 64);
        stamped[64..68].copy_from_slice(&sum.to_be_bytes());
        stamped[68..84].fill(0x77);
        let copies = [
            copy(Place::End, 0x5000, stamped),
            copy(Place::Start, 0, dynamic()),
        ];
        assert_eq!(choose_footer(&copies, 0x5200).unwrap(), 1);
    }

    #[test]
    fn probe_scores_a_valid_footer_at_the_end_highest() {
        let mut tail = vec![0u8; 1024];
        tail[512..].copy_from_slice(&footer_bytes(2, b"win ", 512, (1, 1, 1)));
        let probe = Probe {
            head: &[0; 512],
            tail: &tail,
            file_len: 1024,
        };
        assert_eq!(VhdDriver.probe(&probe), 100);
        let broken = corrupted(footer_bytes(2, b"win ", 512, (1, 1, 1)));
        tail[512..].copy_from_slice(&broken);
        let probe = Probe {
            head: &[0; 512],
            tail: &tail,
            file_len: 1024,
        };
        assert_eq!(VhdDriver.probe(&probe), 60);
    }
}
