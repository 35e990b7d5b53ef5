//! Who proves what to whom, against the real binaries: an agent cannot announce
//! another agent's endpoint (the rogue-agent attack), a copied agent key is refused,
//! and an agent holds to the coordinator it pinned.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mesh::control::{AgentMessage, CoordinatorMessage};
use mesh::control_channel::{ControlClient, Received, RecvError};
use tests::TestEnv;

/// Opens a control channel with `token` as a hand-written agent would, and returns
/// the socket and the welcome.
async fn rogue_channel(env: &TestEnv, token: &str) -> (ControlClient, CoordinatorMessage) {
    let mut ws = mesh::control_channel::connect(&env.url, token, None)
        .await
        .unwrap();
    let Ok(Received::Message(first)) = ws.recv().await else {
        panic!("no welcome")
    };
    (ws, first)
}

/// Reads until the coordinator closes the channel; returns the close reason.
async fn close_reason(ws: &mut ControlClient) -> String {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(30), ws.recv())
            .await
            .expect("the coordinator never closed the channel")
        {
            Ok(Received::Closed(reason)) => return reason.unwrap_or_default(),
            Ok(Received::Message(_)) | Err(RecvError::Decode(_)) => {}
            Err(e) => panic!("channel failed instead of closing: {e}"),
        }
    }
}

#[test]
fn a_rogue_agent_cannot_take_another_users_agent_endpoint() {
    let (env, victim) = TestEnv::alice_and_bob();
    let alice_agent = env.wait_agent_connected("alice", "dev");
    let victim_id: iroh::EndpointId = alice_agent["connection"]["endpoint_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let bob_token = env.create_workspace("bob", "mine");

    // 1. Bob's "agent" announces alice's agent's endpoint id, which is public (it is
    // in every handshake and in `show -o json`), with a proof made by a key of its own.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reason = rt.block_on(async {
        let (mut ws, welcome) = rogue_channel(&env, &bob_token).await;
        let CoordinatorMessage::Welcome {
            challenge,
            agent_id,
            ..
        } = welcome
        else {
            panic!("not a welcome: {welcome:?}")
        };
        let own = iroh::SecretKey::generate();
        let msg = AgentMessage::Addr {
            addr: iroh::EndpointAddr::new(victim_id),
            proof: mesh::sign::endpoint_proof(&own, &challenge, &agent_id),
        };
        ws.send(&msg).await.unwrap();
        close_reason(&mut ws).await
    });
    assert!(
        reason.contains("no proof this agent holds its endpoint's key"),
        "{reason:?}"
    );
    // Bob gets no ticket for it: his workspace has no agent on the mesh.
    let line = env.run("bob", &["ssh", "mine", "--", "true"]).fails();
    assert!(line.contains("is not connected"), "{line}");
    // And through OpenSSH, as the attack was first tried.
    let out = tests::run_command(
        {
            let mut c = std::process::Command::new("ssh");
            c.args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
            ])
            .arg(format!(
                "ProxyCommand=env MYCO_CONFIG_DIR={} MYCO_MESH_BIND=127.0.0.1:0 MYCO_PORTMAPPER=false {} ssh --stdio mine",
                env.config_dir("bob").display(),
                tests::myco_bin().display()
            ))
            .args(["myco.mine", "id"]);
            c
        },
        "",
    );
    assert_ne!(out.code, Some(0), "{out:#?}");

    // 2. Bob's real agent with a copy of alice's agent key: it holds the key, but the
    // endpoint is alice's agent's, so the coordinator refuses it.
    let stolen = env.dir().join("stolen");
    std::fs::create_dir(&stolen).unwrap();
    std::fs::copy(victim.data_dir.join("agent.key"), stolen.join("agent.key")).unwrap();
    let rogue = env.start_agent_at(None, &bob_token, &stolen, &[]);
    tests::eventually("the coordinator refuses the copied key", || {
        rogue.log().contains("is another agent's")
    });
    let line = env.run("bob", &["ssh", "mine", "--", "true"]).fails();
    assert!(line.contains("is not connected"), "{line}");
    // Alice's workspace is untouched and still hers.
    let out = env
        .run("alice", &["ssh", "dev", "--", "echo", "still-mine"])
        .ok();
    assert_eq!(out.stdout.trim(), "still-mine");
}

#[test]
fn an_agent_refuses_a_coordinator_with_another_key() {
    let (env, mut agent) = TestEnv::with_agent();
    let pin = std::fs::read_to_string(agent.data_dir.join("coordinator.pin")).unwrap();
    assert!(pin.contains(&env.ticket_key), "{pin}");
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();

    // Another coordinator (another key) at another address: the same agent data dir
    // pointed at it is refused, with what to do.
    let other = TestEnv::start();
    other.bootstrap("alice");
    let token = other.create_workspace("alice", "dev");
    let mut moved = other.start_agent_at(None, &token, &agent.data_dir, &[]);
    assert_eq!(moved.wait_exit(), Some(1), "{}", moved.log());
    let log = moved.log();
    assert!(log.contains("is pinned to"), "{log}");
    assert!(log.contains("re-enrol"), "{log}");
    assert!(log.contains(&other.ticket_key), "{log}");

    // Re-enrolled by the operator with --coordinator-key (here its variable).
    let _enrolled = other.start_agent_at(
        None,
        &token,
        &agent.data_dir,
        &[("MYCO_COORDINATOR_KEY", &other.ticket_key)],
    );
    other.wait_agent_connected("alice", "dev");
    let pin = std::fs::read_to_string(agent.data_dir.join("coordinator.pin")).unwrap();
    assert!(pin.contains(&other.ticket_key), "{pin}");
}

#[test]
fn a_coordinator_key_given_up_front_must_match_the_first_welcome() {
    let env = TestEnv::start();
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let wrong = iroh::SecretKey::generate().public().to_string();
    let mut agent = env.start_agent_with(None, &token, &[("MYCO_COORDINATOR_KEY", &wrong)]);
    assert_eq!(agent.wait_exit(), Some(1), "{}", agent.log());
    let log = agent.log();
    assert!(log.contains("--coordinator-key"), "{log}");
    assert!(!agent.data_dir.join("coordinator.pin").exists());
}
