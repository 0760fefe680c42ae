//! Mapping guest offsets to host locations: decoding L1/L2 entries (pure, no I/O).
//!
//! [`Geometry`] holds the sizes derived from the header. [`decode_l2`] turns one L2 entry (and,
//! with extended L2 entries, its subcluster bitmap) into a [`Cluster`]; [`map_run`] walks one
//! loaded L2 table from a guest offset and returns the longest [`Mapping`] run of one kind it can
//! find inside that table, which both `read_at` (one pread per run) and `block_status` use.

use crate::error::{Error, Result};

/// L1/L2 entry bits 9-55: a cluster-aligned host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry bit 62: the cluster is compressed.
pub const L2_COMPRESSED: u64 = 1 << 62;
/// L1/L2 entry bit 63: refcount is exactly one ("copied").
pub const COPIED: u64 = 1 << 63;
/// Standard cluster descriptor bit 0 (v3 without extended L2): the cluster reads as zeros.
pub const L2_ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// Size of a sector in compressed cluster descriptors.
const SECTOR: u64 = 512;

/// Sizes derived from the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    /// Guest clusters per L2 table.
    pub l2_entries: u64,
    /// 128-bit L2 entries with subcluster bitmaps.
    pub extended: bool,
    /// Version 3: the zero flag (bit 0) is honoured.
    pub v3: bool,
}

impl Geometry {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The allocation unit of the mapping: a subcluster with extended L2, else a cluster.
    pub fn unit_size(&self) -> u64 {
        if self.extended {
            self.cluster_size() / u64::from(SUBCLUSTERS)
        } else {
            self.cluster_size()
        }
    }

    /// u64 words per L2 entry.
    pub fn words_per_entry(&self) -> usize {
        if self.extended { 2 } else { 1 }
    }

    /// Bytes of guest space one L2 table maps.
    pub fn bytes_per_l2(&self) -> u64 {
        self.l2_entries << self.cluster_bits
    }

    /// (L1 index, L2 index, offset in the cluster) of a guest offset.
    pub fn split(&self, guest: u64) -> (u64, u64, u64) {
        let cluster = guest >> self.cluster_bits;
        (
            cluster / self.l2_entries,
            cluster % self.l2_entries,
            guest & (self.cluster_size() - 1),
        )
    }

    /// Bit position where the compressed descriptor's sector count starts.
    fn compressed_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

/// One guest cluster as its L2 entry describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated here: backing file or zeros.
    Unallocated,
    /// Reads as zeros (v3 zero flag); `prealloc` is a host cluster kept for it.
    Zero { prealloc: Option<u64> },
    /// Stored at the cluster-aligned host offset.
    Normal { host: u64 },
    /// Compressed: `len` bytes starting at byte `host` hold the stream (the range may pass
    /// the end of the file by less than a sector).
    Compressed { host: u64, len: u64 },
    /// Extended L2: per-subcluster allocation (`alloc`) and zero (`zero`) bits; `host` is the
    /// host cluster when one is set.
    Sub {
        host: Option<u64>,
        alloc: u32,
        zero: u32,
    },
}

/// Decodes an L2 entry (`bitmap` is the second word of an extended entry, else 0).
/// `at` is the entry's file offset, for errors.
pub fn decode_l2(g: &Geometry, entry: u64, bitmap: u64, at: u64) -> Result<Cluster> {
    let bad = |reason: String| Error::corrupt("qcow2 L2 table", at, reason);
    if entry & L2_COMPRESSED != 0 {
        if g.extended && bitmap != 0 {
            return Err(bad(format!(
                "compressed cluster with a non-zero subcluster bitmap {bitmap:#x}"
            )));
        }
        let shift = g.compressed_shift();
        let host = entry & ((1u64 << shift) - 1);
        let sectors = (entry & !(L2_COMPRESSED | COPIED)) >> shift;
        // (sectors + 1) sectors counted from the sector holding `host`.
        let len = (sectors + 1) * SECTOR - (host % SECTOR);
        if host == 0 {
            return Err(bad("compressed cluster at host offset 0".into()));
        }
        return Ok(Cluster::Compressed { host, len });
    }
    let host = entry & OFFSET_MASK;
    if host & (g.cluster_size() - 1) != 0 {
        return Err(bad(format!(
            "host cluster offset {host:#x} is not cluster-aligned"
        )));
    }
    let host = (host != 0).then_some(host);
    if g.extended {
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(bad(format!(
                "subclusters {:#x} are both allocated and zero",
                alloc & zero
            )));
        }
        if alloc != 0 && host.is_none() {
            return Err(bad("allocated subclusters without a host cluster".into()));
        }
        return Ok(Cluster::Sub { host, alloc, zero });
    }
    if g.v3 && entry & L2_ZERO != 0 {
        return Ok(Cluster::Zero { prealloc: host });
    }
    Ok(match host {
        Some(host) => Cluster::Normal { host },
        None => Cluster::Unallocated,
    })
}

/// A run of guest bytes of one kind, as [`map_run`] returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// `len` bytes stored uncompressed, contiguously, from host offset `host`.
    Data { host: u64, len: u64 },
    /// Part of a compressed cluster: decompress `[host, host+clen)`, take `len` bytes at
    /// `offset` in the cluster.
    Compressed {
        host: u64,
        clen: u64,
        offset: u64,
        len: u64,
    },
    /// `len` bytes reading as zeros.
    Zero { len: u64 },
    /// `len` bytes not allocated in this image.
    Unallocated { len: u64 },
}

impl Mapping {
    /// Bytes the run covers.
    pub fn len(&self) -> u64 {
        match *self {
            Mapping::Data { len, .. }
            | Mapping::Compressed { len, .. }
            | Mapping::Zero { len }
            | Mapping::Unallocated { len } => len,
        }
    }

    /// True for an empty run (never returned by [`map_run`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one allocation unit (cluster or subcluster) holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Data(u64),
    Compressed { host: u64, clen: u64 },
    Zero,
    Unallocated,
}

fn unit_of(g: &Geometry, c: Cluster, sub: u32) -> Unit {
    match c {
        Cluster::Unallocated => Unit::Unallocated,
        Cluster::Zero { .. } => Unit::Zero,
        Cluster::Normal { host } => Unit::Data(host),
        Cluster::Compressed { host, len } => Unit::Compressed { host, clen: len },
        Cluster::Sub { host, alloc, zero } => {
            let bit = 1u32 << sub;
            match host {
                Some(host) if alloc & bit != 0 => Unit::Data(host + u64::from(sub) * g.unit_size()),
                _ if zero & bit != 0 => Unit::Zero,
                _ => Unit::Unallocated,
            }
        }
    }
}

/// The entries of one L2 table (`words` as loaded, big-endian already decoded) and the file
/// offset it was read from.
#[derive(Clone, Copy, Debug)]
pub struct L2Table<'a> {
    pub words: &'a [u64],
    pub offset: u64,
}

impl L2Table<'_> {
    /// Decodes the entry of guest cluster `index` of this table.
    pub fn cluster(&self, g: &Geometry, index: u64) -> Result<Cluster> {
        let w = g.words_per_entry();
        let i = usize::try_from(index)
            .unwrap_or(usize::MAX)
            .saturating_mul(w);
        let entry = self.words.get(i).copied();
        let bitmap = if g.extended {
            self.words.get(i + 1).copied()
        } else {
            Some(0)
        };
        let at = self.offset.saturating_add((i as u64).saturating_mul(8));
        match (entry, bitmap) {
            (Some(e), Some(b)) => decode_l2(g, e, b, at),
            _ => Err(Error::corrupt(
                "qcow2 L2 table",
                at,
                "index past the end of the table",
            )),
        }
    }
}

/// Maps the guest range starting at `guest` (at most `max_len` bytes) through `table`, which
/// must be the L2 table covering `guest` (`None`: the L1 entry is empty). Returns the longest
/// run of one kind that stays inside the table: data runs continue while host offsets stay
/// contiguous; a compressed run never leaves its cluster.
pub fn map_run(
    g: &Geometry,
    table: Option<L2Table<'_>>,
    guest: u64,
    max_len: u64,
) -> Result<Mapping> {
    let (_, l2_index, _) = g.split(guest);
    let table_end = (guest / g.bytes_per_l2() + 1).saturating_mul(g.bytes_per_l2());
    let limit = max_len.min(table_end - guest);
    let Some(table) = table else {
        return Ok(Mapping::Unallocated { len: limit });
    };
    let unit = g.unit_size();
    let mut index = l2_index;
    let mut cluster = table.cluster(g, index)?;
    let sub_of = |pos: u64| ((pos & (g.cluster_size() - 1)) / unit) as u32;
    let in_unit = guest % unit;
    let first = match unit_of(g, cluster, sub_of(guest)) {
        Unit::Compressed { host, clen } => {
            let offset = guest & (g.cluster_size() - 1);
            let len = limit.min(g.cluster_size() - offset);
            return Ok(Mapping::Compressed {
                host,
                clen,
                offset,
                len,
            });
        }
        Unit::Data(h) => Run::Data(h),
        Unit::Zero => Run::Zero,
        Unit::Unallocated => Run::Unallocated,
    };
    let mut len = (unit - in_unit).min(limit);
    let mut expect_host = match first {
        Run::Data(h) => Some(h + unit),
        _ => None,
    };
    // Walk unit by unit; bounded by `limit`, which stays inside this table.
    while len < limit {
        let pos = guest + len;
        let idx = (pos >> g.cluster_bits) % g.l2_entries;
        if idx != index {
            index = idx;
            cluster = table.cluster(g, index)?;
        }
        let next = unit_of(g, cluster, sub_of(pos));
        let same = match (first, next) {
            (Run::Data(_), Unit::Data(h)) => expect_host == Some(h),
            (Run::Zero, Unit::Zero) | (Run::Unallocated, Unit::Unallocated) => true,
            _ => false,
        };
        if !same {
            break;
        }
        if let Some(h) = expect_host.as_mut() {
            *h += unit;
        }
        len = (len + unit).min(limit);
    }
    Ok(match first {
        Run::Data(h) => Mapping::Data {
            host: h + in_unit,
            len,
        },
        Run::Zero => Mapping::Zero { len },
        Run::Unallocated => Mapping::Unallocated { len },
    })
}

/// The kind of a run that can span several units.
#[derive(Clone, Copy)]
enum Run {
    Data(u64),
    Zero,
    Unallocated,
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        cluster_bits: 16,
        l2_entries: 8192,
        extended: false,
        v3: true,
    };
    const GX: Geometry = Geometry {
        cluster_bits: 16,
        l2_entries: 4096,
        extended: true,
        v3: true,
    };

    #[test]
    fn normal_entry_maps_to_its_host_cluster() {
        assert_eq!(
            decode_l2(&G, COPIED | 0x50000, 0, 0).unwrap(),
            Cluster::Normal { host: 0x50000 }
        );
    }

    #[test]
    fn zero_flag_with_preallocation_reads_zero() {
        assert_eq!(
            decode_l2(&G, 0x50000 | L2_ZERO, 0, 0).unwrap(),
            Cluster::Zero {
                prealloc: Some(0x50000)
            }
        );
    }

    #[test]
    fn zero_flag_is_ignored_in_v2() {
        let g2 = Geometry { v3: false, ..G };
        assert_eq!(decode_l2(&g2, L2_ZERO, 0, 0).unwrap(), Cluster::Unallocated);
    }

    #[test]
    fn unaligned_host_offset_is_a_corruption() {
        assert!(decode_l2(&G, 0x50200, 0, 0).unwrap_err().is_corruption());
    }

    #[test]
    fn compressed_descriptor_splits_offset_and_sectors() {
        // 64 KiB clusters: x = 62 - 8 = 54; 2 additional sectors; offset 0x12345 (0x145 into
        // its sector), so 3 * 512 - 0x145 bytes.
        let entry = L2_COMPRESSED | (2u64 << 54) | 0x12345;
        assert_eq!(
            decode_l2(&G, entry, 0, 0).unwrap(),
            Cluster::Compressed {
                host: 0x12345,
                len: 3 * 512 - 0x145
            }
        );
    }

    #[test]
    fn extended_entry_with_alloc_and_zero_overlap_is_a_corruption() {
        assert!(decode_l2(&GX, 0x50000, 0x1_0000_0001, 0).is_err());
    }

    #[test]
    fn contiguous_clusters_merge_into_one_run() {
        let words = [0x50000, 0x60000, 0x80000, 0];
        let t = L2Table {
            words: &words,
            offset: 0x20000,
        };
        let m = map_run(&G, Some(t), 100, u64::MAX).unwrap();
        assert_eq!(
            m,
            Mapping::Data {
                host: 0x50064,
                len: 2 * 65536 - 100
            }
        );
    }

    #[test]
    fn subclusters_split_runs_by_bitmap() {
        // Subclusters 0-1 allocated, 2 zero, rest unallocated; 2 KiB subclusters.
        let words = [0x50000, 0b11 | (0b100 << 32)];
        let t = L2Table {
            words: &words,
            offset: 0,
        };
        assert_eq!(
            map_run(&GX, Some(t), 0, 65536).unwrap(),
            Mapping::Data {
                host: 0x50000,
                len: 4096
            }
        );
        assert_eq!(
            map_run(&GX, Some(t), 4096, 65536).unwrap(),
            Mapping::Zero { len: 2048 }
        );
        assert_eq!(
            map_run(&GX, Some(t), 6144, 65536 - 6144).unwrap(),
            Mapping::Unallocated { len: 65536 - 6144 }
        );
    }

    #[test]
    fn missing_l2_table_is_unallocated_up_to_the_table_end() {
        let m = map_run(&G, None, 10, u64::MAX).unwrap();
        assert_eq!(
            m,
            Mapping::Unallocated {
                len: G.bytes_per_l2() - 10
            }
        );
    }
}
