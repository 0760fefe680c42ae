#![no_main]
//! Arbitrary bytes as a VMDK file (sparse header, grain tables, embedded descriptor, markers).
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmnest_fuzz::exercise("vmdk", data));
