//! Bearer tokens. Agent tokens are random and only their SHA-256 is stored, so a copy
//! of the database lets nobody heartbeat as an agent. The cluster token (for calls
//! between broker and agents) is derived from the join token, which lives only in the
//! broker's configuration: the broker can recompute it after a restart without ever
//! writing it down.

use sha2::{Digest, Sha256};

/// 32 random bytes, hex-encoded.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// A short random identifier (migration ids).
pub fn short_id(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    if getrandom::fill(&mut bytes).is_err() {
        // ids need uniqueness, not secrecy: the clock is a fine fallback
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        bytes.copy_from_slice(&nanos.to_le_bytes()[..6]);
    }
    format!("{prefix}{}", hex::encode(bytes))
}

pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The cluster token every agent receives at registration.
pub fn cluster_token(join_token: &str) -> String {
    sha256_hex(&format!("away cluster token\0{join_token}"))
}

/// Compare a presented token with a stored hash. Both sides are hashes of equal length,
/// and the loop does not stop early, so timing reveals nothing about the secret.
pub fn matches(presented: &str, stored_sha256: &str) -> bool {
    same_hash(&sha256_hex(presented), stored_sha256)
}

/// [`matches`] for a presented token already hashed (one hash for many stored ones).
pub fn same_hash(presented_sha256: &str, stored_sha256: &str) -> bool {
    let (a, b) = (presented_sha256.as_bytes(), stored_sha256.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashes_match_only_their_token() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let h = sha256_hex(&a);
        assert_ne!(h, a, "the hash is not the token");
        assert!(matches(&a, &h));
        assert!(!matches(&b, &h));
        assert!(!matches("", &h));
        assert!(same_hash(&h, &h) && !same_hash(&sha256_hex(&b), &h) && !same_hash("", &h));
    }

    #[test]
    fn sha256_is_the_standard_one() {
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn cluster_token_is_stable_and_not_the_join_token() {
        assert_eq!(cluster_token("join"), cluster_token("join"));
        assert_ne!(cluster_token("join"), cluster_token("other"));
        assert!(!cluster_token("join").contains("join"));
    }

    #[test]
    fn short_ids_differ() {
        assert_ne!(short_id("m-"), short_id("m-"));
        assert!(short_id("m-").starts_with("m-"));
    }
}
