//! Store objects other than packs and map nodes: snapshot manifests, recipe parts, a remote's
//! pack index objects and gc condemnation records, as read back from a store directory or a remote (untrusted bytes), and
//! the memory-stream cutters
//! (ELF program headers, QEMU migration streams) over untrusted memory files.
#![no_main]

use dedup_store::MemoryChunkStore;
use dedup_store::store::Manifest;
use dedup_store::store::stream::{decode_part, encode_part, export_stream, import_stream};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode("fuzz", data) {
        // A manifest that parses re-encodes to one that parses to the same value.
        let again = Manifest::decode("fuzz", &m.encode()).expect("re-encoded manifest parses");
        assert_eq!(again, m);
        for member in &m.members {
            let _ = member.map_root();
        }
    }
    // A gc --remote condemnation record.
    let _ = dedup_store::remote::parse_condemned_record("fuzz", data);
    if let Ok((entries, frames, len)) = dedup_store::remote::parse_index_object("fuzz", data) {
        // What parses is what a reader may index into: every entry inside its frame, the frames
        // inside the pack.
        for e in &entries {
            let f = &frames[e.loc.frame as usize];
            assert!(u64::from(e.loc.offset) + u64::from(e.loc.len) <= u64::from(f.plain_len));
            assert!(f.offset + 16 + u64::from(f.stored_len) <= len);
        }
    }
    if let Ok(entries) = decode_part("fuzz", data) {
        assert_eq!(encode_part(&entries), data, "parts are canonical");
    }
    // Memory images as streams (ELF dumps, migration streams, anything else): cut, stored and
    // given back byte for byte.
    let store = MemoryChunkStore::new();
    let (layout, _, _) = import_stream(&store, data).expect("a stream always imports");
    let mut out = Vec::new();
    export_stream(&store, &layout, &mut out).expect("export");
    assert!(out == data, "stream round trip");
});
