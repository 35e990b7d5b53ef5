//! Fuzzes `mesh::fuzz_cases::forward_spec`, which says what it feeds and asserts.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh::fuzz_cases::forward_spec(data));
