//! Connection tickets: the coordinator's signed permission for one client endpoint to
//! connect to one agent (its endpoint, its record and its workspace's), for a few
//! minutes.
//!
//! Text form: `hex(claims JSON) "." hex(ed25519 signature)`, the signature over
//! `"myco connection ticket v1\0" || claims JSON bytes` ([`crate::sign`]).
//!
//! Why the encoding is unambiguous: the signature covers the exact bytes that are
//! then parsed (no re-serialisation, so no canonical form is needed); hex has one
//! decoding; the claims parse into a struct that refuses unknown and duplicate
//! fields, so no two readers can take different claims from one signed text; the
//! context string keeps a ticket signature from meaning anything else; and
//! `verify_strict` admits one signature encoding per message. Checking is a pure
//! function of the ticket, the coordinator's public key, the QUIC peer's id, the
//! agent's own identity and `now`.

use iroh::{EndpointId, PublicKey, SecretKey};
use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::sign::{self, SignatureError, TICKET_CONTEXT};

/// The longest ticket text an agent reads; a real one is well under 2 KiB.
pub const MAX_TICKET_LEN: usize = 4096;

/// How long a ticket is valid after the coordinator issues it. A connection made in
/// time lives on after; an agent remembers a revoked token at least this long, so a
/// ticket issued under it before the revocation cannot open a new connection.
pub const LIFETIME: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// What a ticket grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketClaims {
    /// The client endpoint allowed to connect.
    pub client: EndpointId,
    /// The agent endpoint it may connect to.
    pub agent: EndpointId,
    /// The workspace's record id: the agent checks it is its own.
    pub workspace_id: String,
    /// The agent's record id: the agent checks it is its own.
    pub agent_id: String,
    /// The user the coordinator authenticated.
    pub user: String,
    /// The public id of the token the user asked with, so revoking it closes what
    /// this ticket opened.
    pub token_id: String,
    /// `owner/workspace.agent`, for logs.
    pub target: String,
    pub expires_at: Timestamp,
}

/// Who the agent checking a ticket is: its endpoint, proven by the QUIC handshake,
/// and its record ids, learnt from its coordinator's welcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub endpoint: EndpointId,
    pub workspace_id: String,
    pub agent_id: String,
}

/// Why a ticket was refused. Each message is shown to the client as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Longer than [`MAX_TICKET_LEN`], not in the ticket text form, or its claims do
    /// not parse.
    #[error("connection ticket is malformed")]
    Malformed,
    /// The signature is not the coordinator's.
    #[error("connection ticket is not signed by this agent's coordinator")]
    BadSignature,
    /// Issued for another client endpoint than the one connecting.
    #[error("connection ticket was issued to endpoint {ticket}, not to {peer}")]
    WrongClient { ticket: String, peer: String },
    /// Issued for another agent endpoint.
    #[error("connection ticket is for agent endpoint {0}, not this one")]
    WrongAgent(String),
    /// Issued for another agent or workspace record, whatever endpoint it names.
    #[error("connection ticket is for {0}, another workspace or agent than this one")]
    WrongWorkspace(String),
    /// Past its expiry.
    #[error("connection ticket expired at {0}; ask the coordinator for a new one")]
    Expired(Timestamp),
}

/// Signs `claims` with the coordinator's key.
pub fn sign(key: &SecretKey, claims: &TicketClaims) -> String {
    // Serializing a plain struct of strings and ids cannot fail.
    let json = serde_json::to_vec(claims).unwrap_or_default();
    let sig = sign::sign_hex(key, TICKET_CONTEXT, &json);
    format!("{}.{sig}", hex::encode(&json))
}

/// Checks a ticket presented by `peer` to the agent `me` at `now`.
///
/// # Errors
/// The first [`TicketError`] that applies, signature first: nothing in an unsigned
/// ticket is trusted.
pub fn verify(
    text: &str,
    coordinator: &PublicKey,
    peer: EndpointId,
    me: &AgentIdentity,
    now: Timestamp,
) -> Result<TicketClaims, TicketError> {
    if text.len() > MAX_TICKET_LEN {
        return Err(TicketError::Malformed);
    }
    let (claims_hex, sig_hex) = text.trim().split_once('.').ok_or(TicketError::Malformed)?;
    let json = hex::decode(claims_hex).map_err(|_| TicketError::Malformed)?;
    sign::verify_hex(coordinator, TICKET_CONTEXT, &json, sig_hex).map_err(|e| match e {
        SignatureError::Malformed => TicketError::Malformed,
        SignatureError::BadKey | SignatureError::Mismatch => TicketError::BadSignature,
    })?;
    let claims: TicketClaims = serde_json::from_slice(&json).map_err(|_| TicketError::Malformed)?;
    if claims.client != peer {
        return Err(TicketError::WrongClient {
            ticket: claims.client.fmt_short().to_string(),
            peer: peer.fmt_short().to_string(),
        });
    }
    if claims.agent != me.endpoint {
        return Err(TicketError::WrongAgent(
            claims.agent.fmt_short().to_string(),
        ));
    }
    if claims.workspace_id != me.workspace_id || claims.agent_id != me.agent_id {
        return Err(TicketError::WrongWorkspace(claims.target));
    }
    if claims.expires_at <= now {
        return Err(TicketError::Expired(claims.expires_at));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct World {
        coordinator: SecretKey,
        client: EndpointId,
        agent: AgentIdentity,
        now: Timestamp,
    }

    fn world() -> World {
        World {
            coordinator: SecretKey::from_bytes(&[1; 32]),
            client: SecretKey::from_bytes(&[2; 32]).public(),
            agent: AgentIdentity {
                endpoint: SecretKey::from_bytes(&[3; 32]).public(),
                workspace_id: "ws1".into(),
                agent_id: "ag1".into(),
            },
            now: Timestamp::from_unix_millis(1_000_000),
        }
    }

    fn claims(w: &World) -> TicketClaims {
        TicketClaims {
            client: w.client,
            agent: w.agent.endpoint,
            workspace_id: w.agent.workspace_id.clone(),
            agent_id: w.agent.agent_id.clone(),
            user: "alice".into(),
            token_id: "t1".into(),
            target: "alice/dev.main".into(),
            expires_at: Timestamp::from_unix_millis(1_060_000),
        }
    }

    /// A ticket over arbitrary claim bytes, correctly signed.
    fn sign_json(key: &SecretKey, json: &[u8]) -> String {
        let sig = sign::sign_hex(key, TICKET_CONTEXT, json);
        format!("{}.{sig}", hex::encode(json))
    }

    #[test]
    fn a_signature_without_the_context_is_refused() {
        let w = world();
        let json = serde_json::to_vec(&claims(&w)).unwrap();
        let raw = w.coordinator.sign(&json);
        let t = format!("{}.{}", hex::encode(&json), hex::encode(raw.to_bytes()));
        assert_eq!(
            verify(&t, &w.coordinator.public(), w.client, &w.agent, w.now),
            Err(TicketError::BadSignature)
        );
    }

    #[test]
    fn valid_ticket_verifies() {
        let w = world();
        let t = sign(&w.coordinator, &claims(&w));
        let got = verify(&t, &w.coordinator.public(), w.client, &w.agent, w.now).unwrap();
        assert_eq!(got, claims(&w));
    }

    #[test]
    fn every_refusal() {
        let w = world();
        let key = w.coordinator.public();
        let t = sign(&w.coordinator, &claims(&w));

        let forged = sign(&SecretKey::from_bytes(&[9; 32]), &claims(&w));
        assert_eq!(
            verify(&forged, &key, w.client, &w.agent, w.now),
            Err(TicketError::BadSignature)
        );

        // Changing the claims after signing breaks the signature.
        let (c, s) = t.split_once('.').unwrap();
        let mut json = hex::decode(c).unwrap();
        let pos = json.iter().position(|b| *b == b'a').unwrap();
        json[pos] = b'b';
        let tampered = format!("{}.{s}", hex::encode(json));
        assert_eq!(
            verify(&tampered, &key, w.client, &w.agent, w.now),
            Err(TicketError::BadSignature)
        );

        let other = SecretKey::from_bytes(&[4; 32]).public();
        assert!(matches!(
            verify(&t, &key, other, &w.agent, w.now),
            Err(TicketError::WrongClient { .. })
        ));
        let moved = AgentIdentity {
            endpoint: other,
            ..w.agent.clone()
        };
        assert!(matches!(
            verify(&t, &key, w.client, &moved, w.now),
            Err(TicketError::WrongAgent(_))
        ));
        // The rogue-agent case: the right endpoint, another workspace's record ids.
        for other_ids in [
            AgentIdentity {
                workspace_id: "ws2".into(),
                ..w.agent.clone()
            },
            AgentIdentity {
                agent_id: "ag2".into(),
                ..w.agent.clone()
            },
        ] {
            assert!(matches!(
                verify(&t, &key, w.client, &other_ids, w.now),
                Err(TicketError::WrongWorkspace(_))
            ));
        }

        // The boundary: valid until just before expiry, refused at it.
        let before = Timestamp::from_unix_millis(1_059_999);
        let at = Timestamp::from_unix_millis(1_060_000);
        assert!(verify(&t, &key, w.client, &w.agent, before).is_ok());
        assert!(matches!(
            verify(&t, &key, w.client, &w.agent, at),
            Err(TicketError::Expired(_))
        ));

        let huge = format!("{}{t}", " ".repeat(MAX_TICKET_LEN));
        let unknown_field = {
            let mut v = serde_json::to_value(claims(&w)).unwrap();
            v["admin"] = true.into();
            sign_json(&w.coordinator, &serde_json::to_vec(&v).unwrap())
        };
        let duplicate_field = {
            let json = serde_json::to_string(&claims(&w)).unwrap();
            let dup = json.replacen('{', "{\"user\":\"mallory\",", 1);
            sign_json(&w.coordinator, dup.as_bytes())
        };
        for bad in [
            "",
            "nodot",
            "zz.zz",
            "00.00",
            &huge,
            &unknown_field,
            &duplicate_field,
        ] {
            assert_eq!(
                verify(bad, &key, w.client, &w.agent, w.now),
                Err(TicketError::Malformed),
                "{bad}"
            );
        }
    }
}
