//! GUIDs as VHDX stores them: 16 bytes, the first three fields little-endian ([MS-VHDX] 2.1,
//! "GUID" follows the Windows `GUID` structure layout).

use std::fmt;

/// A GUID in its on-disk byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID (an unset log GUID, say).
    pub const ZERO: Guid = Guid([0; 16]);

    /// The GUID printed as `{d1-d2-d3-d4[0..2]-d4[2..8]}`, laid out as on disk.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// True for the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses the textual form, with or without braces, any case
    /// (`{8B7CA206-4790-4B9A-B8FE-575F050F886E}`). `None` when malformed.
    pub fn parse(text: &str) -> Option<Guid> {
        let t = text.trim();
        let t = t
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or(t);
        let parts: Vec<&str> = t.split('-').collect();
        let [p1, p2, p3, p4, p5] = parts.as_slice() else {
            return None;
        };
        if p1.len() != 8 || p2.len() != 4 || p3.len() != 4 || p4.len() != 4 || p5.len() != 12 {
            return None;
        }
        let d1 = u32::from_str_radix(p1, 16).ok()?;
        let d2 = u16::from_str_radix(p2, 16).ok()?;
        let d3 = u16::from_str_radix(p3, 16).ok()?;
        let tail = format!("{p4}{p5}");
        let mut d4 = [0u8; 8];
        for (i, byte) in d4.iter_mut().enumerate() {
            let pair = tail.get(i * 2..i * 2 + 2)?;
            *byte = u8::from_str_radix(pair, 16).ok()?;
        }
        if !t.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) {
            return None;
        }
        Some(Guid::from_fields(d1, d2, d3, d4))
    }
}

impl fmt::Display for Guid {
    /// The usual form, upper case with braces as Windows prints it in parent locators.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        let d1 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let d2 = u16::from_le_bytes([b[4], b[5]]);
        let d3 = u16::from_le_bytes([b[6], b[7]]);
        write!(
            f,
            "{{{d1:08X}-{d2:04X}-{d3:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}}}",
            b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The BAT region GUID, 2DC27766-F623-4200-9D64-115E9BFD4A08, as it appears on disk.
    const BAT_ON_DISK: [u8; 16] = [
        0x66, 0x77, 0xC2, 0x2D, // Data1, little-endian
        0x23, 0xF6, // Data2, little-endian
        0x00, 0x42, // Data3, little-endian
        0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08, // Data4, as is
    ];

    #[test]
    fn fields_are_stored_little_endian_then_bytes() {
        let g = Guid::from_fields(
            0x2DC2_7766,
            0xF623,
            0x4200,
            [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
        );
        assert_eq!(g.0, BAT_ON_DISK);
    }

    #[test]
    fn display_prints_the_usual_braced_form() {
        assert_eq!(
            Guid(BAT_ON_DISK).to_string(),
            "{2DC27766-F623-4200-9D64-115E9BFD4A08}"
        );
    }

    #[test]
    fn parse_accepts_braces_and_lower_case() {
        assert_eq!(
            Guid::parse("2dc27766-f623-4200-9d64-115e9bfd4a08"),
            Some(Guid(BAT_ON_DISK))
        );
        assert_eq!(
            Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A08}"),
            Some(Guid(BAT_ON_DISK))
        );
    }

    #[test]
    fn parse_rejects_malformed_text() {
        assert_eq!(Guid::parse("{2DC27766-F623-4200-9D64}"), None);
        assert_eq!(Guid::parse("+DC27766-F623-4200-9D64-115E9BFD4A08"), None);
        assert_eq!(Guid::parse(""), None);
    }
}
