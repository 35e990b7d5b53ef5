//! What the coordinator does with each frame of an agent's control channel, as a pure
//! state machine with time passed in (quinn's `handle_*(.., now)` in, `poll_timeout`
//! out): the channel's limits, the idle timeout, the endpoint proof and which message
//! goes where. The I/O loop in `control/mod.rs` carries out the [`Step`]s.

use std::time::Duration;

use iroh::{EndpointAddr, EndpointId};
use mesh::control::{AgentMessage, CoordinatorMessage, Manifest};
use tokio::time::Instant;

use crate::bucket::TokenBucket;
use crate::registry::Push;

/// Refused reports one channel may send before it is closed.
const MAX_REFUSALS: u32 = 100;
/// Messages a channel may send in a burst, and per second after.
const MESSAGE_BURST: f64 = 200.0;
const MESSAGES_PER_SECOND: f64 = 50.0;
/// Store writes a channel may cause: endpoint keys proven and host keys. An honest
/// agent sends its host key once per channel and keeps one endpoint key.
const MAX_ENDPOINT_CLAIMS: u32 = 4;
const MAX_HOST_KEYS: u32 = 2;

/// A channel silent this long is closed: two missed heartbeats and some slack.
pub(crate) fn idle_timeout(heartbeat: Duration) -> Duration {
    heartbeat.saturating_mul(2) + Duration::from_secs(5)
}

/// What the WebSocket gave the loop.
#[derive(Debug)]
pub(crate) enum Received<'a> {
    /// A text frame: one JSON [`AgentMessage`].
    Text(&'a str),
    /// The agent's close frame.
    Close,
    /// Ping, pong or binary: keeps the channel alive, carries nothing.
    Other,
    /// The stream ended without a close frame.
    Ended,
    /// Reading the socket failed.
    Failed,
}

/// What the loop does next.
#[derive(Debug)]
pub(crate) enum Step {
    /// Nothing: a frame without a message, or a report refused under the limit.
    Nothing,
    /// Send this message to the agent.
    Send(CoordinatorMessage),
    /// End the channel.
    End(End),
    /// The agent proved it holds this endpoint's key: record the endpoint as the
    /// agent's in the store, tell [`ControlChannel::endpoint_claimed`], then publish.
    ClaimEndpoint(EndpointAddr),
    /// Publish the address of the endpoint this channel already proved.
    PublishAddr(EndpointAddr),
    /// Record a heartbeat.
    Heartbeat,
    /// Store the agent's SSH host key, in canonical form.
    HostKey(String),
    /// Hand a report (lifecycle, app health, stats, metadata, logs, netcheck) to the
    /// ledger.
    Report(AgentMessage),
}

/// How a channel ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct End {
    /// The close frame's reason, which the agent logs; `None` sends no close frame.
    pub(crate) close_frame: Option<String>,
    /// Why, for the coordinator's log.
    pub(crate) reason: &'static str,
}

impl End {
    fn quiet(reason: &'static str) -> Self {
        Self {
            close_frame: None,
            reason,
        }
    }

    fn closing(close_frame: impl Into<String>, reason: &'static str) -> Self {
        Self {
            close_frame: Some(close_frame.into()),
            reason,
        }
    }

    /// The agent's endpoint was refused (by the store or the registry) for `refusal`.
    pub(crate) fn endpoint_refused(refusal: impl Into<String>) -> Self {
        Self::closing(refusal, "endpoint refused")
    }
}

/// A limit a channel's message broke; the message is the close frame's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum OverLimit {
    /// The agent sends faster than the channel's message rate.
    #[error("more than {MESSAGES_PER_SECOND} messages a second (burst {MESSAGE_BURST})")]
    Messages,
    /// The agent sent more SSH host keys than one channel needs.
    #[error("more than {MAX_HOST_KEYS} SSH host keys on one channel")]
    HostKeys,
}

/// One control channel, from the welcome on. Pure: the caller passes `now`.
#[derive(Debug)]
pub(crate) struct ControlChannel {
    agent_id: String,
    manifest: Manifest,
    /// The challenge sent in the welcome, which an endpoint proof signs.
    challenge: String,
    idle: Duration,
    last_heard: Instant,
    messages: TokenBucket,
    endpoint_claims: u32,
    host_keys: u32,
    refused: u32,
    /// The endpoint this channel proved and the store accepted for this agent.
    proven: Option<EndpointId>,
}

impl ControlChannel {
    /// A channel whose welcome carried `challenge`, sent at `now`.
    pub(crate) fn new(
        agent_id: String,
        manifest: Manifest,
        challenge: String,
        idle: Duration,
        now: Instant,
    ) -> Self {
        Self {
            agent_id,
            manifest,
            challenge,
            idle,
            last_heard: now,
            messages: TokenBucket::new(MESSAGES_PER_SECOND, MESSAGE_BURST, now),
            endpoint_claims: 0,
            host_keys: 0,
            refused: 0,
            proven: None,
        }
    }

    /// When the channel times out unless a frame arrives first.
    pub(crate) fn poll_timeout(&self) -> Instant {
        self.last_heard + self.idle
    }

    /// The channel's end if it has been silent too long at `now`.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Option<End> {
        (now >= self.poll_timeout()).then(|| End::quiet("no heartbeat in time"))
    }

    /// A push from the API; `None` when a newer channel of this agent replaced this one.
    pub(crate) fn handle_push(&mut self, push: Option<Push>) -> Step {
        match push {
            Some(Push::Close(reason)) => {
                tracing::info!(%reason, "closing the agent's channel");
                Step::End(End::closing(reason, "closed by the coordinator"))
            }
            Some(Push::Revoke { token_ids }) => {
                Step::Send(CoordinatorMessage::Revoke { token_ids })
            }
            None => Step::End(End::closing(
                "replaced by a newer channel of this agent",
                "replaced by a newer channel",
            )),
        }
    }

    /// A frame from the agent, received at `now`.
    pub(crate) fn handle_received(&mut self, received: Received<'_>, now: Instant) -> Step {
        let text = match received {
            Received::Ended => return Step::End(End::quiet("channel closed")),
            Received::Failed => return Step::End(End::quiet("channel failed")),
            Received::Close => return Step::End(End::quiet("agent closed the channel")),
            Received::Other => {
                self.last_heard = now;
                return Step::Nothing;
            }
            Received::Text(text) => text,
        };
        self.last_heard = now;
        match serde_json::from_str::<AgentMessage>(text) {
            Ok(msg) => self.handle_message(msg, now),
            Err(e) => {
                tracing::warn!("bad control message: {e}");
                Step::End(End::quiet("protocol error"))
            }
        }
    }

    /// One message from the agent, at `now`: checked against the channel's limits and
    /// the agent's manifest, then routed.
    pub(crate) fn handle_message(&mut self, msg: AgentMessage, now: Instant) -> Step {
        if let Err(over) = self.admit(&msg, now) {
            tracing::warn!("closing the agent's channel: {over}");
            return Step::End(End::closing(over.to_string(), "over its limits"));
        }
        if let Err(refusal) = mesh::limits::check_agent_message(&msg, &self.manifest) {
            tracing::warn!(kind = msg.kind(), "agent report refused: {refusal}");
            self.refused += 1;
            if self.refused > MAX_REFUSALS {
                return Step::End(End::closing(
                    "too many refused reports",
                    "too many refused reports",
                ));
            }
            return Step::Nothing;
        }
        match msg {
            AgentMessage::Addr { addr, proof } => self.addr(addr, &proof),
            AgentMessage::Heartbeat => Step::Heartbeat,
            // Checked above; what is stored is the canonical form.
            AgentMessage::HostKey { openssh } => match mesh::limits::canonical_host_key(&openssh) {
                Ok(openssh) => Step::HostKey(openssh),
                Err(_) => Step::Nothing,
            },
            report => Step::Report(report),
        }
    }

    /// The store recorded `id` as this agent's endpoint.
    pub(crate) fn endpoint_claimed(&mut self, id: EndpointId) {
        self.proven = Some(id);
    }

    /// Takes one message; an error says which limit it broke.
    fn admit(&mut self, msg: &AgentMessage, now: Instant) -> Result<(), OverLimit> {
        if !self.messages.try_take(1.0, now) {
            return Err(OverLimit::Messages);
        }
        if let AgentMessage::HostKey { .. } = msg {
            self.host_keys += 1;
            if self.host_keys > MAX_HOST_KEYS {
                return Err(OverLimit::HostKeys);
            }
        }
        Ok(())
    }

    /// An address: published at once for the proven endpoint; a new endpoint must
    /// prove its key (a signature over this channel's challenge), and only a few may.
    fn addr(&mut self, addr: EndpointAddr, proof: &str) -> Step {
        if self.proven == Some(addr.id) {
            return Step::PublishAddr(addr);
        }
        self.endpoint_claims += 1;
        if self.endpoint_claims > MAX_ENDPOINT_CLAIMS {
            return Step::End(End::closing(
                "too many endpoint keys on one channel",
                "over its limits",
            ));
        }
        if let Err(e) =
            mesh::sign::verify_endpoint_proof(&addr.id, &self.challenge, &self.agent_id, proof)
        {
            let refusal = format!("no proof this agent holds its endpoint's key ({e})");
            tracing::warn!(endpoint = %addr.id, "agent address refused: {refusal}");
            return Step::End(End::endpoint_refused(refusal));
        }
        Step::ClaimEndpoint(addr)
    }
}

#[cfg(test)]
mod tests {
    use iroh::SecretKey;

    use super::*;

    const AGENT: &str = "agent-a";
    const CHALLENGE: &str = "challenge-1";
    const HEARTBEAT: Duration = Duration::from_secs(15);

    fn channel(now: Instant) -> ControlChannel {
        ControlChannel::new(
            AGENT.into(),
            Manifest::default(),
            CHALLENGE.into(),
            idle_timeout(HEARTBEAT),
            now,
        )
    }

    fn key(n: u8) -> SecretKey {
        SecretKey::from_bytes(&[n; 32])
    }

    fn addr_msg(key: &SecretKey) -> AgentMessage {
        AgentMessage::Addr {
            addr: EndpointAddr::new(key.public()),
            proof: mesh::sign::endpoint_proof(key, CHALLENGE, AGENT),
        }
    }

    fn heartbeat() -> String {
        serde_json::to_string(&AgentMessage::Heartbeat).unwrap()
    }

    fn end(step: Step) -> End {
        match step {
            Step::End(end) => end,
            other => panic!("expected the channel to end, got {other:?}"),
        }
    }

    #[test]
    fn a_silent_channel_times_out_two_heartbeats_and_five_seconds_after_its_last_frame() {
        let t0 = Instant::now();
        let mut c = channel(t0);
        assert_eq!(c.poll_timeout(), t0 + Duration::from_secs(35));
        assert_eq!(c.handle_timeout(t0 + Duration::from_secs(34)), None);

        let t1 = t0 + Duration::from_secs(20);
        assert!(matches!(
            c.handle_received(Received::Text(&heartbeat()), t1),
            Step::Heartbeat
        ));
        assert_eq!(c.poll_timeout(), t1 + Duration::from_secs(35));
        assert_eq!(c.handle_timeout(t0 + Duration::from_secs(35)), None);

        let t2 = t1 + Duration::from_secs(10);
        assert!(matches!(
            c.handle_received(Received::Other, t2),
            Step::Nothing
        ));
        assert_eq!(c.poll_timeout(), t2 + Duration::from_secs(35));

        let over = c.handle_timeout(t2 + Duration::from_secs(35)).unwrap();
        assert_eq!(over, End::quiet("no heartbeat in time"));
    }

    #[test]
    fn a_flood_is_refused_past_the_burst_and_a_paced_channel_is_not() {
        let t0 = Instant::now();
        let mut c = channel(t0);
        for _ in 0..200 {
            assert!(matches!(
                c.handle_message(AgentMessage::Heartbeat, t0),
                Step::Heartbeat
            ));
        }
        let over = end(c.handle_message(AgentMessage::Heartbeat, t0));
        assert_eq!(over.reason, "over its limits");
        assert!(over.close_frame.unwrap().contains("messages a second"));

        // Fifty a second refill; a channel at that pace is never refused.
        let mut c = channel(t0);
        for i in 1..=1000u32 {
            let at = t0 + Duration::from_millis(20) * i;
            assert!(matches!(
                c.handle_message(AgentMessage::Heartbeat, at),
                Step::Heartbeat
            ));
        }
    }

    #[test]
    fn a_third_host_key_on_one_channel_closes_it() {
        let t0 = Instant::now();
        let mut c = channel(t0);
        let host_key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        for _ in 0..2 {
            let msg = AgentMessage::HostKey {
                openssh: format!("{host_key} comment"),
            };
            match c.handle_message(msg, t0) {
                Step::HostKey(stored) => assert_eq!(stored, host_key),
                other => panic!("expected the host key stored, got {other:?}"),
            }
        }
        let msg = AgentMessage::HostKey {
            openssh: host_key.into(),
        };
        let over = end(c.handle_message(msg, t0));
        assert_eq!(over.reason, "over its limits");
        assert!(over.close_frame.unwrap().contains("host keys"));
    }

    #[test]
    fn an_address_is_published_only_after_its_endpoint_is_proven_and_claimed() {
        let t0 = Instant::now();
        let mut c = channel(t0);
        let k = key(1);
        let Step::ClaimEndpoint(addr) = c.handle_message(addr_msg(&k), t0) else {
            panic!("a new endpoint is claimed first");
        };
        assert_eq!(addr.id, k.public());
        c.endpoint_claimed(addr.id);
        assert!(matches!(
            c.handle_message(addr_msg(&k), t0),
            Step::PublishAddr(a) if a.id == k.public()
        ));
    }

    #[test]
    fn an_address_without_proof_ends_the_channel() {
        let t0 = Instant::now();
        let mut c = channel(t0);
        let (k, other) = (key(1), key(2));
        // Signed by another key, and signed over another challenge.
        let stolen = AgentMessage::Addr {
            addr: EndpointAddr::new(k.public()),
            proof: mesh::sign::endpoint_proof(&other, CHALLENGE, AGENT),
        };
        let refused = end(c.handle_message(stolen, t0));
        assert_eq!(refused.reason, "endpoint refused");
        assert!(refused.close_frame.unwrap().contains("no proof"));

        let mut c = channel(t0);
        let replayed = AgentMessage::Addr {
            addr: EndpointAddr::new(k.public()),
            proof: mesh::sign::endpoint_proof(&k, "an older challenge", AGENT),
        };
        assert_eq!(
            end(c.handle_message(replayed, t0)).reason,
            "endpoint refused"
        );
    }

    #[test]
    fn a_fifth_endpoint_key_on_one_channel_closes_it() {
        let t0 = Instant::now();
        let mut c = channel(t0);
        for n in 1..=4 {
            let Step::ClaimEndpoint(addr) = c.handle_message(addr_msg(&key(n)), t0) else {
                panic!("endpoint {n} is claimed");
            };
            c.endpoint_claimed(addr.id);
        }
        let over = end(c.handle_message(addr_msg(&key(5)), t0));
        assert_eq!(
            over,
            End::closing("too many endpoint keys on one channel", "over its limits")
        );
    }

    #[test]
    fn refused_reports_are_skipped_until_too_many() {
        let t0 = Instant::now();
        let mut c = channel(t0);
        // The manifest declares no apps, so health for one is refused.
        let bad = || AgentMessage::AppHealth {
            changes: vec![mesh::control::AppHealthChange {
                slug: mesh::Name::new("web").unwrap(),
                health: mesh::api::AppHealth::Healthy,
            }],
        };
        for _ in 0..100 {
            assert!(matches!(c.handle_message(bad(), t0), Step::Nothing));
        }
        let over = end(c.handle_message(bad(), t0));
        assert_eq!(
            over,
            End::closing("too many refused reports", "too many refused reports")
        );
    }

    #[test]
    fn reports_go_to_the_ledger() {
        let t0 = Instant::now();
        let mut c = channel(t0);
        let msg = AgentMessage::Logs { lines: Vec::new() };
        assert!(matches!(
            c.handle_message(msg, t0),
            Step::Report(AgentMessage::Logs { .. })
        ));
    }

    #[test]
    fn frames_that_end_the_channel() {
        let t0 = Instant::now();
        let mut c = channel(t0);
        assert_eq!(
            end(c.handle_received(Received::Text("{\"type\":\"nonsense\"}"), t0)),
            End::quiet("protocol error")
        );
        assert_eq!(
            end(c.handle_received(Received::Close, t0)),
            End::quiet("agent closed the channel")
        );
        assert_eq!(
            end(c.handle_received(Received::Ended, t0)),
            End::quiet("channel closed")
        );
        assert_eq!(
            end(c.handle_received(Received::Failed, t0)),
            End::quiet("channel failed")
        );
    }

    #[test]
    fn pushes_close_revoke_or_replace() {
        let t0 = Instant::now();
        let mut c = channel(t0);
        assert_eq!(
            end(c.handle_push(Some(Push::Close("workspace deleted".into())))),
            End::closing("workspace deleted", "closed by the coordinator")
        );
        assert!(matches!(
            c.handle_push(Some(Push::Revoke { token_ids: vec!["t1".into()] })),
            Step::Send(CoordinatorMessage::Revoke { token_ids }) if token_ids == ["t1"]
        ));
        assert_eq!(
            end(c.handle_push(None)),
            End::closing(
                "replaced by a newer channel of this agent",
                "replaced by a newer channel"
            )
        );
    }
}
