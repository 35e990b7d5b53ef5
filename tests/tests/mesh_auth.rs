//! Mesh authorization against a real agent and coordinator: the agent refuses forged,
//! expired, misdirected and malformed tickets with a reason, and the relay refuses
//! endpoints the coordinator does not know.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use iroh::SecretKey;
use mesh::Timestamp;
use mesh::control::{AgentHello, ClientHello, ConnectInfo};
use mesh::endpoint::{EndpointOptions, MeshEndpoint};
use mesh::ticket::TicketClaims;
use tests::TestEnv;

/// Sets up alice's workspace with a live agent and asks the coordinator for a ticket
/// for `client`.
fn connect_info(env: &TestEnv, client: &SecretKey) -> ConnectInfo {
    let r = env.http().post_json(
        "/api/v1/workspaces/me/dev/connect",
        Some(&env.token_of("alice")),
        &serde_json::json!({ "client_id": client.public() }),
    );
    assert_eq!(r.status, 200, "{r:#?}");
    serde_json::from_value(r.body).unwrap()
}

async fn endpoint(key: &SecretKey, info: &ConnectInfo) -> MeshEndpoint {
    mesh::endpoint::bind(EndpointOptions {
        secret_key: key.clone(),
        relay_url: info.relay_url.clone(),
        relay_only: false,
        bind_addr: Some("127.0.0.1:0".parse().unwrap()),
        portmapper: false,
        alpns: Vec::new(),
        relay_token: None,
        relay_quic: info.relay_quic.clone(),
    })
    .await
    .unwrap()
}

/// Presents `ticket` to the agent; returns its hello, or the reason it closed with.
async fn present(
    ep: &MeshEndpoint,
    info: &ConnectInfo,
    ticket: &str,
) -> Result<AgentHello, String> {
    let conn = ep
        .endpoint
        .connect(info.agent_addr.clone(), mesh::alpn::PING)
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    mesh::frame::write(
        &mut send,
        &ClientHello {
            ticket: ticket.into(),
        },
    )
    .await
    .unwrap();
    match mesh::frame::read::<_, AgentHello>(&mut recv).await {
        Ok(h) => Ok(h),
        Err(_) => match conn.closed().await {
            iroh::endpoint::ConnectionError::ApplicationClosed(ac) => {
                assert_eq!(ac.error_code, mesh::alpn::close::TICKET_REFUSED.into());
                Err(String::from_utf8_lossy(&ac.reason).into_owned())
            }
            other => panic!("closed without a reason: {other}"),
        },
    }
}

fn coordinator_key(env: &TestEnv) -> SecretKey {
    let text = std::fs::read_to_string(env.data_dir().join("coordinator.key")).unwrap();
    let bytes: [u8; 32] = hex::decode(text.trim()).unwrap().try_into().unwrap();
    SecretKey::from_bytes(&bytes)
}

#[test]
fn agent_refuses_bad_tickets_with_a_reason() {
    let (env, _agent) = TestEnv::with_agent();

    let alice = SecretKey::generate();
    let mallory = SecretKey::generate();
    let info = connect_info(&env, &alice);
    let shown = env.run("alice", &["show", "dev", "-o", "json"]).ok().json();
    let (workspace_id, agent_id) = (
        shown["id"].as_str().unwrap().to_owned(),
        shown["agents"][0]["id"].as_str().unwrap().to_owned(),
    );
    let claims = |client: &SecretKey, expires_at: Timestamp| TicketClaims {
        client: client.public(),
        agent: info.agent_addr.id,
        workspace_id: workspace_id.clone(),
        agent_id: agent_id.clone(),
        user: "alice".into(),
        token_id: "t1".into(),
        target: "alice/dev.main".into(),
        expires_at,
    };
    let in_a_minute = Timestamp::now().saturating_add(std::time::Duration::from_secs(60));
    let forged = mesh::ticket::sign(&SecretKey::generate(), &claims(&alice, in_a_minute));
    let expired = mesh::ticket::sign(
        &coordinator_key(&env),
        &claims(
            &alice,
            Timestamp::from_unix_millis(Timestamp::now().unix_millis() - 1000),
        ),
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep = endpoint(&alice, &info).await;
        let hello = present(&ep, &info, &info.ticket)
            .await
            .expect("a good ticket is accepted");
        assert_eq!(hello.agent, "alice/dev.main");

        let why = present(&ep, &info, &forged).await.unwrap_err();
        assert!(
            why.contains("not signed by this agent's coordinator"),
            "{why}"
        );
        let why = present(&ep, &info, &expired).await.unwrap_err();
        assert!(why.contains("expired"), "{why}");
        let why = present(&ep, &info, "garbage").await.unwrap_err();
        assert!(why.contains("malformed"), "{why}");

        // Alice's ticket presented by another endpoint.
        let other = endpoint(&mallory, &info).await;
        let why = present(&other, &info, &info.ticket).await.unwrap_err();
        assert!(why.contains("was issued to endpoint"), "{why}");
        other.endpoint.close().await;
        ep.endpoint.close().await;
    });
}

#[test]
fn relay_refuses_unknown_endpoints_and_admits_ticketed_ones() {
    let (env, _agent) = TestEnv::with_agent();
    let relay_url: iroh::RelayUrl = format!("{}/", env.url).parse().unwrap();
    let stranger = SecretKey::generate();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dial = |key: SecretKey| {
        let url = relay_url.clone();
        rt.block_on(async move {
            let tls = iroh_relay::tls::CaTlsConfig::default()
                .client_config(iroh_relay::tls::default_provider())
                .unwrap();
            iroh_relay::client::ClientBuilder::new(url, key, iroh::dns::DnsResolver::new())
                .tls_client_config(tls)
                .connect()
                .await
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        })
    };
    let err = dial(stranger.clone()).unwrap_err();
    assert!(err.contains("unknown to this coordinator"), "{err}");
    // Once the coordinator issued a ticket to it, the same endpoint is admitted.
    connect_info(&env, &stranger);
    dial(stranger).expect("a ticketed client is admitted");
}
