//! What the YAML config and every store backend share, kept below both so
//! neither imports the other: [`ConfigError`] (every message names the
//! YAML key it is about), [`deserialize_at`] (serde with that key path),
//! [`OneOrMany`] and [`duration`] parsing.

pub mod duration;

use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_yaml::Value;
use std::fmt;

/// A configuration problem, always prefixed with the YAML key it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Deserialize `value` as `T`, reporting errors with the YAML key path,
/// prefixed by `prefix` (the key `value` sits under).
pub fn deserialize_at<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let mut key = prefix.to_string();
        let path = err.path().to_string();
        if path != "." {
            if !key.is_empty() && !path.starts_with('[') {
                key.push('.');
            }
            key.push_str(&path);
        }
        let msg = err.into_inner().to_string();
        // Point at the offending key itself for unknown and missing keys.
        for (marker, text) in [
            ("unknown field `", "unknown key"),
            ("missing field `", "required key is missing"),
        ] {
            if let Some(rest) = msg.strip_prefix(marker) {
                if let Some((field, tail)) = rest.split_once('`') {
                    let last = key.rsplit(['.', '[']).next().unwrap_or("");
                    if last != field {
                        if !key.is_empty() {
                            key.push('.');
                        }
                        key.push_str(field);
                    }
                    let tail = tail.trim_start_matches(',').trim();
                    let tail = tail.replace("expected one of", "known keys:");
                    let message = if tail.is_empty() || marker.starts_with("missing") {
                        text.to_string()
                    } else {
                        format!("{text} ({tail})")
                    };
                    return ConfigError::new(key, message);
                }
            }
        }
        ConfigError::new(key, msg)
    })
}

/// A string or a list of strings.
#[derive(Debug, Default)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a host:port string or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}
