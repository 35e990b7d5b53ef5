//! TLS end to end, against the real binaries: a coordinator given a certificate
//! serves the API, the agents' control channel and the relay over https/wss, the
//! CLI and the agent trust a private CA from `MYCO_CA_CERT_FILE` or `SSL_CERT_FILE`,
//! a certificate from an unknown CA is refused in one line naming the host, and
//! SIGHUP swaps the certificate without dropping anyone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use tests::TestEnv;
use tests::pki::{private_ca, private_ca_expired};

/// A coordinator serving https with a certificate of a private CA; its clients
/// trust that CA through `MYCO_CA_CERT_FILE`.
fn https_env(dir: &Path) -> (TestEnv, PathBuf) {
    let (ca, cert, key) = private_ca(dir, "one", &["127.0.0.1", "localhost"]);
    let mut env = TestEnv::start_with(&[
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
    ]);
    assert!(env.url.starts_with("https://127.0.0.1:"), "{}", env.url);
    env.client_env
        .push(("MYCO_CA_CERT_FILE".into(), ca.to_str().unwrap().to_owned()));
    (env, ca)
}

#[test]
fn the_whole_product_works_over_https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _ca) = https_env(dir.path());
    env.bootstrap("alice");
    let created = env
        .run("alice", &["create", "dev", "-o", "json"])
        .ok()
        .json();
    let token = created["agent_tokens"][0]["token"].as_str().unwrap();
    // The agent: control channel over wss, relay over https.
    let _agent = env.start_agent(token);
    let shown = env.wait_agent_connected("alice", "dev");
    assert!(
        shown["connection"]["relay_url"]
            .as_str()
            .unwrap()
            .starts_with("https://"),
        "{shown:#}"
    );
    env.run("alice", &["ping", "dev", "-n", "1"]).ok();
    // Through the relay, which now speaks TLS.
    let out = env
        .run("alice", &["ping", "dev", "-n", "2", "--relay-only"])
        .ok();
    assert!(out.stdout.contains("relay https://"), "{}", out.stdout);
    let out = env
        .run("alice", &["ssh", "dev", "--", "echo", "over-tls"])
        .ok();
    assert_eq!(out.stdout.trim(), "over-tls");
    // netcheck's HTTPS probe of the relay trusts the same CA.
    let report = env.run("alice", &["netcheck", "-o", "json"]).ok().json();
    assert!(report["relays"][0]["http_ms"].is_number(), "{report:#}");
    // And QAD, whose certificate the CA signed, with the pin the coordinator gave.
    assert!(report["relays"][0]["quic_ms"].is_number(), "{report:#}");
}

#[test]
fn ssl_cert_file_is_honoured_like_curl() {
    let dir = tempfile::tempdir().unwrap();
    let (mut env, ca) = https_env(dir.path());
    env.client_env.clear();
    env.client_env
        .push(("SSL_CERT_FILE".into(), ca.to_str().unwrap().to_owned()));
    env.bootstrap("alice");
    env.run("alice", &["whoami"]).ok();
}

#[test]
fn an_untrusted_certificate_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (mut env, _ca) = https_env(dir.path());
    // Trust nothing but another CA.
    let (other, ..) = private_ca(dir.path(), "other", &["127.0.0.1", "localhost"]);
    env.client_env.clear();
    env.client_env
        .push(("SSL_CERT_FILE".into(), other.to_str().unwrap().to_owned()));
    let err = env
        .run_with_input(
            "alice",
            &[
                "login",
                &env.url,
                "--first-user",
                "--username",
                "alice",
                "--password-stdin",
            ],
            &format!("{}\n", tests::PASSWORD),
        )
        .fails();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("TLS certificate of 127.0.0.1 was refused"),
        "{err}"
    );
    assert!(err.contains("not trusted"), "{err}");
    assert!(err.contains("other-ca.pem"), "{err}");
    // A CA file that is not one is named too.
    env.client_env.clear();
    env.client_env
        .push(("MYCO_CA_CERT_FILE".into(), "/nonexistent/ca.pem".into()));
    let err = env.run("alice", &["whoami"]).fails();
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

#[test]
fn sighup_swaps_the_certificate_without_dropping_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, cert, key) = private_ca(dir.path(), "one", &["127.0.0.1", "localhost"]);
    let (ca2, cert2, key2) = private_ca(dir.path(), "two", &["127.0.0.1", "localhost"]);
    // The server reads fixed paths; the renewal overwrites them.
    let live_cert = dir.path().join("live.pem");
    let live_key = dir.path().join("live.key");
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let mut env = TestEnv::start_with(&[
        "--tls-cert-file",
        live_cert.to_str().unwrap(),
        "--tls-key-file",
        live_key.to_str().unwrap(),
    ]);
    // Clients trust both CAs: the agent must ride through the swap.
    let both = dir.path().join("both.pem");
    std::fs::write(
        &both,
        std::fs::read_to_string(&ca1).unwrap() + &std::fs::read_to_string(&ca2).unwrap(),
    )
    .unwrap();
    env.client_env.push((
        "MYCO_CA_CERT_FILE".into(),
        both.to_str().unwrap().to_owned(),
    ));
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let mut agent = env.start_agent(&token);
    env.wait_agent_connected("alice", "dev");

    std::fs::copy(&cert2, &live_cert).unwrap();
    std::fs::copy(&key2, &live_key).unwrap();
    env.signal_server("HUP");
    // New connections get the new certificate: a client trusting only the second CA
    // gets in, one trusting only the first no longer does.
    let only = |ca: &Path| {
        let mut cmd = env.cmd("alice", &["whoami"]);
        cmd.env("MYCO_CA_CERT_FILE", ca);
        tests::run_command(cmd, "").code == Some(0)
    };
    tests::eventually("the new certificate is served", || only(&ca2));
    assert!(!only(&ca1));
    // The agent's channel stayed up throughout.
    assert!(agent.child.try_wait().unwrap().is_none());
    env.run("alice", &["ssh", "dev", "--", "true"]).ok();
    // A broken renewal keeps what is served.
    std::fs::write(&live_cert, "garbage").unwrap();
    env.signal_server("HUP");
    assert!(only(&ca2));
}

/// A renewal that came after the certificate expired: SIGHUP brings back the API and
/// QUIC address discovery too (one certificate for both), which clients pin by the
/// certificate the coordinator names now.
#[test]
fn sighup_renews_an_expired_certificate_for_quic_address_discovery_too() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["127.0.0.1", "localhost"];
    let (ca1, cert, key) = private_ca_expired(dir.path(), "old", &names);
    let (ca2, cert2, key2) = private_ca(dir.path(), "new", &names);
    let live_cert = dir.path().join("live.pem");
    let live_key = dir.path().join("live.key");
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let mut env = TestEnv::start_with(&[
        "--tls-cert-file",
        live_cert.to_str().unwrap(),
        "--tls-key-file",
        live_key.to_str().unwrap(),
    ]);
    let both = dir.path().join("both.pem");
    std::fs::write(
        &both,
        std::fs::read_to_string(&ca1).unwrap() + &std::fs::read_to_string(&ca2).unwrap(),
    )
    .unwrap();
    env.client_env.push((
        "MYCO_CA_CERT_FILE".into(),
        both.to_str().unwrap().to_owned(),
    ));
    let netcheck = || env.run("nobody", &["netcheck", "-o", "json", "--url", &env.url]);
    let expired = netcheck().fails();
    assert!(expired.contains("expired"), "{expired}");

    std::fs::copy(&cert2, &live_cert).unwrap();
    std::fs::copy(&key2, &live_key).unwrap();
    env.signal_server("HUP");
    tests::eventually("the renewed certificate is served", || {
        netcheck().code == Some(0)
    });
    let report = netcheck().ok().json();
    let relay = &report["relays"][0];
    assert!(relay["http_ms"].is_number(), "{report:#}");
    assert!(
        relay["quic_ms"].is_number(),
        "QAD still serves the expired certificate: {report:#}"
    );
    assert_eq!(report["udp"], true, "{report:#}");
}

#[test]
fn secrets_go_over_plain_http_beyond_loopback_only_when_asked() {
    let env = TestEnv::start_in(None, "0.0.0.0", &["--access-url", "http://127.0.0.1:9"]);
    let code = env.setup_code();
    let login = |insecure: bool| {
        let mut cmd = env.cmd(
            "root",
            &[
                "login",
                &env.url,
                "--first-user",
                "--username",
                "root",
                "--password-stdin",
                "--setup-code",
                &code,
            ],
        );
        cmd.env_remove("MYCO_INSECURE_HTTP");
        if insecure {
            cmd.arg("--insecure-http");
        }
        tests::run_command(cmd, &format!("{}\n", tests::PASSWORD))
    };
    let refused = login(false);
    assert_ne!(refused.code, Some(0));
    assert!(
        refused.stderr.contains("plain HTTP to another machine")
            && refused.stderr.contains("--insecure-http"),
        "{}",
        refused.stderr
    );
    let allowed = login(true);
    assert_eq!(allowed.code, Some(0), "{}", allowed.stderr);
    assert!(
        allowed
            .stderr
            .contains("warning: sending credentials in clear text"),
        "{}",
        allowed.stderr
    );
}
