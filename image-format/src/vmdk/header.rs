//! Pure parsing of the binary VMDK structures: the hosted sparse extent header (KDMV), the ESX
//! vmfsSparse header (COWD), and stream-optimized markers. No I/O; every error names the
//! structure and its absolute file offset.
//!
//! # Hosted sparse extent header (512 bytes, little-endian; "Virtual Disk Format 5.0")
//!
//! | off | size | field              | meaning                                                |
//! |----:|-----:|--------------------|--------------------------------------------------------|
//! |   0 |    4 | magicNumber        | `KDMV`                                                 |
//! |   4 |    4 | version            | 1, 2 (zeroed-grain GTEs), 3 (stream-optimized)         |
//! |   8 |    4 | flags              | see the `FLAG_*` constants                             |
//! |  12 |    8 | capacity           | sectors                                                |
//! |  20 |    8 | grainSize          | sectors                                                |
//! |  28 |    8 | descriptorOffset   | sector of the embedded descriptor (0: none)            |
//! |  36 |    8 | descriptorSize     | sectors                                                |
//! |  44 |    4 | numGTEsPerGT       | entries per grain table (512)                          |
//! |  48 |    8 | rgdOffset          | sector of the redundant grain directory                |
//! |  56 |    8 | gdOffset           | sector of the grain directory, or [`GD_AT_END`]        |
//! |  64 |    8 | overHead           | sectors of metadata before the first grain             |
//! |  72 |    1 | uncleanShutdown    |                                                        |
//! |  73 |    4 | newline test chars | `\n`, ` `, `\r`, `\n` (detects text-mode transfers)    |
//! |  77 |    2 | compressAlgorithm  | 0 none, 1 deflate                                      |
//!
//! # COWD header (ESX 3 "vmfsSparse" redo log, little-endian, 2048 bytes)
//!
//! | off | size | field        |
//! |----:|-----:|--------------|
//! |   0 |    4 | magic `COWD` |
//! |   4 |    4 | version (1)  |
//! |   8 |    4 | flags        |
//! |  12 |    4 | numSectors   |
//! |  16 |    4 | grainSize    |
//! |  20 |    4 | gdOffset     |
//! |  24 |    4 | numGDEntries |
//! |  28 |    4 | freeSector   |
//!
//! Its grain tables always hold [`COWD_GTES_PER_GT`] entries.

use crate::bytes::Fields;
use crate::error::{Error, Result};

/// Magic of a hosted sparse extent: the bytes `KDMV` ("VMDK" as a little-endian u32).
pub const SPARSE_MAGIC: [u8; 4] = *b"KDMV";
/// Magic of an ESX 3 sparse extent (vmfsSparse redo log): the bytes `COWD` ("copy on write disk").
pub const COWD_MAGIC: [u8; 4] = *b"COWD";
/// `gdOffset` value meaning "the grain directory is found through the footer at the end of the
/// file" (stream-optimized disks written by VMware).
pub const GD_AT_END: u64 = u64::MAX;
/// Bytes per sector: every VMDK offset and size is in 512-byte sectors.
pub const SECTOR: u64 = 512;

/// Flag: the newline test characters are valid and must be checked.
pub const FLAG_VALID_NEWLINE_TEST: u32 = 1 << 0;
/// Flag: a redundant grain directory and redundant grain tables exist.
pub const FLAG_REDUNDANT_GT: u32 = 1 << 1;
/// Flag: a grain table entry of 1 means "grain reads as zeros" (zeroed-grain GTE).
pub const FLAG_ZEROED_GRAIN_GTE: u32 = 1 << 2;
/// Flag: grains are compressed (stream-optimized).
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: the file holds markers (grain markers with lba/size, metadata markers).
pub const FLAG_MARKERS: u32 = 1 << 17;

/// `compressAlgorithm` value for deflate (zlib streams).
pub const COMPRESSION_DEFLATE: u16 = 1;
/// The grain table entry meaning "zeroed grain" when [`FLAG_ZEROED_GRAIN_GTE`] is set.
pub const GTE_ZEROED: u32 = 1;

/// Metadata marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Metadata marker type: a grain table follows.
pub const MARKER_GT: u32 = 1;
/// Metadata marker type: a grain directory follows.
pub const MARKER_GD: u32 = 2;
/// Metadata marker type: the footer (a copy of the header) follows.
pub const MARKER_FOOTER: u32 = 3;

/// Entries per grain table of a COWD extent (fixed by the format).
pub const COWD_GTES_PER_GT: u32 = 4096;

/// Largest guest capacity accepted, in bytes (64 TiB; VMware's own limit is 62 TiB).
pub const MAX_CAPACITY: u64 = 64 << 40;
/// Largest grain accepted, in sectors (16 MiB; VMware writes 64 KiB, ESX redo logs 512 B).
pub const MAX_GRAIN_SECTORS: u64 = 32 * 1024;
/// Most entries in one grain table (VMware writes 512, COWD has 4096).
pub const MAX_GTES_PER_GT: u32 = 4096;
/// Most grain directory entries (16 MiB of directory; 64 TiB of 64 KiB grains needs 2 Mi).
pub const MAX_GD_ENTRIES: u64 = 4 << 20;

/// Which family of sparse extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparseKind {
    /// Hosted sparse extent (`KDMV`), including stream-optimized.
    Hosted,
    /// ESX 3 redo log (`COWD`).
    Cowd,
}

/// The validated geometry of a sparse extent, whatever its family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseHeader {
    /// Family.
    pub kind: SparseKind,
    /// Format version.
    pub version: u32,
    /// Raw flags (hosted) or COWD flags.
    pub flags: u32,
    /// Capacity in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_sectors: u64,
    /// Embedded descriptor sector and size in sectors (0, 0: none).
    pub descriptor_offset: u64,
    /// Embedded descriptor size in sectors.
    pub descriptor_size: u64,
    /// Entries per grain table.
    pub gtes_per_gt: u32,
    /// Redundant grain directory sector (0: none).
    pub rgd_offset: u64,
    /// Grain directory sector, possibly [`GD_AT_END`] in a header (never in a footer).
    pub gd_offset: u64,
    /// Grain directory entries declared (COWD) or derived from capacity (hosted).
    pub gd_entries: u64,
    /// Metadata sectors before the first grain.
    pub overhead: u64,
    /// The disk was not closed cleanly.
    pub unclean_shutdown: bool,
    /// `compressAlgorithm`.
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// Grain size in bytes.
    pub fn grain_size(&self) -> u64 {
        self.grain_sectors * SECTOR
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR
    }

    /// Grains are compressed.
    pub fn compressed(&self) -> bool {
        self.kind == SparseKind::Hosted && self.flags & FLAG_COMPRESSED != 0
    }

    /// Grains and metadata carry markers.
    pub fn markers(&self) -> bool {
        self.kind == SparseKind::Hosted && self.flags & FLAG_MARKERS != 0
    }

    /// A GTE of [`GTE_ZEROED`] means a zero grain.
    pub fn zeroed_grain_gte(&self) -> bool {
        self.kind == SparseKind::Hosted && self.flags & FLAG_ZEROED_GRAIN_GTE != 0
    }

    /// Bytes of guest space one grain table covers.
    pub fn gt_coverage(&self) -> u64 {
        self.grain_size() * u64::from(self.gtes_per_gt)
    }

    /// Bytes of one grain table on disk.
    pub fn gt_bytes(&self) -> usize {
        self.gtes_per_gt as usize * 4
    }

    /// The redundant grain directory, when the flags say there is one.
    pub fn redundant_gd(&self) -> Option<u64> {
        (self.kind == SparseKind::Hosted
            && self.flags & FLAG_REDUNDANT_GT != 0
            && self.rgd_offset != 0)
            .then_some(self.rgd_offset)
    }
}

/// Parses and validates a hosted sparse extent header read from byte `base` of its file (the
/// start of the file, or the footer near its end). `GD_AT_END` is accepted here; the caller
/// then reads the footer.
pub fn parse_hosted(buf: &[u8], base: u64) -> Result<SparseHeader> {
    const S: &str = "sparse extent header";
    let f = Fields::new(buf, S, base);
    if f.array::<4>(0)? != SPARSE_MAGIC {
        return Err(f.error(0, "magic is not KDMV"));
    }
    let version = f.u32_le(4)?;
    if !(1..=3).contains(&version) {
        return Err(Error::Unsupported {
            path: Default::default(),
            what: format!("sparse extent header version {version} (at offset {base:#x})"),
        });
    }
    let flags = f.u32_le(8)?;
    let capacity = f.u64_le(12)?;
    let grain_sectors = f.u64_le(20)?;
    let descriptor_offset = f.u64_le(28)?;
    let descriptor_size = f.u64_le(36)?;
    let gtes_per_gt = f.u32_le(44)?;
    let rgd_offset = f.u64_le(48)?;
    let gd_offset = f.u64_le(56)?;
    let overhead = f.u64_le(64)?;
    let unclean_shutdown = f.u8(72)? != 0;
    let newline = f.array::<4>(73)?;
    let compress_algorithm = f.u16_le(77)?;
    if flags & FLAG_COMPRESSED != 0 && compress_algorithm != COMPRESSION_DEFLATE {
        return Err(Error::unsupported(format!(
            "compression algorithm {compress_algorithm} (at offset {:#x})",
            base + 77
        )));
    }
    let header = SparseHeader {
        kind: SparseKind::Hosted,
        version,
        flags,
        capacity,
        grain_sectors,
        descriptor_offset,
        descriptor_size,
        gtes_per_gt,
        rgd_offset,
        gd_offset,
        gd_entries: 0,
        overhead,
        unclean_shutdown,
        compress_algorithm,
    };
    // Geometry first: a size problem says more than a damaged newline test.
    let header = finish_geometry(header, &f, 12, 20, 44)?;
    if flags & FLAG_VALID_NEWLINE_TEST != 0 && newline != *b"\n \r\n" {
        return Err(f.error(
            73,
            "newline test characters damaged (file transferred in text mode?)",
        ));
    }
    Ok(header)
}

/// Parses and validates a COWD header read from byte `base` of its file.
pub fn parse_cowd(buf: &[u8], base: u64) -> Result<SparseHeader> {
    let f = Fields::new(buf, "COWD header", base);
    if f.array::<4>(0)? != COWD_MAGIC {
        return Err(f.error(0, "magic is not COWD"));
    }
    let version = f.u32_le(4)?;
    if version != 1 {
        return Err(Error::unsupported(format!(
            "COWD version {version} (at offset {base:#x})"
        )));
    }
    let flags = f.u32_le(8)?;
    let capacity = u64::from(f.u32_le(12)?);
    let grain_sectors = u64::from(f.u32_le(16)?);
    let gd_offset = u64::from(f.u32_le(20)?);
    let gd_entries = u64::from(f.u32_le(24)?);
    let header = SparseHeader {
        kind: SparseKind::Cowd,
        version,
        flags,
        capacity,
        grain_sectors,
        descriptor_offset: 0,
        descriptor_size: 0,
        gtes_per_gt: COWD_GTES_PER_GT,
        rgd_offset: 0,
        gd_offset,
        gd_entries,
        overhead: 0,
        unclean_shutdown: false,
        compress_algorithm: 0,
    };
    let mut h = finish_geometry(header, &f, 12, 16, 0)?;
    if gd_entries > MAX_GD_ENTRIES {
        return Err(f.error(
            24,
            format!("{gd_entries} grain directory entries, more than the {MAX_GD_ENTRIES} limit"),
        ));
    }
    h.gd_entries = gd_entries;
    Ok(h)
}

/// Checks capacity, grain size and table size against the caps and derives the number of grain
/// directory entries the capacity needs.
fn finish_geometry(
    mut h: SparseHeader,
    f: &Fields<'_>,
    capacity_at: usize,
    grain_at: usize,
    gtes_at: usize,
) -> Result<SparseHeader> {
    if h.capacity > MAX_CAPACITY / SECTOR {
        return Err(f.error(
            capacity_at,
            format!(
                "capacity of {} sectors exceeds the {} TiB limit",
                h.capacity,
                MAX_CAPACITY >> 40
            ),
        ));
    }
    if h.grain_sectors == 0 || h.grain_sectors > MAX_GRAIN_SECTORS {
        return Err(f.error(
            grain_at,
            format!(
                "grain size of {} sectors outside 1..={MAX_GRAIN_SECTORS}",
                h.grain_sectors
            ),
        ));
    }
    if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES_PER_GT {
        return Err(f.error(
            gtes_at,
            format!(
                "{} entries per grain table outside 1..={MAX_GTES_PER_GT}",
                h.gtes_per_gt
            ),
        ));
    }
    // Both factors are capped above, so the product cannot overflow.
    let coverage = h.grain_sectors * u64::from(h.gtes_per_gt);
    let needed = h.capacity.div_ceil(coverage);
    if needed > MAX_GD_ENTRIES {
        return Err(f.error(
            capacity_at,
            format!(
                "grain directory of {needed} entries (capacity {} sectors, grain {} sectors) \
                 exceeds the {MAX_GD_ENTRIES}-entry limit",
                h.capacity, h.grain_sectors
            ),
        ));
    }
    h.gd_entries = needed;
    Ok(h)
}

/// A stream-optimized marker read from one sector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    /// A compressed grain: guest sector `lba`, `size` bytes of deflate data after the 12-byte
    /// marker head.
    Grain { lba: u64, size: u32 },
    /// A metadata marker: `sectors` sectors of metadata of `kind` (`MARKER_*`) follow.
    Metadata { sectors: u64, kind: u32 },
}

/// Parses a marker (at least 16 bytes) read from byte `base`.
pub fn parse_marker(buf: &[u8], base: u64) -> Result<Marker> {
    let f = Fields::new(buf, "stream marker", base);
    let value = f.u64_le(0)?;
    let size = f.u32_le(8)?;
    if size != 0 {
        return Ok(Marker::Grain { lba: value, size });
    }
    Ok(Marker::Metadata {
        sectors: value,
        kind: f.u32_le(12)?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A hosted sparse header: 16 MiB capacity (32768 sectors), 64 KiB grains (128 sectors),
    /// 512 GTEs per GT, descriptor at sector 1 (20 sectors), rgd at 21, gd at 22.
    pub(crate) fn hosted_header(flags: u32, capacity: u64, gd_offset: u64) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[0..4].copy_from_slice(b"KDMV"); // magicNumber
        h[4..8].copy_from_slice(&1u32.to_le_bytes()); // version
        h[8..12].copy_from_slice(&flags.to_le_bytes()); // flags
        h[12..20].copy_from_slice(&capacity.to_le_bytes()); // capacity (sectors)
        h[20..28].copy_from_slice(&128u64.to_le_bytes()); // grainSize (sectors)
        h[28..36].copy_from_slice(&1u64.to_le_bytes()); // descriptorOffset
        h[36..44].copy_from_slice(&20u64.to_le_bytes()); // descriptorSize
        h[44..48].copy_from_slice(&512u32.to_le_bytes()); // numGTEsPerGT
        h[48..56].copy_from_slice(&21u64.to_le_bytes()); // rgdOffset
        h[56..64].copy_from_slice(&gd_offset.to_le_bytes()); // gdOffset
        h[64..72].copy_from_slice(&128u64.to_le_bytes()); // overHead
        h[73..77].copy_from_slice(b"\n \r\n"); // newline test
        h
    }

    #[test]
    fn hosted_header_geometry_is_derived() {
        let h = parse_hosted(
            &hosted_header(FLAG_VALID_NEWLINE_TEST | FLAG_REDUNDANT_GT, 32768, 22),
            0,
        )
        .unwrap();
        assert_eq!(h.grain_size(), 65536);
        assert_eq!(h.gt_coverage(), 32 << 20);
        assert_eq!(h.gd_entries, 1);
        assert_eq!(h.redundant_gd(), Some(21));
        assert!(!h.compressed());
    }

    #[test]
    fn damaged_newline_test_is_reported_at_its_offset() {
        let mut raw = hosted_header(FLAG_VALID_NEWLINE_TEST, 32768, 22);
        raw[75] = b'\n'; // a text-mode transfer turned \r\n into \n
        let err = parse_hosted(&raw, 0).unwrap_err().to_string();
        assert!(
            err.starts_with("corrupt sparse extent header at offset 0x49"),
            "{err}"
        );
    }

    #[test]
    fn huge_capacity_is_refused_before_any_allocation() {
        let err = parse_hosted(&hosted_header(0, u64::MAX / 2, 22), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("capacity"), "{err}");
    }

    #[test]
    fn zero_grain_size_and_zero_gtes_are_refused() {
        let mut raw = hosted_header(0, 32768, 22);
        raw[20..28].fill(0);
        assert!(parse_hosted(&raw, 0).is_err());
        let mut raw = hosted_header(0, 32768, 22);
        raw[44..48].fill(0);
        assert!(parse_hosted(&raw, 0).is_err());
    }

    #[test]
    fn tiny_grains_over_a_large_disk_exceed_the_directory_cap() {
        let mut raw = hosted_header(0, MAX_CAPACITY / SECTOR, 22);
        raw[20..28].copy_from_slice(&1u64.to_le_bytes());
        raw[44..48].copy_from_slice(&1u32.to_le_bytes());
        let err = parse_hosted(&raw, 0).unwrap_err().to_string();
        assert!(err.contains("grain directory of"), "{err}");
    }

    #[test]
    fn compressed_with_unknown_algorithm_is_unsupported() {
        let mut raw = hosted_header(FLAG_COMPRESSED, 32768, 22);
        raw[77..79].copy_from_slice(&7u16.to_le_bytes());
        assert!(matches!(
            parse_hosted(&raw, 0),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn cowd_header_parses() {
        let mut raw = [0u8; 2048];
        raw[0..4].copy_from_slice(b"COWD"); // magic
        raw[4..8].copy_from_slice(&1u32.to_le_bytes()); // version
        raw[8..12].copy_from_slice(&3u32.to_le_bytes()); // flags
        raw[12..16].copy_from_slice(&8192u32.to_le_bytes()); // numSectors
        raw[16..20].copy_from_slice(&1u32.to_le_bytes()); // grainSize
        raw[20..24].copy_from_slice(&4u32.to_le_bytes()); // gdOffset
        raw[24..28].copy_from_slice(&2u32.to_le_bytes()); // numGDEntries
        let h = parse_cowd(&raw, 0).unwrap();
        assert_eq!(h.kind, SparseKind::Cowd);
        assert_eq!(h.gtes_per_gt, 4096);
        assert_eq!(h.gd_entries, 2);
        assert_eq!(h.gt_coverage(), 4096 * 512);
    }

    #[test]
    fn markers_parse_as_grain_or_metadata() {
        let mut s = [0u8; 512];
        s[0..8].copy_from_slice(&256u64.to_le_bytes());
        s[8..12].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            parse_marker(&s, 0).unwrap(),
            Marker::Grain {
                lba: 256,
                size: 1000
            }
        );
        let mut s = [0u8; 512];
        s[0..8].copy_from_slice(&1u64.to_le_bytes());
        s[12..16].copy_from_slice(&MARKER_FOOTER.to_le_bytes());
        assert_eq!(
            parse_marker(&s, 0).unwrap(),
            Marker::Metadata {
                sectors: 1,
                kind: MARKER_FOOTER
            }
        );
    }
}
