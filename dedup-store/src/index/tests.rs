use super::*;
use crate::pack::tests::scratch;

fn loc(pack: u8, i: u32) -> Location {
    Location {
        pack: PackId([pack; 32]),
        loc: ChunkLoc {
            frame: i / 10,
            offset: i * 100,
            len: 100 + i,
        },
    }
}

fn entries(n: u32, salt: u32) -> Vec<PackEntry> {
    (0..n)
        .map(|i| PackEntry {
            id: ChunkId::of(&(i + salt).to_le_bytes()),
            loc: loc(0, i).loc,
        })
        .collect()
}

#[test]
fn golden_index_file_of_two_records_has_pinned_bytes() {
    let mut recs = BTreeMap::new();
    recs.insert(ChunkId::of(b"a"), loc(1, 3));
    recs.insert(ChunkId::of(b"b"), loc(2, 25));
    let bytes = encode_index_file(&recs);
    assert_eq!(bytes.len(), 48 + 2 * 32 + 2 * 48);
    assert_eq!(
        &bytes[..8],
        &blake3::hash(b"vmnest chunk index v1").as_bytes()[..8]
    );
    assert_eq!(
        blake3::hash(&bytes).to_hex().as_str(),
        "a45674a9c124c40c91ad1d5ec646d4c10ecc8b91ddcc636d90b21b77eca57aa1",
        "index file format changed"
    );
    let (packs, n) = parse_index_file("t", &bytes).unwrap();
    assert_eq!((packs.len(), n), (2, 2));
}

#[test]
fn a_flipped_byte_anywhere_in_an_index_file_is_detected_with_its_name() {
    let mut recs = BTreeMap::new();
    for i in 0..20u32 {
        recs.insert(ChunkId::of(&i.to_le_bytes()), loc((i % 3) as u8, i));
    }
    let bytes = encode_index_file(&recs);
    for at in 0..bytes.len() {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        let e = parse_index_file("index file X", &b).unwrap_err();
        assert!(e.to_string().contains("index file X"), "{e}");
    }
    for cut in [0, 47, 48, bytes.len() - 1] {
        assert!(parse_index_file("t", &bytes[..cut]).is_err());
    }
}

#[test]
fn lookups_in_a_50k_record_mapped_index_find_every_chunk_and_no_other() {
    let dir = scratch("idx50k");
    let mut index = ChunkIndex::rebuild(&dir, std::iter::empty()).unwrap();
    let packs: Vec<(PackId, Vec<PackEntry>)> = (0..5u8)
        .map(|p| (PackId([p + 1; 32]), entries(10_000, p as u32 * 10_000)))
        .collect();
    for (p, e) in &packs {
        index.insert_pack(*p, e);
    }
    index.persist_delta().unwrap();
    assert_eq!(index.file_count(), 1);
    assert_eq!(index.delta_len(), 0);
    let (reopened, _) = ChunkIndex::open(&dir).unwrap();
    let mut found = 0;
    for (p, es) in &packs {
        for e in es {
            let l = reopened.lookup(&e.id).unwrap();
            assert_eq!((l.pack, l.loc), (*p, e.loc));
            found += 1;
        }
    }
    assert_eq!(found, 50_000);
    for i in 50_000..51_000u32 {
        assert_eq!(reopened.lookup(&ChunkId::of(&i.to_le_bytes())), None);
    }
}

#[test]
fn deltas_persist_as_files_and_merge_into_one_with_newest_winning() {
    let dir = scratch("merge");
    let (mut index, _) = ChunkIndex::open(&dir).unwrap();
    for p in 0..(MAX_INDEX_FILES as u8 + 3) {
        index.insert_pack(PackId([p; 32]), &entries(50, p as u32 * 25));
        index.persist_delta().unwrap();
    }
    assert!(index.file_count() <= MAX_INDEX_FILES);
    let all = index.all();
    assert_eq!(all.len(), 25 * (MAX_INDEX_FILES + 3) + 25);
    // Chunk 30 is in pack 0 (ids 0..50) and pack 1 (ids 25..75): the newer pack 1 wins.
    let id = ChunkId::of(&30u32.to_le_bytes());
    assert_eq!(index.lookup(&id).unwrap().pack, PackId([1; 32]));
    index.merge().unwrap();
    assert_eq!(index.file_count(), 1);
    assert_eq!(index.all(), all);
    let (reopened, _) = ChunkIndex::open(&dir).unwrap();
    assert_eq!(reopened.all(), all);
    assert_eq!(reopened.covered_packs().len(), MAX_INDEX_FILES + 3);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

#[test]
fn open_removes_temporary_leftovers_and_rejects_a_damaged_file() {
    let dir = scratch("idxopen");
    std::fs::write(dir.join("tmp-1-2.idx.tmp"), b"half").unwrap();
    let (mut index, removed) = ChunkIndex::open(&dir).unwrap();
    assert_eq!(removed.len(), 1);
    index.insert_pack(PackId([9; 32]), &entries(10, 0));
    index.persist_delta().unwrap();
    let file = dir.join("0000000000000001.idx");
    let mut b = std::fs::read(&file).unwrap();
    b[100] ^= 1;
    std::fs::write(&file, b).unwrap();
    let e = ChunkIndex::open(&dir).unwrap_err().to_string();
    assert!(e.contains("0000000000000001.idx"), "{e}");
}
