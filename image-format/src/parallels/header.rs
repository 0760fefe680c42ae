//! The Parallels header: pure parsing and validation.

use crate::bytes::Fields;
use crate::error::{Error, Result};

/// Bytes in the header; the BAT follows it.
pub const HEADER_SIZE: usize = 64;
/// `in_use` value of an image left open for writing (ASCII "Ynot").
const IN_USE_OPEN: u32 = 0x746F_6E59;
/// `in_use` value of a cleanly closed image (ASCII "v2.1").
const IN_USE_CLOSED: u32 = 0x312E_3276;
/// Largest cluster accepted: 256 MiB (the default is 1 MiB; old images used 31.5, 252 and 256 KiB).
const MAX_CLUSTER_SECTORS: u32 = 1 << 19;
/// Largest BAT accepted, in entries (2^28 entries of 1 MiB clusters is 256 TiB; 1 GiB of BAT).
const MAX_BAT_ENTRIES: u32 = 1 << 28;

/// The two header magics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Magic {
    /// `WithoutFreeSpace`: BAT entries count sectors; only the low 32 bits of the size count.
    WithoutFreeSpace,
    /// `WithouFreSpacExt`: BAT entries count clusters.
    WithouFreSpacExt,
}

impl Magic {
    /// The magic as it appears in the file.
    pub fn name(self) -> &'static str {
        match self {
            Magic::WithoutFreeSpace => "WithoutFreeSpace",
            Magic::WithouFreSpacExt => "WithouFreSpacExt",
        }
    }
}

/// A parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub magic: Magic,
    pub cluster_size: u64,
    pub bat_entries: u32,
    /// Guest size in bytes.
    pub size: u64,
    /// Left open for writing (not closed cleanly).
    pub in_use: bool,
    /// Byte offset of the data area.
    pub data_offset: u64,
    /// The Empty Image flag: every cluster reads as zeros.
    pub empty: bool,
    /// Byte offset of the Format Extension cluster, 0 if none.
    pub ext_off: u64,
}

impl Header {
    /// Parses the first bytes of a file.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let f = Fields::new(buf, "header", 0);
        let magic = match f.slice(0, 16)? {
            b"WithoutFreeSpace" => Magic::WithoutFreeSpace,
            b"WithouFreSpacExt" => Magic::WithouFreSpacExt,
            _ => return Err(f.error(0, "not a Parallels magic")),
        };
        let version = f.u32_le(16)?;
        if version != 2 {
            return Err(f.error(16, format!("version {version}, expected 2")));
        }
        let tracks = f.u32_le(28)?;
        if tracks == 0 || tracks > MAX_CLUSTER_SECTORS {
            return Err(f.error(28, format!("cluster of {tracks} sectors")));
        }
        let bat_entries = f.u32_le(32)?;
        if bat_entries > MAX_BAT_ENTRIES {
            return Err(f.error(
                32,
                format!("{bat_entries} BAT entries (cap {MAX_BAT_ENTRIES})"),
            ));
        }
        let mut sectors = f.u64_le(36)?;
        if magic == Magic::WithoutFreeSpace {
            sectors &= 0xffff_ffff;
        }
        let in_use = match f.u32_le(44)? {
            IN_USE_OPEN => true,
            IN_USE_CLOSED | 0 => false,
            other => return Err(f.error(44, format!("in_use value {other:#x}"))),
        };
        let cluster_size = u64::from(tracks) * 512;
        let bat_end = (HEADER_SIZE as u64 + 4 * u64::from(bat_entries)).next_multiple_of(512);
        let data_off = u64::from(f.u32_le(48)?) * 512;
        let data_offset = if data_off == 0 { bat_end } else { data_off };
        if data_offset < bat_end {
            return Err(f.error(
                48,
                format!("data area at {data_offset:#x} overlaps the BAT"),
            ));
        }
        let size = sectors
            .checked_mul(512)
            .ok_or_else(|| f.error(36, format!("{sectors} sectors overflow")))?;
        if size.div_ceil(cluster_size) > u64::from(bat_entries) {
            return Err(f.error(
                32,
                format!("{bat_entries} BAT entries do not cover {size} bytes"),
            ));
        }
        Ok(Header {
            magic,
            cluster_size,
            bat_entries,
            size,
            in_use,
            data_offset,
            empty: f.u32_le(52)? & 1 != 0,
            ext_off: f.u64_le(56)?.saturating_mul(512),
        })
    }

    /// Checks the header against the length of its file.
    pub fn validate(&self, file_len: u64) -> Result<()> {
        let bat_end = HEADER_SIZE as u64 + 4 * u64::from(self.bat_entries);
        if bat_end > file_len {
            return Err(Error::corrupt(
                "BAT",
                HEADER_SIZE as u64,
                format!(
                    "{} entries run past the end of the file at {file_len:#x}",
                    self.bat_entries
                ),
            ));
        }
        Ok(())
    }

    /// The byte offset a non-zero BAT entry points at.
    pub fn entry_to_offset(&self, entry: u32) -> u64 {
        match self.magic {
            Magic::WithoutFreeSpace => u64::from(entry) * 512,
            Magic::WithouFreSpacExt => u64::from(entry) * self.cluster_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `WithouFreSpacExt` header: 64 KiB clusters (128 sectors), 32 BAT entries, 2 MiB.
    fn v2_header() -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(b"WithouFreSpacExt"); // magic
        h.extend_from_slice(&2u32.to_le_bytes()); // version
        h.extend_from_slice(&16u32.to_le_bytes()); // heads
        h.extend_from_slice(&8u32.to_le_bytes()); // cylinders
        h.extend_from_slice(&128u32.to_le_bytes()); // tracks: cluster size in sectors
        h.extend_from_slice(&32u32.to_le_bytes()); // BAT entries
        h.extend_from_slice(&4096u64.to_le_bytes()); // size in sectors
        h.extend_from_slice(&IN_USE_CLOSED.to_le_bytes()); // in_use
        h.extend_from_slice(&128u32.to_le_bytes()); // data offset in sectors
        h.extend_from_slice(&0u32.to_le_bytes()); // flags
        h.extend_from_slice(&0u64.to_le_bytes()); // ext_off
        h
    }

    #[test]
    fn parses_a_v2_header() {
        let h = Header::parse(&v2_header()).unwrap();
        assert_eq!(h.size, 2 << 20);
        assert_eq!(h.cluster_size, 64 << 10);
        assert_eq!(h.data_offset, 64 << 10);
        assert_eq!(h.entry_to_offset(2), 128 << 10);
        assert!(!h.in_use);
    }

    #[test]
    fn rejects_a_bat_too_small_for_the_disk() {
        let mut raw = v2_header();
        raw[32..36].copy_from_slice(&31u32.to_le_bytes());
        let err = Header::parse(&raw).unwrap_err().to_string();
        assert!(err.contains("corrupt header at offset 0x20"), "{err}");
    }

    #[test]
    fn rejects_zero_sized_clusters() {
        let mut raw = v2_header();
        raw[28..32].copy_from_slice(&0u32.to_le_bytes());
        assert!(Header::parse(&raw).is_err());
    }

    #[test]
    fn rejects_a_truncated_header_without_panicking() {
        let raw = v2_header();
        for len in 0..raw.len() {
            assert!(Header::parse(&raw[..len]).is_err());
        }
    }

    #[test]
    fn without_free_space_ignores_the_high_size_bits() {
        let mut raw = v2_header();
        raw[..16].copy_from_slice(b"WithoutFreeSpace");
        raw[40..44].copy_from_slice(&1u32.to_le_bytes());
        let h = Header::parse(&raw).unwrap();
        assert_eq!(h.size, 2 << 20);
        assert_eq!(h.entry_to_offset(256), 128 << 10);
    }
}
