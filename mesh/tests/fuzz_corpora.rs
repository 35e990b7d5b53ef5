//! Replays every input of the fuzz corpora in `fuzz/corpus/` through the same
//! `mesh::fuzz_cases` functions the fuzz targets call, so CI checks on stable what
//! the fuzzer found interesting (TESTING.md, "Fuzzing"). A missing or empty corpus
//! fails: it would replay nothing.

use std::path::PathBuf;

fn replay(target: &str, case: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for path in files {
        let bytes = std::fs::read(&path).expect("a corpus file");
        // Name the input if it panics, as the fuzzer would.
        let done = std::panic::catch_unwind(|| case(&bytes));
        assert!(done.is_ok(), "{target}: {} fails", path.display());
    }
}

#[test]
fn frame_decode() {
    replay("frame_decode", mesh::fuzz_cases::frame_decode);
}

#[test]
fn ticket_verify() {
    replay("ticket_verify", mesh::fuzz_cases::ticket_verify);
}

#[test]
fn control_message() {
    replay("control_message", mesh::fuzz_cases::control_message);
}

#[test]
fn api_bodies() {
    replay("api_bodies", mesh::fuzz_cases::api_bodies);
}

#[test]
fn forward_spec() {
    replay("forward_spec", mesh::fuzz_cases::forward_spec);
}

#[test]
fn workspace_ref() {
    replay("workspace_ref", mesh::fuzz_cases::workspace_ref);
}
