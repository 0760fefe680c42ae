//! Structural checks of an open VHD (`vmnest check`).
//!
//! * every footer copy: present, checksum valid, the copy at 0 equal to the footer at the end;
//! * the current size is whole sectors;
//! * every allocated block: its bitmap and data inside the file, before the footer;
//! * no two of {footer copy, dynamic header, BAT, parent locator data, blocks, footer} overlap;
//! * parent locators inside the file; allocated BAT entries past the disk's end are leaks.
//!
//! The dynamic header's checksum and the table's size are checked at open (an image that fails
//! them does not open).

use crate::image::CheckReport;

use super::header::{
    DiskType, DynamicHeader, FOOTER_SIZE, Integrity, MAX_LOCATOR_BYTES, ParentLocator,
    PlatformCode, SECTOR,
};
use super::map::BlockMap;
use super::{Layout, Place, VhdImage};

/// Cap on the problems of one kind listed; more are summarised in one line.
const MAX_LISTED: usize = 100;

/// A structure of a dynamic or differencing VHD that claims a range of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Claimant {
    FooterCopy,
    DynamicHeader,
    Table,
    Locator(PlatformCode),
    Block(u64),
    Footer,
}

impl std::fmt::Display for Claimant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Claimant::FooterCopy => f.write_str("footer copy"),
            Claimant::DynamicHeader => f.write_str("dynamic header"),
            Claimant::Table => f.write_str("block allocation table"),
            Claimant::Locator(code) => write!(f, "{} parent locator data", code.name()),
            Claimant::Block(b) => write!(f, "block {b}"),
            Claimant::Footer => f.write_str("footer"),
        }
    }
}

/// One range of the file that a structure claims.
#[derive(Clone, Copy, Debug)]
pub(super) struct Claim {
    pub start: u64,
    pub end: u64,
    pub what: Claimant,
}

/// What [`survey`] finds wrong with the layout of a dynamic or differencing VHD.
pub(super) enum Finding<'a> {
    /// A parent locator's data lies outside the file's data.
    LocatorOutside(&'a ParentLocator),
    /// Block `block`, past the disk's end, is allocated at `sector`.
    Leaked { block: u64, sector: u32 },
    /// Block `block`'s bitmap and data, at `[start, end)`, run past the file's data (it is
    /// left out of the overlap sweep).
    Outside { block: u64, start: u64, end: u64 },
    /// `claim` overlaps `prev`, which starts no later.
    Overlap { claim: Claim, prev: Claim },
}

/// What [`survey`] counts.
pub(super) struct Survey {
    /// Blocks allocated inside the disk.
    pub allocated: u64,
    /// Blocks the disk uses.
    pub in_use: u64,
    /// The end of the furthest range claimed by anything but the footer.
    pub claims_end: u64,
}

/// Where the footer at the end starts (the end of the file without one).
fn footer_start(image: &VhdImage) -> u64 {
    match image
        .copies
        .iter()
        .find(|c| c.place != Place::Start && c.parsed.is_some())
    {
        Some(c) => c.offset,
        None => image.file.len(),
    }
}

/// Walks the ranges a dynamic or differencing VHD's structures claim (footer copy, dynamic
/// header, BAT, parent locator data, blocks, footer) and reports each problem to `visit`. Used
/// by `check` and by the in-place writer, which refuses to write blocks found here.
pub(super) fn survey(
    image: &VhdImage,
    header: &DynamicHeader,
    header_offset: u64,
    map: &BlockMap,
    visit: &mut dyn FnMut(Finding<'_>),
) -> Survey {
    let footer_start = footer_start(image);
    let mut claims: Vec<Claim> = Vec::new();
    if image
        .copies
        .iter()
        .any(|c| c.place == Place::Start && c.parsed.is_some())
    {
        claims.push(Claim {
            start: 0,
            end: FOOTER_SIZE as u64,
            what: Claimant::FooterCopy,
        });
    }
    claims.push(Claim {
        start: header_offset,
        end: header_offset.saturating_add(1024),
        what: Claimant::DynamicHeader,
    });
    claims.push(Claim {
        start: map.table_offset(),
        end: map
            .table_offset()
            .saturating_add(header.table_bytes().div_ceil(SECTOR) * SECTOR),
        what: Claimant::Table,
    });
    for loc in &header.locators {
        if loc.data_length == 0 {
            continue;
        }
        let end = loc.data_offset.saturating_add(u64::from(loc.data_length));
        if loc.data_length > MAX_LOCATOR_BYTES || end > footer_start {
            visit(Finding::LocatorOutside(loc));
            continue;
        }
        claims.push(Claim {
            start: loc.data_offset,
            end,
            what: Claimant::Locator(loc.code),
        });
    }

    let in_use = map.blocks_in_use();
    let mut allocated = 0u64;
    let mut outside_end = 0u64;
    for (i, &entry) in map.entries().iter().enumerate() {
        let block = i as u64;
        let Some(start) = map.block_start(block) else {
            continue;
        };
        if block >= in_use {
            visit(Finding::Leaked {
                block,
                sector: entry,
            });
            continue;
        }
        allocated += 1;
        let data_len = map
            .block_size()
            .min(map.disk_size() - block * map.block_size());
        let end = start + map.bitmap_size() + data_len;
        if end > footer_start {
            visit(Finding::Outside { block, start, end });
            outside_end = outside_end.max(end);
            continue;
        }
        claims.push(Claim {
            start,
            end,
            what: Claimant::Block(block),
        });
    }
    let claims_end = claims
        .iter()
        .map(|c| c.end)
        .max()
        .unwrap_or(0)
        .max(outside_end);

    claims.push(Claim {
        start: footer_start,
        end: image.file.len(),
        what: Claimant::Footer,
    });
    claims.sort_by_key(|c| (c.start, c.end));
    let mut furthest: Option<Claim> = None;
    for &claim in &claims {
        if let Some(prev) = furthest
            && claim.start < prev.end
        {
            visit(Finding::Overlap { claim, prev });
        }
        if furthest.is_none_or(|prev| claim.end > prev.end) {
            furthest = Some(claim);
        }
    }
    Survey {
        allocated,
        in_use,
        claims_end,
    }
}

pub(super) fn check(image: &VhdImage) -> CheckReport {
    let mut report = CheckReport::default();
    let file_len = image.file.len();
    check_footers(image, &mut report);
    if !image.footer.current_size.is_multiple_of(SECTOR) {
        report.corruption(
            "VHD footer",
            Some(image.copies[image.chosen].offset + 48),
            format!(
                "current size {} is not a whole number of sectors",
                image.footer.current_size
            ),
        );
    }
    let Layout::Sparse {
        header,
        header_offset,
        map,
    } = &image.layout
    else {
        report.image_end_offset = Some(image.size + FOOTER_SIZE as u64);
        return report;
    };

    let (mut outside, mut leaked, mut overlaps) = (0usize, 0usize, 0usize);
    let survey = survey(
        image,
        header,
        *header_offset,
        map,
        &mut |finding| match finding {
            Finding::LocatorOutside(loc) => report.corruption(
                "VHD parent locator",
                Some(header_offset + 576 + 24 * loc.index as u64),
                format!(
                    "{} locator data of {} bytes at {:#x} lies outside the file's data",
                    loc.code.name(),
                    loc.data_length,
                    loc.data_offset
                ),
            ),
            Finding::Leaked { block, sector } => {
                leaked += 1;
                if leaked <= MAX_LISTED {
                    report.leak(
                        "VHD block allocation table",
                        Some(map.table_offset() + 4 * block),
                        format!(
                            "block {block} past the end of the disk is allocated at sector {sector}"
                        ),
                    );
                }
            }
            Finding::Outside { block, start, end } => {
                outside += 1;
                if outside <= MAX_LISTED {
                    report.corruption(
                    "VHD block allocation table",
                    Some(map.table_offset() + 4 * block),
                    format!(
                        "block {block} at {start:#x}..{end:#x} runs past the file's data, which \
                         ends at {:#x}",
                        footer_start(image)
                    ),
                );
                }
            }
            Finding::Overlap { claim, prev } => {
                overlaps += 1;
                if overlaps <= MAX_LISTED {
                    report.corruption(
                        "VHD block allocation table",
                        Some(claim.start),
                        format!(
                            "{} at {:#x}..{:#x} overlaps {} at {:#x}..{:#x}",
                            claim.what, claim.start, claim.end, prev.what, prev.start, prev.end
                        ),
                    );
                }
            }
        },
    );
    summarise(&mut report, outside, "blocks outside the file", true);
    summarise(
        &mut report,
        leaked,
        "allocated blocks past the disk's end",
        false,
    );
    summarise(&mut report, overlaps, "overlapping structures", true);

    report.allocated_clusters = Some(survey.allocated);
    report.total_clusters = Some(survey.in_use);
    report.image_end_offset = Some(file_len);
    report
}

/// Adds a summary line when more than [`MAX_LISTED`] problems of one kind were found.
fn summarise(report: &mut CheckReport, count: usize, what: &str, corruption: bool) {
    if count <= MAX_LISTED {
        return;
    }
    let message = format!("{count} {what} in all ({MAX_LISTED} listed)");
    if corruption {
        report.corruption("VHD block allocation table", None, message);
    } else {
        report.leak("VHD block allocation table", None, message);
    }
}

/// The footer copies: each present one valid, the copy at 0 equal to the end one.
fn check_footers(image: &VhdImage, report: &mut CheckReport) {
    let sparse = image.footer.disk_type != DiskType::Fixed;
    let end = image
        .copies
        .iter()
        .find(|c| c.place != Place::Start && c.parsed.is_some());
    let start = image.copies.iter().find(|c| c.place == Place::Start);
    match end {
        None => report.corruption(
            "VHD footer",
            Some(image.file.len().saturating_sub(FOOTER_SIZE as u64)),
            "no footer at the end of the file (the copy at offset 0 was used)",
        ),
        Some(c) if c.place == Place::EndOld => report.leak(
            "VHD footer",
            Some(c.offset),
            "511-byte footer of a pre-2004 Virtual PC image",
        ),
        Some(_) => {}
    }
    let mut footers = end.into_iter().collect::<Vec<_>>();
    if sparse {
        match start {
            Some(c) if c.parsed.is_some() => footers.push(c),
            _ => report.corruption(
                "VHD footer",
                Some(0),
                "dynamic disk without the footer copy at offset 0",
            ),
        }
    }
    for c in &footers {
        match &c.parsed {
            Some(Err(err)) => report.corruption("VHD footer", Some(c.offset), err.to_string()),
            Some(Ok(f)) if f.integrity == Integrity::UniqueIdUnchecked => report.corruption(
                "VHD footer",
                Some(c.offset + 64),
                "checksum matches only with the unique id zeroed (the id was set after checksumming)",
            ),
            _ => {}
        }
    }
    if let [end, start] = footers.as_slice() {
        let same = match end.place {
            Place::EndOld => end.bytes[..FOOTER_SIZE - 1] == start.bytes[..FOOTER_SIZE - 1],
            _ => end.bytes == start.bytes,
        };
        if !same {
            report.corruption(
                "VHD footer",
                Some(0),
                format!(
                    "the copy at offset 0 differs from the footer at {:#x}",
                    end.offset
                ),
            );
        }
    }
}
