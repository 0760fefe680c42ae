//! `check`: rebuild every cluster's refcount from the references the metadata makes, and
//! compare with the stored refcounts, as `qemu-img check` does.
//!
//! References counted (each adds one per referencing structure):
//!
//! | structure | clusters |
//! |---|---|
//! | header | cluster 0 |
//! | active L1, each snapshot's L1 | their byte ranges |
//! | L2 table | one cluster per L1 entry naming it (shared tables count once per L1) |
//! | data | one cluster per L2 entry (normal, preallocated zero, subclustered), once per L1 reaching the L2 table |
//! | compressed data | every cluster its sector range spans |
//! | refcount table, refcount blocks | their clusters |
//! | snapshot table | its byte range |
//! | bitmap directory, bitmap tables, bitmap data | their clusters |
//!
//! A stored refcount lower than the computed one is a corruption (the cluster could be
//! reallocated while in use); a higher one is a leak. References past the end of the file,
//! misaligned offsets, clusters used both as metadata and as guest data, and "copied" flags that
//! disagree with the refcount (active tables only) are corruptions.
//!
//! Every distinct L2 table is read once, whatever the number of L1 tables naming it, and the
//! work and memory are capped ([`MAX_CHECK_CLUSTERS`],
//! [`super::overlap::MAX_SNAPSHOT_L1_ENTRIES`]).

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::image::CheckReport;

use super::Qcow2Image;
use super::io::read_table;
use super::map::{COPIED, Cluster, OFFSET_MASK, decode_l2};
use super::overlap::{Found, walk};
use super::rw::get_refcount;

/// Cap on the host clusters a check tracks (two counters each): larger files are refused.
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 24;
/// Problems listed one by one; more are summarised in one last entry.
pub const MAX_LISTED_PROBLEMS: usize = 1000;

const META: u8 = 1;
const DATA: u8 = 2;

struct Counter<'a> {
    cs: u64,
    file_len: u64,
    computed: Vec<u32>,
    role: Vec<u8>,
    report: &'a mut CheckReport,
    extra_corruptions: u64,
}

impl Counter<'_> {
    fn corruption(&mut self, structure: &str, offset: Option<u64>, msg: String) {
        if self.report.corruptions.len() < MAX_LISTED_PROBLEMS {
            self.report.corruption(structure, offset, msg);
        } else {
            self.extra_corruptions += 1;
        }
    }

    /// Counts `times` references to the clusters of `[offset, offset + len)`.
    fn add(&mut self, structure: &str, offset: u64, len: u64, role: u8, times: u32) {
        if len == 0 || times == 0 {
            return;
        }
        let end = offset.saturating_add(len);
        let first = offset / self.cs;
        let last = (end - 1) / self.cs;
        // The tail of a last cluster may be missing (qemu writes only the subclusters or
        // sectors it uses), but a cluster that starts past the end is not in the file.
        if last.saturating_mul(self.cs) >= self.file_len {
            self.corruption(
                structure,
                Some(offset),
                format!(
                    "{len} bytes referenced but the file ends at {:#x}",
                    self.file_len
                ),
            );
        }
        let in_file = (self.computed.len() as u64).min(last.saturating_add(1));
        for idx in first..in_file {
            let i = idx as usize;
            if let (Some(c), Some(r)) = (self.computed.get_mut(i), self.role.get_mut(i)) {
                *c = c.saturating_add(times);
                *r |= role;
                if *r == META | DATA {
                    *r |= 4; // reported once
                    let at = idx * self.cs;
                    self.corruption(
                        structure,
                        Some(at),
                        "cluster used both as metadata and as guest data".into(),
                    );
                }
            }
        }
    }
}

/// Counts the L2 tables one L1 table names. `stored_of` is given for the active L1 only, whose
/// copied flags must agree with the stored refcounts.
fn count_l1(
    c: &mut Counter<'_>,
    l2_refs: &mut HashMap<u64, (u32, u32)>,
    l1_off: u64,
    table: &[u64],
    stored_of: Option<&dyn Fn(u64) -> u64>,
) {
    let cs = c.cs;
    for (i, &entry) in table.iter().enumerate() {
        let off = entry & OFFSET_MASK;
        let at = l1_off + i as u64 * 8;
        if off == 0 {
            continue;
        }
        if off & (cs - 1) != 0 {
            c.corruption(
                "qcow2 L1 table",
                Some(at),
                format!("L2 table offset {off:#x} is not cluster-aligned"),
            );
            continue;
        }
        c.add("qcow2 L2 table", off, cs, META, 1);
        let e = l2_refs.entry(off).or_insert((0, 0));
        e.0 = e.0.saturating_add(1);
        if let Some(stored_of) = stored_of {
            e.1 = e.1.saturating_add(1);
            let rc = stored_of(off);
            let copied = entry & COPIED != 0;
            if (rc == 1) != copied {
                c.corruption(
                    "qcow2 L1 table",
                    Some(at),
                    format!("copied flag {copied} but the L2 table's refcount is {rc}"),
                );
            }
        }
    }
}

pub(super) fn check(img: &Qcow2Image) -> Result<CheckReport> {
    let h = &img.header;
    let cs = h.cluster_size();
    let file_len = img.file.len();
    let file_clusters = file_len.div_ceil(cs);
    if file_clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::unsupported(format!(
            "checking images of more than {MAX_CHECK_CLUSTERS} clusters"
        ))
        .in_file(img.file.path()));
    }
    let mut report = CheckReport::default();
    let mut c = Counter {
        cs,
        file_len,
        computed: vec![0; file_clusters as usize],
        role: vec![0; file_clusters as usize],
        report: &mut report,
        extra_corruptions: 0,
    };

    // Stored refcounts, and the references of the refcount structures themselves.
    let stored = stored_refcounts(img, &mut c, file_clusters);

    // The header, L1 tables (and the L2 tables they name), refcount table, snapshot table and
    // bitmaps: the walk the in-place writer's overlap check uses too.
    let stored_of = |off: u64| stored.get((off / cs) as usize).copied().unwrap_or(0);
    let mut l2_refs: HashMap<u64, (u32, u32)> = HashMap::new();
    walk(img, &mut |found| match found {
        Found::Range { kind, offset, len } => c.add(kind.name(), offset, len, META, 1),
        Found::L1 {
            offset,
            entries,
            active,
        } => count_l1(
            &mut c,
            &mut l2_refs,
            offset,
            entries,
            active.then_some(&stored_of as &dyn Fn(u64) -> u64),
        ),
        Found::Problem {
            structure,
            offset,
            message,
        } => c.corruption(structure, Some(offset), message),
    })?;

    // Each distinct L2 table once.
    let g = img.geometry;
    let mut allocated = 0u64;
    let mut tables: Vec<(u64, (u32, u32))> = l2_refs.into_iter().collect();
    tables.sort_unstable();
    for (off, (total, active)) in tables {
        if off.saturating_add(cs) > file_len {
            continue; // reported by add() above
        }
        let words = match read_table(&img.file, off, cs as usize, "qcow2 L2 table") {
            Ok(w) => w,
            Err(e) => {
                c.corruption("qcow2 L2 table", Some(off), e.to_string());
                continue;
            }
        };
        let step = g.words_per_entry();
        for (i, pair) in words.chunks_exact(step).enumerate() {
            let entry = pair.first().copied().unwrap_or(0);
            let bitmap = if g.extended {
                pair.get(1).copied().unwrap_or(0)
            } else {
                0
            };
            let at = off + (i * step * 8) as u64;
            let cluster = match decode_l2(&g, entry, bitmap, at) {
                Ok(cl) => cl,
                Err(e) => {
                    c.corruption("qcow2 L2 table", Some(at), e.to_string());
                    continue;
                }
            };
            let host = match cluster {
                Cluster::Normal { host } => Some(host),
                Cluster::Zero { prealloc } => prealloc,
                Cluster::Sub { host, .. } => host,
                Cluster::Compressed { host, len } => {
                    let start = host & !511;
                    c.add(
                        "qcow2 compressed cluster",
                        start,
                        host + len - start,
                        DATA,
                        total,
                    );
                    if active > 0 {
                        allocated += u64::from(active);
                        if entry & COPIED != 0 {
                            c.corruption(
                                "qcow2 L2 table",
                                Some(at),
                                "compressed cluster has the copied flag".into(),
                            );
                        }
                    }
                    None
                }
                Cluster::Unallocated => None,
            };
            if let Some(host) = host {
                c.add("qcow2 data cluster", host, cs, DATA, total);
                if active > 0 {
                    allocated += u64::from(active);
                    // qemu's OFLAG_COPIED rule: set exactly when the refcount is one.
                    let rc = stored_of(host);
                    let copied = entry & COPIED != 0;
                    if (rc == 1) != copied {
                        c.corruption(
                            "qcow2 L2 table",
                            Some(at),
                            format!("copied flag {copied} but the data cluster's refcount is {rc}"),
                        );
                    }
                }
            }
        }
    }

    // Compare.
    let mut highest = None;
    let mut extra_leaks = 0u64;
    let computed = std::mem::take(&mut c.computed);
    for (idx, (&want, &have)) in computed.iter().zip(stored.iter()).enumerate() {
        let want = u64::from(want);
        let at = idx as u64 * cs;
        if want > 0 || have > 0 {
            highest = Some(idx as u64);
        }
        if want > have {
            c.corruption(
                "qcow2 refcount",
                Some(at),
                format!("refcount too low: {have} stored, {want} references"),
            );
        } else if want < have {
            if c.report.leaks.len() < MAX_LISTED_PROBLEMS {
                c.report.leak(
                    "qcow2 refcount",
                    Some(at),
                    format!("{have} stored, {want} references"),
                );
            } else {
                extra_leaks += 1;
            }
        }
    }
    if c.extra_corruptions > 0 {
        let n = c.extra_corruptions;
        c.report.corruption(
            "qcow2 check",
            None,
            format!("{n} more corruptions not listed"),
        );
    }
    if extra_leaks > 0 {
        c.report.leak(
            "qcow2 check",
            None,
            format!("{extra_leaks} more leaked clusters not listed"),
        );
    }
    report.allocated_clusters = Some(allocated);
    report.total_clusters = Some(h.size.div_ceil(cs));
    report.image_end_offset = Some(highest.map_or(0, |i| (i + 1) * cs));
    Ok(report)
}

/// Reads the refcount table and blocks; counts their own references; returns the stored
/// refcount of every cluster of the file.
fn stored_refcounts(img: &Qcow2Image, c: &mut Counter<'_>, file_clusters: u64) -> Vec<u64> {
    let h = &img.header;
    let cs = c.cs;
    let mut stored = vec![0u64; file_clusters as usize];
    // The table's own clusters are counted by the walk.
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    let table = match read_table(
        &img.file,
        h.refcount_table_offset,
        rt_len as usize,
        "qcow2 refcount table",
    ) {
        Ok(t) => t,
        Err(e) => {
            c.corruption(
                "qcow2 refcount table",
                Some(h.refcount_table_offset),
                e.to_string(),
            );
            return stored;
        }
    };
    let bits = h.refcount_bits();
    let per_block = cs * 8 / u64::from(bits);
    for (i, &entry) in table.iter().enumerate() {
        let at = h.refcount_table_offset + i as u64 * 8;
        let off = entry & !511;
        if off == 0 {
            continue;
        }
        if off & (cs - 1) != 0 || entry & 511 != 0 {
            c.corruption(
                "qcow2 refcount table",
                Some(at),
                format!("refcount block offset {entry:#x} is not cluster-aligned"),
            );
            continue;
        }
        c.add("qcow2 refcount block", off, cs, META, 1);
        let first = i as u64 * per_block;
        if first >= file_clusters || off.saturating_add(cs) > c.file_len {
            continue; // covers only clusters past the end, or is itself past it (reported)
        }
        let mut block = vec![0u8; cs as usize];
        if let Err(e) = img
            .file
            .read_exact_at(&mut block, off, "qcow2 refcount block")
        {
            c.corruption("qcow2 refcount block", Some(off), e.to_string());
            continue;
        }
        let n = per_block.min(file_clusters - first);
        for j in 0..n {
            if let Some(slot) = stored.get_mut((first + j) as usize) {
                *slot = get_refcount(&block, j, bits);
            }
        }
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_refcounts_are_big_endian() {
        assert_eq!(get_refcount(&[0, 1, 0x12, 0x34], 1, 16), 0x1234);
    }

    #[test]
    fn sub_byte_refcounts_start_at_the_least_significant_bit() {
        // Two-bit entries: 0b11_10_01_00 holds 0, 1, 2, 3.
        let block = [0b1110_0100u8];
        let got: Vec<u64> = (0..4).map(|i| get_refcount(&block, i, 2)).collect();
        assert_eq!(got, vec![0, 1, 2, 3]);
    }
}
