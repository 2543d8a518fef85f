//! Session ids and the signed cookie value `<id>.<signature>`.
//!
//! An id is `id_bytes` bytes from the OS CSPRNG, unpadded base64url. The
//! signature is the unpadded base64url HMAC-SHA256 of the id's text under the
//! first secret key; every configured key verifies, so keys can be rotated.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

/// Longest cookie value we even look at. A 64-byte id plus a signature is
/// well under this; anything longer is garbage and is never decoded.
const MAX_COOKIE_VALUE: usize = 512;

/// A session id: the unpadded base64url text of random bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// A new random id of `bytes` bytes of OS entropy.
    pub fn generate(bytes: usize) -> Self {
        let mut buf = vec![0u8; bytes];
        // The OS CSPRNG failing is not recoverable: serving a predictable id
        // would be worse than crashing the worker.
        getrandom::getrandom(&mut buf).expect("OS random number generator failed");
        SessionId(URL_SAFE_NO_PAD.encode(&buf))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A given id (known-answer tests).
    #[cfg(test)]
    pub(crate) fn known(id: &str) -> Self {
        SessionId(id.to_string())
    }

    /// The key under which a store keeps this session.
    pub fn store_key(&self, prefix: &str) -> String {
        let mut key = String::with_capacity(prefix.len() + self.0.len());
        key.push_str(prefix);
        key.push_str(&self.0);
        key
    }
}

// Ids are bearer credentials: keep them out of Debug output and logs.
impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.0.chars().take(6).collect();
        write!(f, "SessionId({shown}…)")
    }
}

/// Signs ids with the first key and verifies them with any key.
#[derive(Clone)]
pub struct CookieVerifier {
    keys: Vec<HmacSha256>,
    id_len: usize,
}

impl CookieVerifier {
    /// `keys` must hold at least one key; `id_bytes` fixes the id length that
    /// verification accepts.
    pub fn new(keys: &[Vec<u8>], id_bytes: usize) -> Self {
        assert!(!keys.is_empty(), "at least one secret key is required");
        let keys = keys
            .iter()
            .map(|k| HmacSha256::new_from_slice(k).expect("HMAC accepts keys of any length"))
            .collect();
        CookieVerifier {
            keys,
            id_len: base64_len(id_bytes),
        }
    }

    fn signature(mac: &HmacSha256, id: &str) -> [u8; 32] {
        let mut mac = mac.clone();
        mac.update(id.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The cookie value `<id>.<signature>` under the signing (first) key.
    pub fn sign(&self, id: &SessionId) -> String {
        let sig = Self::signature(&self.keys[0], id.as_str());
        let mut out = String::with_capacity(id.0.len() + 44);
        out.push_str(id.as_str());
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut out);
        out
    }

    /// The id in a cookie value if its signature verifies under any key.
    /// Anything malformed is simply `None`: never a panic, never an error.
    pub fn verify(&self, value: &str) -> Option<SessionId> {
        self.verify_with_key(value).map(|(id, _)| id)
    }

    /// Like [`Self::verify`], and also says whether the value is signed
    /// with the current (first) key: then it is byte for byte what
    /// [`Self::sign`] makes for the id (the signature is deterministic and
    /// only canonical base64 decodes), so it can be sent back as is.
    pub fn verify_with_key(&self, value: &str) -> Option<(SessionId, bool)> {
        if value.len() > MAX_COOKIE_VALUE {
            return None;
        }
        let (id, sig) = value.split_once('.')?;
        if id.len() != self.id_len || !id.bytes().all(is_base64url) {
            return None;
        }
        let mut given = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(sig, &mut given) {
            Ok(32) => {}
            _ => return None,
        }
        // Check every key without an early exit so the time taken does not
        // reveal which key (if any) matched.
        let mut ok = subtle::Choice::from(0u8);
        let mut current = subtle::Choice::from(0u8);
        for (i, key) in self.keys.iter().enumerate() {
            let mut mac = key.clone();
            mac.update(id.as_bytes());
            let expected: [u8; 32] = mac.finalize().into_bytes().into();
            let equal = subtle::ConstantTimeEq::ct_eq(&expected[..], &given[..]);
            ok |= equal;
            if i == 0 {
                current = equal;
            }
        }
        bool::from(ok).then(|| (SessionId(id.to_string()), bool::from(current)))
    }
}

fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Length of the unpadded base64 text of `n` bytes.
fn base64_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(keys: &[&str]) -> CookieVerifier {
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
        CookieVerifier::new(&keys, 32)
    }

    const K1: &str = "0123456789abcdef0123456789abcdef-one";
    const K2: &str = "0123456789abcdef0123456789abcdef-two";

    #[test]
    fn ids_are_random_and_sized() {
        let a = SessionId::generate(32);
        let b = SessionId::generate(32);
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 43);
        assert!(a.as_str().bytes().all(is_base64url));
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let v = verifier(&[K1]);
        let id = SessionId::generate(32);
        let value = v.sign(&id);
        assert_eq!(v.verify(&value), Some(id));
    }

    #[test]
    fn a_value_signed_with_the_current_key_is_what_sign_makes() {
        let rotated = verifier(&[K2, K1]);
        let id = SessionId::generate(32);
        let current = rotated.sign(&id);
        assert_eq!(rotated.verify_with_key(&current), Some((id.clone(), true)));
        let old = verifier(&[K1]).sign(&id);
        assert_ne!(old, current);
        assert_eq!(rotated.verify_with_key(&old), Some((id, false)));
    }

    #[test]
    fn rotation_old_key_still_verifies_new_key_signs() {
        let old = verifier(&[K1]);
        let rotated = verifier(&[K2, K1]);
        let id = SessionId::generate(32);
        let old_cookie = old.sign(&id);
        assert_eq!(rotated.verify(&old_cookie), Some(id.clone()));
        let new_cookie = rotated.sign(&id);
        assert_ne!(new_cookie, old_cookie);
        assert_eq!(old.verify(&new_cookie), None);
    }

    #[test]
    fn tampered_and_garbage_values_are_rejected() {
        let v = verifier(&[K1]);
        let id = SessionId::generate(32);
        let good = v.sign(&id);
        let mut bytes = good.clone().into_bytes();
        bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        for bad in [
            tampered.as_str(),
            "",
            ".",
            "abc",
            "abc.def",
            &good[..good.len() - 1],
            &format!("{good}x"),
            &"A".repeat(10_000),
            "ÿÿÿÿ.ÿÿÿ",
        ] {
            assert_eq!(v.verify(bad), None, "accepted {bad:?}");
        }
    }

    #[test]
    fn debug_does_not_leak_the_id() {
        let id = SessionId::generate(32);
        assert!(!format!("{id:?}").contains(id.as_str()));
    }
}
