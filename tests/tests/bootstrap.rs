//! The agent served into a workspace image, against the real binaries: the
//! coordinator serves its agent binary with a checksum and an init script; the one
//! line `myco create` prints, run in a fresh "workspace" (its own network and mount
//! namespaces, an empty HOME, a PATH and a file system where no `myco` is), brings
//! the agent up over https, and OpenSSH reaches it through `config-ssh`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

use tests::natlab::{Host, Lab, Nat, SERVER_IP};
use tests::{TestEnv, myco_bin, sha256_hex};

#[test]
fn the_coordinator_serves_its_agent_and_an_init_script() {
    let env = TestEnv::start();
    let api = env.http();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no agent binary name for {other}"),
    };
    let bin = api
        .client
        .get(format!("{}/bin/myco-linux-{arch}", env.url))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(bin.as_ref(), std::fs::read(myco_bin()).unwrap().as_slice());
    let sum = api
        .client
        .get(format!("{}/bin/myco-linux-{arch}.sha256", env.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let want = sha256_hex(&bin);
    let want = want.split_whitespace().next().unwrap();
    assert_eq!(sum, format!("{want}  myco-linux-{arch}\n"));
    // An architecture it does not have: 404, saying what it has.
    let reply = api.get("/bin/myco-linux-sparc", None);
    let message = reply.error(404);
    assert!(message.contains("myco-linux-sparc"), "{reply:?}");
    assert!(
        reply.body["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("myco-linux-{arch}")),
        "{reply:?}"
    );
    assert_eq!(api.get("/api/v1/init-script/linux/sparc", None).status, 404);
    // `uname -m`'s name for the machine is ours too: the printed line says
    // `.../linux/$(uname -m)`, one line for every machine.
    let by_uname = api
        .client
        .get(format!(
            "{}/api/v1/init-script/linux/{}",
            env.url,
            std::env::consts::ARCH
        ))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(by_uname.contains(&format!("ARCH='{arch}'")), "{by_uname}");
    let script = api
        .client
        .get(format!("{}/api/v1/init-script/linux/{arch}", env.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(script.starts_with("#!/bin/sh"), "{script}");
    assert!(
        script.contains(&format!("MYCO_URL='{}'", env.url)),
        "{script}"
    );
    // POSIX sh: dash parses it.
    let check = Command::new("sh")
        .args(["-n", "-c", &script])
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}

#[test]
fn the_init_script_keeps_the_workspace_alive_when_it_cannot_start() {
    let env = TestEnv::start();
    let script = env
        .http()
        .client
        .get(format!("{}/api/v1/init-script/linux/amd64", env.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    if !script.starts_with("#!") {
        eprintln!("skipping: this coordinator serves no amd64 agent");
        return;
    }
    // No token: it says why on stderr, and stays up for someone to look inside.
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(line.contains("no agent token"), "{line}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the init script exited"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn the_one_line_brings_up_an_agent_in_a_fresh_workspace_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tests::pki::private_ca(dir.path(), "lab", &[SERVER_IP]);
    let ca = ca.to_str().unwrap().to_owned();
    let Some(lab) = Lab::start_with(
        Nat::None,
        Nat::None,
        &[
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
        ],
        &[("MYCO_CA_CERT_FILE", &ca)],
        false,
    ) else {
        return;
    };
    assert!(lab.env.url.starts_with("https://"), "{}", lab.env.url);
    let created = lab.run(Host::Core, "alice", &["create", "img"]).ok();
    let line = created
        .stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("curl "))
        .unwrap_or_else(|| panic!("no init line: {}", created.stdout))
        .to_owned();
    assert!(line.contains("| MYCO_AGENT_TOKEN=myco_"), "{line}");

    // The workspace: the agent's network namespace; a mount namespace where the
    // build tree (and with it every `myco`) is covered by an empty tmpfs; an empty
    // HOME; a PATH of system directories. curl trusts the CA by SSL_CERT_FILE, as
    // the agent then does.
    let home = dir.path().join("empty-home");
    std::fs::create_dir(&home).unwrap();
    let target = myco_bin().parent().unwrap().parent().unwrap().to_owned();
    let workspace = format!(
        "mount -t tmpfs none {} && ! command -v myco && exec env -i HOME={} PATH=/usr/sbin:/usr/bin:/sbin:/bin SSL_CERT_FILE={ca} MYCO_MESH_BIND=0.0.0.0:0 MYCO_PORTMAPPER=false sh -c '{line}'",
        target.display(),
        home.display(),
    );
    let log = std::fs::File::create(dir.path().join("workspace.log")).unwrap();
    let mut agent = Command::new("ip")
        .args(["netns", "exec", lab.netns(Host::Agent)])
        .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(&workspace)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let shown = lab.env.wait_agent_connected("alice", "img");
    let workspace_log = std::fs::read_to_string(dir.path().join("workspace.log")).unwrap();
    assert!(
        shown["connection"]["relay_url"]
            .as_str()
            .unwrap()
            .starts_with("https://"),
        "{shown:#}\n{workspace_log}"
    );
    // The binary was downloaded into the empty HOME's cache.
    assert!(
        home.join(".cache/myco/myco-linux-amd64").exists()
            || home.join(".cache/myco/myco-linux-arm64").exists(),
        "{workspace_log}"
    );

    // OpenSSH from the client's network, through config-ssh.
    let cfg = lab.env.config_dir("alice").join("ssh_config");
    lab.run(
        Host::Client,
        "alice",
        &[
            "config-ssh",
            "--ssh-config-file",
            cfg.to_str().unwrap(),
            "-y",
        ],
    )
    .ok();
    let out = Command::new("ip")
        .args(["netns", "exec", lab.netns(Host::Client)])
        .args(["ssh", "-F"])
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "myco.img", "echo", "$HOME"])
        .env("MYCO_CA_CERT_FILE", &ca)
        .env("MYCO_MESH_BIND", "0.0.0.0:0")
        .env("MYCO_PORTMAPPER", "false")
        .env("MYCO_CONFIG_DIR", lab.env.config_dir("alice"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{out:?}\n{}",
        std::fs::read_to_string(dir.path().join("workspace.log")).unwrap()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        home.to_str().unwrap()
    );
    let _ = agent.kill();
    let _ = agent.wait();
}
