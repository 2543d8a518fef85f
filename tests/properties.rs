//! Property tests (proptest) for the pure units every request goes
//! through: the `X-Session` header encoding and the stored forms, RFC 7396
//! merge patches, cookie signing, and path normalization for
//! `session.exclude`. Each property holds for every input the strategies
//! below generate; the example-based tests next to the code pin the cases
//! the README names.
//!
//! The whole file runs in a few seconds (case counts are set per block); a
//! failure prints the shrunk input, which then belongs in a unit test next
//! to the code it broke.

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{Map, Number, Value};
use session_gateway::config::HeaderNames;
use session_gateway::proxy::path::{is_excluded, normalize};
use session_gateway::proxy::protocol::{object_depth, RawDirectives, MAX_DEPTH};
use session_gateway::session::{
    merge_patch, CookieVerifier, SessionId, SessionRecord, StoredSession,
};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures are turned into unit tests by hand, not replayed from
        // files that would appear in the work tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Arbitrary JSON
// ---------------------------------------------------------------------------

/// Characters that stress the ASCII header encoding: printable ASCII, the
/// JSON escapes, control characters, DEL, two- and three-byte UTF-8 (both
/// sides of the surrogate gap) and astral characters (surrogate pairs in
/// `\u` form).
fn json_char() -> impl Strategy<Value = char> {
    prop_oneof![
        6 => prop::char::range(' ', '~'),
        2 => prop::char::range('\0', '\u{1f}'),
        1 => prop::sample::select(vec!['\u{7f}', '"', '\\', '/', '\u{2028}', '\u{feff}']),
        1 => prop::char::range('\u{80}', '\u{7ff}'),
        1 => prop::char::range('\u{800}', '\u{d7ff}'),
        1 => prop::char::range('\u{e000}', '\u{ffff}'),
        2 => prop::char::range('\u{10000}', '\u{10ffff}'),
    ]
}

fn json_string() -> impl Strategy<Value = String> {
    prop::collection::vec(json_char(), 0..12).prop_map(String::from_iter)
}

/// i64, u64 and finite f64 (JSON has no NaN or infinity).
fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("JSON numbers are finite", |f| {
            Number::from_f64(f).map(Value::Number)
        }),
        // Short decimals, as apps write them.
        (-10_000i32..10_000, 0u32..4)
            .prop_map(|(m, e)| Value::from(f64::from(m) / 10f64.powi(e as i32))),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        json_string().prop_map(Value::String),
    ]
}

/// Any JSON value, at most 6 levels of containers deep, with keys drawn
/// from `keys`.
fn json_value(keys: BoxedStrategy<String>) -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(6, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(keys.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object(keys: BoxedStrategy<String>) -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(keys.clone(), json_value(keys), 0..8)
        .prop_map(|m| m.into_iter().collect())
}

/// Objects nested up to exactly [`MAX_DEPTH`] levels: a chain of arrays
/// and objects around one leaf, next to some ordinary data.
fn deep_object() -> impl Strategy<Value = Map<String, Value>> {
    (
        prop::collection::vec((any::<bool>(), json_string()), 0..MAX_DEPTH),
        json_leaf(),
        json_object(json_string().boxed()),
    )
        .prop_map(|(chain, leaf, mut data)| {
            let mut v = leaf;
            for (is_array, key) in chain {
                v = if is_array {
                    Value::Array(vec![v])
                } else {
                    Value::Object(Map::from_iter([(key, v)]))
                };
            }
            data.insert("deep".into(), v);
            data
        })
}

/// Session data of every shape a session may have.
fn session_data() -> impl Strategy<Value = Map<String, Value>> {
    prop_oneof![4 => json_object(json_string().boxed()), 1 => deep_object()]
}

fn printable_ascii(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| (0x20..0x7f).contains(b))
}

// ---------------------------------------------------------------------------
// Header encoding and stored forms
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    /// What the app receives is printable ASCII and is exactly the data.
    #[test]
    fn header_value_is_ascii_and_parses_back(data in session_data()) {
        prop_assume!(object_depth(&data) <= MAX_DEPTH);
        let record = SessionRecord { permanent: true, data };
        let header = record.header_value();
        prop_assert!(printable_ascii(header.as_bytes()), "{}", header);
        let back: Map<String, Value> = serde_json::from_str(&header).unwrap();
        prop_assert_eq!(back, record.data);
    }

    /// The app can send back exactly what it got: the gateway accepts its
    /// own `X-Session` value as a replacement, unchanged.
    #[test]
    fn header_value_is_accepted_back_from_the_app(data in session_data()) {
        let names = HeaderNames::new("X-Session");
        let record = SessionRecord { permanent: false, data };
        let header = record.header_value();
        let mut raw = RawDirectives::default();
        raw.offer("X-Session", header.as_bytes(), &names);
        let parsed = raw.parse(&names, usize::MAX).unwrap_or_else(|e| panic!("{}: {}", header, e.0));
        prop_assert_eq!(parsed.replace, Some(record.data));
    }

    /// The stored form: decode (the cheap check every load does) accepts
    /// what encode wrote, serves the header byte for byte, and parses back
    /// to the same record; the legacy form loads as the same session.
    #[test]
    fn stored_forms_round_trip(data in session_data(), permanent in any::<bool>()) {
        let record = SessionRecord { permanent, data };
        let stored = record.encode();
        let view = StoredSession::decode(stored.clone()).unwrap();
        prop_assert_eq!(view.permanent(), permanent);
        let header = record.header_value();
        prop_assert_eq!(&view.header()[..], header.as_bytes());
        prop_assert_eq!(view.header_len(), header.len());
        prop_assert_eq!(&view.record().unwrap(), &record);
        prop_assert_eq!(&SessionRecord::from_stored(&stored).unwrap(), &record);

        let legacy = serde_json::to_vec(&record).unwrap();
        let view = StoredSession::decode(legacy.clone().into()).unwrap();
        prop_assert_eq!(view.bytes(), &stored);
        prop_assert_eq!(&SessionRecord::from_stored(&legacy).unwrap(), &record);
        // The header value is made without a second check: it must be one
        // that the checking constructor accepts, byte for byte.
        let checked = http::HeaderValue::from_bytes(header.as_bytes()).unwrap();
        prop_assert_eq!(view.header_value(), checked);
    }
}

// ---------------------------------------------------------------------------
// Merge patch (RFC 7396)
// ---------------------------------------------------------------------------

/// RFC 7396 section 2, transcribed: the slow, obvious version.
fn reference_merge(target: Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else {
        return patch.clone();
    };
    let mut target = match target {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    for (name, value) in patch {
        if value.is_null() {
            target.remove(name);
        } else {
            let current = target.remove(name).unwrap_or(Value::Null);
            target.insert(name.clone(), reference_merge(current, value));
        }
    }
    Value::Object(target)
}

fn merged(target: &Map<String, Value>, patch: &Map<String, Value>) -> Map<String, Value> {
    let mut out = target.clone();
    merge_patch(&mut out, patch);
    out
}

fn contains_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(items) => items.iter().any(contains_null),
        Value::Object(map) => map.values().any(contains_null),
        _ => false,
    }
}

/// A member whose value is `null`, in this object or one nested in it
/// through objects (arrays are values: a patch stores them verbatim, nulls
/// and all).
fn has_null_member(map: &Map<String, Value>) -> bool {
    map.values().any(|v| match v {
        Value::Null => true,
        Value::Object(inner) => has_null_member(inner),
        _ => false,
    })
}

/// Every member of the patch shows in the result as RFC 7396 says: a
/// `null` member is absent, an object member merged (recursively), any
/// other value present verbatim.
fn patch_shows_in(result: &Map<String, Value>, patch: &Map<String, Value>) -> Result<(), String> {
    for (key, value) in patch {
        match (value, result.get(key)) {
            (Value::Null, None) => {}
            (Value::Null, Some(v)) => return Err(format!("`{key}` was deleted but is {v}")),
            (Value::Object(inner), Some(Value::Object(got))) => patch_shows_in(got, inner)?,
            (Value::Object(_), got) => return Err(format!("`{key}` is {got:?}, not an object")),
            (v, got) if got == Some(v) => {}
            (v, got) => return Err(format!("`{key}` is {got:?}, the patch set {v}")),
        }
    }
    Ok(())
}

/// Keys that collide often, so patches meet the target's members.
fn patch_keys() -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::sample::select(vec!["a", "b", "c", "é", ""]).prop_map(String::from),
        1 => json_string(),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn merge_patch_is_rfc_7396(
        target in json_object(patch_keys()),
        patch in json_object(patch_keys()),
    ) {
        let result = merged(&target, &patch);
        prop_assert_eq!(
            Value::Object(result.clone()),
            reference_merge(Value::Object(target), &Value::Object(patch.clone()))
        );
        if let Err(e) = patch_shows_in(&result, &patch) {
            prop_assert!(false, "{}", e);
        }
    }

    /// Applying a patch twice is applying it once; `{}` changes nothing.
    #[test]
    fn merge_patch_is_idempotent_and_empty_is_identity(
        target in json_object(patch_keys()),
        patch in json_object(patch_keys()),
    ) {
        let once = merged(&target, &patch);
        prop_assert_eq!(&merged(&once, &patch), &once);
        prop_assert_eq!(&merged(&target, &Map::new()), &target);
    }

    /// Null members of a patch are deletions, never stored values: data
    /// without null members stays without them.
    #[test]
    fn merge_patch_never_stores_the_patch_nulls(
        target in json_object(patch_keys()),
        patch in json_object(patch_keys()),
    ) {
        let target: Map<String, Value> = target
            .into_iter()
            .filter(|(_, v)| !contains_null(v))
            .collect();
        let result = merged(&target, &patch);
        prop_assert!(!has_null_member(&result), "{:?}", result);
    }
}

// ---------------------------------------------------------------------------
// Cookie signing
// ---------------------------------------------------------------------------

fn secret() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..80)
}

/// The base64url character after `b` (cyclically), or `A` for anything
/// else: the smallest change of a signature character (for the last one,
/// only its unused low bits).
fn next_base64url(b: u8) -> u8 {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    match ALPHABET.iter().position(|&c| c == b) {
        Some(i) => ALPHABET[(i + 1) % ALPHABET.len()],
        None => b'A',
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn signed_cookies_verify_and_every_byte_change_fails(
        keys in prop::collection::vec(secret(), 1..4),
        id_bytes in 16usize..=64,
        random in prop::collection::vec(0u8..0x80, 2),
    ) {
        let verifier = CookieVerifier::new(&keys, id_bytes);
        let id = SessionId::generate(id_bytes);
        let cookie = verifier.sign(&id);
        prop_assert_eq!(verifier.verify(&cookie), Some(id), "{}", cookie);
        // A cookie value is text: only ASCII replacements keep it UTF-8.
        for i in 0..cookie.len() {
            let original = cookie.as_bytes()[i];
            let mut replacements = vec![
                next_base64url(original),
                original ^ 0x20,
                b'.',
                b'=',
                random[0],
                random[1],
            ];
            replacements.retain(|&r| r != original && r.is_ascii());
            for r in replacements {
                let mut changed = cookie.clone().into_bytes();
                changed[i] = r;
                let changed = String::from_utf8(changed).unwrap();
                prop_assert_eq!(verifier.verify(&changed), None, "{} accepted", changed);
            }
        }
        prop_assert_eq!(verifier.verify(&cookie[..cookie.len() - 1]), None);
        prop_assert_eq!(verifier.verify(&format!("{cookie}A")), None);
    }

    /// Rotation: `[new, old]` signs with new and still verifies old cookies;
    /// old alone does not accept new cookies, new alone drops old ones.
    #[test]
    fn rotated_keys_verify_old_cookies(
        old in secret(),
        new in secret(),
        id_bytes in 16usize..=64,
    ) {
        prop_assume!(old != new);
        let old_only = CookieVerifier::new(std::slice::from_ref(&old), id_bytes);
        let new_only = CookieVerifier::new(std::slice::from_ref(&new), id_bytes);
        let rotated = CookieVerifier::new(&[new, old], id_bytes);
        let id = SessionId::generate(id_bytes);
        let old_cookie = old_only.sign(&id);
        let new_cookie = rotated.sign(&id);
        prop_assert_eq!(rotated.verify(&old_cookie), Some(id.clone()));
        prop_assert_eq!(rotated.verify(&new_cookie), Some(id.clone()));
        prop_assert_eq!(new_only.verify(&new_cookie), Some(id));
        prop_assert_eq!(old_only.verify(&new_cookie), None);
        prop_assert_eq!(new_only.verify(&old_cookie), None);
    }
}

// ---------------------------------------------------------------------------
// Path normalization
// ---------------------------------------------------------------------------

/// Request targets built from the pieces that make normalization hard:
/// dot segments plain and encoded, encoded separators, `%` and its
/// encodings, query and fragment markers, absolute forms.
fn target() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        3 => prop::sample::select(vec![
            "", ".", "..", "%2e", "%2E%2e", ".%2e", "%2f", "%2F", "..%2f", "%25", "%252e",
            "%252e%252e", "%3f", "%3F", "%23", "?", "#", "%", "%zz", "%ff", "%c3%a9", "é",
            "static", "Static", "api", "a", "x.y", "http:", "%73tatic", "~", " ",
        ])
        .prop_map(String::from),
        1 => json_string(),
    ];
    let start = prop::sample::select(vec!["/", "", "//", "http://h", "HTTPS://h:1", "./", "/."]);
    (start, prop::collection::vec(segment, 0..8))
        .prop_map(|(start, segments)| format!("{start}{}", segments.join("/")))
}

/// The reference for exclusion: the prefix's segments (without trailing
/// empty ones) lead the path's segments.
fn under_prefix_reference(path: &str, prefix: &str) -> bool {
    let prefix: Vec<&str> = prefix.trim_end_matches('/').split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    path.starts_with(&prefix)
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn normalize_is_idempotent_and_stays_under_root(target in prop_oneof![target(), any::<String>()]) {
        let once = normalize(&target);
        prop_assert!(once.starts_with('/'), "{:?} -> {:?}", target, once);
        for segment in once.split('/') {
            prop_assert!(segment != "." && segment != "..", "{:?} -> {:?}", target, once);
        }
        prop_assert_eq!(normalize(&once), once.clone(), "{:?}", target);
    }

    #[test]
    fn exclusion_matches_whole_segments_of_the_normalized_path(
        target in target(),
        prefixes in prop::collection::vec(target().prop_map(|p| format!("/{p}")), 1..3),
    ) {
        let normalized: Vec<String> = prefixes.iter().map(|p| normalize(p)).collect();
        let path = normalize(&target);
        let expected = normalized.iter().any(|p| under_prefix_reference(&path, p));
        prop_assert_eq!(is_excluded(&target, &normalized), expected, "{:?} {:?}", path, normalized);
        // Matching the normalized path gives the same verdict.
        prop_assert_eq!(is_excluded(&path, &normalized), expected);
    }
}
