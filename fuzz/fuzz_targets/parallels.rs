#![no_main]
//! Parallels header and BAT.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmnest_fuzz::exercise("parallels", data));
