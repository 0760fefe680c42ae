//! The write log of a volume: a header naming the base snapshot, then records appended in the
//! order the writes were made.
//!
//! ```text
//! header  (48 bytes)  magic "vmnVLOG1" (plain) or "vmnVLOGS" (sealed) | base snapshot id (32) | check (8)
//! plain record  (32 bytes)  kind (1: data, 2: zero) | 7 zero bytes | guest offset u64 | length u64 | check u64
//! sealed record (64 bytes)  kind | 7 zero bytes | guest offset u64 | length u64 | nonce (24) | mac (16)
//!         then, for a data record, `length` payload bytes (ciphertext in a sealed log)
//! ```
//!
//! Integers are little-endian. A check is the first 8 bytes (little-endian) of the BLAKE3 of
//! what precedes it in the header or record, followed, for a record, by its payload. The log is
//! read back as untrusted bytes: a record is accepted only when its header is well formed, its
//! range lies inside the disk, its payload is at most [`MAX_RECORD_PAYLOAD`] bytes and its check
//! matches. The first record that is not accepted ends the log (a write torn by a crash); what
//! follows it is reported and cut off by the caller.
//!
//! The volumes of an encrypted store write sealed logs ([`Sealing`]): a data record's payload is
//! XChaCha20-encrypted under a fresh random nonce (a torn record's offset is reused by the next
//! write, so the nonce cannot come from the offset), and the keyed MAC covers the volume and log
//! file names, the base snapshot, the record's log offset, the first 48 bytes of the record
//! header and the ciphertext: a record cannot be moved, reordered, or taken into another log.
//! Guest offsets and lengths stay visible, as the allocation of stored disks does
//! (docs/architecture.md, "Encryption").

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::crypt::{LOG_MAC_LEN, LogKeys, NONCE_LEN};
use crate::error::{Error, Result};
use crate::store::SnapshotId;
use crate::store::volume::overlay::Source;

/// Bytes of the log header.
pub const LOG_HEADER_LEN: u64 = 48;
/// Bytes of a plain record header.
pub const RECORD_HEADER_LEN: u64 = 32;
/// Bytes of a sealed record header.
pub const SEALED_RECORD_HEADER_LEN: u64 = 64;
/// Longest payload of one data record; longer writes are split.
pub const MAX_RECORD_PAYLOAD: u64 = 4 << 20;
const MAGIC: &[u8; 8] = b"vmnVLOG1";
const MAGIC_SEALED: &[u8; 8] = b"vmnVLOGS";
/// Bytes of a sealed record header that its MAC covers (kind to length, and the nonce).
const SEALED_MAC_COVERS: usize = 48;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;

/// What a record makes the guest bytes read as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The record's payload.
    Data,
    /// Zeros (write_zeroes, discard).
    Zero,
}

/// One accepted record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Data or zeros.
    pub kind: RecordKind,
    /// Guest offset of the first byte.
    pub guest_off: u64,
    /// Guest bytes covered (at least 1).
    pub len: u64,
    /// Log offset of the payload (data records).
    pub payload_at: u64,
    /// The payload's nonce (sealed logs).
    pub nonce: Option<[u8; NONCE_LEN]>,
}

impl Record {
    /// Where the overlay reads this record's bytes from.
    pub fn source(&self) -> Source {
        match (self.kind, self.nonce) {
            (RecordKind::Zero, _) => Source::Zero,
            (RecordKind::Data, None) => Source::Log(self.payload_at),
            (RecordKind::Data, Some(nonce)) => Source::Sealed {
                at: self.payload_at,
                payload_at: self.payload_at,
                nonce,
            },
        }
    }
}

/// How the records of a sealed log are sealed and checked.
#[derive(Debug)]
pub struct Sealing<'a> {
    /// The store's log keys.
    pub keys: &'a LogKeys,
    /// What the MACs bind records to besides their position: the volume and log file names.
    pub log_id: Vec<u8>,
    /// The snapshot the log is over.
    pub base: SnapshotId,
}

impl Sealing<'_> {
    /// The MAC of the record at log offset `at` whose header starts with `covered` (its first
    /// 48 bytes) and whose payload is `payload`.
    fn mac(&self, at: u64, covered: &[u8], payload: &[u8]) -> [u8; LOG_MAC_LEN] {
        self.keys.mac(&[
            &(self.log_id.len() as u64).to_le_bytes(),
            &self.log_id,
            &self.base.0,
            &at.to_le_bytes(),
            covered,
            payload,
        ])
    }
}

/// How a scan of a log ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanEnd {
    /// The base snapshot the header names.
    pub base: SnapshotId,
    /// Records accepted.
    pub records: u64,
    /// Log offset just past the last accepted record.
    pub valid_end: u64,
    /// Bytes of the log after `valid_end` (a torn tail when not zero).
    pub torn_bytes: u64,
    /// Why the record at `valid_end` was refused, when `torn_bytes` is not zero.
    pub torn_reason: Option<String>,
}

/// Bytes a log can be read from: a file, or a byte slice (fuzzing, tests).
pub trait LogSource {
    /// Length in bytes.
    fn byte_len(&self) -> std::io::Result<u64>;
    /// Fills `buf` from `off`; fails when the source is shorter.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()>;
}

impl LogSource for File {
    fn byte_len(&self) -> std::io::Result<u64> {
        self.metadata().map(|m| m.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, off)
    }
}

impl LogSource for [u8] {
    fn byte_len(&self) -> std::io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let start = usize::try_from(off).map_err(std::io::Error::other)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fn check_of(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    let bytes = h.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Bytes of a record header in a log that is `sealed` or not.
pub fn record_header_len(sealed: bool) -> u64 {
    if sealed {
        SEALED_RECORD_HEADER_LEN
    } else {
        RECORD_HEADER_LEN
    }
}

/// The header of a log over `base`, sealed (an encrypted store's) or plain.
pub fn header(base: &SnapshotId, sealed: bool) -> [u8; LOG_HEADER_LEN as usize] {
    let mut h = [0u8; LOG_HEADER_LEN as usize];
    h[..8].copy_from_slice(if sealed { MAGIC_SEALED } else { MAGIC });
    h[8..40].copy_from_slice(&base.0);
    let check = check_of(&[&h[..40]]);
    h[40..].copy_from_slice(&check.to_le_bytes());
    h
}

/// The header of a record; `payload` is the data of a data record (empty for zeros).
pub fn record_header(
    kind: RecordKind,
    guest_off: u64,
    len: u64,
    payload: &[u8],
) -> [u8; RECORD_HEADER_LEN as usize] {
    let mut h = [0u8; RECORD_HEADER_LEN as usize];
    h[0] = kind_byte(kind);
    h[8..16].copy_from_slice(&guest_off.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    let check = check_of(&[&h[..24], payload]);
    h[24..].copy_from_slice(&check.to_le_bytes());
    h
}

fn kind_byte(kind: RecordKind) -> u8 {
    match kind {
        RecordKind::Data => KIND_DATA,
        RecordKind::Zero => KIND_ZERO,
    }
}

/// Appends to `out` the sealed record at log offset `at` of `sealing`'s log: its header, then
/// for a data record `payload` encrypted under a fresh nonce, which is returned.
pub fn seal_record(
    sealing: &Sealing,
    at: u64,
    kind: RecordKind,
    guest_off: u64,
    len: u64,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<[u8; NONCE_LEN]> {
    let nonce: [u8; NONCE_LEN] = crate::crypt::random_bytes()?;
    let mut h = [0u8; SEALED_RECORD_HEADER_LEN as usize];
    h[0] = kind_byte(kind);
    h[8..16].copy_from_slice(&guest_off.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h[24..SEALED_MAC_COVERS].copy_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    let body = &mut out[start + h.len()..];
    sealing.keys.apply(&nonce, 0, body);
    let mac = sealing.mac(at, &h[..SEALED_MAC_COVERS], body);
    out[start + SEALED_MAC_COVERS..start + h.len()].copy_from_slice(&mac);
    Ok(nonce)
}

/// Reads the log in `src` (`object` names it in errors) of a `disk_size`-byte disk, calling
/// `on_record` for each accepted record in order. `sealing` is an encrypted store's, whose logs
/// must be sealed (and a plain store's must not be). A bad header is an error; a bad record ends
/// the scan (see the module documentation). Memory: one payload buffer of at most
/// [`MAX_RECORD_PAYLOAD`] bytes.
pub fn scan<S: LogSource + ?Sized>(
    src: &S,
    object: &str,
    disk_size: u64,
    sealing: Option<&Sealing>,
    on_record: &mut dyn FnMut(Record),
) -> Result<ScanEnd> {
    let io = |e: std::io::Error| Error::corrupt(object, 0, format!("cannot read: {e}"));
    let len = src.byte_len().map_err(io)?;
    let mut h = [0u8; LOG_HEADER_LEN as usize];
    if len < LOG_HEADER_LEN {
        return Err(Error::corrupt(
            object,
            0,
            format!("volume log of {len} bytes is shorter than its header"),
        ));
    }
    src.read_exact_at(&mut h, 0).map_err(io)?;
    match (&h[..8], sealing) {
        (m, None) if m == MAGIC => {}
        (m, Some(_)) if m == MAGIC_SEALED => {}
        (m, Some(_)) if m == MAGIC => {
            return Err(Error::corrupt(
                object,
                0,
                "plain volume log in an encrypted store",
            ));
        }
        (m, None) if m == MAGIC_SEALED => {
            return Err(Error::corrupt(
                object,
                0,
                "sealed volume log in a store that is not encrypted",
            ));
        }
        _ => return Err(Error::corrupt(object, 0, "not a vmnest volume log")),
    }
    if check_of(&[&h[..40]]) != u64_at(&h, 40) {
        return Err(Error::corrupt(
            object,
            40,
            "volume log header check mismatch",
        ));
    }
    let mut base = [0u8; 32];
    base.copy_from_slice(&h[8..40]);
    let mut end = ScanEnd {
        base: SnapshotId(base),
        records: 0,
        valid_end: LOG_HEADER_LEN,
        torn_bytes: 0,
        torn_reason: None,
    };
    let mut payload = Vec::new();
    let mut at = LOG_HEADER_LEN;
    while at < len {
        match read_record(src, at, len, disk_size, sealing, &mut payload) {
            Ok(rec) => {
                on_record(rec);
                end.records += 1;
                at = rec.payload_at
                    + match rec.kind {
                        RecordKind::Data => rec.len,
                        RecordKind::Zero => 0,
                    };
                end.valid_end = at;
            }
            Err(reason) => {
                end.torn_bytes = len - at;
                end.torn_reason = Some(reason);
                break;
            }
        }
    }
    Ok(end)
}

/// The record at `at` of a `len`-byte log, or why it is refused.
fn read_record<S: LogSource + ?Sized>(
    src: &S,
    at: u64,
    len: u64,
    disk_size: u64,
    sealing: Option<&Sealing>,
    payload: &mut Vec<u8>,
) -> std::result::Result<Record, String> {
    let header_len = record_header_len(sealing.is_some());
    if len - at < header_len {
        return Err(format!(
            "{} bytes where a record header needs {header_len}",
            len - at
        ));
    }
    let mut h = [0u8; SEALED_RECORD_HEADER_LEN as usize];
    let h = &mut h[..header_len as usize];
    src.read_exact_at(h, at)
        .map_err(|e| format!("cannot read: {e}"))?;
    let kind = match h[0] {
        KIND_DATA => RecordKind::Data,
        KIND_ZERO => RecordKind::Zero,
        k => return Err(format!("unknown record kind {k}")),
    };
    if h[1..8].iter().any(|&b| b != 0) {
        return Err("reserved record bytes are not zero".into());
    }
    let guest_off = u64_at(h, 8);
    let rlen = u64_at(h, 16);
    if rlen == 0 || guest_off.checked_add(rlen).is_none_or(|e| e > disk_size) {
        return Err(format!(
            "record of {rlen} bytes at guest offset {guest_off:#x} is outside the {disk_size}-byte disk"
        ));
    }
    let payload_at = at + header_len;
    payload.clear();
    if kind == RecordKind::Data {
        if rlen > MAX_RECORD_PAYLOAD {
            return Err(format!(
                "data record of {rlen} bytes exceeds {MAX_RECORD_PAYLOAD}"
            ));
        }
        if len - payload_at < rlen {
            return Err(format!(
                "data record of {rlen} bytes, {} left in the log",
                len - payload_at
            ));
        }
        payload.resize(rlen as usize, 0);
        src.read_exact_at(payload, payload_at)
            .map_err(|e| format!("cannot read: {e}"))?;
    }
    let nonce = match sealing {
        None => {
            if check_of(&[&h[..24], payload]) != u64_at(h, 24) {
                return Err("record check mismatch".into());
            }
            None
        }
        Some(sealing) => {
            let mac = sealing.mac(at, &h[..SEALED_MAC_COVERS], payload);
            let stored = &h[SEALED_MAC_COVERS..SEALED_MAC_COVERS + LOG_MAC_LEN];
            // Compared without an early exit.
            if mac.iter().zip(stored).fold(0u8, |d, (a, b)| d | (a ^ b)) != 0 {
                return Err(
                    "record MAC mismatch (damaged, moved, or sealed with another key)".into(),
                );
            }
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&h[24..SEALED_MAC_COVERS]);
            Some(nonce)
        }
    };
    Ok(Record {
        kind,
        guest_off,
        len: rlen,
        payload_at,
        nonce,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(records: &[(RecordKind, u64, Vec<u8>, u64)]) -> Vec<u8> {
        let mut out = header(&SnapshotId([7; 32]), false).to_vec();
        for (kind, off, data, len) in records {
            out.extend_from_slice(&record_header(*kind, *off, *len, data));
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_ends_the_scan() {
        let log = log_of(&[
            (RecordKind::Data, 5, b"hello".to_vec(), 5),
            (RecordKind::Zero, 100, Vec::new(), 4000),
        ]);
        let mut seen = Vec::new();
        let end = scan(&log[..], "log", 1 << 20, None, &mut |r| seen.push(r)).unwrap();
        assert_eq!(end.base, SnapshotId([7; 32]));
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].kind, RecordKind::Data);
        assert_eq!(&log[seen[0].payload_at as usize..][..5], b"hello");
        assert_eq!((seen[1].guest_off, seen[1].len), (100, 4000));
        assert_eq!(end.valid_end, log.len() as u64);
        assert_eq!(end.torn_bytes, 0);
        // Every cut inside the second record leaves the first.
        let first_end = seen[0].payload_at + 5;
        for cut in first_end as usize + 1..log.len() {
            let end = scan(&log[..cut], "log", 1 << 20, None, &mut |_| {}).unwrap();
            assert_eq!(end.records, 1, "cut at {cut}");
            assert_eq!(end.valid_end, first_end);
            assert_eq!(end.torn_bytes, cut as u64 - first_end);
            assert!(end.torn_reason.is_some());
        }
    }

    #[test]
    fn flipped_bits_and_out_of_range_records_are_refused() {
        let log = log_of(&[(RecordKind::Data, 0, vec![1, 2, 3], 3)]);
        for i in LOG_HEADER_LEN as usize..log.len() {
            let mut bad = log.clone();
            bad[i] ^= 0x10;
            let end = scan(&bad[..], "log", 1 << 20, None, &mut |_| {}).unwrap();
            assert_eq!(end.records, 0, "flip at {i}");
        }
        for i in 0..LOG_HEADER_LEN as usize {
            let mut bad = log.clone();
            bad[i] ^= 1;
            let err = scan(&bad[..], "vol/log", 1 << 20, None, &mut |_| {}).unwrap_err();
            assert!(err.to_string().contains("vol/log"), "{err}");
        }
        let past = log_of(&[(RecordKind::Zero, 10, Vec::new(), u64::MAX - 5)]);
        assert_eq!(
            scan(&past[..], "l", 100, None, &mut |_| {})
                .unwrap()
                .records,
            0
        );
        let beyond = log_of(&[(RecordKind::Zero, 90, Vec::new(), 11)]);
        assert_eq!(
            scan(&beyond[..], "l", 100, None, &mut |_| {})
                .unwrap()
                .records,
            0
        );
    }

    fn test_keys(seed: u8) -> LogKeys {
        crate::crypt::Keys::from_master(&[seed; 32])
            .log_keys()
            .clone()
    }

    fn sealing<'a>(keys: &'a LogKeys, log_id: &str) -> Sealing<'a> {
        Sealing {
            keys,
            log_id: log_id.as_bytes().to_vec(),
            base: SnapshotId([7; 32]),
        }
    }

    fn sealed_log_of(s: &Sealing, records: &[(RecordKind, u64, Vec<u8>, u64)]) -> Vec<u8> {
        let mut out = header(&SnapshotId([7; 32]), true).to_vec();
        for (kind, off, data, len) in records {
            let at = out.len() as u64;
            seal_record(s, at, *kind, *off, *len, data, &mut out).unwrap();
        }
        out
    }

    fn nonce_of(r: &Record) -> [u8; NONCE_LEN] {
        r.nonce.expect("a sealed record")
    }

    #[test]
    fn sealed_records_hide_their_payload_and_decrypt_from_any_offset() {
        let keys = test_keys(3);
        let s = sealing(&keys, "vm/log-1");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let log = sealed_log_of(
            &s,
            &[
                (RecordKind::Data, 4096, data.clone(), data.len() as u64),
                (RecordKind::Zero, 0, Vec::new(), 512),
                (RecordKind::Data, 4096, data.clone(), data.len() as u64),
            ],
        );
        // The same plaintext twice: neither copy shows, and the two ciphertexts differ.
        assert!(!log.windows(64).any(|w| w == &data[1000..1064]));
        let mut seen = Vec::new();
        let end = scan(&log[..], "log", 1 << 20, Some(&s), &mut |r| seen.push(r)).unwrap();
        assert_eq!((end.records, end.torn_bytes), (3, 0));
        let (a, b) = (seen[0], seen[2]);
        assert_ne!(nonce_of(&a), nonce_of(&b));
        assert_eq!(seen[1].source(), Source::Zero);
        let at = |r: &Record| r.payload_at as usize;
        assert_ne!(&log[at(&a)..at(&a) + 64], &log[at(&b)..at(&b) + 64]);
        // Any byte range decrypts on its own: the stream is seeked, not replayed.
        for (from, to) in [
            (0, 10_000),
            (1, 2),
            (4095, 4161),
            (9_999, 10_000),
            (64, 8192),
        ] {
            let mut part = log[at(&b) + from..at(&b) + to].to_vec();
            keys.apply(&nonce_of(&b), from as u64, &mut part);
            assert_eq!(part, &data[from..to], "{from}..{to}");
        }
        // Sealed and plain logs are not taken for each other, and another key fails every MAC.
        let err = scan(&log[..], "vol/log-1", 1 << 20, None, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("vol/log-1"), "{err}");
        assert!(err.to_string().contains("sealed volume log"), "{err}");
        let plain = log_of(&[(RecordKind::Zero, 0, Vec::new(), 1)]);
        let err = scan(&plain[..], "l", 1 << 20, Some(&s), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("plain volume log"), "{err}");
        let other = test_keys(9);
        let end = scan(
            &log[..],
            "l",
            1 << 20,
            Some(&sealing(&other, "vm/log-1")),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(end.records, 0);
        assert!(end.torn_reason.unwrap().contains("MAC"));
    }

    #[test]
    fn sealed_records_cannot_move_between_positions_logs_or_bases() {
        let keys = test_keys(3);
        let s = sealing(&keys, "vm/log-1");
        let log = sealed_log_of(
            &s,
            &[
                (RecordKind::Data, 0, vec![1; 100], 100),
                (RecordKind::Data, 0, vec![2; 100], 100),
            ],
        );
        let rec = (log.len() - LOG_HEADER_LEN as usize) / 2;
        // The two records swapped (an older write made to win): the first is refused.
        let mut swapped = log[..LOG_HEADER_LEN as usize].to_vec();
        swapped.extend_from_slice(&log[LOG_HEADER_LEN as usize + rec..]);
        swapped.extend_from_slice(&log[LOG_HEADER_LEN as usize..LOG_HEADER_LEN as usize + rec]);
        let end = scan(&swapped[..], "l", 1 << 20, Some(&s), &mut |_| {}).unwrap();
        assert_eq!(end.records, 0);
        // The same bytes read as another volume's log, another log of this volume, or a log
        // over another base: refused.
        for other in [sealing(&keys, "web/log-1"), sealing(&keys, "vm/log-2")] {
            let end = scan(&log[..], "l", 1 << 20, Some(&other), &mut |_| {}).unwrap();
            assert_eq!(end.records, 0);
        }
        let mut rebased = sealing(&keys, "vm/log-1");
        rebased.base = SnapshotId([8; 32]);
        let end = scan(&log[..], "l", 1 << 20, Some(&rebased), &mut |_| {}).unwrap();
        assert_eq!(end.records, 0);
        let end = scan(&log[..], "l", 1 << 20, Some(&s), &mut |_| {}).unwrap();
        assert_eq!(end.records, 2);
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_sealed_record_ends_the_scan_there() {
        let keys = test_keys(3);
        let s = sealing(&keys, "vm/log-1");
        let log = sealed_log_of(
            &s,
            &[
                (RecordKind::Data, 0, vec![1, 2, 3], 3),
                (RecordKind::Zero, 10, Vec::new(), 20),
            ],
        );
        let first_end = LOG_HEADER_LEN as usize + SEALED_RECORD_HEADER_LEN as usize + 3;
        for i in LOG_HEADER_LEN as usize..log.len() {
            let mut bad = log.clone();
            bad[i] ^= 0x04;
            let end = scan(&bad[..], "log", 1 << 20, Some(&s), &mut |_| {}).unwrap();
            let want = if i < first_end { 0 } else { 1 };
            assert_eq!(end.records, want, "flip at {i}");
        }
        for cut in first_end + 1..log.len() {
            let end = scan(&log[..cut], "log", 1 << 20, Some(&s), &mut |_| {}).unwrap();
            assert_eq!(end.records, 1, "cut at {cut}");
        }
    }
}
