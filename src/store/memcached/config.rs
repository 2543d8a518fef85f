//! The keys of `store.type: memcached`, validated at start: `servers` (a
//! `host:port` or a list of them), and the store keys the session settings
//! imply (memcached keys are at most 250 bytes, without spaces or control
//! characters).

use crate::store::StoreContext;
use crate::yaml::{deserialize_at, ConfigError};
use serde::Deserialize;
use serde_yaml::Value;
use std::time::Duration;

/// Memcached's longest key.
pub const MAX_KEY_LEN: usize = 250;

/// The Memcached-specific keys of `store:`, checked.
#[derive(Clone, Debug)]
pub struct MemcachedConfig {
    /// The addresses as written: they are also the routing identities, so
    /// every gateway must list the same strings.
    pub servers: Vec<String>,
    /// The YAML key of each server, for messages (`store.servers[1]`).
    pub keys: Vec<String>,
    /// `store.timeout`: bounds each connect and each exchange.
    pub timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// A string or a list of strings; read as a plain value so errors can
    /// name the list item.
    servers: Value,
}

impl MemcachedConfig {
    pub fn parse(keys: Value, ctx: &StoreContext) -> Result<MemcachedConfig, ConfigError> {
        let raw: RawConfig = deserialize_at(keys, "store")?;
        let listed: Vec<(String, Value)> = match raw.servers {
            Value::Sequence(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("store.servers[{i}]"), v))
                .collect(),
            one @ Value::String(_) => vec![("store.servers".to_string(), one)],
            _ => {
                return Err(ConfigError::new(
                    "store.servers",
                    "expected a host:port string or a list of them (e.g. [127.0.0.1:11211])",
                ))
            }
        };
        if listed.is_empty() {
            return Err(ConfigError::new(
                "store.servers",
                "at least one server is required (e.g. [127.0.0.1:11211])",
            ));
        }
        let mut servers: Vec<String> = Vec::with_capacity(listed.len());
        let mut keys = Vec::with_capacity(listed.len());
        for (key, value) in listed {
            let Value::String(addr) = value else {
                return Err(ConfigError::new(key, "expected a host:port string"));
            };
            check_addr(&addr).map_err(|m| ConfigError::new(&key, m))?;
            if let Some(i) = servers.iter().position(|s| *s == addr) {
                return Err(ConfigError::new(
                    key,
                    format!("`{addr}` is listed twice (also {})", keys[i]),
                ));
            }
            servers.push(addr);
            keys.push(key);
        }
        check_key_prefix(ctx)?;
        check_value_size(ctx)?;
        Ok(MemcachedConfig {
            servers,
            keys,
            timeout: ctx.timeout,
        })
    }
}

/// `host:port` with a port in 1..=65535: an IPv4 address, `[IPv6]`, or a
/// DNS name (resolved when the gateway first uses the server).
fn check_addr(addr: &str) -> Result<(), String> {
    let expected = || format!("`{addr}` is not host:port (e.g. 127.0.0.1:11211 or cache1:11211)");
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return if addr.ends_with(":0") {
            Err(format!("`{addr}`: port 0 is not a server port"))
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(expected());
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !host.starts_with(['-', '.']);
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(expected())
    }
}

/// The largest session must fit memcached's default item size (1 MiB),
/// with the item header and the key; otherwise a write of it would be
/// refused (and memcached would drop the session it replaces).
fn check_value_size(ctx: &StoreContext) -> Result<(), ConfigError> {
    let fits = super::item::max_value_len(ctx.max_key_len);
    let needs = ctx.max_value_len + super::item::HEADER;
    if needs > fits {
        return Err(ConfigError::new(
            "session.max_bytes",
            format!(
                "sessions of up to this size take {needs} bytes in a memcached item; \
                 the default item size limit (-I 1m) leaves {fits}: lower session.max_bytes"
            ),
        ));
    }
    Ok(())
}

/// Store keys are `session.key_prefix` + the id; memcached refuses longer
/// than 250 bytes, and a space or control byte would split the command
/// line (the crate would base64 such keys, which then no longer fit).
fn check_key_prefix(ctx: &StoreContext) -> Result<(), ConfigError> {
    if let Some(b) = ctx.key_prefix.bytes().find(|&b| b <= b' ' || b == 0x7f) {
        return Err(ConfigError::new(
            "session.key_prefix",
            format!(
                "memcached keys cannot contain spaces or control characters (found byte 0x{b:02x})"
            ),
        ));
    }
    if ctx.max_key_len > MAX_KEY_LEN {
        return Err(ConfigError::new(
            "session.key_prefix",
            format!(
                "store keys would be up to {} bytes (the prefix's {} plus the session id); \
                 memcached keys are at most {MAX_KEY_LEN}",
                ctx.max_key_len,
                ctx.key_prefix.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(prefix: &str) -> StoreContext {
        StoreContext {
            timeout: Duration::from_millis(500),
            retries: 2,
            cleanup_interval: Duration::from_secs(300),
            key_prefix: prefix.into(),
            max_key_len: prefix.len() + 43,
            max_value_len: 8193,
        }
    }

    fn parse(yaml: &str) -> Result<MemcachedConfig, ConfigError> {
        MemcachedConfig::parse(serde_yaml::from_str(yaml).unwrap(), &ctx("session:"))
    }

    fn err(yaml: &str) -> ConfigError {
        parse(yaml).unwrap_err()
    }

    #[test]
    fn a_list_or_one_string() {
        let c =
            parse("{servers: [127.0.0.1:11211, \"[::1]:11212\", cache-2.internal:11211]}").unwrap();
        assert_eq!(
            c.servers,
            ["127.0.0.1:11211", "[::1]:11212", "cache-2.internal:11211"]
        );
        assert_eq!(c.keys[2], "store.servers[2]");
        let c = parse("{servers: localhost:11211}").unwrap();
        assert_eq!(c.servers, ["localhost:11211"]);
        assert_eq!(c.keys, ["store.servers"]);
    }

    #[test]
    fn bad_servers_name_their_key() {
        assert_eq!(err("{}").key, "store.servers");
        assert_eq!(err("{servers: []}").key, "store.servers");
        assert_eq!(err("{servers: 11211}").key, "store.servers");
        assert_eq!(err("{servers: {a: 1}}").key, "store.servers");
        assert_eq!(err("{servers: localhost}").key, "store.servers");
        for bad in [
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            ":11211",
            "memcached://127.0.0.1:11211",
            "::1:11211",
            "a b:11211",
            "-x:11211",
        ] {
            let e = err(&format!("{{servers: [127.0.0.1:11211, \"{bad}\"]}}"));
            assert_eq!(e.key, "store.servers[1]", "{bad}: {e}");
            assert!(
                e.message.contains("host:port") || e.message.contains("port 0"),
                "{e}"
            );
        }
        let e = err("{servers: [127.0.0.1:11211, 11212]}");
        assert_eq!(e.key, "store.servers[1]");
        let e = err("{servers: [a:1, b:2, a:1]}");
        assert_eq!(e.key, "store.servers[2]");
        assert!(e.message.contains("store.servers[0]"), "{e}");
        let e = err("{servers: [a:1], pool: 3}");
        assert_eq!(e.key, "store.pool");
        assert!(e.message.contains("unknown key"), "{e}");
    }

    #[test]
    fn key_prefix_must_make_memcached_keys() {
        let yaml = || serde_yaml::from_str("{servers: [a:1]}").unwrap();
        let long = "p".repeat(208);
        let e = MemcachedConfig::parse(yaml(), &ctx(&long)).unwrap_err();
        assert_eq!(e.key, "session.key_prefix");
        assert!(e.message.contains("251 bytes"), "{e}");
        assert!(MemcachedConfig::parse(yaml(), &ctx(&"p".repeat(207))).is_ok());
        for bad in ["my app:", "tab\t", "nl\n", "del\x7f"] {
            let e = MemcachedConfig::parse(yaml(), &ctx(bad)).unwrap_err();
            assert_eq!(e.key, "session.key_prefix", "{bad:?}");
        }
        assert!(MemcachedConfig::parse(yaml(), &ctx("café:")).is_ok());
    }

    #[test]
    fn sessions_must_fit_an_item() {
        let mut c = ctx("session:");
        c.max_value_len = 1 << 20;
        let e = check_value_size(&c).unwrap_err();
        assert_eq!(e.key, "session.max_bytes");
        c.max_value_len = 1_000_000;
        check_value_size(&c).unwrap();
    }
}
