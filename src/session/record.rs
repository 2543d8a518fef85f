//! The session record and its two encodings: the stored form every backend
//! keeps, and the ASCII-only JSON carried in the `X-Session` header.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io;

/// What a store keeps for one session: the app's data and its permanence.
/// Expiry is metadata of the store (TTL, column, file header), not part of
/// the record, so a refresh can touch it without rewriting the data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    #[serde(rename = "p")]
    pub permanent: bool,
    #[serde(rename = "d")]
    pub data: Map<String, Value>,
}

impl SessionRecord {
    pub fn new(permanent: bool) -> Self {
        SessionRecord {
            permanent,
            data: Map::new(),
        }
    }

    /// The stored form: compact JSON `{"p":<bool>,"d":{...}}`.
    pub fn to_stored(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a JSON map always serializes")
    }

    /// Parse the stored form. A value no record decodes from is reported as
    /// an error so the caller can treat it as "no session" and log it.
    pub fn from_stored(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The session data as the `X-Session` header value.
    pub fn header_value(&self) -> String {
        to_ascii_json(&self.data)
    }

    /// Size of the data as the upstream would see it in `X-Session`; this is
    /// what `session.max_bytes` limits.
    pub fn data_len(&self) -> usize {
        let mut counter = ByteCounter(0);
        serde_json::to_writer(&mut counter, &self.data).expect("a JSON map always serializes");
        counter.0
    }
}

struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Serialize to JSON that is pure printable ASCII: every non-ASCII character
/// (and DEL) is `\u` escaped, with surrogate pairs above the BMP, so any HTTP
/// stack accepts it as a header value.
pub fn to_ascii_json<T: Serialize + ?Sized>(value: &T) -> String {
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
    fn stored_form_round_trips() {
        let rec = SessionRecord {
            permanent: false,
            data: obj(json!({"a": [1, 2, {"b": null}]})),
        };
        assert_eq!(SessionRecord::from_stored(&rec.to_stored()).unwrap(), rec);
        assert!(SessionRecord::from_stored(b"garbage").is_err());
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

    #[test]
    fn data_len_matches_compact_json() {
        let rec = SessionRecord {
            permanent: true,
            data: obj(json!({"k": "v", "n": [1, 2]})),
        };
        assert_eq!(rec.data_len(), serde_json::to_vec(&rec.data).unwrap().len());
    }
}
