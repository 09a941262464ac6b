#![no_main]
// The target is defined once, in cstore_fuzz; see fuzzing/src/lib.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cstore_fuzz::index_parse(data));
