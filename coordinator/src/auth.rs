//! Passwords and bearer tokens: argon2id hashes for passwords; for tokens, a random
//! public id (the store key) and a random 128-bit secret kept only as its SHA-256.
//!
//! A token reads `myco_<id>_<secret>`. Token secrets are uniformly random, so a fast
//! hash is enough: there is nothing to brute-force from the hash.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::{Store, StoreError, TokenKind, TokenRecord};
use mesh::Timestamp;

const TOKEN_PREFIX: &str = "myco_";
/// Bytes of the public id (64 bits: a key, not a secret).
const ID_BYTES: usize = 8;
/// Bytes of the secret (128 bits).
const SECRET_BYTES: usize = 16;

/// The shortest password we accept.
pub const MIN_PASSWORD_LEN: usize = 8;

/// Random bytes from the OS, hex encoded.
///
/// # Panics
/// When the OS has no randomness to give: nothing secure can be done without it.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    hex::encode(buf)
}

/// A one-time setup code for the first user: 80 random bits as 20 hex digits in
/// groups of four, easy to copy from a log.
pub fn setup_code() -> String {
    let hex = random_hex(10);
    hex.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("-")
}

/// Whether `given` is the setup code, compared in constant time.
pub fn setup_code_matches(expected: &str, given: &str) -> bool {
    use subtle::ConstantTimeEq;
    let norm = |s: &str| s.trim().to_ascii_lowercase().replace([' ', '-'], "");
    norm(expected)
        .as_bytes()
        .ct_eq(norm(given).as_bytes())
        .into()
}

/// A new random id for a record (workspace, agent).
pub fn new_id() -> String {
    random_hex(16)
}

/// A freshly minted token: the text handed to the user once, and what we store.
pub struct IssuedToken {
    pub text: String,
    pub record: TokenRecord,
}

pub fn issue_token(kind: TokenKind, now: Timestamp, expires_at: Option<Timestamp>) -> IssuedToken {
    let id = random_hex(ID_BYTES);
    let secret = random_hex(SECRET_BYTES);
    IssuedToken {
        text: format!("{TOKEN_PREFIX}{id}_{secret}"),
        record: TokenRecord {
            id,
            secret_sha256: sha256_hex(&secret),
            kind,
            created_at: now,
            expires_at,
        },
    }
}

/// Splits token text into its id and secret, or `None` when it is not shaped like ours.
pub fn parse_token(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex_of = |s: &str, n: usize| s.len() == n * 2 && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex_of(id, ID_BYTES) && hex_of(secret, SECRET_BYTES)).then_some((id, secret))
}

/// The stored token that `text` names, if it is shaped like ours and its secret
/// matches. Its kind and expiry are for the caller to judge. Reads the store: call it
/// off the async runtime.
pub fn find_token(store: &Store, text: &str) -> Result<Option<TokenRecord>, StoreError> {
    let Some((id, secret)) = parse_token(text.trim()) else {
        return Ok(None);
    };
    Ok(store.token(id)?.filter(|t| secret_matches(t, secret)))
}

/// Whether `secret` is the one `record` was issued with (constant-time comparison).
pub fn secret_matches(record: &TokenRecord, secret: &str) -> bool {
    sha256_hex(secret)
        .as_bytes()
        .ct_eq(record.secret_sha256.as_bytes())
        .into()
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Hashes a password with argon2id and a random salt. CPU-heavy: call it off the
/// async runtime.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::encode_b64(&rand_salt())?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

fn rand_salt() -> [u8; 16] {
    let mut salt = [0u8; 16];
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut salt).expect("the operating system's random source failed");
    salt
}

/// Whether `password` matches the stored PHC string. CPU-heavy: call it off the
/// async runtime. With `None` (no such user) it still spends the same work, so the
/// response time does not reveal which usernames exist.
pub fn verify_password(stored: Option<&str>, password: &str) -> bool {
    // A valid hash of a random password, made once, for the no-such-user case.
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let (hash, real) = match stored {
        Some(h) => (h.to_owned(), true),
        None => (
            DUMMY
                .get_or_init(|| hash_password(&random_hex(16)).unwrap_or_default())
                .clone(),
            false,
        ),
    };
    let Ok(parsed) = PasswordHash::new(&hash) else {
        return false;
    };
    let ok = Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    ok && real
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::Name;

    #[test]
    fn tokens_parse_and_verify() {
        let kind = TokenKind::Session {
            user: Name::new("alice").unwrap(),
        };
        let t = issue_token(kind, Timestamp::from_unix_millis(0), None);
        let (id, secret) = parse_token(&t.text).unwrap();
        assert_eq!(id, t.record.id);
        assert!(secret_matches(&t.record, secret));
        assert!(!secret_matches(&t.record, &"0".repeat(32)));
        assert!(!t.record.secret_sha256.contains(secret));
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        for bad in [
            "",
            "myco_",
            "myco_abc_def",
            "nope_0011223344556677_00112233445566778899aabbccddeeff",
            "myco_0011223344556677_00112233445566778899aabbccddeefg",
        ] {
            assert!(parse_token(bad).is_none(), "{bad}");
        }
        assert!(parse_token("myco_0011223344556677_00112233445566778899aabbccddeeff").is_some());
    }

    #[test]
    fn passwords_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(Some(&h), "correct horse"));
        assert!(!verify_password(Some(&h), "wrong horse"));
        assert!(!verify_password(None, "correct horse"));
    }
}
