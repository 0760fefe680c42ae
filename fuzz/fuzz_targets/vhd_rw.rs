#![no_main]
//! Arbitrary bytes as a VHD opened writable: in-place writes over a hostile footer and BAT.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmnest_fuzz::exercise_writes("vpc", data));
