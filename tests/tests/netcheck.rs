//! `myco netcheck` against a real coordinator on loopback, and the agent's network
//! check reaching `myco show`. Behind NATs and with UDP blocked: tests/nat_lab.rs.

use serde_json::Value;
use tests::{TestEnv, eventually};

#[test]
fn netcheck_on_loopback_finds_udp_and_no_nat() {
    let env = TestEnv::start();
    // No login needed: the probe targets are public.
    let out = env.run("nobody", &["netcheck", "--url", &env.url, "-o", "json"]);
    let r = out.ok().json();
    assert_eq!(r["udp"], true, "{r:#}");
    assert_eq!(r["ipv4"], true, "{r:#}");
    let public = r["global_v4"].as_str().unwrap();
    assert!(public.starts_with("127.0.0.1:"), "{r:#}");
    assert_eq!(r["behind_nat"], false, "{r:#}");
    // Both QAD ports saw the one socket at the same address.
    assert_eq!(r["mapping_varies_by_dest"], false, "{r:#}");
    assert_eq!(r["preferred_relay"], format!("{}/", env.url), "{r:#}");
    let relay = &r["relays"][0];
    assert!(relay["quic_ms"].as_f64().is_some(), "{r:#}");
    assert!(relay["http_ms"].as_f64().is_some(), "{r:#}");
    // IPv6 is not offered here; the report says so instead of leaving it out.
    assert_eq!(r["ipv6"], false);
    let failures = r["failures"].as_array().unwrap();
    assert!(
        failures
            .iter()
            .any(|f| f["probe"] == "udp_v6" && f["reason"].as_str().unwrap().contains("IPv6")),
        "{r:#}"
    );

    let text = env
        .run(
            "nobody",
            &["netcheck", "--url", &env.url, "--no-port-mapping"],
        )
        .ok()
        .stdout;
    assert!(text.contains("UDP: yes"), "{text}");
    assert!(text.contains("mapping varies by destination: no"), "{text}");
    assert!(text.contains("udp_v6: "), "{text}");
}

#[test]
fn netcheck_without_a_coordinator_says_what_to_do() {
    let env = TestEnv::start();
    let err = env.run("nobody", &["netcheck"]).fails();
    assert!(err.contains("pass --url"), "{err}");
    let port = tests::free_port();
    let err = env
        .run(
            "nobody",
            &["netcheck", "--url", &format!("http://127.0.0.1:{port}")],
        )
        .fails();
    assert!(err.contains("cannot reach the coordinator"), "{err}");
}

#[test]
fn the_agent_reports_its_network_check() {
    let (env, _agent) = TestEnv::with_agent();
    let mut agent = Value::Null;
    eventually("the agent's netcheck reaches the coordinator", || {
        agent = env.run("alice", &["show", "dev", "-o", "json"]).ok().json()["agents"][0].clone();
        !agent["netcheck"].is_null()
    });
    let n = &agent["netcheck"];
    assert_eq!(n["reason"], "start", "{n:#}");
    assert_eq!(n["report"]["udp"], true, "{n:#}");
    assert_eq!(n["report"]["mapping_varies_by_dest"], false, "{n:#}");
    let text = env.run("alice", &["show", "dev"]).ok().stdout;
    assert!(
        text.contains("network: UDP ok, public 127.0.0.1:"),
        "{text}"
    );
}

#[test]
fn netcheck_over_ipv6() {
    // A coordinator on IPv6 loopback only: its QAD ports are IPv6 addresses.
    let env = TestEnv::start_in(None, "[::1]", &[]);
    let r = env
        .run(
            "nobody",
            &[
                "netcheck",
                "--url",
                &env.url,
                "-o",
                "json",
                "--no-port-mapping",
            ],
        )
        .ok()
        .json();
    assert_eq!(r["udp"], true, "{r:#}");
    assert_eq!(r["ipv6"], true, "{r:#}");
    assert!(
        r["global_v6"].as_str().unwrap().starts_with("[::1]:"),
        "{r:#}"
    );
    assert_eq!(r["mapping_varies_by_dest"], false, "{r:#}");
    assert_eq!(r["ipv4"], false, "{r:#}");
    let failures = r["failures"].as_array().unwrap();
    assert!(
        failures
            .iter()
            .any(|f| f["probe"] == "udp_v4" && f["reason"].as_str().unwrap().contains("IPv4")),
        "{r:#}"
    );
}
