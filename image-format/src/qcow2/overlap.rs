//! Where a qcow2 file keeps its metadata: one walker over the structures `check` counts and the
//! in-place writer protects, and [`MetaMap`], the sorted set of metadata clusters the writer
//! consults before it writes guest data (qemu calls this the "overlap check").
//!
//! [`walk`] reports the header cluster, the active L1 table, the refcount table, the snapshot
//! table, every snapshot's L1 table, and the bitmap directory, tables and data; it hands over
//! each L1 table's entries so the caller can add the L2 tables they name (check also judges
//! their copied flags). Refcount blocks come from the refcount table each caller already holds.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

use super::Qcow2Image;
use super::io::read_table;
use super::map::OFFSET_MASK;

/// Cap on L1 entries walked over all snapshots together.
pub const MAX_SNAPSHOT_L1_ENTRIES: u64 = 64 << 20;
/// Cap on the entries of one bitmap table.
pub const MAX_BITMAP_TABLE_ENTRIES: u32 = 1 << 22;

/// A kind of metadata structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MetaKind {
    Header,
    L1Table,
    L2Table,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    SnapshotL1Table,
    BitmapDirectory,
    BitmapTable,
    BitmapData,
}

impl MetaKind {
    /// The structure's name, as errors and check reports give it.
    pub(super) fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "qcow2 header",
            MetaKind::L1Table => "qcow2 L1 table",
            MetaKind::L2Table => "qcow2 L2 table",
            MetaKind::RefcountTable => "qcow2 refcount table",
            MetaKind::RefcountBlock => "qcow2 refcount block",
            MetaKind::SnapshotTable => "qcow2 snapshot table",
            MetaKind::SnapshotL1Table => "qcow2 snapshot L1 table",
            MetaKind::BitmapDirectory => "qcow2 bitmap directory",
            MetaKind::BitmapTable => "qcow2 bitmap table",
            MetaKind::BitmapData => "qcow2 bitmap data",
        }
    }
}

/// What [`walk`] finds.
pub(super) enum Found<'a> {
    /// `[offset, offset + len)` holds a structure of this kind.
    Range {
        kind: MetaKind,
        offset: u64,
        len: u64,
    },
    /// The entries of an L1 table read from `offset` (`active`: the image's own, else a
    /// snapshot's). Its range was reported before.
    L1 {
        offset: u64,
        entries: &'a [u64],
        active: bool,
    },
    /// A structure that could not be followed.
    Problem {
        structure: &'static str,
        offset: u64,
        message: String,
    },
}

/// Reports every metadata structure of `img` except L2 tables and refcount blocks (see the
/// module text). Errors only when a cap is passed or the snapshot table cannot be re-read.
pub(super) fn walk(img: &Qcow2Image, visit: &mut dyn FnMut(Found<'_>)) -> Result<()> {
    let h = &img.header;
    let cs = h.cluster_size();
    visit(Found::Range {
        kind: MetaKind::Header,
        offset: 0,
        len: cs,
    });
    visit(Found::Range {
        kind: MetaKind::L1Table,
        offset: h.l1_table_offset,
        len: u64::from(h.l1_size) * 8,
    });
    visit(Found::L1 {
        offset: h.l1_table_offset,
        entries: &img.l1.read().unwrap_or_else(|e| e.into_inner()),
        active: true,
    });
    visit(Found::Range {
        kind: MetaKind::RefcountTable,
        offset: h.refcount_table_offset,
        len: u64::from(h.refcount_table_clusters) * cs,
    });
    if h.nb_snapshots > 0 {
        visit(Found::Range {
            kind: MetaKind::SnapshotTable,
            offset: h.snapshots_offset,
            len: img.snapshot_table_len,
        });
    }
    let mut walked = 0u64;
    for s in &img.snapshots {
        walked = walked.saturating_add(u64::from(s.l1_size));
        if walked > MAX_SNAPSHOT_L1_ENTRIES {
            return Err(
                Error::unsupported("qcow2 snapshots with this many L1 entries")
                    .in_file(img.file.path()),
            );
        }
        let len = u64::from(s.l1_size) * 8;
        visit(Found::Range {
            kind: MetaKind::SnapshotL1Table,
            offset: s.l1_table_offset,
            len,
        });
        match read_table(
            &img.file,
            s.l1_table_offset,
            len as usize,
            "qcow2 snapshot L1 table",
        ) {
            Ok(t) => visit(Found::L1 {
                offset: s.l1_table_offset,
                entries: &t,
                active: false,
            }),
            Err(e) => visit(Found::Problem {
                structure: "qcow2 snapshot L1 table",
                offset: s.l1_table_offset,
                message: e.to_string(),
            }),
        }
    }
    walk_bitmaps(img, visit);
    Ok(())
}

fn walk_bitmaps(img: &Qcow2Image, visit: &mut dyn FnMut(Found<'_>)) {
    let Some(ext) = &img.ext.bitmaps else {
        return;
    };
    let cs = img.header.cluster_size();
    visit(Found::Range {
        kind: MetaKind::BitmapDirectory,
        offset: ext.directory_offset,
        len: ext.directory_size,
    });
    // Bitmaps may name one table many times: each table's entries are read once (a table
    // named again is still reported as a range, so a double claim shows). All tables together,
    // a repeated one as often as it is named, hold at most MAX_BITMAP_TABLE_ENTRIES entries
    // (real tables hold tens): that bounds what is read and every range reported.
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for b in &img.bitmaps {
        total = total.saturating_add(u64::from(b.table_size));
        if total > u64::from(MAX_BITMAP_TABLE_ENTRIES) {
            visit(Found::Problem {
                structure: "qcow2 bitmap directory",
                offset: ext.directory_offset,
                message: format!(
                    "bitmap tables hold more than {MAX_BITMAP_TABLE_ENTRIES} entries in all \
                     (at bitmap {:?})",
                    b.name
                ),
            });
            return;
        }
        if !seen.insert(b.table_offset) {
            visit(Found::Range {
                kind: MetaKind::BitmapTable,
                offset: b.table_offset,
                len: u64::from(b.table_size) * 8,
            });
            continue;
        }
        let len = u64::from(b.table_size) * 8;
        visit(Found::Range {
            kind: MetaKind::BitmapTable,
            offset: b.table_offset,
            len,
        });
        let table = match read_table(
            &img.file,
            b.table_offset,
            len as usize,
            "qcow2 bitmap table",
        ) {
            Ok(t) => t,
            Err(e) => {
                visit(Found::Problem {
                    structure: "qcow2 bitmap table",
                    offset: b.table_offset,
                    message: e.to_string(),
                });
                continue;
            }
        };
        for (i, e) in table.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off & (cs - 1) != 0 {
                visit(Found::Problem {
                    structure: "qcow2 bitmap table",
                    offset: b.table_offset + i as u64 * 8,
                    message: format!("offset {off:#x} unaligned"),
                });
            } else {
                visit(Found::Range {
                    kind: MetaKind::BitmapData,
                    offset: off,
                    len: cs,
                });
            }
        }
    }
}

/// The host clusters holding metadata, as disjoint cluster-aligned ranges keyed by their start.
/// A cluster claimed twice (a corrupt image) keeps the kind that claimed it first.
///
/// It also records which L2 tables the in-place writer has checked whole (see `rw.rs`), so
/// that its lock-free path takes one lock for both questions.
#[derive(Debug)]
pub(super) struct MetaMap {
    cs: u64,
    ranges: BTreeMap<u64, (u64, MetaKind)>,
    /// Checked L2 tables: table offset -> the L1 index naming it.
    checked: BTreeMap<u64, u64>,
}

/// A metadata range found where something else was to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Overlap {
    pub kind: MetaKind,
    pub start: u64,
    pub end: u64,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} (clusters {:#x}..{:#x})",
            self.kind.name().trim_start_matches("qcow2 "),
            self.start,
            self.end
        )
    }
}

impl MetaMap {
    pub(super) fn new(cluster_size: u64) -> Self {
        MetaMap {
            cs: cluster_size,
            ranges: BTreeMap::new(),
            checked: BTreeMap::new(),
        }
    }

    /// The clusters of `[offset, offset + len)`, rounded out to whole clusters.
    fn clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset & !(self.cs - 1);
        let end = offset.saturating_add(len).saturating_add(self.cs - 1) & !(self.cs - 1);
        (start, end)
    }

    /// Claims the clusters of `[offset, offset + len)` for `kind`, except those claimed already.
    pub(super) fn insert(&mut self, kind: MetaKind, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (start, end) = self.clusters(offset, len);
        let taken: Vec<(u64, u64)> = self.overlapping(start, end).collect();
        let mut pos = start;
        for (s, e) in taken {
            if s > pos {
                self.ranges.insert(pos, (s, kind));
            }
            pos = pos.max(e);
        }
        if pos < end {
            self.ranges.insert(pos, (end, kind));
        }
    }

    /// Whether anything claims a cluster of `[offset, offset + len)` or a checked L2 table
    /// starts there: [`MetaMap::remove`] would change something.
    pub(super) fn holds(&self, offset: u64, len: u64) -> bool {
        let (start, end) = self.clusters(offset, len);
        self.find(offset, len).is_some() || self.checked.range(start..end).next().is_some()
    }

    /// Releases the clusters of `[offset, offset + len)`, whatever claimed them (and forgets
    /// that an L2 table there was checked).
    pub(super) fn remove(&mut self, offset: u64, len: u64) {
        let (start, end) = self.clusters(offset, len);
        let forget: Vec<u64> = self.checked.range(start..end).map(|(&t, _)| t).collect();
        for t in forget {
            self.checked.remove(&t);
        }
        let taken: Vec<(u64, u64)> = self.overlapping(start, end).collect();
        for (s, e) in taken {
            let Some((_, kind)) = self.ranges.remove(&s) else {
                continue;
            };
            if s < start {
                self.ranges.insert(s, (start, kind));
            }
            if e > end {
                self.ranges.insert(end, (e, kind));
            }
        }
    }

    /// The claimed ranges meeting `[start, end)`, in order.
    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let before = self
            .ranges
            .range(..start)
            .next_back()
            .filter(|(_, (e, _))| *e > start);
        before
            .into_iter()
            .chain(self.ranges.range(start..end))
            .map(|(&s, &(e, _))| (s, e))
    }

    /// The last metadata range meeting the clusters of `[offset, offset + len)`: one O(log n)
    /// lookup, as the ranges are disjoint (the last one starting before the end meets the
    /// range if any does).
    pub(super) fn find(&self, offset: u64, len: u64) -> Option<Overlap> {
        let (start, end) = self.clusters(offset, len.max(1));
        let (&s, &(e, kind)) = self.ranges.range(..end).next_back()?;
        (e > start).then_some(Overlap {
            kind,
            start: s,
            end: e,
        })
    }

    /// Whether the L2 table at `table` was checked as the table of L1 entry `l1_index`.
    pub(super) fn is_checked(&self, table: u64, l1_index: u64) -> bool {
        self.checked.get(&table) == Some(&l1_index)
    }

    /// Records that the L2 table at `table` was checked as the table of L1 entry `l1_index`.
    pub(super) fn set_checked(&mut self, table: u64, l1_index: u64) {
        self.checked.insert(table, l1_index);
    }

    /// Whether the cluster at `offset` is claimed by exactly the L2 table that starts there (the
    /// ranges are disjoint, so nothing else meets it then).
    pub(super) fn is_l2_table(&self, offset: u64) -> bool {
        self.find(offset, self.cs)
            == Some(Overlap {
                kind: MetaKind::L2Table,
                start: offset,
                end: offset + self.cs,
            })
    }

    /// Number of disjoint ranges held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_out_to_clusters_and_stay_disjoint() {
        let mut m = MetaMap::new(512);
        m.insert(MetaKind::L1Table, 0x600, 16);
        m.insert(MetaKind::RefcountTable, 0x400, 0x600);
        // The L1 cluster keeps its first claim; the refcount table gets the rest.
        assert_eq!(m.find(0x600, 512).map(|o| o.kind), Some(MetaKind::L1Table));
        assert_eq!(
            m.find(0x400, 512).map(|o| o.kind),
            Some(MetaKind::RefcountTable)
        );
        assert_eq!(
            m.find(0x800, 512).map(|o| (o.kind, o.start, o.end)),
            Some((MetaKind::RefcountTable, 0x800, 0xa00))
        );
        assert_eq!(m.find(0xa00, 512), None);
        assert_eq!(m.find(0x200, 512), None);
        // A range covering several claims finds one of them.
        assert_eq!(m.find(0, 0x2000).map(|o| o.start), Some(0x800));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn a_long_range_is_found_from_any_of_its_clusters() {
        let mut m = MetaMap::new(512);
        m.insert(MetaKind::RefcountTable, 0x10000, 0x10000);
        m.insert(MetaKind::L2Table, 0x8000, 512);
        assert!(m.find(0x1fe00, 512).is_some());
        assert!(m.find(0x20000, 512).is_none());
        assert!(m.is_l2_table(0x8000));
        assert!(!m.is_l2_table(0x10000));
    }

    #[test]
    fn a_freed_table_is_no_longer_checked() {
        let mut m = MetaMap::new(512);
        m.insert(MetaKind::L2Table, 0x1000, 512);
        m.set_checked(0x1000, 3);
        assert!(m.is_checked(0x1000, 3) && !m.is_checked(0x1000, 4));
        assert!(m.holds(0x1000, 512));
        m.remove(0x1000, 512);
        assert!(!m.is_checked(0x1000, 3), "a freed table stayed checked");
        assert!(!m.holds(0x1000, 512));
    }

    #[test]
    fn removing_splits_what_was_claimed() {
        let mut m = MetaMap::new(512);
        m.insert(MetaKind::RefcountTable, 0x1000, 0x1000);
        m.remove(0x1400, 512);
        assert!(m.find(0x1400, 512).is_none());
        assert_eq!(m.find(0x1200, 512).map(|o| o.end), Some(0x1400));
        assert_eq!(m.find(0x1600, 512).map(|o| o.start), Some(0x1600));
        m.remove(0, 0x4000);
        assert_eq!(m.len(), 0);
    }
}
