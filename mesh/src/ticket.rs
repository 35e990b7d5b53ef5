//! Connection tickets: the coordinator's signed permission for one client endpoint to
//! connect to one agent endpoint, for a few minutes.
//!
//! Text form: `hex(claims JSON) "." hex(ed25519 signature over those JSON bytes)`.
//! Checking is a pure function of the ticket, the coordinator's public key, the QUIC
//! peer's id, the agent's own id and `now`.

use iroh::{EndpointId, PublicKey, SecretKey, Signature};
use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// What a ticket grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClaims {
    /// The client endpoint allowed to connect.
    pub client: EndpointId,
    /// The agent endpoint it may connect to.
    pub agent: EndpointId,
    /// The user the coordinator authenticated.
    pub user: String,
    /// `owner/workspace.agent`, for logs.
    pub target: String,
    pub expires_at: Timestamp,
}

/// Why a ticket was refused. Each message is shown to the client as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Not in the ticket text form, or its claims do not parse.
    #[error("connection ticket is malformed")]
    Malformed,
    /// The signature is not the coordinator's.
    #[error("connection ticket is not signed by this agent's coordinator")]
    BadSignature,
    /// Issued for another client endpoint than the one connecting.
    #[error("connection ticket was issued to endpoint {ticket}, not to {peer}")]
    WrongClient { ticket: String, peer: String },
    /// Issued for another agent.
    #[error("connection ticket is for agent endpoint {0}, not this one")]
    WrongAgent(String),
    /// Past its expiry.
    #[error("connection ticket expired at {0}; ask the coordinator for a new one")]
    Expired(Timestamp),
}

/// Signs `claims` with the coordinator's key.
pub fn sign(key: &SecretKey, claims: &TicketClaims) -> String {
    // Serializing a plain struct of strings and ids cannot fail.
    let json = serde_json::to_vec(claims).unwrap_or_default();
    let sig = key.sign(&json);
    format!("{}.{}", hex::encode(&json), hex::encode(sig.to_bytes()))
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
    me: EndpointId,
    now: Timestamp,
) -> Result<TicketClaims, TicketError> {
    let (claims_hex, sig_hex) = text.trim().split_once('.').ok_or(TicketError::Malformed)?;
    let json = hex::decode(claims_hex).map_err(|_| TicketError::Malformed)?;
    let sig_bytes: [u8; 64] = hex::decode(sig_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(TicketError::Malformed)?;
    coordinator
        .verify(&json, &Signature::from_bytes(&sig_bytes))
        .map_err(|_| TicketError::BadSignature)?;
    let claims: TicketClaims = serde_json::from_slice(&json).map_err(|_| TicketError::Malformed)?;
    if claims.client != peer {
        return Err(TicketError::WrongClient {
            ticket: claims.client.fmt_short().to_string(),
            peer: peer.fmt_short().to_string(),
        });
    }
    if claims.agent != me {
        return Err(TicketError::WrongAgent(
            claims.agent.fmt_short().to_string(),
        ));
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
        agent: EndpointId,
        now: Timestamp,
    }

    fn world() -> World {
        World {
            coordinator: SecretKey::from_bytes(&[1; 32]),
            client: SecretKey::from_bytes(&[2; 32]).public(),
            agent: SecretKey::from_bytes(&[3; 32]).public(),
            now: Timestamp::from_unix_millis(1_000_000),
        }
    }

    fn claims(w: &World) -> TicketClaims {
        TicketClaims {
            client: w.client,
            agent: w.agent,
            user: "alice".into(),
            target: "alice/dev.main".into(),
            expires_at: Timestamp::from_unix_millis(1_060_000),
        }
    }

    #[test]
    fn valid_ticket_verifies() {
        let w = world();
        let t = sign(&w.coordinator, &claims(&w));
        let got = verify(&t, &w.coordinator.public(), w.client, w.agent, w.now).unwrap();
        assert_eq!(got, claims(&w));
    }

    #[test]
    fn every_refusal() {
        let w = world();
        let key = w.coordinator.public();
        let t = sign(&w.coordinator, &claims(&w));

        let forged = sign(&SecretKey::from_bytes(&[9; 32]), &claims(&w));
        assert_eq!(
            verify(&forged, &key, w.client, w.agent, w.now),
            Err(TicketError::BadSignature)
        );

        // Changing the claims after signing breaks the signature.
        let (c, s) = t.split_once('.').unwrap();
        let mut json = hex::decode(c).unwrap();
        let pos = json.iter().position(|b| *b == b'a').unwrap();
        json[pos] = b'b';
        let tampered = format!("{}.{s}", hex::encode(json));
        assert_eq!(
            verify(&tampered, &key, w.client, w.agent, w.now),
            Err(TicketError::BadSignature)
        );

        let other = SecretKey::from_bytes(&[4; 32]).public();
        assert!(matches!(
            verify(&t, &key, other, w.agent, w.now),
            Err(TicketError::WrongClient { .. })
        ));
        assert!(matches!(
            verify(&t, &key, w.client, other, w.now),
            Err(TicketError::WrongAgent(_))
        ));

        // The boundary: valid until just before expiry, refused at it.
        let before = Timestamp::from_unix_millis(1_059_999);
        let at = Timestamp::from_unix_millis(1_060_000);
        assert!(verify(&t, &key, w.client, w.agent, before).is_ok());
        assert!(matches!(
            verify(&t, &key, w.client, w.agent, at),
            Err(TicketError::Expired(_))
        ));

        for bad in ["", "nodot", "zz.zz", "00.00"] {
            assert_eq!(
                verify(bad, &key, w.client, w.agent, w.now),
                Err(TicketError::Malformed),
                "{bad}"
            );
        }
    }
}
