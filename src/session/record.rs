//! The session record and its encodings: the ASCII-only JSON carried in the
//! `X-Session` header, and the stored form every backend keeps, which is
//! that header value behind one flag byte, so serving a session is a copy
//! and JSON is parsed only when the app changes something.
//!
//! Stored form (since 0.2): `P` (permanent) or `T` (transient), then the
//! data exactly as sent in `X-Session`: compact JSON, printable ASCII only.
//! The earlier form, `{"p":<bool>,"d":{...}}`, is still read (and replaced
//! by the current one on the session's next write).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

const PERMANENT: u8 = b'P';
const TRANSIENT: u8 = b'T';

/// What a store keeps for one session: the app's data and its permanence.
/// Expiry is metadata of the store (TTL, column, file header), not part of
/// the record, so a refresh can touch it without rewriting the data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    #[serde(rename = "p")]
    pub permanent: bool,
    #[serde(rename = "d", deserialize_with = "plain_object")]
    pub data: Map<String, Value>,
}

/// A session as read from a store: checked, not parsed. Holds the stored
/// form, so the `X-Session` value is a slice of what the store returned.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSession {
    /// Always the current stored form (a legacy value is converted).
    /// Invariant: every byte after the flag is printable ASCII
    /// (0x20..0x7f), checked by [`StoredSession::decode`] or written so by
    /// [`SessionRecord::encode`]; [`StoredSession::header_value`] relies
    /// on it.
    bytes: Bytes,
}

impl StoredSession {
    /// Check a stored value. The current form costs one scan over its
    /// bytes (flag, braces, printable ASCII: what keeps it a valid header)
    /// and no JSON parsing, which is what makes a read a copy: the gateway
    /// only ever writes valid JSON here, and a store is trusted not to be
    /// rewritten by someone else (`session.seal` authenticates every value
    /// where that matters). The legacy form is parsed and converted.
    /// Anything else is an error, which callers treat as "no session"
    /// (logged): corrupt data must not lock a user out.
    pub fn decode(stored: Bytes) -> Result<StoredSession, String> {
        match stored.first() {
            Some(&(PERMANENT | TRANSIENT)) => {
                if !is_header_json(&stored[1..]) {
                    return Err("stored session is not printable ASCII JSON".into());
                }
                Ok(StoredSession { bytes: stored })
            }
            Some(b'{') => {
                let record: SessionRecord = serde_json::from_slice(&stored)
                    .map_err(|e| format!("stored session (legacy form) does not decode: {e}"))?;
                Ok(StoredSession {
                    bytes: record.encode(),
                })
            }
            _ => Err("stored session has an unknown format".into()),
        }
    }

    pub fn permanent(&self) -> bool {
        self.bytes[0] == PERMANENT
    }

    /// The `X-Session` header value (shares the stored bytes).
    pub fn header(&self) -> Bytes {
        self.bytes.slice(1..)
    }

    /// [`Self::header`] as an HTTP header value, without checking its
    /// bytes again: they were checked (or written) as printable ASCII when
    /// this value was made, and a read should not scan a session twice.
    pub fn header_value(&self) -> http::HeaderValue {
        let header = self.header();
        debug_assert!(header.iter().all(|b| (0x20..0x7f).contains(b)));
        // SAFETY: `from_maybe_shared_unchecked` requires bytes that are
        // valid in a header value (no control character but tab, no DEL);
        // printable ASCII (the invariant of `bytes`, see the field) is a
        // subset. (Debug builds check again inside http.)
        unsafe { http::HeaderValue::from_maybe_shared_unchecked(header) }
    }

    /// Length of [`Self::header`]: what `session.max_bytes` limits.
    pub fn header_len(&self) -> usize {
        self.bytes.len() - 1
    }

    /// The stored form (current encoding).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Parse the data, for applying an update.
    pub fn record(&self) -> Result<SessionRecord, String> {
        SessionRecord::from_stored(&self.bytes)
    }
}

/// `{...}` of printable ASCII: what [`SessionRecord::header_value`] writes.
fn is_header_json(h: &[u8]) -> bool {
    h.len() >= 2
        && h[0] == b'{'
        && h[h.len() - 1] == b'}'
        // No early exit, so the check compiles to a vectorized scan.
        && h.iter()
            .fold(true, |ok, &b| ok & (0x20..0x7f).contains(&b))
}

/// Parse JSON text into a `Value`, every object key taken as plain text.
///
/// serde_json's own `Value` deserializer gives one key a meaning when its
/// `raw_value` feature is on anywhere in the build (a dependency turns it
/// on): an object whose first key is `$serde_json::private::RawValue` has
/// its value re-read as JSON text. Found by fuzzing: an app could store
/// data with that key second, which the gateway writes first (keys are
/// sorted) and then could not read back. Session data from apps and
/// stores is parsed here instead.
pub fn parse_json(json: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Plain>(json).map(|p| p.0)
}

/// [`parse_json`] for text that must be an object.
pub fn parse_object(json: &[u8]) -> Result<Map<String, Value>, serde_json::Error> {
    serde_json::from_slice::<PlainObject>(json).map(|p| p.0)
}

fn plain_object<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    PlainObject::deserialize(d).map(|p| p.0)
}

struct Plain(Value);

struct PlainObject(Map<String, Value>);

impl<'de> Deserialize<'de> for Plain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PlainVisitor).map(Plain)
    }
}

impl<'de> Deserialize<'de> for PlainObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_map(PlainVisitor)? {
            Value::Object(map) => Ok(PlainObject(map)),
            _ => Err(serde::de::Error::custom("expected a JSON object")),
        }
    }
}

struct PlainVisitor;

impl<'de> serde::de::Visitor<'de> for PlainVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Plain(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some((key, Plain(v))) = map.next_entry::<String, Plain>()? {
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

impl SessionRecord {
    pub fn new(permanent: bool) -> Self {
        SessionRecord {
            permanent,
            data: Map::new(),
        }
    }

    /// The stored form: the flag byte and [`Self::header_value`].
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(256);
        out.push(if self.permanent { PERMANENT } else { TRANSIENT });
        write_ascii_object(&mut out, &self.data);
        Bytes::from(out)
    }

    /// Parse a stored value (current or legacy form). An error means the
    /// caller treats the value as "no session" and logs it.
    pub fn from_stored(bytes: &[u8]) -> Result<Self, String> {
        match bytes.first() {
            Some(&flag @ (PERMANENT | TRANSIENT)) => {
                let data = parse_object(&bytes[1..])
                    .map_err(|e| format!("stored session does not decode: {e}"))?;
                Ok(SessionRecord {
                    permanent: flag == PERMANENT,
                    data,
                })
            }
            Some(b'{') => serde_json::from_slice(bytes)
                .map_err(|e| format!("stored session (legacy form) does not decode: {e}")),
            _ => Err("stored session has an unknown format".into()),
        }
    }

    /// The session data as the `X-Session` header value: compact JSON that
    /// is pure printable ASCII (every non-ASCII character and DEL `\u`
    /// escaped, surrogate pairs above the BMP), so any HTTP stack accepts
    /// it. Written by a direct walk of the data: this runs on every request,
    /// and most strings need no escaping at all.
    pub fn header_value(&self) -> String {
        let mut out = Vec::with_capacity(256);
        write_ascii_object(&mut out, &self.data);
        // Only ASCII is ever written.
        String::from_utf8(out).expect("ASCII is UTF-8")
    }
}

/// Bytes a JSON string in an ASCII header cannot carry as they are: what
/// JSON escapes (`"`, `\\`, control characters), DEL and non-ASCII.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\' || b >= 0x7f
}

fn write_ascii_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // No early exit, so the check compiles to a vectorized scan.
    if bytes
        .iter()
        .fold(0u8, |any, &b| any | u8::from(needs_escape(b)))
        == 0
    {
        out.extend_from_slice(bytes);
    } else {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let unit_escape = |out: &mut Vec<u8>, unit: u16| {
            out.extend_from_slice(b"\\u");
            for shift in [12, 8, 4, 0] {
                out.push(HEX[usize::from((unit >> shift) & 0xf)]);
            }
        };
        for ch in s.chars() {
            match ch {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                '\n' => out.extend_from_slice(b"\\n"),
                '\r' => out.extend_from_slice(b"\\r"),
                '\t' => out.extend_from_slice(b"\\t"),
                '\u{8}' => out.extend_from_slice(b"\\b"),
                '\u{c}' => out.extend_from_slice(b"\\f"),
                c if c.is_ascii() && !c.is_ascii_control() => out.push(c as u8),
                c => {
                    let mut units = [0u16; 2];
                    for &mut unit in c.encode_utf16(&mut units) {
                        unit_escape(out, unit);
                    }
                }
            }
        }
    }
    out.push(b'"');
}

fn write_ascii_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            serde_json::to_writer(&mut *out, n).expect("a number always serializes")
        }
        Value::String(s) => write_ascii_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_ascii_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_ascii_object(out, map),
    }
}

fn write_ascii_object(out: &mut Vec<u8>, map: &Map<String, Value>) {
    out.push(b'{');
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_ascii_str(out, key);
        out.push(b':');
        write_ascii_value(out, value);
    }
    out.push(b'}');
}

/// Apply a JSON merge patch (RFC 7396) to `target` in place: objects merge
/// recursively, `null` removes a key, anything else replaces.
pub fn merge_patch(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner_patch) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(inner) = slot {
                    merge_patch(inner, inner_patch);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io;

    /// The reference `header_value` must match, byte for byte: serde_json
    /// with a formatter that `\u`-escapes non-ASCII and DEL.
    fn to_ascii_json<T: Serialize + ?Sized>(value: &T) -> String {
        let mut out = Vec::with_capacity(128);
        let mut ser = serde_json::Serializer::with_formatter(&mut out, AsciiFormatter);
        value
            .serialize(&mut ser)
            .expect("JSON values always serialize");
        // The formatter only ever writes ASCII.
        String::from_utf8(out).expect("ASCII is UTF-8")
    }

    struct AsciiFormatter;

    impl serde_json::ser::Formatter for AsciiFormatter {
        fn write_string_fragment<W: ?Sized + io::Write>(
            &mut self,
            writer: &mut W,
            fragment: &str,
        ) -> io::Result<()> {
            let bytes = fragment.as_bytes();
            // Almost all session data is printable ASCII: one vectorizable scan
            // instead of decoding every character.
            if bytes.iter().all(|&b| b < 0x7f) {
                return writer.write_all(bytes);
            }
            let mut start = 0;
            for (i, ch) in fragment.char_indices() {
                if ch.is_ascii() && ch != '\x7f' {
                    continue;
                }
                writer.write_all(&bytes[start..i])?;
                let mut units = [0u16; 2];
                for unit in ch.encode_utf16(&mut units) {
                    write!(writer, "\\u{:04x}", unit)?;
                }
                start = i + ch.len_utf8();
            }
            writer.write_all(&bytes[start..])
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn header_json_is_ascii_and_round_trips() {
        let rec = SessionRecord {
            permanent: true,
            data: obj(json!({"name": "Zoë 😀", "del": "\u{7f}", "ctl": "a\nb", "n": 1})),
        };
        let header = rec.header_value();
        assert!(
            header.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "{header}"
        );
        assert!(header.contains("\\u00eb"));
        assert!(header.contains("\\ud83d\\ude00"));
        let back: Map<String, Value> = serde_json::from_str(&header).unwrap();
        assert_eq!(back, rec.data);
    }

    #[test]
    fn header_value_is_exactly_the_serde_ascii_json() {
        let tricky = [
            json!({}),
            json!({"": ""}),
            json!({"a": null, "b": true, "c": false, "d": [], "e": {}, "f": [[], {}]}),
            json!({"n": [0, -1, 1.5, -0.0, 1e300, 5e-324, u64::MAX, i64::MIN, 0.1]}),
            json!({"q": "say \"hi\" \\ /", "ctl": "\u{0}\u{1}\u{8}\u{9}\u{a}\u{c}\u{d}\u{1f} \u{7f}"}),
            json!({"zoë": "Zoë 😀 \u{80}\u{7ff}\u{800}\u{ffff}\u{10000}\u{10ffff}", "k\n": {"deep": ["é", {"x": "\""}]}}),
            json!({"plain": "x".repeat(300), "mixed": format!("{}é{}", "a".repeat(40), "b".repeat(40))}),
        ];
        for data in tricky {
            let rec = SessionRecord {
                permanent: true,
                data: obj(data),
            };
            assert_eq!(rec.header_value(), to_ascii_json(&rec.data));
        }
    }

    #[test]
    fn stored_form_round_trips_and_is_the_header() {
        for permanent in [true, false] {
            let rec = SessionRecord {
                permanent,
                data: obj(json!({"a": [1, 2, {"b": null}], "z": "Zoë"})),
            };
            let stored = rec.encode();
            assert_eq!(SessionRecord::from_stored(&stored).unwrap(), rec);
            let view = StoredSession::decode(stored).unwrap();
            assert_eq!(view.permanent(), permanent);
            assert_eq!(&view.header()[..], rec.header_value().as_bytes());
            assert_eq!(view.header_len(), rec.header_value().len());
            assert_eq!(view.record().unwrap(), rec);
        }
        for bad in [
            &b"garbage"[..],
            b"",
            b"P",
            b"P{",
            b"Pnot json",
            b"T{\"a\":\"\xc3\xa9\"}",
        ] {
            assert!(
                StoredSession::decode(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
        // A read does not parse JSON (found by fuzzing to let these through
        // to the app: accepted, see `decode`); an update parses and treats
        // them as no session.
        for foreign in [
            &b"P{x}"[..],
            br#"P{"cart":[3]t":[3],"user":"ada"}"#,
            br#"T{"a":1}{"b":2}"#,
            br#"P{"lone":"\ud800"}"#,
        ] {
            let stored = StoredSession::decode(Bytes::copy_from_slice(foreign)).unwrap();
            assert!(stored.record().is_err(), "{foreign:?}");
            assert!(SessionRecord::from_stored(foreign).is_err(), "{foreign:?}");
        }
    }

    /// Found by the property tests: without serde_json's `float_roundtrip`
    /// these came back one ULP off after a parse (the app's header, a
    /// stored value being patched).
    #[test]
    fn doubles_come_back_exactly() {
        for f in [
            8.461137949850885e54,
            -3.44354081083241e105,
            1.4000290037766217e150,
            -8.69957334476601e-309,
            0.1,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
        ] {
            let rec = SessionRecord {
                permanent: true,
                data: obj(json!({ "f": f })),
            };
            let header = rec.header_value();
            let back: Map<String, Value> = serde_json::from_str(&header).unwrap();
            assert_eq!(back["f"].as_f64(), Some(f), "{header}");
            assert_eq!(SessionRecord::from_stored(&rec.encode()).unwrap(), rec);
        }
    }

    /// Found by fuzzing: with serde_json's `raw_value` feature on, this
    /// key as the first of a nested object made the data unreadable once
    /// the gateway had written it (keys sorted, so first).
    #[test]
    fn serde_json_private_key_is_plain_data() {
        let key = "$serde_json::private::RawValue";
        let text = format!(r#"{{"a":{{"b":1,"{key}":{{"3":1}}}},"c":{{"{key}":"[1]"}}}}"#);
        let data = parse_object(text.as_bytes()).unwrap();
        assert_eq!(data["a"][key], json!({"3": 1}));
        assert_eq!(data["c"][key], json!("[1]"), "not re-read as JSON");
        for permanent in [true, false] {
            let rec = SessionRecord {
                permanent,
                data: data.clone(),
            };
            let view = StoredSession::decode(rec.encode()).unwrap();
            assert_eq!(view.record().unwrap(), rec);
            let legacy = serde_json::to_vec(&rec).unwrap();
            assert_eq!(SessionRecord::from_stored(&legacy).unwrap(), rec);
            assert_eq!(parse_object(&view.header()).unwrap(), rec.data);
        }
        assert!(parse_object(b"[1]").is_err());
        assert!(parse_object(br#"{"a":1e400}"#).is_err());
        assert_eq!(
            parse_json(b"[null,-1,2.5]").unwrap(),
            json!([null, -1, 2.5])
        );
    }

    #[test]
    fn legacy_stored_form_still_loads() {
        // What versions before the header-ready form wrote.
        let legacy = br#"{"p":false,"d":{"user":"ada","n":[1,2],"z":"Zo\u00eb"}}"#;
        let expected = SessionRecord {
            permanent: false,
            data: obj(json!({"user": "ada", "n": [1, 2], "z": "Zoë"})),
        };
        assert_eq!(SessionRecord::from_stored(legacy).unwrap(), expected);
        let view = StoredSession::decode(Bytes::from_static(legacy)).unwrap();
        assert!(!view.permanent());
        // serde_json's map keeps keys sorted.
        assert_eq!(
            &view.header()[..],
            br#"{"n":[1,2],"user":"ada","z":"Zo\u00eb"}"#
        );
        assert_eq!(view.bytes(), &expected.encode());
    }

    #[test]
    fn merge_patch_follows_rfc_7396_examples() {
        // The examples from RFC 7396 appendix A that have object targets and patches.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (
                json!({"a":"foo"}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            let mut t = obj(target);
            merge_patch(&mut t, &obj(patch.clone()));
            assert_eq!(Value::Object(t), expected, "patch {patch}");
        }
    }
}
