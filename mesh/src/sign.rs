//! Every ed25519 signature Myco makes or checks: connection tickets (by the
//! coordinator's key), an agent's proof that it holds its endpoint key (by that key),
//! and the coordinator's word for its QUIC address discovery certificate.
//!
//! Signatures are made and checked with `ed25519-dalek` directly (iroh's keys wrap
//! the same crate), and checked with `verify_strict`, which refuses small-order keys
//! and non-canonical signatures, so one message has exactly one valid signature
//! encoding under one key. Each kind of message starts with its own context string
//! ending in a NUL byte, so a signature made for one purpose is never valid for
//! another (the contexts are distinct and none is a prefix of another).

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use iroh::{PublicKey, SecretKey};

/// Context of a connection ticket's claims.
pub(crate) const TICKET_CONTEXT: &[u8] = b"myco connection ticket v1\0";
/// Context of an agent's proof of its endpoint key.
const ENDPOINT_PROOF_CONTEXT: &[u8] = b"myco agent endpoint proof v1\0";
/// Context of the coordinator's signature over its QAD certificate.
const QAD_CERT_CONTEXT: &[u8] = b"myco qad certificate v1\0";

/// Bytes of a per-channel challenge.
pub const CHALLENGE_BYTES: usize = 32;

/// A signature did not check out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Not 64 bytes of hex.
    #[error("signature is not 128 hex characters")]
    Malformed,
    /// The public key is not a usable ed25519 point (or a weak one).
    #[error("public key is not a valid ed25519 key")]
    BadKey,
    /// Well formed, but not made by the key's holder over this message.
    #[error("signature does not match")]
    Mismatch,
}

fn signing_key(key: &SecretKey) -> SigningKey {
    SigningKey::from_bytes(&key.to_bytes())
}

/// Signs `context || message` with `key`; the signature as 128 hex characters.
pub(crate) fn sign_hex(key: &SecretKey, context: &[u8], message: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(context.len() + message.len());
    bytes.extend_from_slice(context);
    bytes.extend_from_slice(message);
    hex::encode(signing_key(key).sign(&bytes).to_bytes())
}

/// Checks a hex signature made by [`sign_hex`] with the same context.
///
/// # Errors
/// [`SignatureError`]: malformed hex, a weak or invalid key, or a mismatch.
pub(crate) fn verify_hex(
    key: &PublicKey,
    context: &[u8],
    message: &[u8],
    signature_hex: &str,
) -> Result<(), SignatureError> {
    if signature_hex.len() != 128 {
        return Err(SignatureError::Malformed);
    }
    let sig: [u8; 64] = hex::decode(signature_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SignatureError::Malformed)?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig);
    let key = VerifyingKey::from_bytes(key.as_bytes()).map_err(|_| SignatureError::BadKey)?;
    if key.is_weak() {
        return Err(SignatureError::BadKey);
    }
    let mut bytes = Vec::with_capacity(context.len() + message.len());
    bytes.extend_from_slice(context);
    bytes.extend_from_slice(message);
    key.verify_strict(&bytes, &sig)
        .map_err(|_| SignatureError::Mismatch)
}

/// A fresh random challenge, hex encoded, for one control channel.
///
/// # Panics
/// When the OS has no randomness to give: nothing secure can be done without it.
pub fn new_challenge() -> String {
    let mut b = [0u8; CHALLENGE_BYTES];
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    hex::encode(b)
}

/// What an endpoint proof signs: the channel's challenge and the agent's record id,
/// each length-prefixed so no two (challenge, id) pairs give the same bytes.
fn endpoint_proof_message(challenge: &str, agent_id: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + challenge.len() + agent_id.len());
    for part in [challenge, agent_id] {
        m.extend_from_slice(&(part.len() as u64).to_be_bytes());
        m.extend_from_slice(part.as_bytes());
    }
    m
}

/// The agent's proof that it holds `key`: a signature over the challenge its
/// coordinator sent on this control channel and its own agent record id.
pub fn endpoint_proof(key: &SecretKey, challenge: &str, agent_id: &str) -> String {
    sign_hex(
        key,
        ENDPOINT_PROOF_CONTEXT,
        &endpoint_proof_message(challenge, agent_id),
    )
}

/// Checks an agent's endpoint proof against the challenge the coordinator sent.
///
/// # Errors
/// [`SignatureError`]: the agent does not hold the key of `endpoint`.
pub fn verify_endpoint_proof(
    endpoint: &PublicKey,
    challenge: &str,
    agent_id: &str,
    proof: &str,
) -> Result<(), SignatureError> {
    verify_hex(
        endpoint,
        ENDPOINT_PROOF_CONTEXT,
        &endpoint_proof_message(challenge, agent_id),
        proof,
    )
}

/// The coordinator's signature over the QAD certificate it announces (hex DER), so an
/// agent that pinned the coordinator's key can accept a renewed certificate.
pub fn qad_cert_signature(key: &SecretKey, cert_der_hex: &str) -> String {
    sign_hex(key, QAD_CERT_CONTEXT, cert_der_hex.as_bytes())
}

/// Checks [`qad_cert_signature`].
///
/// # Errors
/// [`SignatureError`]: not signed by `coordinator`.
pub fn verify_qad_cert(
    coordinator: &PublicKey,
    cert_der_hex: &str,
    signature: &str,
) -> Result<(), SignatureError> {
    verify_hex(
        coordinator,
        QAD_CERT_CONTEXT,
        cert_der_hex.as_bytes(),
        signature,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_bytes(&[n; 32])
    }

    #[test]
    fn endpoint_proofs_bind_key_challenge_and_agent() {
        let k = key(1);
        let c = new_challenge();
        let p = endpoint_proof(&k, &c, "agent-a");
        assert_eq!(
            verify_endpoint_proof(&k.public(), &c, "agent-a", &p),
            Ok(())
        );
        // Another key, another channel's challenge, another agent: refused.
        assert_eq!(
            verify_endpoint_proof(&key(2).public(), &c, "agent-a", &p),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_endpoint_proof(&k.public(), &new_challenge(), "agent-a", &p),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_endpoint_proof(&k.public(), &c, "agent-b", &p),
            Err(SignatureError::Mismatch)
        );
        for bad in ["", "zz", &p[..126], &format!("{p}00")] {
            assert_eq!(
                verify_endpoint_proof(&k.public(), &c, "agent-a", bad),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn contexts_do_not_mix() {
        // A QAD certificate signature over the same bytes is not an endpoint proof.
        let k = key(3);
        let msg = endpoint_proof_message("c", "a");
        let as_qad = sign_hex(&k, QAD_CERT_CONTEXT, &msg);
        assert_eq!(
            verify_hex(&k.public(), ENDPOINT_PROOF_CONTEXT, &msg, &as_qad),
            Err(SignatureError::Mismatch)
        );
        let sig = qad_cert_signature(&k, "abcd");
        assert_eq!(verify_qad_cert(&k.public(), "abcd", &sig), Ok(()));
        assert_eq!(
            verify_qad_cert(&k.public(), "abce", &sig),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn length_prefixes_keep_pairs_apart() {
        assert_ne!(
            endpoint_proof_message("ab", "c"),
            endpoint_proof_message("a", "bc")
        );
    }

    #[test]
    fn weak_keys_are_refused() {
        // The identity point (all zeros but the sign-free encoding of y = 1) is of
        // small order: anyone can make "signatures" that verify under it loosely.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = PublicKey::from_bytes(&identity).unwrap();
        let sig = "00".repeat(64);
        assert_eq!(
            verify_endpoint_proof(&weak, "c", "a", &sig),
            Err(SignatureError::BadKey)
        );
    }
}
