//! Pure parsing of the qcow2 header, its extensions and the snapshot table entries.
//!
//! Nothing here does I/O: every function takes the bytes of one structure and the file offset
//! they came from, so errors name the absolute offset. Layouts follow qemu's
//! `docs/interop/qcow2.rst` ("Header", "Header extensions", "Snapshots", "Bitmaps").

use crate::bytes::Fields;
use crate::error::{Error, Result};

/// "QFI\xfb": the first four bytes of every qcow2 file (spec: header bytes 0-3, "magic").
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of a version 2 header; also the offset of the first v3-only field.
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest valid `header_length` of a version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Offset of the `compression_type` byte, present when `header_length` > 104.
const COMPRESSION_TYPE_OFFSET: usize = 104;
/// Bytes of the header fields this parser reads before it knows the cluster size.
pub const HEADER_PREFIX_LEN: usize = 112;

/// Smallest cluster size qemu accepts: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size qemu accepts: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Cap on L1 entries (32 MiB of table, qemu's limit too): sizes the L1 allocation at open.
pub const MAX_L1_ENTRIES: u32 = 4 * 1024 * 1024;
/// Cap on the refcount table (8 MiB, qemu's limit).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Cap on internal snapshots (qemu's limit).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Cap on the bytes of the whole snapshot table.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Cap on one snapshot entry's extra data (qemu's limit).
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Cap on the recorded backing file name (qemu's limit).
pub const MAX_BACKING_NAME_LEN: u32 = 1023;
/// Cap on the length of a name in the snapshot table or bitmap directory.
pub const MAX_NAME_LEN: u16 = 1023;
/// Cap on the number of persistent bitmaps (qemu's limit).
pub const MAX_BITMAPS: u32 = 65535;
/// Cap on the bitmap directory (qemu's limit: 1 KiB per bitmap).
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 64 << 20;
/// Largest refcount_order: 64-bit refcounts.
pub const MAX_REFCOUNT_ORDER: u32 = 6;

/// Incompatible feature bit 0: the image was not closed cleanly; refcounts may be stale.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: qemu found the metadata corrupt; open read-only only.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression_type header field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: L2 entries are 128 bits with 32 subclusters per cluster.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this reader knows.
pub const KNOWN_INCOMPAT: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0: lazy refcounts (refcounts updated only on clean close).
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension type 0: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension "backing file format name" (spec magic 0xe2792aca).
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension "feature name table" (spec magic 0x6803f857).
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Header extension "bitmaps" (spec magic 0x23852875).
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension "full disk encryption header pointer" (spec magic 0x0537be77).
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension "external data file name" (spec magic 0x44415441, "DATA").
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Bytes of one feature name table entry: type, bit, 46-byte name.
const FEATURE_NAME_ENTRY: usize = 48;
/// Cap on the data of one known header extension (the feature name table of all 192
/// possible bits is 9 KiB; names are short). Unknown extensions are skipped, never read.
pub const MAX_HEADER_EXTENSION_LEN: usize = 64 << 10;
/// Fixed part of a snapshot table entry.
pub const SNAPSHOT_FIXED_LEN: usize = 40;
/// Fixed part of a bitmap directory entry.
pub const BITMAP_FIXED_LEN: usize = 24;

/// How compressed clusters are compressed (header byte 104).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// 0: raw deflate (no zlib header), window of 4 KiB.
    Zlib,
    /// 1: zstd frames.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img info prints.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// The fixed header fields, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// True when L2 entries are 128-bit with subclusters.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Guest clusters mapped by one L2 table.
    pub fn l2_entries(&self) -> u64 {
        let entry = if self.extended_l2() { 16 } else { 8 };
        self.cluster_size() / entry
    }

    /// Bits per refcount.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
}

/// Reads `cluster_bits` from the header prefix, so the caller knows how much to read next.
pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32> {
    let f = Fields::new(buf, "qcow2 header", 0);
    if f.array::<4>(0)? != MAGIC {
        return Err(f.error(0, "bad magic (not a qcow2 image)"));
    }
    let bits = f.u32_be(20)?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(f.error(
            20,
            format!("cluster_bits {bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"),
        ));
    }
    Ok(bits)
}

/// Parses and validates the header from `buf`, the first cluster of the file (or the whole file
/// when it is shorter). Feature bits are checked later, once the feature name table is known.
pub fn parse_header(buf: &[u8]) -> Result<Header> {
    let f = Fields::new(buf, "qcow2 header", 0);
    let cluster_bits = peek_cluster_bits(buf)?;
    let version = f.u32_be(4)?;
    if version != 2 && version != 3 {
        return Err(Error::unsupported(format!("qcow2 version {version}")));
    }
    let mut h = Header {
        version,
        backing_file_offset: f.u64_be(8)?,
        backing_file_size: f.u32_be(16)?,
        cluster_bits,
        size: f.u64_be(24)?,
        crypt_method: f.u32_be(32)?,
        l1_size: f.u32_be(36)?,
        l1_table_offset: f.u64_be(40)?,
        refcount_table_offset: f.u64_be(48)?,
        refcount_table_clusters: f.u32_be(56)?,
        nb_snapshots: f.u32_be(60)?,
        snapshots_offset: f.u64_be(64)?,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: V2_HEADER_LEN,
        compression_type: CompressionType::Zlib,
    };
    let cluster_size = h.cluster_size();
    if version == 3 {
        h.incompatible_features = f.u64_be(72)?;
        h.compatible_features = f.u64_be(80)?;
        h.autoclear_features = f.u64_be(88)?;
        h.refcount_order = f.u32_be(96)?;
        h.header_length = f.u32_be(100)?;
        if h.header_length < V3_MIN_HEADER_LEN || u64::from(h.header_length) > cluster_size {
            return Err(f.error(100, format!("header_length {} invalid", h.header_length)));
        }
        if h.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(f.error(96, format!("refcount_order {} > 6", h.refcount_order)));
        }
        if h.header_length > COMPRESSION_TYPE_OFFSET as u32 {
            h.compression_type = match f.u8(COMPRESSION_TYPE_OFFSET)? {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                other => {
                    return Err(Error::unsupported(format!(
                        "qcow2 compression type {other}"
                    )));
                }
            };
        }
        let flagged = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
        if flagged != (h.compression_type != CompressionType::Zlib) {
            return Err(f.error(
                72,
                "compression type and incompatible feature bit 3 disagree",
            ));
        }
    }
    if h.crypt_method != 0 {
        return Err(Error::unsupported(format!(
            "encrypted qcow2 images (crypt_method {})",
            h.crypt_method
        )));
    }
    let aligned = |v: u64| v & (cluster_size - 1) == 0;
    if h.l1_size > MAX_L1_ENTRIES {
        return Err(f.error(
            36,
            format!(
                "L1 table of {} entries exceeds the cap {MAX_L1_ENTRIES}",
                h.l1_size
            ),
        ));
    }
    // The L1 table must cover the whole virtual disk.
    let bytes_per_l1 = h.l2_entries().saturating_mul(cluster_size);
    let needed = h.size.div_ceil(bytes_per_l1);
    if needed > u64::from(h.l1_size) {
        return Err(f.error(
            36,
            format!(
                "L1 table of {} entries cannot map the {}-byte disk ({needed} needed)",
                h.l1_size, h.size
            ),
        ));
    }
    if h.l1_size > 0 && (!aligned(h.l1_table_offset) || h.l1_table_offset == 0) {
        return Err(f.error(
            40,
            format!("L1 table offset {:#x} invalid", h.l1_table_offset),
        ));
    }
    if !aligned(h.refcount_table_offset) || h.refcount_table_offset == 0 {
        return Err(f.error(
            48,
            format!(
                "refcount table offset {:#x} invalid",
                h.refcount_table_offset
            ),
        ));
    }
    let rt_bytes = u64::from(h.refcount_table_clusters).saturating_mul(cluster_size);
    if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
        return Err(f.error(
            56,
            format!(
                "refcount table of {rt_bytes} bytes exceeds the cap {MAX_REFCOUNT_TABLE_BYTES}"
            ),
        ));
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(f.error(
            60,
            format!(
                "{} snapshots exceed the cap {MAX_SNAPSHOTS}",
                h.nb_snapshots
            ),
        ));
    }
    if h.nb_snapshots > 0 && !aligned(h.snapshots_offset) {
        return Err(f.error(
            64,
            format!("snapshot table offset {:#x} unaligned", h.snapshots_offset),
        ));
    }
    if h.backing_file_offset != 0 {
        if h.backing_file_size > MAX_BACKING_NAME_LEN {
            return Err(f.error(
                16,
                format!(
                    "backing file name of {} bytes is too long",
                    h.backing_file_size
                ),
            ));
        }
        if h.backing_file_offset > cluster_size {
            return Err(f.error(
                8,
                format!(
                    "backing file name offset {:#x} past the first cluster",
                    h.backing_file_offset
                ),
            ));
        }
    }
    Ok(h)
}

/// The bitmaps header extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// A feature named in the feature name table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// What the header extensions say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    pub backing_format: Option<String>,
    pub feature_names: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExtension>,
    pub data_file: Option<String>,
    /// Offset and length of the encryption header.
    pub crypto: Option<(u64, u64)>,
}

/// Parses the header extensions in `cluster0[start..limit]` (`start` is the header length,
/// `limit` the end of the first cluster or the backing file name, whichever comes first).
pub fn parse_extensions(cluster0: &[u8], start: usize, limit: usize) -> Result<Extensions> {
    let limit = limit.min(cluster0.len());
    let f = Fields::new(cluster0, "qcow2 header extension", 0);
    let mut ext = Extensions::default();
    let mut at = start;
    // Each step advances by at least 8 bytes, so the loop ends.
    while at.checked_add(8).is_some_and(|end| end <= limit) {
        let kind = f.u32_be(at)?;
        let len = f.u32_be(at + 4)? as usize;
        if kind == EXT_END {
            break;
        }
        let data_at = at + 8;
        let padded = len.div_ceil(8).saturating_mul(8);
        if data_at.saturating_add(len) > limit {
            return Err(f.error(
                at,
                format!("extension {kind:#x} of {len} bytes overruns the header area"),
            ));
        }
        let known = matches!(
            kind,
            EXT_BACKING_FORMAT | EXT_DATA_FILE | EXT_FEATURE_NAMES | EXT_BITMAPS | EXT_CRYPTO
        );
        if known && len > MAX_HEADER_EXTENSION_LEN {
            return Err(f.error(
                at,
                format!(
                    "extension {kind:#x} of {len} bytes exceeds the cap {MAX_HEADER_EXTENSION_LEN}"
                ),
            ));
        }
        let data = f.slice(data_at, len)?;
        let d = Fields::new(data, "qcow2 header extension", data_at as u64);
        match kind {
            EXT_BACKING_FORMAT => ext.backing_format = Some(text(data, &d)?),
            EXT_DATA_FILE => ext.data_file = Some(text(data, &d)?),
            EXT_FEATURE_NAMES => {
                for entry in data.chunks_exact(FEATURE_NAME_ENTRY) {
                    let name_bytes = entry.get(2..).unwrap_or_default();
                    let end = name_bytes
                        .iter()
                        .position(|&b| b == 0)
                        .unwrap_or(name_bytes.len());
                    ext.feature_names.push(FeatureName {
                        kind: entry.first().copied().unwrap_or_default(),
                        bit: entry.get(1).copied().unwrap_or_default(),
                        name: String::from_utf8_lossy(name_bytes.get(..end).unwrap_or_default())
                            .into_owned(),
                    });
                }
            }
            EXT_BITMAPS => {
                ext.bitmaps = Some(BitmapsExtension {
                    nb_bitmaps: d.u32_be(0)?,
                    directory_size: d.u64_be(8)?,
                    directory_offset: d.u64_be(16)?,
                });
            }
            EXT_CRYPTO => ext.crypto = Some((d.u64_be(0)?, d.u64_be(8)?)),
            _ => {} // Unknown extensions are ignored, as the spec requires.
        }
        at = data_at.saturating_add(padded);
    }
    Ok(ext)
}

fn text(data: &[u8], f: &Fields<'_>) -> Result<String> {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8(data.get(..end).unwrap_or_default().to_vec())
        .map_err(|_| f.error(0, "name is not UTF-8"))
}

/// Refuses unknown incompatible features (naming them, with the image's own names for them when
/// its feature name table has them) and the external data file feature.
pub fn check_features(h: &Header, ext: &Extensions) -> Result<()> {
    let unknown = h.incompatible_features & !KNOWN_INCOMPAT;
    if unknown != 0 {
        let names: Vec<String> = (0..64u8)
            .filter(|bit| unknown & (1u64 << bit) != 0)
            .map(|bit| {
                match ext
                    .feature_names
                    .iter()
                    .find(|n| n.kind == 0 && n.bit == bit)
                {
                    Some(n) => format!("bit {bit} ({})", n.name),
                    None => format!("bit {bit}"),
                }
            })
            .collect();
        return Err(Error::unsupported(format!(
            "qcow2 incompatible features {unknown:#x}: {}",
            names.join(", ")
        )));
    }
    if h.incompatible_features & INCOMPAT_DATA_FILE != 0 || ext.data_file.is_some() {
        let name = ext.data_file.as_deref().unwrap_or("(unnamed)");
        return Err(Error::unsupported(format!(
            "qcow2 external data file {name:?}"
        )));
    }
    if ext.crypto.is_some() {
        return Err(Error::unsupported(
            "encrypted qcow2 images (encryption header present)",
        ));
    }
    Ok(())
}

/// One internal snapshot's table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    pub icount: Option<u64>,
}

/// Sizes of the variable parts of a snapshot entry, from its fixed 40 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotSizes {
    pub extra: u32,
    pub id: u16,
    pub name: u16,
}

impl SnapshotSizes {
    /// Bytes of the variable part (extra data, id, name).
    pub fn variable_len(self) -> usize {
        self.extra as usize + usize::from(self.id) + usize::from(self.name)
    }

    /// Bytes of the whole entry with its padding.
    pub fn entry_len(self) -> u64 {
        ((SNAPSHOT_FIXED_LEN + self.variable_len()) as u64).div_ceil(8) * 8
    }
}

/// Validates the fixed part of a snapshot entry read at `base` and returns its variable sizes.
pub fn snapshot_sizes(fixed: &[u8], base: u64) -> Result<SnapshotSizes> {
    let f = Fields::new(fixed, "qcow2 snapshot table", base);
    let s = SnapshotSizes {
        id: f.u16_be(12)?,
        name: f.u16_be(14)?,
        extra: f.u32_be(36)?,
    };
    if s.extra > MAX_SNAPSHOT_EXTRA_DATA {
        return Err(f.error(
            36,
            format!("extra data of {} bytes exceeds the cap", s.extra),
        ));
    }
    if s.id > MAX_NAME_LEN || s.name > MAX_NAME_LEN {
        return Err(f.error(12, "snapshot id or name too long"));
    }
    Ok(s)
}

/// Parses one snapshot entry: `entry` holds the fixed part followed by the variable part.
pub fn parse_snapshot(entry: &[u8], base: u64, cluster_size: u64) -> Result<Snapshot> {
    let f = Fields::new(entry, "qcow2 snapshot table", base);
    let sizes = snapshot_sizes(entry, base)?;
    let extra = f.slice(SNAPSHOT_FIXED_LEN, sizes.extra as usize)?;
    let x = Fields::new(
        extra,
        "qcow2 snapshot table",
        base + SNAPSHOT_FIXED_LEN as u64,
    );
    let id_at = SNAPSHOT_FIXED_LEN + sizes.extra as usize;
    let name_at = id_at + usize::from(sizes.id);
    let l1_table_offset = f.u64_be(0)?;
    let l1_size = f.u32_be(8)?;
    if l1_size > MAX_L1_ENTRIES {
        return Err(f.error(
            8,
            format!("snapshot L1 table of {l1_size} entries exceeds the cap"),
        ));
    }
    if l1_size > 0 && (l1_table_offset == 0 || l1_table_offset & (cluster_size - 1) != 0) {
        return Err(f.error(
            0,
            format!("snapshot L1 table offset {l1_table_offset:#x} invalid"),
        ));
    }
    let small_vm_state = u64::from(f.u32_be(32)?);
    Ok(Snapshot {
        l1_table_offset,
        l1_size,
        id: String::from_utf8_lossy(f.slice(id_at, usize::from(sizes.id))?).into_owned(),
        name: String::from_utf8_lossy(f.slice(name_at, usize::from(sizes.name))?).into_owned(),
        date_sec: f.u32_be(16)?,
        date_nsec: f.u32_be(20)?,
        vm_clock_nsec: f.u64_be(24)?,
        vm_state_size: x.u64_be(0).unwrap_or(small_vm_state),
        disk_size: x.u64_be(8).ok(),
        icount: x.u64_be(16).ok(),
    })
}

/// One persistent bitmap's directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name: String,
}

/// Parses a bitmap directory of `count` entries read from `base`.
pub fn parse_bitmap_directory(dir: &[u8], base: u64, count: u32) -> Result<Vec<Bitmap>> {
    let f = Fields::new(dir, "qcow2 bitmap directory", base);
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..count.min(MAX_BITMAPS) {
        let name_size = f.u16_be(at + 18)?;
        let extra = f.u32_be(at + 20)? as usize;
        if name_size == 0 || name_size > MAX_NAME_LEN {
            return Err(f.error(at + 18, format!("bitmap name of {name_size} bytes invalid")));
        }
        let name_at = (at + BITMAP_FIXED_LEN).saturating_add(extra);
        let name = f.slice(name_at, usize::from(name_size))?;
        out.push(Bitmap {
            table_offset: f.u64_be(at)?,
            table_size: f.u32_be(at + 8)?,
            flags: f.u32_be(at + 12)?,
            kind: f.u8(at + 16)?,
            granularity_bits: f.u8(at + 17)?,
            name: String::from_utf8_lossy(name).into_owned(),
        });
        let len = (BITMAP_FIXED_LEN + extra + usize::from(name_size)).div_ceil(8) * 8;
        at = at.saturating_add(len);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A v3 header: 64 KiB clusters, 1 GiB disk, L1 at 0x30000 (2 entries), refcount table at
    /// 0x10000 (1 cluster), no snapshots, header_length 112, zlib.
    pub(crate) fn v3_header() -> Vec<u8> {
        let mut h = vec![0u8; 112];
        h[0..4].copy_from_slice(&MAGIC); // magic
        h[4..8].copy_from_slice(&3u32.to_be_bytes()); // version
        h[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes()); // size
        h[36..40].copy_from_slice(&2u32.to_be_bytes()); // l1_size
        h[40..48].copy_from_slice(&0x30000u64.to_be_bytes()); // l1_table_offset
        h[48..56].copy_from_slice(&0x10000u64.to_be_bytes()); // refcount_table_offset
        h[56..60].copy_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
        h[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
        h[100..104].copy_from_slice(&112u32.to_be_bytes()); // header_length
        h
    }

    #[test]
    fn v3_header_parses() {
        let h = parse_header(&v3_header()).unwrap();
        assert_eq!(
            (h.version, h.cluster_size(), h.size, h.l1_size),
            (3, 65536, 1 << 30, 2)
        );
        assert_eq!(h.compression_type, CompressionType::Zlib);
        assert_eq!(h.l2_entries(), 8192);
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut b = v3_header();
        b[0] = b'X';
        assert!(
            parse_header(&b)
                .unwrap_err()
                .to_string()
                .contains("bad magic")
        );
    }

    #[test]
    fn cluster_bits_out_of_range_is_rejected() {
        let mut b = v3_header();
        b[20..24].copy_from_slice(&22u32.to_be_bytes());
        assert!(
            parse_header(&b)
                .unwrap_err()
                .to_string()
                .contains("cluster_bits 22")
        );
    }

    #[test]
    fn too_small_l1_is_a_corruption() {
        let mut b = v3_header();
        b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let err = parse_header(&b).unwrap_err();
        assert!(err.is_corruption(), "{err}");
    }

    #[test]
    fn huge_l1_is_refused_by_the_cap() {
        let mut b = v3_header();
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_header(&b).unwrap_err().to_string().contains("cap"));
    }

    #[test]
    fn zstd_compression_type_needs_the_feature_bit() {
        let mut b = v3_header();
        b[104] = 1;
        assert!(parse_header(&b).is_err());
        b[79] |= 1 << 3;
        assert_eq!(
            parse_header(&b).unwrap().compression_type,
            CompressionType::Zstd
        );
    }

    #[test]
    fn unknown_incompatible_bits_are_named() {
        let mut b = v3_header();
        b[79] |= 1 << 5;
        let h = parse_header(&b).unwrap();
        let ext = Extensions {
            feature_names: vec![FeatureName {
                kind: 0,
                bit: 5,
                name: "future thing".into(),
            }],
            ..Default::default()
        };
        let msg = check_features(&h, &ext).unwrap_err().to_string();
        assert!(msg.contains("bit 5 (future thing)"), "{msg}");
    }

    #[test]
    fn external_data_file_is_unsupported() {
        let mut b = v3_header();
        b[79] |= 1 << 2;
        let h = parse_header(&b).unwrap();
        let msg = check_features(&h, &Extensions::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("external data file"), "{msg}");
    }

    #[test]
    fn extensions_parse_backing_format_and_stop_at_end() {
        let mut c = v3_header();
        c.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes()); // type
        c.extend_from_slice(&5u32.to_be_bytes()); // length
        c.extend_from_slice(b"qcow2\0\0\0"); // data, padded to 8
        c.extend_from_slice(&[0; 8]); // end marker
        let ext = parse_extensions(&c, 112, c.len()).unwrap();
        assert_eq!(ext.backing_format.as_deref(), Some("qcow2"));
    }

    #[test]
    fn extension_overrunning_the_header_area_is_a_corruption() {
        let mut c = v3_header();
        c.extend_from_slice(&EXT_FEATURE_NAMES.to_be_bytes());
        c.extend_from_slice(&1000u32.to_be_bytes());
        assert!(
            parse_extensions(&c, 112, c.len())
                .unwrap_err()
                .is_corruption()
        );
    }

    #[test]
    fn snapshot_entry_parses_with_extra_data() {
        let mut e = vec![0u8; 40];
        e[0..8].copy_from_slice(&0x50000u64.to_be_bytes()); // l1_table_offset
        e[8..12].copy_from_slice(&2u32.to_be_bytes()); // l1_size
        e[12..14].copy_from_slice(&1u16.to_be_bytes()); // id_str_size
        e[14..16].copy_from_slice(&5u16.to_be_bytes()); // name_size
        e[36..40].copy_from_slice(&16u32.to_be_bytes()); // extra_data_size
        e.extend_from_slice(&7u64.to_be_bytes()); // vm_state_size_large
        e.extend_from_slice(&(1u64 << 30).to_be_bytes()); // disk_size
        e.extend_from_slice(b"1snap1");
        let s = parse_snapshot(&e, 0x1000, 65536).unwrap();
        assert_eq!((s.id.as_str(), s.name.as_str()), ("1", "snap1"));
        assert_eq!(
            (s.vm_state_size, s.disk_size, s.icount),
            (7, Some(1 << 30), None)
        );
    }
}
