//! Store objects other than packs and map nodes: snapshot manifests, recipe parts, a remote's
//! pack index objects and gc condemnation records, as read back from a store directory or a remote (untrusted bytes), and
//! the memory-stream cutters
//! (ELF program headers, QEMU migration streams) over untrusted memory files; and an encrypted
//! store's objects: manifests with sealed fields and a MAC (opened with a fixed key: garbage
//! and wrong tags are errors), and `encryption` config sections (unlocked when their argon2
//! costs are small enough for a fuzzer).
#![no_main]

use dedup_store::MemoryChunkStore;
use dedup_store::crypt::{EncryptionConfig, Kdf, KeySource, Keys};
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
        // As an encrypted store reads it: a MAC and sealed fields that do not open are errors;
        // one sealed here opens back to what was sealed.
        let keys = Keys::from_master(&[0x42; 32]);
        let mut keyed = m.clone();
        let _ = keys.open_manifest("fuzz", &mut keyed);
        let mut plain = m.clone();
        plain.sealed = None;
        plain.mac = None;
        let mut sealed = plain.clone();
        // (A sealed manifest over the size limit is refused by Store::write_manifest.)
        if keys.seal_manifest(&mut sealed).is_ok()
            && sealed.encode().len() <= dedup_store::store::manifest::MAX_MANIFEST_LEN
        {
            let mut back = Manifest::decode("fuzz", &sealed.encode()).expect("sealed parses");
            keys.open_manifest("fuzz", &mut back).expect("sealed opens");
            assert_eq!(back, plain);
        }
    }
    if let Ok(section) = serde_json::from_slice::<EncryptionConfig>(data) {
        let cheap = match &section.kdf {
            Kdf::Argon2id { memory_kib, iterations, lanes, .. } => {
                *memory_kib <= 256 && *iterations <= 2 && *lanes <= 2
            }
            Kdf::KeyFile => false,
        };
        if cheap {
            let _ = Keys::unlock(
                std::path::Path::new("fuzz"),
                &section,
                &KeySource::Passphrase(b"fuzz".to_vec()),
            );
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
