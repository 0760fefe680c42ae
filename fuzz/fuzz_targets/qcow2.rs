#![no_main]
//! Arbitrary bytes as a qcow2 image (header, extensions, L1/L2, refcounts, snapshots, bitmaps).
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmnest_fuzz::exercise("qcow2", data));
