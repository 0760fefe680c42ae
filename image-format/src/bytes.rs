//! Bounds-checked field access for pure header parsers.
//!
//! [`Fields`] wraps the bytes of one on-disk structure and knows where it came from, so a parser
//! reads `f.u32_be(4)?` and a short buffer becomes an error naming the structure and file offset,
//! never a panic.

use crate::error::{Error, Result};

/// The bytes of one structure read from `base` in its file.
#[derive(Clone, Copy, Debug)]
pub struct Fields<'a> {
    buf: &'a [u8],
    structure: &'static str,
    base: u64,
}

macro_rules! getter {
    ($name:ident, $ty:ty, $from:ident) => {
        /// Reads the field at byte `at` of the structure.
        pub fn $name(&self, at: usize) -> Result<$ty> {
            Ok(<$ty>::$from(self.array(at)?))
        }
    };
}

impl<'a> Fields<'a> {
    /// `buf` holds `structure`, read from byte `base` of its file.
    pub fn new(buf: &'a [u8], structure: &'static str, base: u64) -> Self {
        Fields {
            buf,
            structure,
            base,
        }
    }

    /// The whole buffer.
    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Length of the buffer.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True for an empty buffer.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// `len` bytes at `at`.
    pub fn slice(&self, at: usize, len: usize) -> Result<&'a [u8]> {
        at.checked_add(len)
            .and_then(|end| self.buf.get(at..end))
            .ok_or_else(|| {
                self.error(
                    at,
                    format!("{len} bytes needed, {} present", self.buf.len()),
                )
            })
    }

    /// A fixed-size array at `at`.
    pub fn array<const N: usize>(&self, at: usize) -> Result<[u8; N]> {
        let s = self.slice(at, N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    getter!(u8, u8, from_le_bytes);
    getter!(u16_le, u16, from_le_bytes);
    getter!(u32_le, u32, from_le_bytes);
    getter!(u64_le, u64, from_le_bytes);
    getter!(u16_be, u16, from_be_bytes);
    getter!(u32_be, u32, from_be_bytes);
    getter!(u64_be, u64, from_be_bytes);

    /// A corruption of this structure at byte `at` of it.
    pub fn error(&self, at: usize, reason: impl Into<String>) -> Error {
        Error::corrupt(self.structure, self.base.saturating_add(at as u64), reason)
    }
}

/// Decodes UTF-16LE up to the first NUL, replacing invalid units (VHDX creator and metadata
/// strings, GPT partition names).
pub fn utf16le_string(bytes: &[u8]) -> String {
    let units = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0);
    char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_both_endians() {
        let f = Fields::new(&[0, 0, 1, 2, 3, 4], "header", 0);
        assert_eq!(f.u32_be(2).unwrap(), 0x0102_0304);
        assert_eq!(f.u16_le(2).unwrap(), 0x0201);
    }

    #[test]
    fn short_buffer_is_an_error_with_the_absolute_offset() {
        let f = Fields::new(&[0; 4], "footer", 0x1000);
        let err = f.u64_le(2).unwrap_err().to_string();
        assert_eq!(
            err,
            "corrupt footer at offset 0x1002: 8 bytes needed, 4 present"
        );
    }

    #[test]
    fn huge_offsets_do_not_overflow() {
        let f = Fields::new(&[0; 4], "x", u64::MAX);
        assert!(f.slice(usize::MAX, 2).is_err());
    }
}

/// True when every byte of `buf` is zero. Checks 4 KiB at a time so a non-zero page ends the
/// scan early while each page's loop vectorizes.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|page| page.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Index of the first byte where `a` and `b` differ (same lengths), checking 4 KiB at a time.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let mut base = 0;
    for (x, y) in a.chunks(4096).zip(b.chunks(4096)) {
        if x != y {
            return x.iter().zip(y).position(|(p, q)| p != q).map(|i| base + i);
        }
        base += x.len();
    }
    None
}

/// Index of the first non-zero byte of `buf`.
pub fn first_nonzero(buf: &[u8]) -> Option<usize> {
    let mut base = 0;
    for page in buf.chunks(4096) {
        if page.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return page.iter().position(|&b| b != 0).map(|i| base + i);
        }
        base += page.len();
    }
    None
}

#[cfg(test)]
mod scan_tests {
    use super::*;

    #[test]
    fn finds_first_difference_across_pages() {
        let a = vec![0u8; 10000];
        let mut b = a.clone();
        b[9000] = 1;
        assert_eq!(first_difference(&a, &b), Some(9000));
        assert_eq!(first_nonzero(&b), Some(9000));
        assert!(is_zero(&a));
        assert!(!is_zero(&b));
    }
}
