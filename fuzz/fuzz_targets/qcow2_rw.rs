#![no_main]
//! Arbitrary bytes as a qcow2 image opened writable: in-place writes over hostile L1/L2 tables,
//! refcount tables and blocks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmnest_fuzz::exercise_writes("qcow2", data));
