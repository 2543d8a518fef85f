//! The header protocol between gateway and upstream: which headers belong
//! to it (and are stripped), and parsing the upstream's session directives
//! (`X-Session`, `X-Session-Patch`, `X-Session-Action`) into [`Directives`].
//! Pure functions over header names and values; no I/O.
//!
//! What the upstream may store is limited so that every store can give it
//! back exactly: at most [`MAX_DEPTH`] levels of nesting, integers within
//! 64 bits (a larger one would silently become a float), no lone UTF-16
//! surrogates (refused by the JSON parser). Anything else is a 502.

pub use crate::config::is_protocol_header;
use crate::config::HeaderNames;
use serde_json::{Map, Value};

/// Deepest nesting accepted in session data, counting the data object
/// itself as level 1 (`{"a":{"b":[1]}}` is 3). serde_json refuses input
/// deeper than 128 levels; 64 leaves room for every store's wrapping
/// (the legacy stored form adds one level) and is far beyond what a
/// session needs.
pub const MAX_DEPTH: usize = 64;

/// What the upstream asked for.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Directives {
    /// `X-Session`: replace the data (`{}` empties the session).
    pub replace: Option<Map<String, Value>>,
    /// `X-Session-Patch`: RFC 7396 merge patch.
    pub patch: Option<Map<String, Value>>,
    pub regenerate: bool,
    pub destroy: bool,
    /// `permanent` (true) / `transient` (false).
    pub permanence: Option<bool>,
}

impl Directives {
    /// Does this ask for any change at all?
    pub fn is_empty(&self) -> bool {
        self == &Directives::default()
    }

    /// Does this change the data or flags (as opposed to id-only actions)?
    pub fn modifies_record(&self) -> bool {
        self.replace.is_some() || self.patch.is_some() || self.permanence.is_some()
    }
}

/// Why the upstream's directives were refused; the text goes to the client
/// in a 502 body and to the log.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtocolError(pub String);

/// The protocol headers found in one upstream response, as raw values.
#[derive(Debug, Default)]
pub struct RawDirectives {
    pub data: Vec<Vec<u8>>,
    pub patch: Vec<Vec<u8>>,
    pub action: Vec<Vec<u8>>,
    /// Any protocol header at all was present (including unknown ones).
    pub any: bool,
}

impl RawDirectives {
    /// Sort one response header into the raw directives; returns whether it
    /// belongs to the protocol (and must be removed).
    pub fn offer(&mut self, name: &str, value: &[u8], names: &HeaderNames) -> bool {
        if !is_protocol_header(name, &names.strip_prefix) {
            return false;
        }
        self.any = true;
        if name.eq_ignore_ascii_case(&names.data) {
            self.data.push(value.to_vec());
        } else if name.eq_ignore_ascii_case(&names.patch) {
            self.patch.push(value.to_vec());
        } else if name.eq_ignore_ascii_case(&names.action) {
            self.action.push(value.to_vec());
        }
        true
    }

    /// Validate and parse. Nothing is applied here; a failure leaves the
    /// stored session untouched.
    pub fn parse(
        &self,
        names: &HeaderNames,
        max_bytes: usize,
    ) -> Result<Directives, ProtocolError> {
        let mut d = Directives::default();
        if self.data.len() > 1 {
            return Err(ProtocolError(format!(
                "{} was sent more than once",
                names.data
            )));
        }
        if self.patch.len() > 1 {
            return Err(ProtocolError(format!(
                "{} was sent more than once",
                names.patch
            )));
        }
        // Refused before parsing: a header larger than the session may be
        // is never worth a parse.
        for (raw, header) in [
            (self.data.first(), &names.data),
            (self.patch.first(), &names.patch),
        ] {
            if let Some(raw) = raw.filter(|r| r.len() > max_bytes) {
                return Err(ProtocolError(format!(
                    "{header} is {} bytes, more than session.max_bytes ({max_bytes})",
                    raw.len()
                )));
            }
        }
        if let Some(raw) = self.data.first() {
            d.replace = Some(parse_object(raw, &names.data)?);
        }
        if let Some(raw) = self.patch.first() {
            d.patch = Some(parse_object(raw, &names.patch)?);
        }
        for raw in &self.action {
            let text = std::str::from_utf8(raw)
                .map_err(|_| ProtocolError(format!("{} is not valid UTF-8", names.action)))?;
            for action in text.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                match action.to_ascii_lowercase().as_str() {
                    "regenerate" => d.regenerate = true,
                    "destroy" => d.destroy = true,
                    "permanent" => set_permanence(&mut d, true, names)?,
                    "transient" => set_permanence(&mut d, false, names)?,
                    _ => {
                        return Err(ProtocolError(format!(
                            "unknown action `{}` in {} (known: regenerate, destroy, permanent, transient)",
                            action.escape_default(),
                            names.action
                        )))
                    }
                }
            }
        }
        Ok(d)
    }
}

fn set_permanence(
    d: &mut Directives,
    value: bool,
    names: &HeaderNames,
) -> Result<(), ProtocolError> {
    if d.permanence.is_some_and(|v| v != value) {
        return Err(ProtocolError(format!(
            "{} asks for both permanent and transient",
            names.action
        )));
    }
    d.permanence = Some(value);
    Ok(())
}

fn parse_object(raw: &[u8], header: &str) -> Result<Map<String, Value>, ProtocolError> {
    let map = match crate::session::record::parse_json(raw) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(ProtocolError(format!("{header} is not a JSON object"))),
        Err(e) => return Err(ProtocolError(format!("{header} is not valid JSON: {e}"))),
    };
    if let Some(literal) = oversized_integer(raw) {
        return Err(ProtocolError(format!(
            "{header} holds the integer {literal}, outside the 64-bit range it could be stored in exactly"
        )));
    }
    let depth = object_depth(&map);
    if depth > MAX_DEPTH {
        return Err(ProtocolError(format!(
            "{header} is nested {depth} levels deep, more than the {MAX_DEPTH} a session may have"
        )));
    }
    Ok(map)
}

/// Nesting depth of an object (itself = 1).
pub fn object_depth(map: &Map<String, Value>) -> usize {
    fn depth(v: &Value) -> usize {
        match v {
            Value::Object(m) => object_depth(m),
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    1 + map.values().map(depth).max().unwrap_or(0)
}

/// The first integer literal (no fraction, no exponent) in valid JSON text
/// that does not fit in i64 or u64. serde_json would read it as a float
/// and silently change it (12345678901234567890123 -> 1.2345678901234568e22).
fn oversized_integer(json: &[u8]) -> Option<String> {
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                // Skip the string; the text is valid JSON, so it ends.
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < json.len()
                    && matches!(json[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                let literal = std::str::from_utf8(&json[start..i]).unwrap_or("");
                let integer = !literal.contains(['.', 'e', 'E']);
                if integer && literal.parse::<i64>().is_err() && literal.parse::<u64>().is_err() {
                    return Some(literal.to_string());
                }
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> HeaderNames {
        HeaderNames::new("X-Session")
    }

    fn raw(headers: &[(&str, &str)]) -> RawDirectives {
        let mut r = RawDirectives::default();
        for (n, v) in headers {
            r.offer(n, v.as_bytes(), &names());
        }
        r
    }

    #[test]
    fn protocol_header_matching() {
        let p = &names().strip_prefix;
        for yes in [
            "x-session",
            "X-Session-Patch",
            "X_SESSION",
            "x_session_action",
            "X-Session-Anything",
            "X-Sessions",
        ] {
            assert!(is_protocol_header(yes, p), "{yes}");
        }
        for no in ["x-sess", "session", "x-sessio", "xx-session", "cookie"] {
            assert!(!is_protocol_header(no, p), "{no}");
        }
    }

    #[test]
    fn parses_all_directives() {
        let d = raw(&[
            ("x-session", r#"{"a":1}"#),
            ("x-session-patch", r#"{"b":null}"#),
            ("x-session-action", "Regenerate, permanent"),
            ("x-session-action", "destroy"),
        ])
        .parse(&names(), 100)
        .unwrap();
        assert_eq!(d.replace.unwrap()["a"], 1);
        assert!(d.patch.unwrap()["b"].is_null());
        assert!(d.regenerate && d.destroy);
        assert_eq!(d.permanence, Some(true));
    }

    #[test]
    fn rejects_bad_input() {
        let cases = [
            (vec![("x-session", "[1]")], "not a JSON object"),
            (vec![("x-session", "{")], "not valid JSON"),
            (vec![("x-session-patch", "nope")], "not valid JSON"),
            (vec![("x-session-patch", "null")], "not a JSON object"),
            (vec![("x-session-action", "explode")], "unknown action"),
            (vec![("x-session-action", "permanent,transient")], "both"),
            (
                vec![("x-session", "{}"), ("x-session", "{}")],
                "more than once",
            ),
            (vec![("x-session", r#"{"k":"0123456789"}"#)], "max_bytes"),
            (
                vec![("x-session-patch", r#"{"k":"0123456789"}"#)],
                "max_bytes",
            ),
            (vec![("x-session", r#"{"n":1e999}"#)], "not valid JSON"),
        ];
        for (headers, expect) in cases {
            let err = raw(&headers).parse(&names(), 12).unwrap_err();
            assert!(err.0.contains(expect), "{headers:?}: {}", err.0);
        }
    }

    #[test]
    fn depth_limit_counts_the_object_itself() {
        let deepest = "{\"a\":".repeat(MAX_DEPTH - 1) + "{}" + &"}".repeat(MAX_DEPTH - 1);
        let map = raw(&[("x-session", &deepest)])
            .parse(&names(), 1 << 20)
            .unwrap()
            .replace
            .unwrap();
        assert_eq!(object_depth(&map), MAX_DEPTH);
        let too_deep = format!("{{\"b\":{deepest}}}");
        let err = raw(&[("x-session-patch", &too_deep)])
            .parse(&names(), 1 << 20)
            .unwrap_err();
        assert!(err.0.contains("nested 65 levels"), "{}", err.0);
        let arrays = format!(
            "{{\"a\":{}1{}}}",
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert!(raw(&[("x-session", &arrays)])
            .parse(&names(), 1 << 20)
            .is_err());
    }

    #[test]
    fn integers_must_fit_in_64_bits_and_surrogates_must_pair() {
        for ok in [
            r#"{"a":9223372036854775807,"b":-9223372036854775808,"c":18446744073709551615}"#,
            r#"{"f":1.5e300,"g":-0.0,"s":"12345678901234567890123","t":"\\\"99999999999999999999"}"#,
            r#"{"emoji":"\ud83d\ude00"}"#,
        ] {
            raw(&[("x-session", ok)])
                .parse(&names(), 1 << 20)
                .unwrap_or_else(|e| panic!("{ok}: {}", e.0));
        }
        // Doubles are read exactly: the nearest double to the text, which
        // for the shortest form of a double is that double (found by the
        // property tests; serde_json's default parser was one ULP off).
        let d = raw(&[(
            "x-session",
            r#"{"a":8.461137949850885e54,"b":1.4000290037766217e150}"#,
        )])
        .parse(&names(), 1 << 20)
        .unwrap();
        let data = d.replace.unwrap();
        assert_eq!(data["a"].as_f64(), Some(8.461137949850885e54));
        // serde_json's private RawValue key is plain data (found by fuzzing).
        let d = raw(&[(
            "x-session-patch",
            r#"{"x":{"$serde_json::private::RawValue":"[1]"},"y":{"b":1,"$serde_json::private::RawValue":{}}}"#,
        )])
        .parse(&names(), 1 << 20)
        .unwrap();
        let patch = d.patch.unwrap();
        assert_eq!(patch["x"]["$serde_json::private::RawValue"], "[1]");
        assert!(patch["y"]["$serde_json::private::RawValue"].is_object());
        assert_eq!(data["b"].as_f64(), Some(1.4000290037766217e150));
        for (bad, why) in [
            (r#"{"a":18446744073709551616}"#, "64-bit"),
            (r#"{"a":[1,-9223372036854775809]}"#, "64-bit"),
            (r#"{"lone":"\ud83d"}"#, "not valid JSON"),
            (r#"{"lone":"\ude00x"}"#, "not valid JSON"),
        ] {
            let err = raw(&[("x-session-patch", bad)])
                .parse(&names(), 1 << 20)
                .unwrap_err();
            assert!(err.0.contains(why), "{bad}: {}", err.0);
        }
    }
}
