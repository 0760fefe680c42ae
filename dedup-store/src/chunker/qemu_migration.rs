//! Splitting a QEMU migration stream (`migrate "exec:cat > FILE"`, `savevm` state) into its RAM
//! pages and the opaque rest, so pages dedupe by content like a memory image and the rest goes
//! through content-defined chunking. The stream is rebuilt byte for byte by concatenating the
//! segments' ranges in order.
//!
//! # The format, as far as this parser reads it (all integers big-endian)
//!
//! ```text
//! header        u32 magic 0x5145564d ("QEVM"), u32 version 3
//! [config]      u8 0x07 (QEMU_VM_CONFIGURATION), then VMState fields and subsections: not
//!               self-describing, skipped by searching for the ram section's header
//! section START u8 0x01 | u32 section_id | u8 len, idstr ("ram") | u32 instance_id | u32 version (4)
//! section FULL  u8 0x04 | same header as START (device state in VMState format: opaque)
//! section PART  u8 0x02 | u32 section_id
//! section END   u8 0x03 | u32 section_id
//! footer        u8 0x7e | u32 section_id   (after each section's data, on machine types that
//!               enable section footers)
//! EOF           u8 0x00, then an optional u8 0x06 VM description (u32 length + JSON)
//! ```
//!
//! The ram section's data is a sequence of records, each starting with a u64 whose low 12 bits
//! are flags (`RAM_SAVE_FLAG_*`) and the rest an address (the 4 KiB page's offset in its RAMBlock,
//! or for MEM_SIZE the total RAM size):
//!
//! ```text
//! MEM_SIZE 0x004  then per RAMBlock: u8 len, idstr, u64 used_length, until the lengths sum to
//!                 the total (only in the START section; the postcopy page-size and
//!                 ignore-shared address extras are NOT supported: parsing falls back)
//! ZERO     0x002  [u8 len, idstr unless CONTINUE] u8 fill byte (the page is that byte repeated)
//! PAGE     0x008  [u8 len, idstr unless CONTINUE] 4096 bytes of page data
//! CONTINUE 0x020  or-ed into ZERO/PAGE: same RAMBlock as the previous record, idstr omitted
//! EOS      0x010  end of this section's ram data
//! MULTIFD_FLUSH 0x200  no payload
//! XBZRLE 0x040, HOOK 0x080, COMPRESS_PAGE 0x100: unsupported (fallback, see [`Stop`])
//! ```
//!
//! # How the parser finds RAM records
//!
//! Device sections cannot be parsed generically (VMState lengths are not in the stream), but in
//! a precopy stream the `ram` section comes first: after the header and the configuration,
//! within [`RAM_SEARCH_LIMIT`] bytes. The parser searches for the ram section's START header
//! followed by a MEM_SIZE record, reads the RAMBlock list, then follows the ram section through
//! its PART sections to its END section's EOS; everything after (device state, EOF, the JSON
//! description) is one opaque segment. Anything unexpected (another section interleaved, an
//! unknown or unsupported record, a truncation, a page outside its RAMBlock) stops the parsing
//! and the remainder from the start of that record is opaque: splitting never fails, it only
//! dedupes less; [`Splitter::stop`] says where and why.
//!
//! Memory is bounded: the parser borrows the stream (map large files), yields segments lazily,
//! and keeps only the RAMBlock list (at most [`MAX_RAM_BLOCKS`] entries of at most 255 bytes).

use std::ops::Range;

use crate::error::{Error, Result};

/// "QEVM".
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
/// The only stream version read.
pub const QEMU_VM_FILE_VERSION: u32 = 3;
/// Section types.
pub const QEMU_VM_EOF: u8 = 0x00;
pub const QEMU_VM_SECTION_START: u8 = 0x01;
pub const QEMU_VM_SECTION_PART: u8 = 0x02;
pub const QEMU_VM_SECTION_END: u8 = 0x03;
pub const QEMU_VM_SECTION_FULL: u8 = 0x04;
pub const QEMU_VM_CONFIGURATION: u8 = 0x07;
pub const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;
/// RAM record flags.
pub const RAM_SAVE_FLAG_ZERO: u64 = 0x002;
pub const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x004;
pub const RAM_SAVE_FLAG_PAGE: u64 = 0x008;
pub const RAM_SAVE_FLAG_EOS: u64 = 0x010;
pub const RAM_SAVE_FLAG_CONTINUE: u64 = 0x020;
pub const RAM_SAVE_FLAG_XBZRLE: u64 = 0x040;
pub const RAM_SAVE_FLAG_HOOK: u64 = 0x080;
pub const RAM_SAVE_FLAG_COMPRESS_PAGE: u64 = 0x100;
pub const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;
/// The target page size (x86, arm64 with 4 KiB pages).
pub const PAGE_SIZE: u64 = 4096;
/// The ram section's START header must begin within this many bytes of the stream's start.
pub const RAM_SEARCH_LIMIT: usize = 1 << 20;
/// At most this many RAMBlocks are accepted in the MEM_SIZE record.
pub const MAX_RAM_BLOCKS: usize = 1024;
/// The version of the ram section this parser reads.
pub const RAM_SECTION_VERSION: u32 = 4;

const FLAGS_MASK: u64 = PAGE_SIZE - 1;

/// A RAMBlock named in the MEM_SIZE record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// Its id string (`pc.ram`, `/rom@etc/acpi/tables`, ...), lossily decoded.
    pub id: String,
    /// Its used length in bytes.
    pub length: u64,
}

/// A piece of the stream. Every segment covers a range of the input; the ranges of all segments
/// in order tile the input exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Stream syntax or device state, to chunk with CDC.
    Bytes(Range<u64>),
    /// A 4 KiB page at `offset` of RAMBlock `block` (an index into [`Splitter::blocks`]);
    /// `data` is the 4096 bytes of the page in the stream (its record header is in the
    /// preceding `Bytes`).
    Page {
        block: usize,
        offset: u64,
        data: Range<u64>,
    },
    /// A page filled with `fill` (0 in practice); `at` is the one fill byte in the stream.
    ZeroPage {
        block: usize,
        offset: u64,
        fill: u8,
        at: u64,
    },
}

impl Segment {
    /// The range of the input this segment covers.
    pub fn range(&self) -> Range<u64> {
        match self {
            Segment::Bytes(r) => r.clone(),
            Segment::Page { data, .. } => data.clone(),
            Segment::ZeroPage { at, .. } => *at..*at + 1,
        }
    }
}

/// Why the parser stopped reading RAM records before the ram section's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// No `QEVM` version 3 header.
    NotAMigrationStream,
    /// No ram section START within [`RAM_SEARCH_LIMIT`] bytes.
    NoRamSection,
    /// A record using a feature this parser does not read (XBZRLE, compression, RDMA hooks).
    Unsupported(&'static str),
    /// Another section came before the ram section's END.
    OtherSection,
    /// The stream ends inside the ram section.
    Truncated,
    /// Bytes that break the format.
    Malformed(&'static str),
}

/// Where and why RAM parsing stopped; the input from `offset` on is opaque.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub offset: u64,
    pub reason: StopReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Records,
    AfterEos,
    Rest,
    Done,
}

/// Splits a migration stream into [`Segment`]s; an iterator.
#[derive(Debug)]
pub struct Splitter<'a> {
    data: &'a [u8],
    pos: usize,
    /// Start of the opaque run not yet emitted.
    bytes_start: usize,
    state: State,
    section_id: u32,
    in_end_section: bool,
    blocks: Vec<RamBlock>,
    /// The blocks' ids as sent (ids need not be UTF-8).
    raw_ids: Vec<Vec<u8>>,
    last_block: Option<usize>,
    queued: Option<Segment>,
    stop: Option<Stop>,
    complete: bool,
}

/// Splits `data`.
pub fn split(data: &[u8]) -> Splitter<'_> {
    Splitter {
        data,
        pos: 0,
        bytes_start: 0,
        state: State::Header,
        section_id: 0,
        in_end_section: false,
        blocks: Vec::new(),
        raw_ids: Vec::new(),
        last_block: None,
        queued: None,
        stop: None,
        complete: false,
    }
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_be_bytes(s.try_into().unwrap_or([0; 4])))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
    }
    fn idstr(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()? as usize;
        self.take(len)
    }
}

/// What one step of the record parser found.
enum Step {
    Segment(Segment),
    Continue,
    Stop(StopReason),
}

impl<'a> Splitter<'a> {
    /// The RAMBlocks of the MEM_SIZE record (empty until it is parsed).
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Where and why RAM parsing stopped early, `None` while running or when it reached the ram
    /// section's end (see [`Splitter::is_complete`]).
    pub fn stop(&self) -> Option<&Stop> {
        self.stop.as_ref()
    }

    /// True once the ram section's END was read to its EOS.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// After iterating: an error unless the whole ram section was read (for callers that want
    /// every page split out rather than a silent fallback).
    pub fn require_complete(&self) -> Result<()> {
        match &self.stop {
            None if self.complete => Ok(()),
            None => Err(Error::InvalidArgument(
                "the migration stream was not split to its end".into(),
            )),
            Some(Stop {
                offset,
                reason: StopReason::Unsupported(what),
            }) => Err(Error::InvalidArgument(format!(
                "QEMU migration stream at offset {offset:#x}: {what} records are not supported"
            ))),
            Some(Stop { offset, reason }) => Err(Error::corrupt(
                "QEMU migration stream",
                *offset,
                format!("{reason:?}"),
            )),
        }
    }

    fn stop_at(&mut self, offset: usize, reason: StopReason) {
        self.stop = Some(Stop {
            offset: offset as u64,
            reason,
        });
        self.state = State::Rest;
    }

    /// Emits the pending opaque run up to `end` (if any) and queues `seg`.
    fn emit(&mut self, end: usize, seg: Segment) -> Option<Segment> {
        let next_start = seg.range().end as usize;
        let pending =
            (self.bytes_start < end).then_some(Segment::Bytes(self.bytes_start as u64..end as u64));
        self.bytes_start = next_start;
        match pending {
            Some(p) => {
                self.queued = Some(seg);
                Some(p)
            }
            None => Some(seg),
        }
    }

    /// Reads the header and the ram section's START with its RAMBlock list.
    fn header(&mut self) {
        let mut c = Cursor {
            data: self.data,
            pos: 0,
        };
        if c.u32() != Some(QEMU_VM_FILE_MAGIC) || c.u32() != Some(QEMU_VM_FILE_VERSION) {
            return self.stop_at(0, StopReason::NotAMigrationStream);
        }
        let Some(start) = self.find_ram_start() else {
            return self.stop_at(8, StopReason::NoRamSection);
        };
        let mut c = Cursor {
            data: self.data,
            pos: start,
        };
        // Checked by find_ram_start: u8 type, u32 id, "\x03ram", u32 instance, u32 version.
        c.pos += 1;
        self.section_id = c.u32().unwrap_or(0);
        c.pos += 4 + 4 + 4;
        let mem = c.u64().unwrap_or(0);
        let total = mem & !FLAGS_MASK;
        let mut sum = 0u64;
        while sum < total {
            if self.blocks.len() >= MAX_RAM_BLOCKS {
                return self.stop_at(start, StopReason::Malformed("too many RAMBlocks"));
            }
            let (Some(id), Some(length)) = (c.idstr(), c.u64()) else {
                return self.stop_at(start, StopReason::Truncated);
            };
            if id.is_empty() {
                return self.stop_at(start, StopReason::Malformed("empty RAMBlock id"));
            }
            sum = match sum.checked_add(length) {
                Some(s) if s <= total => s,
                _ => {
                    return self.stop_at(
                        start,
                        StopReason::Malformed("RAMBlock lengths exceed the total"),
                    );
                }
            };
            self.raw_ids.push(id.to_vec());
            self.blocks.push(RamBlock {
                id: String::from_utf8_lossy(id).into_owned(),
                length,
            });
        }
        self.pos = c.pos;
        self.state = State::Records;
    }

    /// The offset of the ram section's START header followed by a MEM_SIZE record.
    fn find_ram_start(&self) -> Option<usize> {
        const NAME: &[u8] = b"\x03ram";
        let limit = self.data.len().min(RAM_SEARCH_LIMIT);
        (8..limit).find(|&at| {
            let mut c = Cursor {
                data: self.data,
                pos: at,
            };
            c.u8() == Some(QEMU_VM_SECTION_START)
                && c.u32().is_some()
                && c.take(4) == Some(NAME)
                && c.u32().is_some()
                && c.u32() == Some(RAM_SECTION_VERSION)
                && c.u64().map(|h| h & FLAGS_MASK) == Some(RAM_SAVE_FLAG_MEM_SIZE)
        })
    }

    /// One RAM record at `self.pos`.
    fn record(&mut self) -> Step {
        let mut c = Cursor {
            data: self.data,
            pos: self.pos,
        };
        let Some(header) = c.u64() else {
            return Step::Stop(StopReason::Truncated);
        };
        let flags = header & FLAGS_MASK;
        let offset = header & !FLAGS_MASK;
        let kind = flags & !RAM_SAVE_FLAG_CONTINUE;
        match kind {
            RAM_SAVE_FLAG_EOS if flags == kind => {
                self.pos = c.pos;
                self.state = State::AfterEos;
                return Step::Continue;
            }
            RAM_SAVE_FLAG_MULTIFD_FLUSH if flags == kind => {
                self.pos = c.pos;
                return Step::Continue;
            }
            RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE => {}
            RAM_SAVE_FLAG_XBZRLE => return Step::Stop(StopReason::Unsupported("XBZRLE")),
            RAM_SAVE_FLAG_COMPRESS_PAGE => {
                return Step::Stop(StopReason::Unsupported("compressed page"));
            }
            RAM_SAVE_FLAG_HOOK => return Step::Stop(StopReason::Unsupported("RAM hook (RDMA)")),
            _ => return Step::Stop(StopReason::Malformed("unknown RAM record flags")),
        }
        let block = if flags & RAM_SAVE_FLAG_CONTINUE != 0 {
            match self.last_block {
                Some(b) => b,
                None => return Step::Stop(StopReason::Malformed("CONTINUE before any block")),
            }
        } else {
            let Some(id) = c.idstr() else {
                return Step::Stop(StopReason::Truncated);
            };
            match self.raw_ids.iter().position(|b| b.as_slice() == id) {
                Some(b) => b,
                None => return Step::Stop(StopReason::Malformed("unknown RAMBlock")),
            }
        };
        if offset
            .checked_add(PAGE_SIZE)
            .is_none_or(|end| end > self.blocks[block].length)
        {
            return Step::Stop(StopReason::Malformed("page outside its RAMBlock"));
        }
        let data_at = c.pos;
        let seg = if kind == RAM_SAVE_FLAG_ZERO {
            let Some(fill) = c.u8() else {
                return Step::Stop(StopReason::Truncated);
            };
            Segment::ZeroPage {
                block,
                offset,
                fill,
                at: data_at as u64,
            }
        } else {
            if c.take(PAGE_SIZE as usize).is_none() {
                return Step::Stop(StopReason::Truncated);
            }
            Segment::Page {
                block,
                offset,
                data: data_at as u64..c.pos as u64,
            }
        };
        self.last_block = Some(block);
        self.pos = c.pos;
        Step::Segment(seg)
    }

    /// After an EOS: an optional footer, then the ram section's next PART or END.
    fn after_eos(&mut self) {
        let mut c = Cursor {
            data: self.data,
            pos: self.pos,
        };
        if c.data.get(c.pos) == Some(&QEMU_VM_SECTION_FOOTER) {
            c.pos += 1;
            if c.u32() != Some(self.section_id) {
                return self.stop_at(self.pos, StopReason::Malformed("footer of another section"));
            }
            self.pos = c.pos;
        }
        if self.in_end_section {
            self.complete = true;
            self.state = State::Rest;
            return;
        }
        let kind = c.u8();
        let id = c.u32();
        match kind {
            Some(QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END) if id == Some(self.section_id) => {
                self.in_end_section = kind == Some(QEMU_VM_SECTION_END);
                self.pos = c.pos;
                self.state = State::Records;
            }
            None => self.stop_at(self.pos, StopReason::Truncated),
            _ => self.stop_at(self.pos, StopReason::OtherSection),
        }
    }
}

impl Iterator for Splitter<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        if let Some(seg) = self.queued.take() {
            return Some(seg);
        }
        loop {
            match self.state {
                State::Header => self.header(),
                State::Records => match self.record() {
                    Step::Segment(seg) => {
                        let start = seg.range().start as usize;
                        return self.emit(start, seg);
                    }
                    Step::Continue => {}
                    Step::Stop(reason) => self.stop_at(self.pos, reason),
                },
                State::AfterEos => self.after_eos(),
                State::Rest => {
                    self.state = State::Done;
                    if self.bytes_start < self.data.len() {
                        let seg = Segment::Bytes(self.bytes_start as u64..self.data.len() as u64);
                        self.bytes_start = self.data.len();
                        return Some(seg);
                    }
                }
                State::Done => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &[u8] = include_bytes!("../../tests/data/qemu-7.2-pc-64m.mig");

    /// Splits `data`, checks that the segments tile it, and returns them with the splitter.
    fn split_checked(data: &[u8]) -> (Vec<Segment>, Option<Stop>, bool, Vec<RamBlock>) {
        let mut s = split(data);
        let segs: Vec<Segment> = s.by_ref().collect();
        let mut rebuilt = Vec::with_capacity(data.len());
        let mut pos = 0u64;
        for seg in &segs {
            let r = seg.range();
            assert_eq!(r.start, pos, "segments tile the input");
            assert!(r.end > r.start, "no empty segment");
            rebuilt.extend_from_slice(&data[r.start as usize..r.end as usize]);
            pos = r.end;
            if let Segment::Page { data: d, .. } = seg {
                assert_eq!(d.end - d.start, PAGE_SIZE);
            }
        }
        assert_eq!(rebuilt, data, "byte-exact reassembly");
        (
            segs,
            s.stop().cloned(),
            s.is_complete(),
            s.blocks().to_vec(),
        )
    }

    #[test]
    fn the_real_qemu_stream_splits_into_its_pages() {
        let (segs, stop, complete, blocks) = split_checked(FIXTURE);
        assert_eq!(stop, None);
        assert!(complete);
        let names: Vec<&str> = blocks.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(
            names,
            [
                "pc.ram",
                "/rom@etc/acpi/tables",
                "pc.rom",
                "pc.bios",
                "/rom@etc/table-loader",
                "/rom@etc/acpi/rsdp"
            ]
        );
        assert_eq!(blocks[0].length, 64 << 20);
        let pages = segs
            .iter()
            .filter(|s| matches!(s, Segment::Page { .. }))
            .count();
        let zeros = segs
            .iter()
            .filter(|s| matches!(s, Segment::ZeroPage { fill: 0, .. }))
            .count();
        // QEMU's own count: "normal: 42 pages", "duplicate: 16424 pages".
        assert_eq!(pages, 42);
        assert_eq!(zeros, 16424);
        // The loader blob at 0x200000 of pc.ram: 16 random pages twice, then 0xAB, then the
        // first random page again.
        let page = |off: u64| {
            segs.iter()
                .find_map(|s| match s {
                    Segment::Page {
                        block: 0,
                        offset,
                        data,
                    } if *offset == off => Some(&FIXTURE[data.start as usize..data.end as usize]),
                    _ => None,
                })
                .unwrap()
        };
        for i in 0..16 {
            assert_eq!(page(0x200000 + i * 4096), page(0x210000 + i * 4096));
        }
        assert_eq!(page(0x220000), &[0xab; 4096][..]);
        assert_eq!(page(0x221000), page(0x200000));
        // The rest after the ram section is one opaque segment holding the device state.
        let Some(Segment::Bytes(last)) = segs.last() else {
            panic!("no trailing bytes")
        };
        assert_eq!(last.end, FIXTURE.len() as u64);
        // Golden: the whole segment list (kind, block, offset, range), so a change of where the
        // splitter cuts (and so of what dedupes) fails here.
        let mut h = blake3::Hasher::new();
        for seg in &segs {
            let (tag, block, offset, r) = match seg {
                Segment::Bytes(r) => (0u8, 0, 0, r.clone()),
                Segment::Page {
                    block,
                    offset,
                    data,
                } => (1, *block, *offset, data.clone()),
                Segment::ZeroPage {
                    block, offset, at, ..
                } => (2, *block, *offset, *at..*at + 1),
            };
            h.update(&[tag]);
            for v in [block as u64, offset, r.start, r.end] {
                h.update(&v.to_le_bytes());
            }
        }
        assert_eq!(segs.len(), 32933, "segment count");
        assert_eq!(
            h.finalize().to_hex().as_str(),
            "1eb88306c9e78846aea2eab07995ccf95618b386f5ae196a4afa5703665e97d5"
        );
        // It starts after the last page record and holds the ram END section's EOS and footer
        // (7e 00000002), then the first device section (FULL, 04).
        assert_eq!(last.start, 320_469);
        assert_eq!(&FIXTURE[320_495..320_501], b"\x7e\0\0\0\x02\x04");
    }

    #[test]
    fn every_truncation_of_the_real_stream_reassembles_exactly() {
        for cut in (0..FIXTURE.len()).step_by(997).chain([0, 1, 8, 9, 30, 200]) {
            let (segs, stop, _, _) = split_checked(&FIXTURE[..cut]);
            if cut > 0 {
                assert!(!segs.is_empty());
            }
            let _ = stop;
        }
    }

    #[test]
    fn garbage_and_corrupted_streams_fall_back_to_bytes() {
        let garbage = crate::chunker::cdc::xorshift_bytes(5, 100_000);
        let (segs, stop, _, _) = split_checked(&garbage);
        assert_eq!(segs, [Segment::Bytes(0..100_000)]);
        assert_eq!(stop.unwrap().reason, StopReason::NotAMigrationStream);

        let mut no_ram = b"QEVM\0\0\0\x03".to_vec();
        no_ram.extend_from_slice(&garbage[..1000]);
        let (_, stop, _, _) = split_checked(&no_ram);
        assert_eq!(stop.unwrap().reason, StopReason::NoRamSection);

        // Flip bytes all over the real stream: always exact, never a panic.
        let mut x = 0x1234_5678_u64;
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut bad = FIXTURE.to_vec();
            let at = (x % FIXTURE.len().min(300_000) as u64) as usize;
            bad[at] ^= (x >> 40) as u8 | 1;
            split_checked(&bad);
        }
    }

    /// A synthetic stream: header, config, ram START with one block, a PART with the given
    /// records, then END with EOS and trailing device bytes.
    fn synthetic(records: &[u8]) -> Vec<u8> {
        let mut s = b"QEVM\0\0\0\x03\x07\0\0\0\x02pc".to_vec();
        s.extend_from_slice(b"\x01\0\0\0\x05\x03ram\0\0\0\0\0\0\0\x04");
        s.extend_from_slice(&(0x10000u64 | RAM_SAVE_FLAG_MEM_SIZE).to_be_bytes());
        s.extend_from_slice(b"\x02m0");
        s.extend_from_slice(&0x10000u64.to_be_bytes());
        s.extend_from_slice(&RAM_SAVE_FLAG_EOS.to_be_bytes());
        s.extend_from_slice(b"\x02\0\0\0\x05");
        s.extend_from_slice(records);
        s
    }

    #[test]
    fn unsupported_records_stop_with_a_reason() {
        let mut rec = (0x1000 | RAM_SAVE_FLAG_XBZRLE).to_be_bytes().to_vec();
        rec.extend_from_slice(b"\x02m0\x00\x00\x10junk");
        let data = synthetic(&rec);
        let mut s = split(&data);
        let segs: Vec<_> = s.by_ref().collect();
        assert_eq!(segs.len(), 1);
        assert_eq!(s.stop().unwrap().reason, StopReason::Unsupported("XBZRLE"));
        assert!(s.require_complete().is_err());
        split_checked(&data);
    }

    #[test]
    fn a_synthetic_stream_without_footers_is_split() {
        let mut rec = (0x2000 | RAM_SAVE_FLAG_PAGE).to_be_bytes().to_vec();
        rec.extend_from_slice(b"\x02m0");
        rec.extend_from_slice(&[7u8; 4096]);
        rec.extend_from_slice(
            &(0x3000 | RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE).to_be_bytes(),
        );
        rec.push(0);
        rec.extend_from_slice(&RAM_SAVE_FLAG_EOS.to_be_bytes());
        rec.extend_from_slice(b"\x03\0\0\0\x05");
        rec.extend_from_slice(&RAM_SAVE_FLAG_EOS.to_be_bytes());
        rec.extend_from_slice(b"\x04device state\x00");
        let data = synthetic(&rec);
        let (segs, stop, complete, _) = split_checked(&data);
        assert_eq!(stop, None);
        assert!(complete);
        let kinds: Vec<_> = segs
            .iter()
            .map(|s| match s {
                Segment::Bytes(_) => "b",
                Segment::Page {
                    offset: 0x2000,
                    block: 0,
                    ..
                } => "p",
                Segment::ZeroPage {
                    offset: 0x3000,
                    block: 0,
                    fill: 0,
                    ..
                } => "z",
                _ => "?",
            })
            .collect();
        assert_eq!(kinds, ["b", "p", "b", "z", "b"]);
        // A page beyond its block's end stops the parsing.
        let mut rec = (0x10000 | RAM_SAVE_FLAG_PAGE).to_be_bytes().to_vec();
        rec.extend_from_slice(b"\x02m0");
        rec.extend_from_slice(&[7u8; 4096]);
        let (_, stop, _, _) = split_checked(&synthetic(&rec));
        assert_eq!(
            stop.unwrap().reason,
            StopReason::Malformed("page outside its RAMBlock")
        );
    }
}
