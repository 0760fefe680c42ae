//! Fuzz the chunk index file parser, then look up a few ids in what it accepted.
//!
//! Mode byte bit 0 clear: the header and body checksums are repaired before parsing, so the
//! length, order and pack-number checks behind them are reached.

#![no_main]

use dedup_store::index::{IndexFile, parse_index_file};
use libfuzzer_sys::fuzz_target;

fn repair(bytes: &mut [u8]) {
    if bytes.len() < 48 {
        return;
    }
    let c = crc32c::crc32c(&bytes[48..]);
    bytes[20..24].copy_from_slice(&c.to_le_bytes());
    let c = crc32c::crc32c(&bytes[..44]);
    bytes[44..48].copy_from_slice(&c.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 == 0 {
        repair(&mut bytes);
    }
    if parse_index_file("fuzz", &bytes).is_err() {
        return;
    }
    let path = std::env::temp_dir().join(format!("vmnest-fuzz-index-{}.idx", std::process::id()));
    if std::fs::write(&path, &bytes).is_err() {
        return;
    }
    if let Ok(file) = IndexFile::open(&path, 1) {
        for rec in file.iter().take(4) {
            assert_eq!(file.lookup(&rec.0).map(|l| l.pack), Some(rec.1.pack));
        }
        let _ = file.lookup(&dedup_store::ChunkId([0x80; 32]));
    }
});
