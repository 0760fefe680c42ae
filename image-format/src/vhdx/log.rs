//! The VHDX metadata log ([MS-VHDX] 2.3): parsing, finding the active sequence, and building an
//! in-memory [`Overlay`] of the writes it describes. Pure functions over the log's bytes.
//!
//! # Layout
//!
//! The log is a circular buffer of 4 KiB sectors. An entry is one or more descriptor sectors
//! (the first starts with a 64-byte header, then 32-byte descriptors follow contiguously) and one
//! data sector per data descriptor. An entry may wrap from the end of the buffer to its start.
//!
//! ```text
//! entry: [ header(64) desc desc ... | desc ... ] [ data sector ] [ data sector ] ...
//!          "loge"     "desc"/"zero"               "data" seqhi <4084 bytes> seqlo
//! ```
//!
//! A data descriptor writes one 4 KiB sector: its LeadingBytes (8), the data sector's 4084
//! payload bytes, then its TrailingBytes (4). A zero descriptor zeroes a 4 KiB-aligned range.
//!
//! # Active sequence ([MS-VHDX] 2.3.3)
//!
//! Starting at every candidate position (advancing past each sequence found), collect the
//! longest run of valid entries whose sequence numbers increase by one. A run counts only if its
//! last entry's Tail points at one of its own entries; the run with the highest final sequence
//! number wins, and the active sequence is its suffix starting at that Tail. Replaying applies
//! the entries of that suffix in order.
//!
//! # Bounds
//!
//! The log is at most [`MAX_LOG_LENGTH`] bytes; a sequence never spans more sectors than the
//! log has; the overlay holds at most one 4 KiB sector per data descriptor (so at most the log's
//! size); checksumming is capped at [`MAX_SCAN_FACTOR`] times the log length so a log crafted
//! with many bad-checksum entries cannot make opening quadratic.

use std::collections::BTreeMap;

use crate::bytes::Fields;
use crate::error::{Error, Result};

use super::guid::Guid;
use super::header::crc32c_with_hole;

/// Log sector size.
pub const LOG_SECTOR: usize = 4096;
/// Largest log this reader loads into memory (Hyper-V and qemu create 1 MiB logs).
pub const MAX_LOG_LENGTH: u32 = 64 << 20;
/// Cap on the bytes checksummed while searching, as a multiple of the log length.
pub const MAX_SCAN_FACTOR: u64 = 8;
/// "loge": log entry header signature.
pub const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
/// "desc": data descriptor signature.
pub const DATA_DESC_SIGNATURE: &[u8; 4] = b"desc";
/// "zero": zero descriptor signature.
pub const ZERO_DESC_SIGNATURE: &[u8; 4] = b"zero";
/// "data": data sector signature.
pub const DATA_SECTOR_SIGNATURE: &[u8; 4] = b"data";
/// Bytes of the entry header.
const ENTRY_HEADER_LEN: u64 = 64;
/// Bytes of one descriptor.
const DESCRIPTOR_LEN: u64 = 32;

/// A write described by the log.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Write {
    /// One 4 KiB sector of data at a 4 KiB-aligned offset.
    Data { offset: u64, sector: Box<[u8]> },
    /// A 4 KiB-aligned range of zeros.
    Zero { offset: u64, len: u64 },
}

/// One valid log entry.
#[derive(Clone, Debug)]
struct Entry {
    /// Sector index in the log.
    pos: u64,
    /// Sectors the entry spans.
    sectors: u64,
    sequence_number: u64,
    /// Sector index of the first entry of the sequence this entry belongs to.
    tail: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

/// The writes of the active sequence, applied in order, kept as non-overlapping pieces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlay {
    /// 4 KiB sectors by their file offset.
    data: BTreeMap<u64, Box<[u8]>>,
    /// Zero ranges `start -> end`, disjoint from each other and from `data`.
    zeros: BTreeMap<u64, u64>,
}

impl Overlay {
    /// True when nothing is overlaid.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty() && self.zeros.is_empty()
    }

    /// Bytes of data held in memory.
    pub fn data_bytes(&self) -> u64 {
        self.data.len() as u64 * LOG_SECTOR as u64
    }

    /// The end of the last overlaid byte (a replay extends the file that far).
    pub fn end(&self) -> u64 {
        let d = self
            .data
            .keys()
            .next_back()
            .map_or(0, |o| o + LOG_SECTOR as u64);
        let z = self.zeros.values().next_back().copied().unwrap_or(0);
        d.max(z)
    }

    fn apply(&mut self, w: Write) {
        match w {
            Write::Data { offset, sector } => {
                self.punch_zeros(offset, offset + LOG_SECTOR as u64);
                self.data.insert(offset, sector);
            }
            Write::Zero { offset, len } => {
                let end = offset + len;
                let doomed: Vec<u64> = self.data.range(offset..end).map(|(k, _)| *k).collect();
                for k in doomed {
                    self.data.remove(&k);
                }
                self.punch_zeros(offset, end);
                self.zeros.insert(offset, end);
            }
        }
    }

    /// Removes `[start, end)` from the zero ranges, splitting the ranges it cuts.
    fn punch_zeros(&mut self, start: u64, end: u64) {
        let mut keep = Vec::new();
        let cut: Vec<(u64, u64)> = self
            .zeros
            .range(..end)
            .rev()
            .take_while(|(_, e)| **e > start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in cut {
            self.zeros.remove(&s);
            if s < start {
                keep.push((s, start));
            }
            if e > end {
                keep.push((end, e));
            }
        }
        self.zeros.extend(keep);
    }

    /// True when `[off, off + len)` touches an overlaid byte.
    pub fn intersects(&self, off: u64, len: u64) -> bool {
        let end = off.saturating_add(len);
        let start = off.saturating_sub(LOG_SECTOR as u64 - 1);
        self.data.range(start..end).next().is_some()
            || self
                .zeros
                .range(..end)
                .next_back()
                .is_some_and(|(_, e)| *e > off)
    }

    /// Replaces the bytes of `buf`, read from file offset `off`, that the log overwrites.
    pub fn patch(&self, buf: &mut [u8], off: u64) {
        let end = off.saturating_add(buf.len() as u64);
        let start = off.saturating_sub(LOG_SECTOR as u64 - 1);
        for (&o, sector) in self.data.range(start..end) {
            copy_intersection(buf, off, sector, o);
        }
        for (&s, &e) in self.zeros.range(..end).rev().take_while(|(_, e)| **e > off) {
            let a = s.max(off) - off;
            let b = e.min(end) - off;
            if let Some(part) = buf.get_mut(a as usize..b as usize) {
                part.fill(0);
            }
        }
    }
}

/// Copies the part of `src` (at file offset `src_off`) that overlaps `dst` (at `dst_off`).
fn copy_intersection(dst: &mut [u8], dst_off: u64, src: &[u8], src_off: u64) {
    let a = dst_off.max(src_off);
    let b = (dst_off + dst.len() as u64).min(src_off + src.len() as u64);
    if a >= b {
        return;
    }
    let (d, s, n) = (
        (a - dst_off) as usize,
        (a - src_off) as usize,
        (b - a) as usize,
    );
    if let (Some(to), Some(from)) = (dst.get_mut(d..d + n), src.get(s..s + n)) {
        to.copy_from_slice(from);
    }
}

/// The outcome of replaying a log in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// The writes, to consult before the file.
    pub overlay: Overlay,
    /// Entries of the active sequence.
    pub entries: u32,
    /// Sequence number of the newest entry.
    pub last_sequence: u64,
    /// The file size the newest entry requires before replay.
    pub flushed_file_offset: u64,
    /// The file size after replay.
    pub last_file_offset: u64,
}

/// Reads the circular log `log` (its whole bytes, read at file offset `log_offset`) and replays
/// the active sequence of entries carrying `log_guid` into an overlay. `Ok(None)` when the log
/// holds no valid sequence (nothing to replay).
pub fn replay(log: &[u8], log_guid: Guid, log_offset: u64) -> Result<Option<Replay>> {
    let err = |reason: String| Error::corrupt("log", log_offset, reason);
    if log.is_empty()
        || !log.len().is_multiple_of(LOG_SECTOR)
        || log.len() > MAX_LOG_LENGTH as usize
    {
        return Err(err(format!(
            "log of {} bytes is not a non-empty multiple of 4 KiB up to {MAX_LOG_LENGTH} bytes",
            log.len()
        )));
    }
    let ring = Ring { log, log_offset };
    let n = ring.sectors();
    let mut budget = MAX_SCAN_FACTOR * log.len() as u64;
    let mut best: Option<Vec<Entry>> = None;
    let mut tail = 0u64;
    while tail < n {
        let mut seq: Vec<Entry> = Vec::new();
        let mut head = tail;
        let mut spanned = 0u64;
        while let Some(e) = ring.entry(head % n, log_guid, &mut budget)? {
            let follows = seq
                .last()
                .is_none_or(|p| p.sequence_number.checked_add(1) == Some(e.sequence_number));
            if !follows || spanned + e.sectors > n {
                break;
            }
            spanned += e.sectors;
            head += e.sectors;
            seq.push(e);
        }
        let Some(last) = seq.last() else {
            tail += 1;
            continue;
        };
        if let Some(k) = seq.iter().position(|e| e.pos == last.tail) {
            let better = best
                .as_ref()
                .and_then(|b| b.last())
                .is_none_or(|b| last.sequence_number > b.sequence_number);
            if better {
                seq.drain(..k);
                best = Some(seq);
            }
        }
        tail = head;
    }
    let Some(active) = best else {
        return Ok(None);
    };
    let mut out = Replay::default();
    for e in &active {
        for w in ring.writes(e)? {
            out.overlay.apply(w);
        }
    }
    if let Some(last) = active.last() {
        out.entries = u32::try_from(active.len()).unwrap_or(u32::MAX);
        out.last_sequence = last.sequence_number;
        out.flushed_file_offset = last.flushed_file_offset;
        out.last_file_offset = last.last_file_offset;
    }
    Ok(Some(out))
}

/// The log as a ring of sectors.
struct Ring<'a> {
    log: &'a [u8],
    log_offset: u64,
}

impl Ring<'_> {
    fn sectors(&self) -> u64 {
        (self.log.len() / LOG_SECTOR) as u64
    }

    /// Sector `i` (taken modulo the ring size).
    fn sector(&self, i: u64) -> &[u8] {
        let start = ((i % self.sectors()) as usize) * LOG_SECTOR;
        self.log.get(start..start + LOG_SECTOR).unwrap_or(&[])
    }

    /// Byte `at` of an entry starting at sector `pos`, as 32 bytes (descriptor slots never
    /// straddle sectors: 64 + 126 * 32 = 4096).
    fn slot(&self, pos: u64, at: u64) -> Fields<'_> {
        let sector = self.sector(pos + at / LOG_SECTOR as u64);
        let within = (at % LOG_SECTOR as u64) as usize;
        let file_off =
            self.log_offset + ((pos + at / LOG_SECTOR as u64) % self.sectors()) * LOG_SECTOR as u64;
        Fields::new(
            sector.get(within..within + 32).unwrap_or(&[]),
            "log descriptor",
            file_off + within as u64,
        )
    }

    /// The entry starting at sector `pos` if it is valid for `guid`, else `None`.
    fn entry(&self, pos: u64, guid: Guid, budget: &mut u64) -> Result<Option<Entry>> {
        let n = self.sectors();
        let first = self.sector(pos);
        let f = Fields::new(
            first,
            "log entry",
            self.log_offset + pos * LOG_SECTOR as u64,
        );
        if f.slice(0, 4)? != ENTRY_SIGNATURE || f.array::<16>(32)? != guid.0 {
            return Ok(None);
        }
        let length = u64::from(f.u32_le(8)?);
        let tail = u64::from(f.u32_le(12)?);
        let sequence_number = f.u64_le(16)?;
        let descriptors = u64::from(f.u32_le(24)?);
        let sector = LOG_SECTOR as u64;
        if length == 0
            || length % sector != 0
            || length / sector > n
            || tail % sector != 0
            || tail / sector >= n
        {
            return Ok(None);
        }
        let sectors = length / sector;
        let desc_sectors = (ENTRY_HEADER_LEN + descriptors * DESCRIPTOR_LEN).div_ceil(sector);
        if desc_sectors > sectors {
            return Ok(None);
        }
        // Checksum over the whole entry, the field at byte 4 read as zero.
        if *budget < length {
            return Err(Error::corrupt(
                "log",
                self.log_offset,
                format!(
                    "searching the log checksummed more than {MAX_SCAN_FACTOR} times its length; refusing"
                ),
            ));
        }
        *budget -= length;
        let mut crc = crc32c_with_hole(first, 4);
        for i in 1..sectors {
            crc = crc32c::crc32c_append(crc, self.sector(pos + i));
        }
        if crc != f.u32_le(4)? {
            return Ok(None);
        }
        // Descriptors and data sectors must carry the entry's sequence number.
        let mut data_count = 0u64;
        for i in 0..descriptors {
            let d = self.slot(pos, ENTRY_HEADER_LEN + i * DESCRIPTOR_LEN);
            let sig = d.slice(0, 4)?;
            if sig == DATA_DESC_SIGNATURE {
                let off = d.u64_le(16)?;
                if d.u64_le(24)? != sequence_number
                    || off % sector != 0
                    || off.checked_add(sector).is_none()
                {
                    return Ok(None);
                }
                let data = self.sector(pos + desc_sectors + data_count);
                let ds = Fields::new(data, "log data sector", 0);
                let high = u64::from(ds.u32_le(4)?);
                let low = u64::from(ds.u32_le(LOG_SECTOR - 4)?);
                if ds.slice(0, 4)? != DATA_SECTOR_SIGNATURE || (high << 32 | low) != sequence_number
                {
                    return Ok(None);
                }
                data_count += 1;
                if desc_sectors + data_count > sectors {
                    return Ok(None);
                }
            } else if sig == ZERO_DESC_SIGNATURE {
                let len = d.u64_le(8)?;
                let off = d.u64_le(16)?;
                if d.u64_le(24)? != sequence_number
                    || len % sector != 0
                    || off % sector != 0
                    || off.checked_add(len).is_none()
                {
                    return Ok(None);
                }
            } else {
                return Ok(None);
            }
        }
        Ok(Some(Entry {
            pos,
            sectors,
            sequence_number,
            tail: tail / sector,
            flushed_file_offset: f.u64_le(48)?,
            last_file_offset: f.u64_le(56)?,
        }))
    }

    /// The writes of a validated entry, in descriptor order.
    fn writes(&self, e: &Entry) -> Result<Vec<Write>> {
        let first = Fields::new(self.sector(e.pos), "log entry", 0);
        let descriptors = u64::from(first.u32_le(24)?);
        let desc_sectors =
            (ENTRY_HEADER_LEN + descriptors * DESCRIPTOR_LEN).div_ceil(LOG_SECTOR as u64);
        let mut out = Vec::new();
        let mut data_count = 0u64;
        for i in 0..descriptors {
            let d = self.slot(e.pos, ENTRY_HEADER_LEN + i * DESCRIPTOR_LEN);
            if d.slice(0, 4)? == DATA_DESC_SIGNATURE {
                let mut sector = vec![0u8; LOG_SECTOR].into_boxed_slice();
                let data = self.sector(e.pos + desc_sectors + data_count);
                sector[..8].copy_from_slice(d.slice(8, 8)?); // leading bytes
                sector[8..LOG_SECTOR - 4]
                    .copy_from_slice(data.get(8..LOG_SECTOR - 4).unwrap_or(&[0; LOG_SECTOR - 12]));
                sector[LOG_SECTOR - 4..].copy_from_slice(d.slice(4, 4)?); // trailing bytes
                out.push(Write::Data {
                    offset: d.u64_le(16)?,
                    sector,
                });
                data_count += 1;
            } else {
                let len = d.u64_le(8)?;
                if len > 0 {
                    out.push(Write::Zero {
                        offset: d.u64_le(16)?,
                        len,
                    });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Descriptor of a test entry: data (file offset, fill byte) or zero (file offset, length).
    #[derive(Clone, Copy)]
    pub(crate) enum Desc {
        Data(u64, u8),
        Zero(u64, u64),
    }

    /// Builds one log entry: header "loge", descriptors, data sectors, checksum.
    pub(crate) fn entry_bytes(
        seq: u64,
        tail: u32,
        guid: Guid,
        descs: &[Desc],
        file_size: u64,
    ) -> Vec<u8> {
        let desc_sectors = (64 + 32 * descs.len()).div_ceil(LOG_SECTOR);
        let data: Vec<(u64, u8)> = descs
            .iter()
            .filter_map(|d| match d {
                Desc::Data(o, b) => Some((*o, *b)),
                Desc::Zero(..) => None,
            })
            .collect();
        let len = (desc_sectors + data.len()) * LOG_SECTOR;
        let mut b = vec![0u8; len];
        b[0..4].copy_from_slice(b"loge"); // signature
        b[8..12].copy_from_slice(&(len as u32).to_le_bytes()); // entry length
        b[12..16].copy_from_slice(&tail.to_le_bytes()); // tail
        b[16..24].copy_from_slice(&seq.to_le_bytes()); // sequence number
        b[24..28].copy_from_slice(&(descs.len() as u32).to_le_bytes()); // descriptor count
        b[32..48].copy_from_slice(&guid.0); // log GUID
        b[48..56].copy_from_slice(&file_size.to_le_bytes()); // flushed file offset
        b[56..64].copy_from_slice(&file_size.to_le_bytes()); // last file offset
        let mut di = 0;
        for (i, d) in descs.iter().enumerate() {
            let at = 64 + 32 * i;
            match *d {
                Desc::Data(off, fill) => {
                    b[at..at + 4].copy_from_slice(b"desc"); // data descriptor
                    b[at + 4..at + 8].copy_from_slice(&[fill; 4]); // trailing bytes
                    b[at + 8..at + 16].copy_from_slice(&[fill; 8]); // leading bytes
                    b[at + 16..at + 24].copy_from_slice(&off.to_le_bytes()); // file offset
                    b[at + 24..at + 32].copy_from_slice(&seq.to_le_bytes()); // sequence number
                    let s = (desc_sectors + di) * LOG_SECTOR;
                    b[s..s + 4].copy_from_slice(b"data"); // data sector signature
                    b[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes()); // seq high
                    b[s + 8..s + LOG_SECTOR - 4].fill(fill); // payload
                    b[s + LOG_SECTOR - 4..s + LOG_SECTOR]
                        .copy_from_slice(&(seq as u32).to_le_bytes()); // seq low
                    di += 1;
                }
                Desc::Zero(off, zlen) => {
                    b[at..at + 4].copy_from_slice(b"zero"); // zero descriptor
                    b[at + 8..at + 16].copy_from_slice(&zlen.to_le_bytes()); // zero length
                    b[at + 16..at + 24].copy_from_slice(&off.to_le_bytes()); // file offset
                    b[at + 24..at + 32].copy_from_slice(&seq.to_le_bytes()); // sequence number
                }
            }
        }
        let crc = crc32c_with_hole(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes()); // checksum
        b
    }

    const GUID: Guid = Guid([0x42; 16]);

    fn log_with(entries: &[(usize, Vec<u8>)], len: usize) -> Vec<u8> {
        let mut log = vec![0u8; len];
        for (at, e) in entries {
            for (i, byte) in e.iter().enumerate() {
                log[(at + i) % len] = *byte;
            }
        }
        log
    }

    fn read(o: &Overlay, off: u64, len: usize, fill: u8) -> Vec<u8> {
        let mut buf = vec![fill; len];
        o.patch(&mut buf, off);
        buf
    }

    #[test]
    fn single_entry_replays_its_data_sector() {
        let e = entry_bytes(7, 0, GUID, &[Desc::Data(0x20_0000, 0xa5)], 1 << 30);
        let log = log_with(&[(0, e)], 1 << 20);
        let r = replay(&log, GUID, 1 << 20).unwrap().unwrap();
        assert_eq!(
            (r.entries, r.last_sequence, r.last_file_offset),
            (1, 7, 1 << 30)
        );
        assert_eq!(read(&r.overlay, 0x20_0000 - 2, 4, 1), [1, 1, 0xa5, 0xa5]);
        assert!(!r.overlay.intersects(0x20_1000, 10));
    }

    #[test]
    fn entry_of_another_log_guid_is_ignored() {
        let e = entry_bytes(7, 0, Guid([1; 16]), &[Desc::Data(0x20_0000, 0xa5)], 0);
        let log = log_with(&[(0, e)], 1 << 20);
        assert_eq!(replay(&log, GUID, 1 << 20).unwrap(), None);
    }

    #[test]
    fn bad_checksum_invalidates_the_entry() {
        let mut e = entry_bytes(7, 0, GUID, &[Desc::Data(0x20_0000, 0xa5)], 0);
        e[5000] ^= 1;
        let log = log_with(&[(0, e)], 1 << 20);
        assert_eq!(replay(&log, GUID, 1 << 20).unwrap(), None);
    }

    #[test]
    fn later_entries_override_earlier_ones_in_sequence_order() {
        let a = entry_bytes(
            1,
            0,
            GUID,
            &[Desc::Data(0x1000, 0xaa), Desc::Data(0x2000, 0xbb)],
            0,
        );
        let b = entry_bytes(2, 0, GUID, &[Desc::Zero(0x1000, 0x1000)], 0);
        let c = entry_bytes(3, 0, GUID, &[Desc::Data(0x1000, 0xcc)], 0);
        let (la, lb) = (a.len(), b.len());
        let log = log_with(&[(0, a), (la, b), (la + lb, c)], 1 << 20);
        let r = replay(&log, GUID, 0).unwrap().unwrap();
        assert_eq!(r.entries, 3);
        assert_eq!(read(&r.overlay, 0x1000, 2, 9), [0xcc, 0xcc]);
        assert_eq!(read(&r.overlay, 0x2000, 1, 9), [0xbb]);
    }

    #[test]
    fn active_sequence_starts_at_the_newest_entrys_tail() {
        // Entry 1 at 0 is stale: entry 2's tail names entry 2 itself.
        let a = entry_bytes(1, 0, GUID, &[Desc::Data(0x1000, 0xaa)], 0);
        let la = a.len() as u32;
        let b = entry_bytes(2, la, GUID, &[Desc::Data(0x2000, 0xbb)], 0);
        let log = log_with(&[(0, a), (la as usize, b)], 1 << 20);
        let r = replay(&log, GUID, 0).unwrap().unwrap();
        assert_eq!(r.entries, 1);
        assert_eq!(read(&r.overlay, 0x1000, 1, 9), [9]);
        assert_eq!(read(&r.overlay, 0x2000, 1, 9), [0xbb]);
    }

    #[test]
    fn sequence_whose_tail_is_outside_it_is_not_active() {
        let a = entry_bytes(5, 0x8000, GUID, &[Desc::Data(0x1000, 0xaa)], 0);
        let log = log_with(&[(0, a)], 1 << 20);
        assert_eq!(replay(&log, GUID, 0).unwrap(), None);
    }

    #[test]
    fn entry_wrapping_around_the_end_of_the_log_is_read() {
        let e = entry_bytes(9, (1 << 20) - 4096, GUID, &[Desc::Data(0x3000, 0x77)], 0);
        let log = log_with(&[((1 << 20) - 4096, e)], 1 << 20);
        let r = replay(&log, GUID, 0).unwrap().unwrap();
        assert_eq!(read(&r.overlay, 0x3000, 1, 0), [0x77]);
    }

    #[test]
    fn zero_range_is_split_by_a_later_data_sector() {
        let mut o = Overlay::default();
        o.apply(Write::Zero {
            offset: 0,
            len: 0x4000,
        });
        o.apply(Write::Data {
            offset: 0x1000,
            sector: vec![5u8; LOG_SECTOR].into_boxed_slice(),
        });
        assert_eq!(read(&o, 0xfff, 2, 9), [0, 5]);
        assert_eq!(read(&o, 0x1fff, 2, 9), [5, 0]);
        assert_eq!(read(&o, 0x3fff, 2, 9), [0, 9]);
        assert_eq!(o.end(), 0x4000);
    }

    #[test]
    fn log_size_must_be_sane() {
        assert!(replay(&[], GUID, 0).is_err());
        assert!(replay(&[0; 100], GUID, 0).is_err());
    }
}
