//! `listen` and `upstream`: the listener entries (a plain `host:port`, or a
//! mapping with `addr` and `tls`), the upstream URLs (`host:port`,
//! `http://host:port`, `https://host:port`), and the TLS files they name,
//! read and checked here so that every problem is a config error naming
//! its key (`listen[1].tls.key_file: ...`), never a panic at start.

use super::{resolve_addr, ConfigError, Listener, ListenerTls, UpstreamServer};
use crate::tls::{self, KeyPairError};
use crate::yaml::deserialize_at;
use serde::Deserialize;
use serde_yaml::Value;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenTable {
    addr: String,
    #[serde(default)]
    tls: Option<TlsFiles>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// The entries of a key that takes one value or a list, each with the key
/// to name in errors: `key` for a single value, `key[i]` in a list.
fn entries(key: &str, value: Value) -> Vec<(String, Value)> {
    match value {
        Value::Sequence(list) => list
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("{key}[{i}]"), v))
            .collect(),
        other => vec![(key.to_string(), other)],
    }
}

/// `listen`: at least one entry; each resolves, and TLS files load.
pub fn listeners(value: Value) -> Result<Vec<Listener>, ConfigError> {
    let mut out = Vec::new();
    for (key, entry) in entries("listen", value) {
        let (listener, addr_key) =
            match entry {
                Value::String(addr) => (Listener { addr, tls: None }, key),
                Value::Mapping(_) => {
                    let table: ListenTable = deserialize_at(entry, &key)?;
                    let tls = match table.tls {
                        None => None,
                        Some(files) => Some(load_tls(&format!("{key}.tls"), files)?),
                    };
                    let listener = Listener {
                        addr: table.addr,
                        tls,
                    };
                    (listener, format!("{key}.addr"))
                }
                _ => return Err(ConfigError::new(
                    key,
                    "expected host:port or {addr: host:port, tls: {cert_file: ..., key_file: ...}}",
                )),
            };
        resolve_addr(&addr_key, &listener.addr)?;
        out.push(listener);
    }
    if out.is_empty() {
        return Err(ConfigError::new(
            "listen",
            "at least one address is required",
        ));
    }
    Ok(out)
}

fn load_tls(key: &str, files: TlsFiles) -> Result<ListenerTls, ConfigError> {
    let certified =
        tls::load_certified_key(&files.cert_file, &files.key_file).map_err(|e| match e {
            KeyPairError::Cert(m) => ConfigError::new(format!("{key}.cert_file"), m),
            KeyPairError::Key(m) => ConfigError::new(format!("{key}.key_file"), m),
        })?;
    Ok(ListenerTls {
        cert_file: files.cert_file,
        key_file: files.key_file,
        key: Arc::new(certified),
    })
}

/// `upstream`: at least one URL, no address twice (health is tracked per
/// address).
pub fn upstreams(value: Value) -> Result<Vec<UpstreamServer>, ConfigError> {
    let mut out: Vec<UpstreamServer> = Vec::new();
    for (key, entry) in entries("upstream", value) {
        let Value::String(text) = entry else {
            return Err(ConfigError::new(
                key,
                "expected host:port, http://host:port or https://host:port",
            ));
        };
        let upstream = parse_upstream(&key, &text)?;
        if let Some(i) = out.iter().position(|u| u.addr == upstream.addr) {
            return Err(ConfigError::new(
                key,
                format!(
                    "`{text}` is the same address as upstream[{i}] ({}); list each upstream once",
                    upstream.addr
                ),
            ));
        }
        out.push(upstream);
    }
    if out.is_empty() {
        return Err(ConfigError::new(
            "upstream",
            "at least one address is required",
        ));
    }
    Ok(out)
}

/// `host:port`, `http://host[:port]` or `https://host[:port]` (IPv6 in
/// brackets); nothing after the authority but an optional `/`.
fn parse_upstream(key: &str, text: &str) -> Result<UpstreamServer, ConfigError> {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
        None => (None, text),
    };
    let tls = match scheme.as_deref() {
        None | Some("http") => false,
        Some("https") => true,
        Some(other) => {
            return Err(ConfigError::new(
                key,
                format!("unsupported scheme `{other}` in `{text}`: expected http:// or https://"),
            ))
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) || authority.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("`{text}`: expected [http[s]://]host:port, without path, query or user info"),
        ));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or_else(|| {
                ConfigError::new(key, format!("`{text}`: unclosed `[` in the address"))
            })?;
            (host, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let port = match (port, scheme.is_some()) {
        (Some(p), _) => p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| {
            ConfigError::new(key, format!("`{text}`: `{p}` is not a port number"))
        })?,
        (None, true) => {
            if tls {
                443
            } else {
                80
            }
        }
        (None, false) => {
            return Err(ConfigError::new(
                key,
                format!(
                    "`{text}` is not a host:port address (or give a scheme: http://, https://)"
                ),
            ))
        }
    };
    if host.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("`{text}`: the host is missing"),
        ));
    }
    let addr = if host.contains(':') {
        resolve_addr(key, &format!("[{host}]:{port}"))?
    } else {
        resolve_addr(key, &format!("{host}:{port}"))?
    };
    Ok(UpstreamServer {
        addr,
        tls,
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<UpstreamServer, String> {
        parse_upstream("upstream", text).map_err(|e| e.to_string())
    }

    #[test]
    fn upstream_urls() {
        let u = parse("127.0.0.1:8000").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 8000));
        let u = parse("http://localhost:8000/").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "localhost", 8000));
        assert_eq!(u.to_string(), "http://localhost:8000");
        let u = parse("HTTPS://localhost").unwrap();
        assert_eq!((u.tls, u.port), (true, 443));
        let u = parse("https://[::1]:8443").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "::1", 8443));
        assert_eq!(u.to_string(), "https://[::1]:8443");
        assert_eq!(u.addr, "[::1]:8443".parse().unwrap());
    }

    #[test]
    fn bad_upstream_urls_name_the_key() {
        for (text, needle) in [
            ("ftp://h:1", "unsupported scheme `ftp`"),
            ("https://h:1/app", "without path"),
            ("https://u:p@h:1", "without path"),
            ("http://h:port", "not a port number"),
            ("http://h:0", "not a port number"),
            ("localhost", "not a host:port"),
            ("https://:443", "host is missing"),
            ("https://[::1:443", "unclosed"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.starts_with("upstream: "), "{text}: {err}");
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn listen_entries() {
        let list: Value = serde_yaml::from_str("[127.0.0.1:1, {addr: 127.0.0.1:2}]").unwrap();
        let l = listeners(list).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l.iter().all(|l| l.tls.is_none()));
        let bad: Value =
            serde_yaml::from_str("[127.0.0.1:1, {addr: 127.0.0.1:2, tls: {cert: x}}]").unwrap();
        let err = listeners(bad).unwrap_err();
        assert_eq!(err.key, "listen[1].tls.cert", "{err}");
        let missing: Value = serde_yaml::from_str(
            "{addr: 127.0.0.1:2, tls: {cert_file: /nonexistent.pem, key_file: /nonexistent.key}}",
        )
        .unwrap();
        let err = listeners(missing).unwrap_err();
        assert_eq!(err.key, "listen.tls.cert_file", "{err}");
        let dup: Value = serde_yaml::from_str("[127.0.0.1:1, 'http://127.0.0.1:1']").unwrap();
        let err = upstreams(dup).unwrap_err();
        assert_eq!(err.key, "upstream[1]", "{err}");
    }
}
