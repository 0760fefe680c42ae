//! `check()` for VMDK: structural consistency of every sparse extent and of the descriptor.
//!
//! Per sparse extent:
//! * the grain directory, the redundant one and every grain table lie inside the file;
//! * every allocated grain (or compressed grain's marker) lies inside the file;
//! * no two of {header, embedded descriptor, directories, tables, grains} overlap (one sorted
//!   sweep over all regions);
//! * the redundant grain tables hold the same entries as the primary ones;
//! * stream-optimized grain markers name the guest sector the table puts them at.
//!
//! For the descriptor: the extents' sizes add up to the capacity, and each sparse extent's
//! header capacity matches its extent line.
//!
//! Work is bounded by the file: a grain table is read once however many directory entries
//! point at it, and at most [`MAX_CHECK_REGIONS`] regions are recorded.

use std::collections::HashSet;

use crate::error::Result;
use crate::image::CheckReport;

use super::header::{GTE_ZEROED, Marker, SECTOR, SparseKind};
use super::sparse::{SparseExtent, read_directory};
use super::{Body, VmdkImage, extent_path, header};

/// Most regions (grains and metadata) recorded for the overlap sweep.
pub const MAX_CHECK_REGIONS: usize = 8 << 20;
/// Most problems recorded per extent; more are summarised in one line.
pub const MAX_PROBLEMS: usize = 1000;

/// One used byte range of an extent file.
#[derive(Clone, Copy, Debug)]
struct Region {
    start: u64,
    end: u64,
    what: &'static str,
}

/// Checks the whole disk.
pub fn check(image: &VmdkImage) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut allocated = 0u64;
    let mut total = 0u64;
    for (i, ext) in image.extents.iter().enumerate() {
        if let (Some(line), Body::Sparse(s)) = (ext.line_sectors, &ext.body)
            && s.header.capacity != line
        {
            report.corruption(
                "descriptor",
                None,
                format!(
                    "extent {} ({}) is {line} sectors in the descriptor but its header says {}",
                    i + 1,
                    ext.recorded,
                    s.header.capacity
                ),
            );
        }
        if let Body::Sparse(s) = &ext.body {
            let (a, t) = check_sparse(s, &mut report);
            allocated += a;
            total += t;
        }
    }
    if image.embedded
        && let Some(sum) = image.desc.total_sectors()
        && !image.desc.extents.is_empty()
        && sum.saturating_mul(SECTOR) != image.size
    {
        report.corruption(
            "embedded descriptor",
            None,
            format!(
                "extent lines add up to {sum} sectors, the header's capacity is {}",
                image.size / SECTOR
            ),
        );
    }
    for ext in &image.extents {
        if let Body::Flat { file, base } = &ext.body
            && base.saturating_add(ext.len) > file.len()
        {
            report.leak(
                "flat extent",
                Some(*base),
                format!(
                    "{} ends at {:#x}, before the extent's end {:#x} (the rest reads as zeros)",
                    extent_path(ext)
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    file.len(),
                    base.saturating_add(ext.len)
                ),
            );
        }
    }
    if total > 0 {
        report.allocated_clusters = Some(allocated);
        report.total_clusters = Some(total);
    }
    Ok(report)
}

/// Checks one sparse extent; returns (allocated grains, total grains).
fn check_sparse(s: &SparseExtent, report: &mut CheckReport) -> (u64, u64) {
    let h = &s.header;
    let file_len = s.file.len();
    let name = s.file.path().display().to_string();
    let grain = h.grain_size();
    let total = h.capacity.div_ceil(h.grain_sectors);
    let mut problems = 0usize;
    let mut problem = |report: &mut CheckReport, structure: &str, off: Option<u64>, msg: String| {
        problems += 1;
        if problems <= MAX_PROBLEMS {
            report.corruption(structure, off, format!("{name}: {msg}"));
        } else if problems == MAX_PROBLEMS + 1 {
            report.corruption(structure, None, format!("{name}: more problems not listed"));
        }
    };

    let mut regions: Vec<Region> = Vec::new();
    let header_len = if h.kind == SparseKind::Cowd {
        4 * SECTOR
    } else {
        SECTOR
    };
    regions.push(Region {
        start: 0,
        end: header_len.min(file_len),
        what: "header",
    });
    if h.descriptor_offset != 0 && h.descriptor_size != 0 {
        let start = h.descriptor_offset.saturating_mul(SECTOR);
        regions.push(Region {
            start,
            end: start.saturating_add(h.descriptor_size.saturating_mul(SECTOR)),
            what: "embedded descriptor",
        });
    }
    let gd_bytes = h.gd_entries * 4;
    let gd_start = h.gd_offset.saturating_mul(SECTOR);
    regions.push(Region {
        start: gd_start,
        end: gd_start.saturating_add(gd_bytes),
        what: "grain directory",
    });
    if s.gd_at_end {
        regions.push(Region {
            start: file_len.saturating_sub(3 * SECTOR),
            end: file_len,
            what: "footer",
        });
    }

    let redundant = h.redundant_gd().map(|sector| {
        let start = sector.saturating_mul(SECTOR);
        regions.push(Region {
            start,
            end: start.saturating_add(gd_bytes),
            what: "redundant grain directory",
        });
        read_directory(&s.file, h, sector, "redundant grain directory")
    });
    let rgd = match redundant {
        Some(Ok(rgd)) => Some(rgd),
        Some(Err(e)) => {
            problem(
                report,
                "redundant grain directory",
                Some(h.rgd_offset.saturating_mul(SECTOR)),
                e.to_string(),
            );
            None
        }
        None => None,
    };

    // Regions that do not overlap number at most one per sector of the file; past twice that,
    // overlaps are certain and already reported, so stop recording.
    let region_cap = MAX_CHECK_REGIONS.min(
        usize::try_from((file_len / SECTOR).saturating_mul(2).saturating_add(1024))
            .unwrap_or(usize::MAX),
    );
    let gt_bytes = h.gt_bytes() as u64;
    let mut seen_gts: HashSet<u32> = HashSet::new();
    let mut allocated = 0u64;
    let mut too_many = false;
    for (gi, &gt_sector) in s.gd.iter().enumerate() {
        if gt_sector == 0 {
            if let Some(r) = &rgd
                && r.get(gi).copied().unwrap_or(0) != 0
            {
                problem(
                    report,
                    "redundant grain directory",
                    None,
                    format!("entry {gi} has a table, the primary has none"),
                );
            }
            continue;
        }
        let gt_off = u64::from(gt_sector) * SECTOR;
        if !seen_gts.insert(gt_sector) {
            problem(
                report,
                "grain directory",
                Some(gd_start + gi as u64 * 4),
                format!("entry {gi} points at grain table {gt_off:#x} already used"),
            );
            continue;
        }
        regions.push(Region {
            start: gt_off,
            end: gt_off + gt_bytes,
            what: "grain table",
        });
        let table = match s.read_gt_at(gt_sector, "grain table") {
            Ok(t) => t,
            Err(e) => {
                problem(report, "grain table", Some(gt_off), e.to_string());
                continue;
            }
        };
        if let Some(r) = &rgd {
            match r.get(gi).copied().unwrap_or(0) {
                0 => problem(
                    report,
                    "redundant grain directory",
                    None,
                    format!("entry {gi} has no table, the primary has one"),
                ),
                rs => {
                    let r_off = u64::from(rs) * SECTOR;
                    regions.push(Region {
                        start: r_off,
                        end: r_off + gt_bytes,
                        what: "redundant grain table",
                    });
                    match s.read_gt_at(rs, "redundant grain table") {
                        Ok(rt) if rt != table => problem(
                            report,
                            "redundant grain table",
                            Some(r_off),
                            format!("differs from primary grain table {gi} at {gt_off:#x}"),
                        ),
                        Ok(_) => {}
                        Err(e) => {
                            problem(report, "redundant grain table", Some(r_off), e.to_string())
                        }
                    }
                }
            }
        }
        for (ti, &gte) in table.iter().enumerate() {
            if gte == 0 || (gte == GTE_ZEROED && h.zeroed_grain_gte()) {
                continue;
            }
            let grain_index = gi as u64 * u64::from(h.gtes_per_gt) + ti as u64;
            if grain_index >= total {
                problem(
                    report,
                    "grain table",
                    Some(gt_off + ti as u64 * 4),
                    format!("entry {ti} maps grain {grain_index}, past the capacity"),
                );
                continue;
            }
            allocated += 1;
            let at = u64::from(gte) * SECTOR;
            let end = if h.compressed() {
                match compressed_extent(s, at, grain_index * h.grain_sectors) {
                    Ok(end) => end,
                    Err(msg) => {
                        problem(report, "compressed grain", Some(at), msg);
                        continue;
                    }
                }
            } else {
                at + grain
            };
            // The last grain of a disk may be cut at the capacity and the file.
            let partial_end = (at + (h.capacity_bytes() - grain_index * grain).min(grain)).min(end);
            if partial_end > file_len {
                problem(
                    report,
                    "grain",
                    Some(at),
                    format!(
                        "grain {grain_index} ends at {partial_end:#x}, past the end of the file ({file_len:#x})"
                    ),
                );
                continue;
            }
            if regions.len() >= region_cap {
                too_many = true;
                continue;
            }
            regions.push(Region {
                start: at,
                end: end.min(file_len).max(at + 1),
                what: "grain",
            });
        }
    }
    for r in &regions {
        if r.what != "grain" && r.end > file_len {
            problem(
                report,
                r.what,
                Some(r.start),
                format!(
                    "ends at {:#x}, past the end of the file ({file_len:#x})",
                    r.end
                ),
            );
        }
    }
    if too_many {
        problem(
            report,
            "grain table",
            None,
            format!(
                "more than {region_cap} allocations for a {file_len}-byte file; overlaps not fully checked"
            ),
        );
    }
    regions.sort_unstable_by_key(|r| (r.start, r.end));
    let mut reach: Option<Region> = None;
    for r in regions {
        if r.start == r.end {
            continue;
        }
        if let Some(prev) = reach
            && r.start < prev.end
        {
            problem(
                report,
                r.what,
                Some(r.start),
                format!(
                    "{} at {:#x} overlaps the {} at {:#x}",
                    r.what, r.start, prev.what, prev.start
                ),
            );
        }
        if reach.is_none_or(|p| r.end > p.end) {
            reach = Some(r);
        }
    }
    (allocated, total)
}

/// The end of a compressed grain at `at` whose guest sector should be `lba`; an error message
/// when its marker is broken.
fn compressed_extent(s: &SparseExtent, at: u64, lba: u64) -> std::result::Result<u64, String> {
    if !s.header.markers() {
        // Without markers the stream's length is only known by inflating; count one sector.
        return Ok(at + SECTOR);
    }
    let mut head = [0u8; 16];
    if at.saturating_add(16) > s.file.len() {
        return Err(format!(
            "grain marker past the end of the file ({:#x})",
            s.file.len()
        ));
    }
    s.file
        .read_exact_at(&mut head, at, "grain marker")
        .map_err(|e| e.to_string())?;
    match header::parse_marker(&head, at).map_err(|e| e.to_string())? {
        Marker::Grain { lba: got, size } => {
            if got != lba {
                return Err(format!(
                    "grain marker says sector {got}, the grain table puts it at {lba}"
                ));
            }
            let limit = s.header.grain_size() + super::io::MAX_COMPRESSED_OVERHEAD;
            if u64::from(size) > limit {
                return Err(format!(
                    "{size} compressed bytes for a {}-byte grain",
                    s.header.grain_size()
                ));
            }
            Ok(at + 12 + u64::from(size))
        }
        other => Err(format!("expected a grain marker, found {other:?}")),
    }
}
