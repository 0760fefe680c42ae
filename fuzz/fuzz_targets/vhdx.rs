#![no_main]
//! Arbitrary bytes as a VHDX image (headers, region tables, metadata, BAT, log replay).
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmnest_fuzz::exercise("vhdx", data));
