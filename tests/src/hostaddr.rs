//! An address of this host that is not on loopback's 127/8, for a coordinator that
//! network namespaces on this host must reach (a namespace's 127.0.0.1 is its own).
//! It sits on `lo` (this kernel has no dummy links), so nothing beyond the machine
//! sees it, and is deleted on drop; one left by a test process that was killed is
//! swept by the next one.

use std::process::Command;

use crate::natlab::{can_use_namespaces, must};

/// `lo` labels of our addresses: `lo:myco` and the owning test process's pid.
const LABEL_PREFIX: &str = "lo:myco";

/// A /32 in 10.214.0.0/16 on `lo`, owned by this test process.
#[derive(Debug)]
pub struct HostAddress {
    pub ip: String,
}

impl HostAddress {
    /// Adds one. Returns `None`, after printing why, when this process is not root or
    /// `ip` is missing; under CI (`CI=true`) a missing tool fails the test instead.
    pub fn add() -> Option<Self> {
        if !can_use_namespaces("give machines network namespaces") {
            return None;
        }
        sweep_stale();
        let pid = std::process::id();
        // One per test process (nextest runs each test in its own).
        let n = pid % 65_534 + 1;
        let ip = format!("10.214.{}.{}", n / 256, n % 256);
        must(Command::new("ip").args([
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            "lo",
            "label",
            &format!("{LABEL_PREFIX}{pid}"),
        ]));
        Some(Self { ip })
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.ip), "dev", "lo"])
            .status();
    }
}

/// Deletes the addresses of test processes that are gone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "dev", "lo"])
        .output()
    else {
        return;
    };
    // "1: lo    inet 10.214.0.7/32 scope global lo:myco1234\       valid_lft ..."
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(pid)) = (
            words
                .iter()
                .position(|w| *w == "inet")
                .and_then(|i| words.get(i + 1)),
            words
                .iter()
                .find_map(|w| w.trim_end_matches('\\').strip_prefix(LABEL_PREFIX))
                .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())),
        ) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["addr", "del", addr, "dev", "lo"])
                .status();
        }
    }
}
