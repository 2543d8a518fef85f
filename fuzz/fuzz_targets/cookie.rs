//! The `Cookie` request header: finding the session cookie ([`find`]),
//! removing it from what the upstream gets ([`without`]), and verifying
//! its value. The input is one or more `Cookie` header values, one per
//! line.
//!
//! Invariants: what `without` leaves never holds the session cookie (the
//! app never sees the id) and is well formed and stable; a value that
//! verifies is exactly the signed form of its id under one of the keys.

#![no_main]

use libfuzzer_sys::fuzz_target;
use session_gateway::proxy::cookies::{find, without, Found};
use session_gateway::session::CookieVerifier;

const NAME: &str = "session";
/// Some seeds in corpus/cookie hold cookies signed with these.
const KEYS: [&[u8]; 2] = [
    b"fuzz-signing-key-0123456789abcdef",
    b"fuzz-rotated-key-0123456789abcdef",
];

/// A value that verifies under `[k0, k1]` is what k0 or k1 signs for its
/// id, byte for byte.
fn check_verify(verifier: &CookieVerifier, signers: &[CookieVerifier], value: &str) {
    if let Some(id) = verifier.verify(value) {
        assert!(
            signers.iter().any(|s| s.sign(&id) == value),
            "{value:?} verified but is not a signed form of its id"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let keys: Vec<Vec<u8>> = KEYS.iter().map(|k| k.to_vec()).collect();
    let verifier = CookieVerifier::new(&keys, 32);
    let signers: Vec<CookieVerifier> = keys
        .iter()
        .map(|k| CookieVerifier::new(std::slice::from_ref(k), 32))
        .collect();
    let headers: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();

    let found = find(headers.iter().copied(), NAME);
    if let Found::One(value) = &found {
        check_verify(&verifier, &signers, value);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        check_verify(&verifier, &signers, text);
    }

    let Some(kept) = without(headers.iter().copied(), NAME) else {
        return;
    };
    assert!(!kept.is_empty());
    assert_eq!(
        find(std::iter::once(&kept[..]), NAME),
        Found::Absent,
        "the session cookie reaches the upstream: {:?}",
        String::from_utf8_lossy(&kept)
    );
    for part in kept.split(|&b| b == b';') {
        // Parts are joined with "; ": after the first, each starts with a
        // space, and nothing else is blank.
        let part = part.strip_prefix(b" ").unwrap_or(part);
        assert!(!part.is_empty() && part.trim_ascii() == part, "{kept:?}");
    }
    assert_eq!(
        without(std::iter::once(&kept[..]), NAME).as_deref(),
        Some(&kept[..]),
        "without is not stable"
    );
});
