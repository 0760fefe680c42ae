//! Fuzz the volume write-log reader, then replay what it accepted into the overlay index and
//! check the overlay against a byte-per-byte model of the same records.
//!
//! Mode byte: bit 0 clear builds a well-formed log from the input (groups of 6 bytes: kind,
//! guest offset, length; payload bytes derived from them), then cuts it at a point and flips a
//! byte chosen by the input, so the checks are passed and the torn-tail paths reached; bit 0 set
//! takes the input as the log's body behind a valid header. Bit 1 set makes the log sealed (an
//! encrypted store's, under a fixed key). The other bits pick the disk size.

#![no_main]

use dedup_store::crypt::Keys;
use dedup_store::store::SnapshotId;
use dedup_store::store::volume::log::{self, RecordKind};
use dedup_store::store::volume::overlay::{Overlay, Source};
use libfuzzer_sys::fuzz_target;

/// The log, and the payload of each record in order.
fn build(rest: &[u8], disk_size: u64, sealing: Option<&log::Sealing>) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut payloads = Vec::new();
    let mut out = log::header(&SnapshotId([3; 32]), sealing.is_some()).to_vec();
    let (body, tail) = rest.split_at(rest.len() - rest.len() % 6);
    for g in body.chunks(6) {
        let kind = if g[0] & 1 == 0 {
            RecordKind::Data
        } else {
            RecordKind::Zero
        };
        let off = u64::from(u16::from_le_bytes([g[1], g[2]])) % disk_size;
        let len = (1 + u64::from(u16::from_le_bytes([g[3], g[4]]))).min(disk_size - off);
        let payload: Vec<u8> = match kind {
            RecordKind::Data => (0..len).map(|i| g[5] ^ i as u8).collect(),
            RecordKind::Zero => Vec::new(),
        };
        match sealing {
            None => {
                out.extend_from_slice(&log::record_header(kind, off, len, &payload));
                out.extend_from_slice(&payload);
            }
            Some(s) => {
                let at = out.len() as u64;
                log::seal_record(s, at, kind, off, len, &payload, &mut out).expect("sealing");
            }
        }
        payloads.push(payload);
    }
    if let [cut, flip, ..] = tail {
        let at = log::LOG_HEADER_LEN as usize
            + usize::from(*flip) * (out.len() - log::LOG_HEADER_LEN as usize) / 256;
        if *cut & 1 == 1 && at < out.len() {
            out[at] ^= cut | 1;
        } else {
            out.truncate(at.max(log::LOG_HEADER_LEN as usize));
        }
    }
    (out, payloads)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let disk_size = 1 + u64::from(mode >> 2) * 97;
    let keys = Keys::from_master(&[5; 32]);
    let sealing = (mode & 2 != 0).then(|| log::Sealing {
        keys: keys.log_keys(),
        log_id: b"fuzz/log-1".to_vec(),
        base: SnapshotId([3; 32]),
    });
    let sealing = sealing.as_ref();
    let (bytes, payloads) = if mode & 1 == 0 {
        let (b, p) = build(rest, disk_size, sealing);
        (b, Some(p))
    } else {
        let mut b = log::header(&SnapshotId([3; 32]), sealing.is_some()).to_vec();
        b.extend_from_slice(rest);
        (b, None)
    };
    let mut records = Vec::new();
    let Ok(end) = log::scan(&bytes[..], "fuzz", disk_size, sealing, &mut |r| {
        records.push(r)
    }) else {
        return;
    };
    assert_eq!(end.valid_end + end.torn_bytes, bytes.len() as u64);
    assert_eq!(end.records, records.len() as u64);
    let mut overlay = Overlay::default();
    let mut model: Vec<Option<Source>> = vec![None; disk_size as usize];
    for (i, r) in records.iter().enumerate() {
        assert!(r.len >= 1 && r.guest_off + r.len <= disk_size);
        if r.kind == RecordKind::Data {
            assert!(r.payload_at + r.len <= end.valid_end);
            assert_eq!(r.nonce.is_some(), sealing.is_some());
            // An accepted record of a built log reads back as what was written: decrypted
            // from its payload offset on, in a sealed log.
            if let Some(payloads) = &payloads {
                let at = r.payload_at as usize;
                let mut got = bytes[at..at + r.len as usize].to_vec();
                if let (Some(nonce), Some(s)) = (r.nonce, sealing) {
                    s.keys.apply(&nonce, 0, &mut got);
                }
                assert_eq!(got, payloads[i], "record {i}");
            }
        }
        let src = r.source();
        overlay.insert(r.guest_off, r.guest_off + r.len, src);
        for b in r.guest_off..r.guest_off + r.len {
            model[b as usize] = Some(src.advance(b - r.guest_off));
        }
    }
    let mut seen = Vec::with_capacity(disk_size as usize);
    for p in overlay.pieces(0, disk_size) {
        for b in p.start..p.end {
            seen.push(p.source.map(|s| s.advance(b - p.start)));
        }
    }
    assert_eq!(seen, model);
});
