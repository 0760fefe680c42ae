//! Fuzz the QEMU migration stream splitter: the input is a stream.
//!
//! When the first input byte is odd, a valid stream head (header, configuration, the ram
//! section's START with a RAMBlock list, a PART section header) is put before the rest of the
//! input, so mutations explore the RAM record parser instead of stopping at the magic. Every
//! split must tile the input exactly (byte-exact reassembly); a panic or a mismatch is a finding.

#![no_main]

use dedup_store::chunker::qemu_migration::{Segment, split};
use libfuzzer_sys::fuzz_target;

fn head() -> Vec<u8> {
    let mut s = b"QEVM\0\0\0\x03\x07\0\0\0\x02pc".to_vec();
    s.extend_from_slice(b"\x01\0\0\0\x02\x03ram\0\0\0\0\0\0\0\x04");
    s.extend_from_slice(&(0x30000u64 | 0x04).to_be_bytes());
    s.extend_from_slice(b"\x02m0");
    s.extend_from_slice(&0x20000u64.to_be_bytes());
    s.extend_from_slice(b"\x02m1");
    s.extend_from_slice(&0x10000u64.to_be_bytes());
    s.extend_from_slice(&0x10u64.to_be_bytes());
    s.extend_from_slice(b"\x7e\0\0\0\x02\x02\0\0\0\x02");
    s
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut bytes = Vec::new();
    if mode & 1 == 1 {
        bytes = head();
    }
    bytes.extend_from_slice(rest);
    let mut splitter = split(&bytes);
    let mut pos = 0u64;
    for seg in splitter.by_ref() {
        let r = seg.range();
        assert_eq!(r.start, pos, "segments must tile the input");
        assert!(r.end > r.start && r.end <= bytes.len() as u64);
        if let Segment::Page { data, .. } = &seg {
            assert_eq!(data.end - data.start, 4096);
        }
        pos = r.end;
    }
    assert_eq!(pos, bytes.len() as u64, "segments must cover the input");
    let _ = splitter.require_complete();
});
