//! Fuzzes `mesh::fuzz_cases::api_bodies`, which says what it feeds and asserts.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh::fuzz_cases::api_bodies(data));
