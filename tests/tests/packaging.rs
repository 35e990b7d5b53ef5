//! What ships beside the binary: systemd units that `systemd-analyze verify`
//! accepts without a word, shell completions that parse, man pages for every
//! command.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use tests::myco_bin;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn the_systemd_units_verify_cleanly() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze must be installed under CI (package systemd)"
        );
        eprintln!("skipping: needs systemd-analyze");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The units name /usr/local/bin/myco, which verify wants to exist: point them at
    // the binary under test. The agent's is a template: verify an instance.
    let mut units = Vec::new();
    for (file, instance) in [
        ("myco-server.service", "myco-server.service"),
        ("myco-agent@.service", "myco-agent@alice.service"),
    ] {
        let text = std::fs::read_to_string(repo().join("packaging/systemd").join(file)).unwrap();
        let path = dir.path().join(instance);
        std::fs::write(
            &path,
            text.replace("/usr/local/bin/myco", myco_bin().to_str().unwrap()),
        )
        .unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Unknown keys and bad values are only warnings to systemd: none is allowed here.
    assert!(stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn completions_parse_and_every_command_has_a_man_page() {
    let out = Command::new(myco_bin())
        .args(["completion", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("config-ssh"), "{script}");
    // From a file: the script is longer than one argument may be.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &script).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(file.path())
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    for shell in ["zsh", "fish"] {
        let out = Command::new(myco_bin())
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success() && !out.stdout.is_empty());
    }
    let err = Command::new(myco_bin())
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert!(!err.status.success());

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(myco_bin())
        .arg("man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for page in [
        "myco.1",
        "myco-server.1",
        "myco-agent.1",
        "myco-ssh.1",
        "myco-users-disable.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".SH NAME"), "{page}: {text}");
    }
}

/// `--help` lists what means something for the command: the coordinator and the
/// agent do not show the CLI's session flags, and a client flag typed before
/// `server` is refused rather than ignored.
#[test]
fn help_lists_only_the_flags_of_the_command() {
    let help = |args: &[&str]| {
        let out = Command::new(myco_bin()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let server = help(&["server", "--help"]);
    for flag in [
        "--url",
        "--token",
        "--config-dir",
        "--ca-cert-file",
        "--insecure-http",
    ] {
        assert!(
            !server.contains(&format!("{flag} ")),
            "server lists {flag}:\n{server}"
        );
    }
    assert!(server.contains("--tls-cert-file"), "{server}");
    let agent = help(&["agent", "--help"]);
    assert!(!agent.contains("--config-dir"), "{agent}");
    assert!(!agent.contains("saved session"), "{agent}");
    assert!(agent.contains("MYCO_AGENT_TOKEN"), "{agent}");
    let ls = help(&["ls", "--help"]);
    assert!(
        ls.contains("Coordinator options") && ls.contains("--config-dir"),
        "{ls}"
    );
    let users = help(&["users", "disable", "--help"]);
    assert!(users.contains("--url"), "{users}");

    let out = Command::new(myco_bin())
        .args(["--url", "http://127.0.0.1:9", "server"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--url means nothing for `myco server`"),
        "{err}"
    );
}
