//! Fuzz the image map node parser of the store: the input is the bytes of one stored node.
//!
//! A node that parses must re-encode to the same bytes (the encoding is canonical, so one tree
//! has one set of ids). A leaf that parses is also opened as the root of a map of its size and
//! walked, read and diffed against the empty map.

#![no_main]

use dedup_store::map::{FANOUT, Map, MapRoot, decode_node, diff, encode_node};
use dedup_store::{ChunkId, ChunkStore, MemoryChunkStore};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id = ChunkId::of(data);
    let Ok(node) = decode_node(&id, data) else { return };
    assert!(!node.entries.is_empty() && node.entries.len() <= FANOUT);
    assert_eq!(encode_node(node.level, &node.entries), data);

    let store = MemoryChunkStore::new();
    store.put(id, data).expect("memory put");
    // A map whose root level and entry count this node fits when it is a leaf; an interior
    // node gets the geometry of a leaf and must be refused as misplaced.
    let chunks = node.entries.len() as u64;
    let Ok(root) = MapRoot::new(Some(id), chunks * 4096, 4096) else { return };
    let Ok(map) = Map::open(&store, root) else { return };
    let _ = map.get(chunks - 1);
    for run in map.iter_range(0, chunks) {
        if run.is_err() {
            break;
        }
    }
    let empty = MapRoot { root: None, ..root };
    if let Ok(d) = diff(&store, &empty, &root) {
        for entry in d {
            if entry.is_err() {
                break;
            }
        }
    }
});
