//! The VMDK text descriptor: a pure, bounded parser.
//!
//! A descriptor ("Virtual Disk Format 5.0", section "The Descriptor File") is a small text file of
//! three parts, in practice in any order and interleaved with `#` comments and blank lines:
//!
//! ```text
//! # Disk DescriptorFile                       <- header comment (optional in practice)
//! version=1                                   <- key=value settings
//! CID=fffffffe
//! parentCID=ffffffff                          <- ffffffff: no parent
//! createType="monolithicSparse"
//! parentFileNameHint="base.vmdk"              <- delta disks only
//! RW 20480 SPARSE "disk-s001.vmdk"            <- extent lines: ACCESS SECTORS TYPE ["FILE" [OFFSET]]
//! ddb.adapterType = "lsilogic"                <- the disk database, also key = value
//! ```
//!
//! The parser accepts CRLF line ends, quoted or bare values, unknown keys and unknown lines (the
//! Python stream converter writes a non-standard first comment), and text padded with NULs (an
//! embedded descriptor fills its sectors). It rejects malformed extent lines, since guessing the
//! layout of a disk would read wrong data. Sizes are capped: [`MAX_DESCRIPTOR_SIZE`] bytes,
//! [`MAX_EXTENTS`] extents and [`MAX_DDB_ENTRIES`] database entries.

use crate::error::{Error, Result};

/// Largest descriptor accepted, embedded or in its own file (real ones are under 2 KiB).
pub const MAX_DESCRIPTOR_SIZE: usize = 1 << 20;
/// Most extent lines accepted in one descriptor (twoGbMaxExtent disks of 2 TiB have ~1000).
pub const MAX_EXTENTS: usize = 1024;
/// Most `ddb.*` entries kept.
pub const MAX_DDB_ENTRIES: usize = 4096;
/// The `parentCID` value that means "no parent".
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// The name of the descriptor structure in errors.
const STRUCTURE: &str = "descriptor";

/// Access mode of an extent line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `RW`: read and write.
    ReadWrite,
    /// `RDONLY`: read only.
    ReadOnly,
    /// `NOACCESS`: the extent may not be accessed.
    NoAccess,
}

/// The type of an extent line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentType {
    /// `SPARSE`: a hosted sparse extent (KDMV header).
    Sparse,
    /// `FLAT`: raw sectors in a file, from an offset.
    Flat,
    /// `ZERO`: reads as zeros, no file.
    Zero,
    /// `VMFS`: ESX flat extent (raw sectors in a file).
    Vmfs,
    /// `VMFSSPARSE`: ESX redo log (COWD header, or KDMV on newer hosts).
    VmfsSparse,
    /// `VMFSRDM`: raw device mapping.
    VmfsRdm,
    /// `VMFSRAW`: raw device.
    VmfsRaw,
    /// `SESPARSE`: ESXi space-efficient sparse.
    SeSparse,
}

impl ExtentType {
    /// The keyword as it appears in a descriptor.
    pub fn keyword(self) -> &'static str {
        match self {
            ExtentType::Sparse => "SPARSE",
            ExtentType::Flat => "FLAT",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRaw => "VMFSRAW",
            ExtentType::SeSparse => "SESPARSE",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        Some(match word.to_ascii_uppercase().as_str() {
            "SPARSE" => ExtentType::Sparse,
            "FLAT" => ExtentType::Flat,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRAW" => ExtentType::VmfsRaw,
            "SESPARSE" => ExtentType::SeSparse,
            _ => return None,
        })
    }
}

/// One extent line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Guest sectors the extent covers.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentType,
    /// The file name as recorded (empty for ZERO extents).
    pub filename: String,
    /// Sector offset of the extent's data in its file (flat extents).
    pub offset_sectors: u64,
    /// Byte offset of the line in the descriptor's file, for errors.
    pub at: u64,
}

/// A parsed descriptor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// `version=`.
    pub version: Option<u32>,
    /// `CID=`: content id, changes on every write.
    pub cid: Option<u32>,
    /// `parentCID=`: the parent's CID when this disk was made, [`NO_PARENT_CID`] for none.
    pub parent_cid: Option<u32>,
    /// `createType=`: the subformat.
    pub create_type: Option<String>,
    /// `parentFileNameHint=`: path of the parent, for delta disks.
    pub parent_hint: Option<String>,
    /// Extent lines, in order.
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` entries, in order, keys without the quotes.
    pub ddb: Vec<(String, String)>,
}

impl Descriptor {
    /// The value of a `ddb.` key (`"ddb.adapterType"`).
    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// True when the descriptor records a parent.
    pub fn has_parent(&self) -> bool {
        self.parent_cid.is_some_and(|c| c != NO_PARENT_CID)
    }

    /// Sum of the extents' sizes, in sectors (`None` on overflow).
    pub fn total_sectors(&self) -> Option<u64> {
        self.extents
            .iter()
            .try_fold(0u64, |acc, e| acc.checked_add(e.sectors))
    }
}

/// Parses descriptor text read from byte `base` of its file. Text stops at the first NUL.
pub fn parse(bytes: &[u8], base: u64) -> Result<Descriptor> {
    if bytes.len() > MAX_DESCRIPTOR_SIZE {
        return Err(Error::corrupt(
            STRUCTURE,
            base,
            format!(
                "{} bytes, more than the {MAX_DESCRIPTOR_SIZE}-byte limit",
                bytes.len()
            ),
        ));
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..end]);
    let mut desc = Descriptor::default();
    let mut line_start = 0usize;
    for raw_line in text.split('\n') {
        let at = base.saturating_add(line_start as u64);
        line_start = line_start.saturating_add(raw_line.len() + 1);
        let line = raw_line.trim_matches(|c: char| c.is_whitespace());
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some(access) = parse_access(first) {
            if desc.extents.len() >= MAX_EXTENTS {
                return Err(Error::corrupt(
                    STRUCTURE,
                    at,
                    format!("more than {MAX_EXTENTS} extents"),
                ));
            }
            desc.extents.push(parse_extent(line, access, at)?);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            // Unknown free text: tolerated, as VMware's own tools do.
            continue;
        };
        let key = key.trim();
        let value = unquote(value.trim());
        match key {
            "version" => desc.version = value.parse().ok(),
            "CID" => desc.cid = parse_cid(value),
            "parentCID" => {
                desc.parent_cid = Some(parse_cid(value).ok_or_else(|| {
                    Error::corrupt(STRUCTURE, at, format!("invalid parentCID {value:?}"))
                })?)
            }
            "createType" => desc.create_type = Some(value.to_string()),
            "parentFileNameHint" => desc.parent_hint = Some(value.to_string()),
            k if k.starts_with("ddb.") && desc.ddb.len() < MAX_DDB_ENTRIES => {
                desc.ddb.push((k.to_string(), value.to_string()));
            }
            _ => {}
        }
    }
    Ok(desc)
}

fn parse_access(word: &str) -> Option<Access> {
    match word {
        "RW" => Some(Access::ReadWrite),
        "RDONLY" => Some(Access::ReadOnly),
        "NOACCESS" => Some(Access::NoAccess),
        _ => None,
    }
}

/// A CID is 8 hex digits; a few writers drop leading zeros.
fn parse_cid(value: &str) -> Option<u32> {
    if value.is_empty() || value.len() > 8 {
        return None;
    }
    u32::from_str_radix(value, 16).ok()
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// `ACCESS SECTORS TYPE ["FILENAME" [OFFSET]]`; the file name may hold spaces when quoted.
fn parse_extent(line: &str, access: Access, at: u64) -> Result<ExtentLine> {
    let bad = |why: &str| Error::corrupt(STRUCTURE, at, format!("extent line {line:?}: {why}"));
    let mut rest = line;
    let mut word = || -> Option<&str> {
        let trimmed = rest.trim_start();
        let end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
        let (w, r) = trimmed.split_at(end);
        rest = r;
        (!w.is_empty()).then_some(w)
    };
    let _access = word();
    let sectors = word()
        .and_then(|w| w.parse::<u64>().ok())
        .ok_or_else(|| bad("size is not a number"))?;
    let kind_word = word().ok_or_else(|| bad("no extent type"))?;
    let kind = ExtentType::parse(kind_word)
        .ok_or_else(|| bad(&format!("unknown extent type {kind_word}")))?;
    let rest = rest.trim();
    let (filename, tail) = if let Some(quoted) = rest.strip_prefix('"') {
        let close = quoted
            .find('"')
            .ok_or_else(|| bad("unterminated file name"))?;
        (&quoted[..close], &quoted[close + 1..])
    } else {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        rest.split_at(end)
    };
    let tail = tail.trim();
    let offset_sectors = if tail.is_empty() {
        0
    } else {
        let first = tail.split_whitespace().next().unwrap_or("");
        first
            .parse::<u64>()
            .map_err(|_| bad("offset is not a number"))?
    };
    if filename.is_empty() && kind != ExtentType::Zero {
        return Err(bad("no file name"));
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        filename: filename.to_string(),
        offset_sectors,
        at,
    })
}

/// How likely `head` (the start of a file) is a text descriptor: 0 (no) to 100.
pub fn probe_text(head: &[u8]) -> u32 {
    // Descriptors may be NUL-padded to a sector (qemu writes them so): judge the text before.
    let window = &head[..head.len().min(4096)];
    let window = &window[..window.iter().position(|&b| b == 0).unwrap_or(window.len())];
    if window.is_empty() {
        return 0;
    }
    let printable = window
        .iter()
        .filter(|&&b| {
            b == b'\n' || b == b'\r' || b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
        })
        .count();
    // Descriptors are text: allow a little binary noise (UTF-8 names are >= 0x80 and count).
    if printable * 100 < window.len() * 95 {
        return 0;
    }
    let text = String::from_utf8_lossy(window);
    if text.trim_start().starts_with("# Disk DescriptorFile") {
        return 90;
    }
    let has_create_type = text
        .lines()
        .any(|l| l.trim_start().starts_with("createType"));
    let has_extent = text.lines().any(|l| {
        let mut words = l.split_whitespace();
        parse_access(words.next().unwrap_or("")).is_some()
            && words.next().is_some_and(|w| w.parse::<u64>().is_ok())
            && words.next().and_then(ExtentType::parse).is_some()
    });
    match (has_create_type, has_extent) {
        (true, true) => 80,
        (false, true) | (true, false) => 20,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_GB_SPARSE: &str = "# Disk DescriptorFile\r\n\
        version=1\r\n\
        CID=0a1b2c3d\r\n\
        parentCID=ffffffff\r\n\
        createType=\"twoGbMaxExtentSparse\"\r\n\
        \r\n\
        # Extent description\r\n\
        RW 4192256 SPARSE \"disk s001.vmdk\"\r\n\
        RDONLY 2048 FLAT \"disk-f002.vmdk\" 128\r\n\
        RW 100 ZERO\r\n\
        \r\n\
        ddb.adapterType = \"lsilogic\"\r\n\
        ddb.virtualHWVersion = \"14\"\r\n";

    #[test]
    fn parses_settings_extents_and_ddb_with_crlf() {
        let d = parse(TWO_GB_SPARSE.as_bytes(), 0).unwrap();
        assert_eq!(d.version, Some(1));
        assert_eq!(d.cid, Some(0x0a1b_2c3d));
        assert_eq!(d.parent_cid, Some(NO_PARENT_CID));
        assert!(!d.has_parent());
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentSparse"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].filename, "disk s001.vmdk");
        assert_eq!(d.extents[0].kind, ExtentType::Sparse);
        assert_eq!(d.extents[1].access, Access::ReadOnly);
        assert_eq!(d.extents[1].offset_sectors, 128);
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
        assert_eq!(d.total_sectors(), Some(4192256 + 2048 + 100));
        assert_eq!(d.ddb("ddb.adapterType"), Some("lsilogic"));
        assert_eq!(d.ddb("ddb.virtualHWVersion"), Some("14"));
    }

    #[test]
    fn stream_converter_comment_and_nul_padding_are_tolerated() {
        let mut text = b"# Description file created by VMDK stream converter\n\
            version=1\n# Believe this is random\nCID=7e5b80a7\nparentCID=ffffffff\n\
            createType=\"streamOptimized\"\nRDONLY 2048 SPARSE \"call-me-stream.vmdk\"\n"
            .to_vec();
        text.extend_from_slice(&[0u8; 300]);
        text.extend_from_slice(b"garbage after the NUL");
        let d = parse(&text, 512).unwrap();
        assert_eq!(d.cid, Some(0x7e5b_80a7));
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].sectors, 2048);
    }

    #[test]
    fn delta_descriptor_records_its_parent() {
        let d = parse(
            b"CID=8f67ca74\nparentCID=0172e8a4\ncreateType=\"vmfsSparse\"\n\
              parentFileNameHint=\"vmfs_thick.vmdk\"\nRW 4096 VMFSSPARSE \"d-delta.vmdk\"\n",
            0,
        )
        .unwrap();
        assert!(d.has_parent());
        assert_eq!(d.parent_cid, Some(0x0172_e8a4));
        assert_eq!(d.parent_hint.as_deref(), Some("vmfs_thick.vmdk"));
        assert_eq!(d.extents[0].kind, ExtentType::VmfsSparse);
    }

    #[test]
    fn malformed_extent_line_is_an_error_naming_its_offset() {
        let err = parse(b"version=1\nRW lots SPARSE \"x.vmdk\"\n", 0x200).unwrap_err();
        assert_eq!(
            err.to_string(),
            "corrupt descriptor at offset 0x20a: extent line \"RW lots SPARSE \\\"x.vmdk\\\"\": size is not a number"
        );
    }

    #[test]
    fn unknown_extent_type_and_unterminated_name_are_errors() {
        assert!(parse(b"RW 10 WEIRD \"x\"\n", 0).is_err());
        assert!(parse(b"RW 10 FLAT \"x\n", 0).is_err());
        assert!(parse(b"RW 10 FLAT\n", 0).is_err());
    }

    #[test]
    fn too_many_extents_are_refused() {
        let text = "RW 1 ZERO\n".repeat(MAX_EXTENTS + 1);
        assert!(parse(text.as_bytes(), 0).is_err());
    }

    #[test]
    fn invalid_parent_cid_is_an_error() {
        assert!(parse(b"parentCID=nothex\n", 0).is_err());
    }

    #[test]
    fn probe_scores_descriptors_and_not_binary() {
        assert_eq!(probe_text(TWO_GB_SPARSE.as_bytes()), 90);
        assert_eq!(
            probe_text(b"createType=\"vmfs\"\nRW 4096 VMFS \"a-flat.vmdk\"\n"),
            80
        );
        assert_eq!(probe_text(&[0u8; 512]), 0);
        let mut padded = TWO_GB_SPARSE.as_bytes().to_vec();
        padded.resize(512, 0);
        assert_eq!(probe_text(&padded), 90);
        assert_eq!(probe_text(b"hello world\n"), 0);
    }
}
