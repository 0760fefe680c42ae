//! Store objects other than packs and map nodes: snapshot manifests and recipe parts, as read
//! back from a store directory or a remote (untrusted bytes).
#![no_main]

use dedup_store::store::Manifest;
use dedup_store::store::stream::{decode_part, encode_part};
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
    if let Ok(entries) = decode_part("fuzz", data) {
        assert_eq!(encode_part(&entries), data, "parts are canonical");
    }
});
