use super::*;
use crate::chunk::ChunkStore;
use crate::crypt::Keys;

pub(crate) fn scratch(name: &str) -> PathBuf {
    let dir = image_format::scratch::path("pack", name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic pseudo-random bytes (xorshift), `compressible` repeats a short pattern.
pub(crate) fn chunk(seed: u64, len: usize, compressible: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if compressible {
            out.extend_from_slice(format!("line {} of chunk {seed}\n", out.len() / 64).as_bytes());
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

fn write_pack(dir: &Path, target: usize, chunks: &[Vec<u8>]) -> FinishedPack {
    let mut w = PackWriter::with_frame_target(dir, target).unwrap();
    for c in chunks {
        w.add(ChunkId::of(c), c).unwrap();
    }
    w.finish().unwrap()
}

fn golden_chunks() -> Vec<Vec<u8>> {
    vec![
        b"the first chunk, compressible: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec(),
        (0u8..=255).collect(),
        vec![0x5a; 1000],
    ]
}

#[test]
fn golden_pack_of_three_chunks_has_pinned_bytes() {
    let dir = scratch("golden");
    let p = write_pack(&dir, FRAME_TARGET, &golden_chunks());
    let bytes = std::fs::read(&p.path).unwrap();
    assert_eq!(PackId(*blake3::hash(&bytes).as_bytes()), p.id);
    assert_eq!(&bytes[..8], &label_magic("vmnest pack v1"));
    assert_eq!(bytes.len() as u64, p.size);
    assert_eq!(
        (p.id.to_hex(), bytes.len()),
        (
            "530e5c386e0234d722471cce62adc7de2f5083c5f3aad930b4ed843126f28b65".to_string(),
            582
        ),
        "pack format changed"
    );
}

#[test]
fn magics_are_blake3_of_their_labels() {
    assert_eq!(
        pack_magic(),
        blake3::hash(b"vmnest pack v1").as_bytes()[..8]
    );
    assert_eq!(
        trailer_magic(),
        blake3::hash(b"vmnest pack trailer v1").as_bytes()[..8]
    );
}

#[test]
fn random_chunks_of_mixed_compressibility_round_trip() {
    let dir = scratch("roundtrip");
    let chunks: Vec<Vec<u8>> = (0..200)
        .map(|i| chunk(i, 1 + (i as usize * 7919) % 70_000, i % 3 != 0))
        .collect();
    let p = write_pack(&dir, 256 << 10, &chunks);
    let r = PackReader::open(p.id, &p.path).unwrap();
    assert_eq!(r.entries().len(), 200);
    assert!(r.frames().iter().any(|f| f.flags == FLAG_ZSTD));
    assert!(
        r.frames()
            .iter()
            .all(|f| f.plain_len as usize <= (256 << 10) + 70_000)
    );
    for c in &chunks {
        assert_eq!(&r.get(&ChunkId::of(c), None).unwrap().unwrap(), c);
    }
    assert_eq!(r.get(&ChunkId::of(b"absent"), None).unwrap(), None);
    r.verify().unwrap();
    assert_eq!(
        parse_pack_bytes(&std::fs::read(&p.path).unwrap()).unwrap(),
        200
    );
}

#[test]
fn incompressible_frames_are_stored_raw() {
    let dir = scratch("raw");
    let p = write_pack(&dir, FRAME_TARGET, &[chunk(1, 100_000, false)]);
    let r = PackReader::open(p.id, &p.path).unwrap();
    assert_eq!(r.frames()[0].flags, 0);
    assert_eq!(r.frames()[0].stored_len, r.frames()[0].plain_len);
}

#[test]
fn a_read_decompresses_only_its_frame_and_the_cache_keeps_it() {
    let dir = scratch("frames");
    let chunks: Vec<Vec<u8>> = (0..64).map(|i| chunk(i, 16 << 10, true)).collect();
    let p = write_pack(&dir, 128 << 10, &chunks);
    let r = PackReader::open(p.id, &p.path).unwrap();
    assert_eq!(r.frames().len(), 8, "8 chunks of 16 KiB per 128 KiB frame");
    let cache = FrameCache::new(1 << 20);
    r.get(&ChunkId::of(&chunks[9]), Some(&cache))
        .unwrap()
        .unwrap();
    assert_eq!(r.frames_decoded(), 1);
    // Same frame (chunks 8..16): a cache hit.
    r.get(&ChunkId::of(&chunks[10]), Some(&cache))
        .unwrap()
        .unwrap();
    assert_eq!(r.frames_decoded(), 1);
    r.get(&ChunkId::of(&chunks[40]), Some(&cache))
        .unwrap()
        .unwrap();
    assert_eq!(r.frames_decoded(), 2);
}

#[test]
fn readers_of_one_frame_at_once_decode_it_once() {
    let dir = scratch("onedecode");
    let chunks: Vec<Vec<u8>> = (0..16).map(|i| chunk(i, 16 << 10, true)).collect();
    let p = write_pack(&dir, 256 << 10, &chunks);
    let r = PackReader::open(p.id, &p.path).unwrap();
    assert_eq!(r.frames().len(), 1);
    let cache = FrameCache::new(1 << 20);
    let start = std::sync::Barrier::new(8);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (r, cache, start, chunks) = (&r, &cache, &start, &chunks);
            s.spawn(move || {
                start.wait();
                let c = &chunks[t * 2];
                assert_eq!(r.get(&ChunkId::of(c), Some(cache)).unwrap().unwrap(), *c);
            });
        }
    });
    assert_eq!(r.frames_decoded(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_chunk_checked_once_is_not_trusted_under_another_id() {
    let dir = scratch("checked");
    let chunks: Vec<Vec<u8>> = (0..4).map(|i| chunk(i, 16 << 10, true)).collect();
    let p = write_pack(&dir, 256 << 10, &chunks);
    let r = PackReader::open(p.id, &p.path).unwrap();
    let cache = FrameCache::new(1 << 20);
    let a = ChunkId::of(&chunks[0]);
    let loc = r.locate(&a).unwrap();
    // Checked once, then served from the cache without hashing.
    assert_eq!(r.read_at(&a, loc, Some(&cache)).unwrap(), chunks[0]);
    assert_eq!(r.read_at(&a, loc, Some(&cache)).unwrap(), chunks[0]);
    // The same bytes asked for under another id (a damaged index would do that) still fail.
    let b = ChunkId::of(&chunks[1]);
    assert!(r.read_at(&b, loc, Some(&cache)).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn frame_cache_is_bounded_by_bytes() {
    let dir = scratch("cache");
    let chunks: Vec<Vec<u8>> = (0..64).map(|i| chunk(i, 16 << 10, true)).collect();
    let p = write_pack(&dir, 128 << 10, &chunks);
    let r = PackReader::open(p.id, &p.path).unwrap();
    let cache = FrameCache::new(300 << 10);
    for c in &chunks {
        r.get(&ChunkId::of(c), Some(&cache)).unwrap();
        assert!(cache.bytes() <= 300 << 10);
    }
    assert_eq!(r.frames_decoded(), 8);
    // The two most recent frames are kept, the first was evicted.
    r.get(&ChunkId::of(&chunks[63]), Some(&cache)).unwrap();
    assert_eq!(r.frames_decoded(), 8);
    r.get(&ChunkId::of(&chunks[0]), Some(&cache)).unwrap();
    assert_eq!(r.frames_decoded(), 9);
}

fn corrupt_copy(p: &FinishedPack, at: u64) -> PathBuf {
    let mut bytes = std::fs::read(&p.path).unwrap();
    bytes[at as usize] ^= 0x40;
    let path = p.path.with_extension("bad");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn corrupt_reason(e: Error) -> String {
    match e {
        Error::Corrupt { .. } => e.to_string(),
        other => panic!("expected corruption, got {other}"),
    }
}

#[test]
fn a_flipped_byte_in_a_frame_is_an_error_naming_pack_frame_and_chunk() {
    let dir = scratch("flipframe");
    let chunks: Vec<Vec<u8>> = (0..16).map(|i| chunk(i, 16 << 10, i % 2 == 0)).collect();
    let p = write_pack(&dir, 64 << 10, &chunks);
    let r0 = PackReader::open(p.id, &p.path).unwrap();
    let target = ChunkId::of(&chunks[5]);
    let loc = r0.locate(&target).unwrap();
    let f = r0.frames()[loc.frame as usize];
    for at in [
        f.offset + 3,
        f.offset + 16 + 10,
        f.offset + 16 + f.stored_len as u64 - 1,
    ] {
        let bad = corrupt_copy(&p, at);
        let r = PackReader::open(p.id, &bad).unwrap();
        let msg = corrupt_reason(r.get(&target, None).unwrap_err());
        assert!(msg.contains(&p.id.to_hex()), "{msg}");
        assert!(msg.contains(&format!("frame {}", loc.frame)), "{msg}");
        assert!(msg.contains(&target.to_hex()), "{msg}");
        // Other frames still read.
        let other = ChunkId::of(&chunks[15]);
        if r.locate(&other).unwrap().frame != loc.frame {
            r.get(&other, None).unwrap().unwrap();
        }
    }
}

#[test]
fn a_chunk_not_matching_its_id_is_an_error_not_wrong_data() {
    // A raw frame whose bytes are altered and whose CRC is recomputed: only BLAKE3 catches it.
    let dir = scratch("blake");
    let c = chunk(3, 4096, false);
    let p = write_pack(&dir, FRAME_TARGET, std::slice::from_ref(&c));
    let mut bytes = std::fs::read(&p.path).unwrap();
    bytes[16 + 16 + 100] ^= 1;
    let crc = crc32c::crc32c(&bytes[32..32 + 4096]);
    bytes[28..32].copy_from_slice(&crc.to_le_bytes());
    let t = bytes.len() - 64;
    let idx_off = u64::from_le_bytes(bytes[t + 24..t + 32].try_into().unwrap()) as usize;
    // The frame table entry's crc (entry at idx_off + 48, crc at +20).
    bytes[idx_off + 48 + 20..idx_off + 48 + 24].copy_from_slice(&crc.to_le_bytes());
    let icrc = crc32c::crc32c(&bytes[idx_off..t]);
    bytes[t + 40..t + 44].copy_from_slice(&icrc.to_le_bytes());
    let tcrc = crc32c::crc32c(&bytes[t..t + 60]);
    bytes[t + 60..t + 64].copy_from_slice(&tcrc.to_le_bytes());
    std::fs::write(&p.path, bytes).unwrap();
    let r = PackReader::open(p.id, &p.path).unwrap();
    let msg = corrupt_reason(r.get(&ChunkId::of(&c), None).unwrap_err());
    assert!(msg.contains("does not match its id"), "{msg}");
}

#[test]
fn a_flipped_byte_in_the_index_or_trailer_fails_the_open_naming_the_pack() {
    let dir = scratch("flipindex");
    let chunks: Vec<Vec<u8>> = (0..10).map(|i| chunk(i, 5000, true)).collect();
    let p = write_pack(&dir, FRAME_TARGET, &chunks);
    let len = p.size;
    let r = PackReader::open(p.id, &p.path).unwrap();
    let index_at = r
        .frames()
        .last()
        .map(|f| f.offset + 16 + f.stored_len as u64)
        .unwrap();
    for (at, want) in [
        (index_at + 5, "index checksum"),
        (len - 64 + 1, "trailer magic"),
        (len - 64 + 20, "trailer checksum"),
        (len - 1, "trailer checksum"),
        (2, "pack magic"),
    ] {
        let bad = corrupt_copy(&p, at);
        let msg = corrupt_reason(PackReader::open(p.id, &bad).unwrap_err());
        assert!(
            msg.contains(&p.id.to_hex()) && msg.contains(want),
            "{at}: {msg}"
        );
        assert!(parse_pack_bytes(&std::fs::read(&bad).unwrap()).is_err() || at == 2);
    }
}

#[test]
fn truncated_packs_are_rejected() {
    let dir = scratch("trunc");
    let p = write_pack(&dir, FRAME_TARGET, &golden_chunks());
    let bytes = std::fs::read(&p.path).unwrap();
    for cut in [0, 10, 79, bytes.len() / 2, bytes.len() - 1] {
        assert!(parse_pack_bytes(&bytes[..cut]).is_err());
        std::fs::write(dir.join("cut"), &bytes[..cut]).unwrap();
        assert!(PackReader::open(p.id, &dir.join("cut")).is_err());
    }
}

#[test]
fn the_writer_leaves_only_the_named_pack() {
    let dir = scratch("names");
    let p = write_pack(&dir, FRAME_TARGET, &golden_chunks());
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![p.id.file_name()]);
    let w = PackWriter::create(&dir).unwrap();
    w.abandon();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

// ---- PackStore ----

fn ids(chunks: &[Vec<u8>]) -> Vec<ChunkId> {
    chunks.iter().map(|c| ChunkId::of(c)).collect()
}

#[test]
fn store_round_trips_and_deduplicates() {
    let root = scratch("store");
    let s = PackStore::open_with_frame_target(&root, 64 << 10).unwrap();
    let chunks: Vec<Vec<u8>> = (0..100)
        .map(|i| chunk(i, 3000 + i as usize * 13, i % 2 == 0))
        .collect();
    for c in &chunks {
        assert!(s.put(ChunkId::of(c), c).unwrap());
    }
    assert!(
        !s.put(ChunkId::of(&chunks[0]), &chunks[0]).unwrap(),
        "pending dedup"
    );
    for (c, id) in chunks.iter().zip(ids(&chunks)) {
        assert!(s.contains(&id).unwrap());
        assert_eq!(&s.get(&id).unwrap(), c);
    }
    s.flush().unwrap();
    assert!(
        !s.put(ChunkId::of(&chunks[1]), &chunks[1]).unwrap(),
        "durable dedup"
    );
    s.flush().unwrap();
    assert_eq!(s.packs().len(), 1, "the second flush had nothing to write");
    assert_eq!(s.packs()[0].entries().len(), 100);
    drop(s);
    let s = PackStore::open(&root).unwrap();
    assert!(s.report().damaged_packs.is_empty() && s.report().index_rebuilt.is_none());
    assert!(s.report().unindexed_packs.is_empty());
    for (c, id) in chunks.iter().zip(ids(&chunks)) {
        assert_eq!(&s.get(&id).unwrap(), c);
    }
    assert!(!s.put(ChunkId::of(&chunks[2]), &chunks[2]).unwrap());
    assert!(matches!(
        s.get(&ChunkId::of(b"nope")),
        Err(Error::MissingChunk(_))
    ));
}

#[test]
fn a_store_dropped_without_flush_claims_nothing_unflushed_and_cleans_temp_packs() {
    let root = scratch("crash");
    let a: Vec<Vec<u8>> = (0..20).map(|i| chunk(i, 4000, true)).collect();
    let b: Vec<Vec<u8>> = (100..120).map(|i| chunk(i, 4000, true)).collect();
    {
        let s = PackStore::open(&root).unwrap();
        for c in &a {
            s.put(ChunkId::of(c), c).unwrap();
        }
        s.flush().unwrap();
        for c in &b {
            s.put(ChunkId::of(c), c).unwrap();
        }
        // Force the open pack's bytes to disk under its temp name, as a crash mid-pack would.
        // Then the process dies: its files close (releasing the temp pack's lock), nothing else.
        let mut open = s.open.lock().unwrap();
        let mut w = open.writer.take().unwrap();
        w.write_pending(false).unwrap();
        drop(w);
        std::mem::forget(open);
        std::mem::forget(s);
    }
    let s = PackStore::open(&root).unwrap();
    let r = s.report();
    assert_eq!(r.removed_temp.len(), 1, "{r:?}");
    assert_eq!(r.packs, 1);
    for c in &a {
        assert_eq!(&s.get(&ChunkId::of(c)).unwrap(), c);
    }
    for c in &b {
        assert!(!s.contains(&ChunkId::of(c)).unwrap());
    }
    let leftovers = std::fs::read_dir(root.join("packs"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")
        })
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn a_truncated_last_pack_is_reported_and_its_chunks_can_be_stored_again() {
    let root = scratch("truncpack");
    let a: Vec<Vec<u8>> = (0..20).map(|i| chunk(i, 4000, true)).collect();
    let b: Vec<Vec<u8>> = (100..120).map(|i| chunk(i, 4000, false)).collect();
    let last;
    {
        let s = PackStore::open(&root).unwrap();
        for c in &a {
            s.put(ChunkId::of(c), c).unwrap();
        }
        s.flush().unwrap();
        let first: HashSet<PackId> = s.packs().iter().map(|p| p.id()).collect();
        for c in &b {
            s.put(ChunkId::of(c), c).unwrap();
        }
        s.flush().unwrap();
        last = s
            .packs()
            .into_iter()
            .find(|p| !first.contains(&p.id()))
            .unwrap()
            .id();
    }
    let path = root.join("packs").join(last.file_name());
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let s = PackStore::open(&root).unwrap();
    let r = s.report().clone();
    assert_eq!(r.damaged_packs.len(), 1, "{r:?}");
    assert!(r.damaged_packs[0].1.contains(&last.to_hex()));
    assert_eq!(r.missing_packs, vec![last]);
    for c in &a {
        assert_eq!(&s.get(&ChunkId::of(c)).unwrap(), c);
    }
    for c in &b {
        let id = ChunkId::of(c);
        assert!(!s.contains(&id).unwrap());
        assert!(s.get(&id).is_err());
        assert!(s.put(id, c).unwrap(), "stored again");
    }
    s.flush().unwrap();
    for c in &b {
        assert_eq!(&s.get(&ChunkId::of(c)).unwrap(), c);
    }
}

use std::collections::HashSet;

#[test]
fn a_pack_written_but_not_indexed_is_found_at_open() {
    let root = scratch("unindexed");
    let a: Vec<Vec<u8>> = (0..20).map(|i| chunk(i, 4000, true)).collect();
    {
        let s = PackStore::open(&root).unwrap();
        for c in &a {
            s.put(ChunkId::of(c), c).unwrap();
        }
        // Crash between the pack rename and the index file: finish without persisting.
        let mut open = s.open.lock().unwrap();
        s.finish_open(&mut open, false).unwrap();
    }
    let s = PackStore::open(&root).unwrap();
    assert_eq!(s.report().unindexed_packs.len(), 1);
    for c in &a {
        assert_eq!(&s.get(&ChunkId::of(c)).unwrap(), c);
    }
    drop(s);
    let s = PackStore::open(&root).unwrap();
    assert!(
        s.report().unindexed_packs.is_empty(),
        "persisted at the previous open"
    );
}

#[test]
fn a_corrupt_or_lost_index_is_rebuilt_from_the_packs_and_equals_the_original() {
    let root = scratch("rebuild");
    let s = PackStore::open_with_frame_target(&root, 32 << 10).unwrap();
    let chunks: Vec<Vec<u8>> = (0..300)
        .map(|i| chunk(i, 2000 + i as usize, i % 4 != 0))
        .collect();
    for (i, c) in chunks.iter().enumerate() {
        s.put(ChunkId::of(c), c).unwrap();
        if i % 100 == 99 {
            s.flush().unwrap();
        }
    }
    let original = s.index.read().unwrap().all();
    assert_eq!(original.len(), 300);
    drop(s);
    let idx_dir = root.join("index");
    let first = std::fs::read_dir(&idx_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&first).unwrap();
    let n = bytes.len();
    bytes[n - 7] ^= 1;
    std::fs::write(&first, bytes).unwrap();
    let s = PackStore::open(&root).unwrap();
    let why = s.report().index_rebuilt.clone().unwrap();
    assert!(
        why.contains("index file") && why.contains("checksum"),
        "{why}"
    );
    assert_eq!(s.index.read().unwrap().all(), original);
    drop(s);
    std::fs::remove_dir_all(&idx_dir).unwrap();
    let s = PackStore::open(&root).unwrap();
    assert_eq!(
        s.report().unindexed_packs.len(),
        3,
        "a lost index: every pack is unindexed"
    );
    assert_eq!(s.index.read().unwrap().all(), original);
    for c in &chunks {
        assert_eq!(&s.get(&ChunkId::of(c)).unwrap(), c);
    }
}

#[test]
fn concurrent_puts_and_gets_agree() {
    let root = scratch("threads");
    let s = std::sync::Arc::new(PackStore::open_with_frame_target(&root, 64 << 10).unwrap());
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let c = chunk(i % 150, 3000, true);
                    s.put(ChunkId::of(&c), &c).unwrap();
                    assert_eq!(s.get(&ChunkId::of(&c)).unwrap(), c);
                    if i % 50 == t {
                        s.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    s.flush().unwrap();
    let total: usize = s.packs().iter().map(|p| p.entries().len()).sum();
    assert_eq!(total, 150, "each chunk stored once");
}

fn test_keys() -> std::sync::Arc<Keys> {
    std::sync::Arc::new(Keys::from_master(&[5; 32]))
}

/// A sealed pack: `data` chunks in sealed frames, `meta` chunks in a metadata frame.
fn write_sealed_pack(
    dir: &Path,
    keys: &std::sync::Arc<Keys>,
    data: &[Vec<u8>],
    meta: &[Vec<u8>],
) -> FinishedPack {
    let h = keys.hasher();
    let mut w = PackWriter::with_frame_target(dir, 64 << 10)
        .unwrap()
        .sealed_with(Some(keys.clone()));
    for c in data {
        w.add(h.id(c), c).unwrap();
    }
    for c in meta {
        w.add_meta(h.id(c), c).unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn a_sealed_pack_reads_back_with_its_key_and_holds_no_plaintext() {
    let dir = scratch("sealed");
    let keys = test_keys();
    let data = vec![
        chunk(1, 30_000, true),
        chunk(2, 30_000, false),
        chunk(3, 50_000, true),
    ];
    let meta = vec![b"a map node: ids only".repeat(10)];
    let p = write_sealed_pack(&dir, &keys, &data, &meta);
    let bytes = std::fs::read(&p.path).unwrap();
    assert!(!bytes.windows(20).any(|w| w == &data[0][100..120]));
    assert!(!bytes.windows(20).any(|w| w == &data[1][100..120]));
    let r = PackReader::open_keyed(p.id, &p.path, Some(keys.clone())).unwrap();
    let h = keys.hasher();
    for c in data.iter().chain(&meta) {
        assert_eq!(&r.get(&h.id(c), None).unwrap().unwrap(), c);
    }
    let flags: Vec<u32> = r.frames().iter().map(|f| f.flags).collect();
    assert!(
        flags.iter().filter(|f| *f & FLAG_SEALED != 0).count() >= 2,
        "{flags:?}"
    );
    assert_eq!(
        flags.iter().filter(|f| *f & FLAG_META != 0).count(),
        1,
        "{flags:?}"
    );
    assert!(r.is_meta(r.locate(&h.id(&meta[0])).unwrap()));
    assert!(!r.is_meta(r.locate(&h.id(&data[0])).unwrap()));
    assert_eq!(parse_pack_bytes_keyed(&bytes, Some(&keys)).unwrap(), 4);
    r.verify().unwrap();
}

#[test]
fn a_plain_reader_refuses_sealed_frames_but_reads_metadata_frames() {
    let dir = scratch("sealed-plain");
    let keys = test_keys();
    let data = vec![chunk(1, 1000, true)];
    let meta = vec![b"node".repeat(50)];
    let p = write_sealed_pack(&dir, &keys, &data, &meta);
    let h = keys.hasher();
    let r = PackReader::open(p.id, &p.path).unwrap();
    let err = r.get(&h.id(&data[0]), None).unwrap_err().to_string();
    assert!(err.contains(&format!("pack {}", p.id)), "{err}");
    assert!(err.contains("frame 0 is sealed"), "{err}");
    // Without the key the node's bytes are readable, its keyed id is not checkable.
    let loc = r.locate(&h.id(&meta[0])).unwrap();
    assert_eq!(&*r.frame(loc.frame, None).unwrap(), &meta[0]);
}

#[test]
fn an_encrypted_reader_refuses_a_plain_data_frame() {
    let dir = scratch("plain-in-sealed");
    let c = chunk(1, 1000, true);
    let keys = test_keys();
    let mut w = PackWriter::with_frame_target(&dir, 64 << 10).unwrap();
    w.add(keys.hasher().id(&c), &c).unwrap();
    let p = w.finish().unwrap();
    let r = PackReader::open_keyed(p.id, &p.path, Some(keys.clone())).unwrap();
    let err = r.get(&keys.hasher().id(&c), None).unwrap_err().to_string();
    assert!(err.contains("frame 0 is not sealed"), "{err}");
}

#[test]
fn a_sealed_frame_flipped_under_a_fixed_checksum_fails_authentication() {
    let dir = scratch("sealed-flip");
    let keys = test_keys();
    let data = vec![chunk(1, 4000, false)];
    let p = write_sealed_pack(&dir, &keys, &data, &[]);
    let bytes = std::fs::read(&p.path).unwrap();
    let r0 = PackReader::open_keyed(p.id, &p.path, Some(keys.clone())).unwrap();
    let f = r0.frames()[0];
    let body = (f.offset + FRAME_HEADER_LEN) as usize;
    // nonce, ciphertext, tag
    for at in [body, body + 30, body + f.stored_len as usize - 1] {
        let mut bad = bytes.clone();
        bad[at] ^= 1;
        let crc = crc32c::crc32c(&bad[body..body + f.stored_len as usize]);
        // Keep the checksums right so that only the AEAD can notice.
        bad[f.offset as usize + 12..f.offset as usize + 16].copy_from_slice(&crc.to_le_bytes());
        let n_chunks = r0.entries().len();
        let t = parse_trailer("t", &bytes[bytes.len() - 64..], bytes.len() as u64).unwrap();
        let ftab = t.index_offset as usize + n_chunks * 48;
        bad[ftab + 20..ftab + 24].copy_from_slice(&crc.to_le_bytes());
        let icrc =
            crc32c::crc32c(&bad[t.index_offset as usize..(t.index_offset + t.index_len) as usize]);
        let tl = bad.len() - 64;
        bad[tl + 40..tl + 44].copy_from_slice(&icrc.to_le_bytes());
        let tcrc = crc32c::crc32c(&bad[tl..tl + 60]);
        bad[tl + 60..tl + 64].copy_from_slice(&tcrc.to_le_bytes());
        let path = dir.join(format!("bad-{at}"));
        std::fs::write(&path, &bad).unwrap();
        let r = PackReader::open_keyed(p.id, &path, Some(keys.clone())).unwrap();
        let err = r
            .get(&keys.hasher().id(&data[0]), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("frame 0 fails authentication"), "{at}: {err}");
        assert!(err.contains(&format!("pack {}", p.id)), "{err}");
    }
}

#[test]
fn a_sealed_frame_in_the_table_must_fit_its_lengths() {
    let dir = scratch("sealed-lengths");
    let keys = test_keys();
    let p = write_sealed_pack(&dir, &keys, &[chunk(1, 4000, false)], &[]);
    let r = PackReader::open_keyed(p.id, &p.path, Some(keys)).unwrap();
    let f = r.frames()[0];
    assert_eq!(f.flags, FLAG_SEALED);
    assert_eq!(
        f.stored_len,
        f.plain_len + crate::crypt::SEAL_OVERHEAD as u32
    );
    // The frame table as parse_index sees it, with the first frame's entry edited (its crc
    // over the index recomputed, so only the new checks can refuse it).
    let bytes = std::fs::read(&p.path).unwrap();
    let len = bytes.len() as u64;
    let t = parse_trailer("p", &bytes[(len - TRAILER_LEN) as usize..], len).unwrap();
    let index = &bytes[t.index_offset as usize..(t.index_offset + t.index_len) as usize];
    let ftab = (t.n_chunks * ENTRY_LEN) as usize;
    let edited = |stored_len: u32, flags: u32| {
        let mut ix = index.to_vec();
        ix[ftab + 12..ftab + 16].copy_from_slice(&stored_len.to_le_bytes());
        ix[ftab + 16..ftab + 20].copy_from_slice(&flags.to_le_bytes());
        let mut t = t;
        t.index_crc = crc32c::crc32c(&ix);
        parse_index("p", &t, &ix)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let seal = crate::crypt::SEAL_OVERHEAD as u32;
    assert_eq!(edited(f.stored_len, f.flags), Ok(()));
    // Longer than its plaintext and a seal.
    let err = edited(f.plain_len + seal + 1, f.flags).unwrap_err();
    assert!(err.contains("bad lengths"), "{err}");
    // Sealed metadata is a contradiction (metadata frames are the unsealed ones).
    let err = edited(f.stored_len, FLAG_SEALED | FLAG_META).unwrap_err();
    assert!(err.contains("bad flags"), "{err}");
    // Sealed and uncompressed: exactly its plaintext and a seal.
    let err = edited(f.plain_len + seal - 1, FLAG_SEALED).unwrap_err();
    assert!(err.contains("bad flags"), "{err}");
}

#[test]
fn frame_cache_evicts_least_recently_used_and_a_peek_is_no_use() {
    let cache = FrameCache::new(300);
    let pack = PackId([7; 32]);
    let frame = |n: u8| std::sync::Arc::new(vec![n; 100]);
    for n in 0..3u8 {
        cache.insert((pack, u32::from(n)), frame(n));
    }
    // 0 used again, 1 only looked at: 1 is now the least recently used.
    assert_eq!(cache.get((pack, 0)).unwrap()[0], 0);
    assert!(cache.contains((pack, 1)));
    cache.insert((pack, 3), frame(3));
    assert!(!cache.contains((pack, 1)));
    assert!(cache.contains((pack, 0)) && cache.contains((pack, 2)));
    // Replacing a frame keeps one entry of it; the next two inserts evict 2, then 0.
    cache.insert((pack, 3), frame(9));
    assert_eq!(cache.bytes(), 300);
    cache.insert((pack, 4), frame(4));
    assert!(!cache.contains((pack, 2)));
    cache.insert((pack, 5), frame(5));
    assert!(!cache.contains((pack, 0)));
    assert_eq!(cache.get((pack, 3)).unwrap()[0], 9);
    assert_eq!(cache.bytes(), 300);
    // Many frames through a small cache: the bound holds and eviction follows use order.
    for n in 10..2000u32 {
        cache.insert((pack, n), frame(1));
        assert!(cache.bytes() <= 300);
    }
    assert!(cache.contains((pack, 1999)) && !cache.contains((pack, 1996)));
}
