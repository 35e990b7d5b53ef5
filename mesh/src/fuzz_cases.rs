//! The bodies of the fuzz targets in `fuzz/`, one function per target: bytes in, the
//! code under test run on them, its invariants asserted. They live here, not in
//! `fuzz/`, so that `tests/fuzz_corpora.rs` replays every corpus on stable with the
//! same assertions the fuzzer checked (TESTING.md, "Fuzzing").
//!
//! A panic is the finding: each function panics, with the input's story in the
//! message, when an invariant breaks, and returns quietly for any input the code
//! under test refuses cleanly.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use iroh::{EndpointId, SecretKey};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    App, ChangePassword, CreateToken, CreateUser, CreateWorkspace, Credentials, ErrorBody,
    MetadataSpec,
};
use crate::control::{
    AgentHello, AgentMessage, ClientHello, ConnectRequest, CoordinatorMessage, ForwardProtocol,
    ForwardReply, ForwardRequest, Manifest, SpeedtestRequest, SpeedtestResult,
};
use crate::forward_spec::{self, PortForward};
use crate::frame::{self, FrameError, MAX_DATAGRAM, MAX_FRAME};
use crate::name::MAX_NAME_LEN;
use crate::sign::{self, TICKET_CONTEXT};
use crate::ticket::{self, AgentIdentity, MAX_TICKET_LEN, TicketClaims, TicketError};
use crate::{Name, Timestamp, WorkspaceRef, limits};

/// Frames as an agent or a client reads them off a mesh stream: each message type
/// carried in frames, and a stream of datagrams. What decodes re-encodes to a frame
/// that decodes to the same message; datagrams re-encode to the very bytes read.
pub fn frame_decode(data: &[u8]) {
    frame_round_trip::<ClientHello>(data);
    frame_round_trip::<AgentHello>(data);
    frame_round_trip::<ForwardRequest>(data);
    frame_round_trip::<ForwardReply>(data);
    frame_round_trip::<SpeedtestRequest>(data);
    frame_round_trip::<SpeedtestResult>(data);
    frame_round_trip::<serde_json::Value>(data);

    let mut rest = data;
    let mut written = Vec::new();
    loop {
        match now_or_never(frame::read_datagram(&mut rest)) {
            Ok(Some(d)) => {
                assert!(d.len() <= MAX_DATAGRAM, "a datagram of {} bytes", d.len());
                now_or_never(frame::write_datagram(&mut written, &d))
                    .expect("a datagram read is one that can be written");
            }
            Ok(None) => {
                assert_eq!(written, data, "datagrams re-encode to the bytes read");
                break;
            }
            Err(FrameError::Io(_)) => {
                assert!(data.starts_with(&written), "datagrams re-encode as read");
                break;
            }
            Err(e) => panic!("reading a datagram: {e}"),
        }
    }
}

/// A ticket text as an agent receives it, checked against a fixed coordinator key,
/// client, agent and clock: it verifies only when the fixed key signed its exact
/// claims, and then grants exactly this client this agent until after `now`. Then
/// the same bytes as claims, correctly signed, to reach the parser behind the
/// signature: they verify exactly when they are claims for this client and agent;
/// signed by another key, they never verify.
pub fn ticket_verify(data: &[u8]) {
    let w = TicketWorld::new();
    let text = String::from_utf8_lossy(data);
    let verdict = ticket::verify(&text, &w.key.public(), w.client, &w.agent, w.now);
    if let Ok(claims) = &verdict {
        let (claims_hex, sig_hex) = text
            .trim()
            .split_once('.')
            .expect("a verified ticket has a dot");
        let json = hex::decode(claims_hex).expect("a verified ticket's claims are hex");
        let ours = sign::sign_hex(&w.key, TICKET_CONTEXT, &json);
        assert!(
            ours.eq_ignore_ascii_case(sig_hex),
            "{text:?} verified without the coordinator's signature"
        );
        w.assert_grants(claims);
    }
    let _ = verdict.map_err(|e| e.to_string());

    let signed = w.ticket_over(&w.key, data);
    match ticket::verify(&signed, &w.key.public(), w.client, &w.agent, w.now) {
        Ok(claims) => {
            let parsed: TicketClaims =
                serde_json::from_slice(data).expect("verified claims are claims");
            assert_eq!(claims, parsed);
            w.assert_grants(&claims);
            // What the coordinator signs for these claims verifies to them too.
            let resigned = ticket::sign(&w.key, &claims);
            assert_eq!(
                ticket::verify(&resigned, &w.key.public(), w.client, &w.agent, w.now),
                Ok(claims)
            );
        }
        Err(TicketError::Malformed) => assert!(
            signed.len() > MAX_TICKET_LEN || serde_json::from_slice::<TicketClaims>(data).is_err(),
            "well-formed signed claims refused as malformed: {:?}",
            String::from_utf8_lossy(data)
        ),
        Err(TicketError::BadSignature) => {
            panic!("the coordinator's own signature refused over {data:?}")
        }
        Err(_) => {}
    }

    let forged = w.ticket_over(&SecretKey::from_bytes(&[9; 32]), data);
    assert!(
        ticket::verify(&forged, &w.key.public(), w.client, &w.agent, w.now).is_err(),
        "claims signed by another key verified: {:?}",
        String::from_utf8_lossy(data)
    );
}

/// A control-channel message as the coordinator reads it off an agent's WebSocket
/// (and a coordinator message as the agent does): what parses re-encodes to what
/// parses the same, and `check_agent_message` gives a verdict, never a panic, for
/// any manifest; the same verdict for the re-encoded message. The bytes as an SSH
/// host key: a key that passes is canonical, so it passes again unchanged.
pub fn control_message(data: &[u8]) {
    if let Some((msg, text)) = json_round_trip::<AgentMessage>(data) {
        let again: AgentMessage = serde_json::from_str(&text).expect("re-encoded message parses");
        let value: serde_json::Value = serde_json::from_str(&text).expect("re-encoded is JSON");
        assert_eq!(value["type"], msg.kind(), "kind() names the JSON type");
        for manifest in [control_manifest(), Manifest::default()] {
            let verdict = limits::check_agent_message(&msg, &manifest);
            assert_eq!(verdict, limits::check_agent_message(&again, &manifest));
            let _ = verdict.map_err(|e| e.to_string());
        }
        if let AgentMessage::HostKey { openssh } = &msg {
            host_key_is_canonical(openssh);
        }
    }
    json_round_trip::<CoordinatorMessage>(data);
    json_round_trip::<Manifest>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        host_key_is_canonical(text);
    }
}

/// Request bodies of the coordinator's HTTP API as its JSON extractor reads them:
/// what parses re-encodes to what parses the same, and every name in it is valid.
pub fn api_bodies(data: &[u8]) {
    if let Some((ws, text)) = json_round_trip::<CreateWorkspace>(data) {
        let again: CreateWorkspace = serde_json::from_str(&text).expect("re-encoded parses");
        assert_eq!(ws, again);
        name_is_valid(&ws.name);
        for agent in &ws.agents {
            name_is_valid(&agent.name);
            agent.apps.iter().for_each(|a| name_is_valid(&a.slug));
            agent.metadata.iter().for_each(|m| name_is_valid(&m.key));
        }
    }
    if let Some((u, _)) = json_round_trip::<CreateUser>(data) {
        name_is_valid(&u.username);
    }
    if let Some((c, _)) = json_round_trip::<Credentials>(data) {
        name_is_valid(&c.username);
    }
    if let Some((t, _)) = json_round_trip::<CreateToken>(data) {
        name_is_valid(&t.name);
    }
    if let Some((c, _)) = json_round_trip::<ConnectRequest>(data) {
        c.agent.iter().for_each(name_is_valid);
    }
    json_round_trip::<ChangePassword>(data);
    json_round_trip::<ErrorBody>(data);
}

/// The values of `myco port-forward --tcp/--udp`: every forward parsed has non-zero
/// ports and the protocol of its flag, and written back as `ADDR:LOCAL:REMOTE` parses
/// to itself; `parse_all` (one value per line, lines alternately `--tcp` and
/// `--udp`) agrees with `parse` on each value and never returns one local address
/// twice for a protocol.
pub fn forward_spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = forward_spec::parse(ForwardProtocol::Tcp, text);
    match &parsed {
        Ok(forwards) => {
            assert!(!forwards.is_empty(), "{text:?} asks for nothing");
            assert!(forwards.len() <= forward_spec::MAX_FORWARDS);
            // Each round trip parses a spec; a few at each end cover the ranges' edges.
            let edges = forwards
                .iter()
                .take(32)
                .chain(forwards.iter().rev().take(32));
            for f in edges {
                forward_is_sane(f, ForwardProtocol::Tcp);
                let written = format!("{}:{}", f.local, f.remote_port);
                assert_eq!(
                    forward_spec::parse(ForwardProtocol::Tcp, &written),
                    Ok(vec![*f]),
                    "{text:?} gave {f:?}, which reads back otherwise from {written:?}"
                );
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    let values = text.lines().map(str::to_owned);
    let (tcp, udp): (Vec<_>, Vec<_>) = values.enumerate().partition(|(i, _)| i % 2 == 0);
    let tcp: Vec<String> = tcp.into_iter().map(|(_, v)| v).collect();
    let udp: Vec<String> = udp.into_iter().map(|(_, v)| v).collect();
    match forward_spec::parse_all(&tcp, &udp) {
        Ok(all) => {
            assert!(all.len() <= forward_spec::MAX_FORWARDS);
            let mut seen = std::collections::HashSet::new();
            for f in &all {
                assert!(
                    seen.insert((f.protocol, f.local)),
                    "{f:?} twice in {text:?}"
                );
            }
            let each = |protocol, values: &[String]| {
                values
                    .iter()
                    .map(|v| forward_spec::parse(protocol, v).map(|f| f.len()))
                    .sum::<Result<usize, _>>()
            };
            let count = each(ForwardProtocol::Tcp, &tcp)
                .and_then(|t| each(ForwardProtocol::Udp, &udp).map(|u| t + u));
            assert_eq!(
                count,
                Ok(all.len()),
                "parse_all and parse disagree on {text:?}"
            );
        }
        Err(bad) => {
            let values = if bad.protocol == ForwardProtocol::Tcp {
                &tcp
            } else {
                &udp
            };
            assert!(values.contains(&bad.spec), "{bad} names a value not given");
            let _ = bad.to_string();
        }
    }
}

/// Workspace references and names as the CLI and the API's paths read them: a
/// reference that parses is written back exactly as given (so two texts never name
/// one workspace), and its parts are valid names; a valid name is a reference to the
/// caller's own workspace, and survives JSON.
pub fn workspace_ref(data: &[u8]) {
    if let Ok(n) = serde_json::from_slice::<Name>(data) {
        name_is_valid(&n);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<WorkspaceRef>() {
        Ok(r) => {
            assert_eq!(r.to_string(), text, "a reference reads back as written");
            assert_eq!(r.to_string().parse::<WorkspaceRef>(), Ok(r.clone()));
            r.owner.iter().for_each(name_is_valid);
            name_is_valid(&r.workspace);
            r.agent.iter().for_each(name_is_valid);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    match Name::new(text) {
        Ok(n) => {
            assert_eq!(n.as_str(), text);
            name_is_valid(&n);
            let r: WorkspaceRef = text.parse().expect("a name is a workspace reference");
            assert_eq!((r.owner, r.workspace, r.agent), (None, n, None));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Polls `fut` once: the readers and writers here are in memory and never wait.
fn now_or_never<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("in-memory I/O waited"),
    }
}

/// Reads one frame of `T` from the start of `data`; when it decodes, writes it
/// again and reads that back.
fn frame_round_trip<T: Serialize + DeserializeOwned>(data: &[u8]) {
    let mut rest = data;
    let first: T = match now_or_never(frame::read(&mut rest)) {
        Ok(msg) => msg,
        Err(FrameError::TooLarge(len)) => {
            assert!(len > MAX_FRAME);
            return;
        }
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let used = data.len() - rest.len();
    assert!(
        used >= 4 && used - 4 <= MAX_FRAME as usize,
        "a frame of {used} bytes"
    );
    let json = serde_json::to_vec(&first).expect("what decoded encodes");
    let mut written = Vec::new();
    match now_or_never(frame::write(&mut written, &first)) {
        Ok(()) => {}
        // Decoding may lengthen a message (`1e3` -> `1000`, RFC 3339 gains its
        // milliseconds); a writer never sends what it could not, so that is fine.
        Err(FrameError::TooLarge(_)) if json.len() > MAX_FRAME as usize => return,
        Err(e) => panic!("re-encoding a decoded frame: {e}"),
    }
    let second: T = now_or_never(frame::read(&mut written.as_slice())).unwrap_or_else(|e| {
        panic!(
            "{:?} does not decode again: {e}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(
        serde_json::to_vec(&second).expect("what decoded encodes"),
        json,
        "a frame changed on its second round trip"
    );
}

/// Parses `T` from `data`; when it parses, checks that its encoding parses and
/// encodes the same again, and returns it with that encoding.
fn json_round_trip<T: Serialize + DeserializeOwned>(data: &[u8]) -> Option<(T, String)> {
    let first: T = match serde_json::from_slice(data) {
        Ok(v) => v,
        Err(e) => {
            let _ = e.to_string();
            return None;
        }
    };
    let text = serde_json::to_string(&first).expect("what decoded encodes");
    let second: T = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{text:?} does not decode again: {e}"));
    let again = serde_json::to_string(&second).expect("what decoded encodes");
    assert_eq!(again, text, "a message changed on its second round trip");
    Some((first, text))
}

fn name_is_valid(n: &Name) {
    let s = n.as_str();
    assert!(
        !s.is_empty() && s.len() <= MAX_NAME_LEN && !s.starts_with('-'),
        "invalid name {s:?}"
    );
    assert!(
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "invalid name {s:?}"
    );
    let json = serde_json::to_string(n).expect("a name encodes");
    assert_eq!(serde_json::from_str::<Name>(&json).ok().as_ref(), Some(n));
}

fn forward_is_sane(f: &PortForward, protocol: ForwardProtocol) {
    assert_eq!(f.protocol, protocol);
    assert_ne!(f.local.port(), 0, "{f:?}");
    assert_ne!(f.remote_port, 0, "{f:?}");
}

fn host_key_is_canonical(text: &str) {
    match limits::canonical_host_key(text) {
        Ok(key) => assert_eq!(
            limits::canonical_host_key(&key).as_ref(),
            Ok(&key),
            "the canonical form of {text:?} is not canonical"
        ),
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// An agent's manifest with one app and one metadata item, so reports about them
/// pass and others do not.
fn control_manifest() -> Manifest {
    let name = |s| Name::new(s).expect("a valid name");
    Manifest {
        apps: vec![App {
            slug: name("web"),
            url: "http://localhost:8080".into(),
            healthcheck: None,
        }],
        metadata: vec![MetadataSpec {
            key: name("cpu"),
            display_name: None,
            script: "true".into(),
            interval: 10,
            timeout: 5,
        }],
        ..Manifest::default()
    }
}

/// The fixed coordinator key, client, agent and clock every ticket is checked with.
struct TicketWorld {
    key: SecretKey,
    client: EndpointId,
    agent: AgentIdentity,
    now: Timestamp,
}

impl TicketWorld {
    fn new() -> Self {
        Self {
            key: SecretKey::from_bytes(&[1; 32]),
            client: SecretKey::from_bytes(&[2; 32]).public(),
            agent: AgentIdentity {
                endpoint: SecretKey::from_bytes(&[3; 32]).public(),
                workspace_id: "ws1".into(),
                agent_id: "ag1".into(),
            },
            now: Timestamp::from_unix_millis(1_000_000),
        }
    }

    /// A ticket over `json` as claims, signed by `key`.
    fn ticket_over(&self, key: &SecretKey, json: &[u8]) -> String {
        let sig = sign::sign_hex(key, TICKET_CONTEXT, json);
        format!("{}.{sig}", hex::encode(json))
    }

    fn assert_grants(&self, claims: &TicketClaims) {
        assert_eq!(claims.client, self.client);
        assert_eq!(claims.agent, self.agent.endpoint);
        assert_eq!(claims.workspace_id, self.agent.workspace_id);
        assert_eq!(claims.agent_id, self.agent.agent_id);
        assert!(claims.expires_at > self.now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed of `fuzz/corpus/ticket_verify`: a ticket the fixed world accepts.
    fn valid_ticket() -> String {
        let w = TicketWorld::new();
        let claims = TicketClaims {
            client: w.client,
            agent: w.agent.endpoint,
            workspace_id: w.agent.workspace_id.clone(),
            agent_id: w.agent.agent_id.clone(),
            user: "alice".into(),
            token_id: "t1".into(),
            target: "alice/dev.main".into(),
            expires_at: Timestamp::from_unix_millis(1_060_000),
        };
        ticket::sign(&w.key, &claims)
    }

    #[test]
    fn a_valid_ticket_passes_the_ticket_case() {
        let t = valid_ticket();
        let w = TicketWorld::new();
        assert!(ticket::verify(&t, &w.key.public(), w.client, &w.agent, w.now).is_ok());
        ticket_verify(t.as_bytes());
        let (claims_hex, _) = t.split_once('.').unwrap();
        ticket_verify(&hex::decode(claims_hex).unwrap());
    }

    /// Found by fuzzing (`control_message` and `frame_decode`): serde_json's default
    /// parse of a long number could land one ulp off, so the shortest text of that
    /// double read back as another one and a re-encoded report changed.
    #[test]
    fn long_numbers_reencode_to_the_same_double() {
        for text in [
            "7151555555555555555555111111111111111111111111111111111100000000000000000001857945507170012.5",
            "888888888188888888888888888888888888888888888888",
        ] {
            let x: f64 = serde_json::from_str(text).unwrap();
            let again: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            assert_eq!(again.to_bits(), x.to_bits(), "{text}");
        }
    }

    #[test]
    fn frames_decode_from_memory() {
        let mut buf = Vec::new();
        now_or_never(frame::write(&mut buf, &ClientHello { ticket: "t".into() })).unwrap();
        let hello: ClientHello = now_or_never(frame::read(&mut buf.as_slice())).unwrap();
        assert_eq!(hello.ticket, "t");
        frame_decode(&buf);
    }
}
