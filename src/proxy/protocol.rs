//! The header protocol between gateway and upstream: which headers belong
//! to it (and are stripped), and parsing the upstream's session directives
//! (`X-Session`, `X-Session-Patch`, `X-Session-Action`) into [`Directives`].
//! Pure functions over header names and values; no I/O.

use crate::config::HeaderNames;
use serde_json::{Map, Value};

/// Does a header name belong to the protocol? Compared case-insensitively
/// with `_` read as `-`, so `X_Session` counts too (some servers map it to
/// the same variable as `X-Session`).
pub fn is_protocol_header(name: &str, strip_prefix: &str) -> bool {
    let name = name.as_bytes();
    let prefix = strip_prefix.as_bytes();
    name.len() >= prefix.len()
        && name[..prefix.len()].iter().zip(prefix).all(|(&a, &b)| {
            let a = if a == b'_' {
                b'-'
            } else {
                a.to_ascii_lowercase()
            };
            a == b
        })
}

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
        if let Some(raw) = self.data.first() {
            if raw.len() > max_bytes {
                return Err(ProtocolError(format!(
                    "{} is {} bytes, more than session.max_bytes ({max_bytes})",
                    names.data,
                    raw.len()
                )));
            }
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
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ProtocolError(format!("{header} is not a JSON object"))),
        Err(e) => Err(ProtocolError(format!("{header} is not valid JSON: {e}"))),
    }
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
        ];
        for (headers, expect) in cases {
            let err = raw(&headers).parse(&names(), 12).unwrap_err();
            assert!(err.0.contains(expect), "{headers:?}: {}", err.0);
        }
    }
}
