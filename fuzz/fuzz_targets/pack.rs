//! Fuzz the pack parsers: trailer, index section, frame table, frame headers, frame decoding and
//! the chunk check, through `parse_pack_bytes` on an in-memory pack.
//!
//! The first input byte picks a mode. Mode bit 0 clear: the rest is a small pack's list of
//! chunks, written by the real writer, then mutated at a few positions from the input, with the
//! index and trailer checksums repaired, so the parsers behind the checksums are reached.
//! Mode bit 0 set: the rest is fed as a pack verbatim.
//! Mode bit 2 set: the pack is an encrypted store's (sealed data frames, every third chunk in a
//! metadata frame), parsed with its keys, with another key and without keys: a mutation must
//! be an error (checksum, authentication, id), never a panic.

#![no_main]

use dedup_store::ChunkId;
use dedup_store::crypt::Keys;
use dedup_store::pack::{PackWriter, parse_pack_bytes, parse_pack_bytes_keyed};
use libfuzzer_sys::fuzz_target;

fn scratch() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmnest-fuzz-pack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn repair(bytes: &mut [u8]) {
    let n = bytes.len();
    if n < 80 {
        return;
    }
    let t = n - 64;
    let idx = u64::from_le_bytes(bytes[t + 24..t + 32].try_into().unwrap_or([0; 8])) as usize;
    if idx <= t {
        let c = crc32c::crc32c(&bytes[idx..t]);
        bytes[t + 40..t + 44].copy_from_slice(&c.to_le_bytes());
    }
    let c = crc32c::crc32c(&bytes[t..t + 60]);
    bytes[t + 60..t + 64].copy_from_slice(&c.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keys = std::sync::Arc::new(Keys::from_master(&[0x42; 32]));
    let other = Keys::from_master(&[0x43; 32]);
    let sealed = mode & 4 != 0;
    if mode & 1 == 1 {
        let _ = parse_pack_bytes(rest);
        let _ = parse_pack_bytes_keyed(rest, Some(&keys));
        return;
    }
    // Chunks: the first 3/4 of the input split in pieces of up to 64 bytes; the rest mutates.
    let split = rest.len() * 3 / 4;
    let (body, muts) = rest.split_at(split);
    let dir = scratch();
    let Ok(w) = PackWriter::with_frame_target(&dir, 96) else {
        return;
    };
    let mut w = w.sealed_with(sealed.then(|| keys.clone()));
    let hasher = keys.hasher();
    for (i, piece) in body.chunks(40).enumerate() {
        if !sealed {
            let _ = w.add(ChunkId::of(piece), piece);
        } else if i % 3 == 2 {
            let _ = w.add_meta(hasher.id(piece), piece);
        } else {
            let _ = w.add(hasher.id(piece), piece);
        }
    }
    let Ok(done) = w.finish() else { return };
    let Ok(mut bytes) = std::fs::read(&done.path) else {
        return;
    };
    let _ = std::fs::remove_file(&done.path);
    for m in muts.chunks(3) {
        if m.len() == 3 && !bytes.is_empty() {
            let at = u16::from_le_bytes([m[0], m[1]]) as usize % bytes.len();
            bytes[at] ^= m[2];
        }
    }
    if mode & 2 == 0 {
        repair(&mut bytes);
    }
    let _ = parse_pack_bytes(&bytes);
    if sealed {
        let intact = muts.chunks(3).all(|m| m.len() < 3 || m[2] == 0);
        let n = parse_pack_bytes_keyed(&bytes, Some(&keys));
        if intact && !body.is_empty() {
            assert!(n.is_ok(), "an intact sealed pack parses with its keys");
        }
        let _ = parse_pack_bytes_keyed(&bytes, Some(&other));
    }
});
