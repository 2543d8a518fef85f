//! Configuration: the YAML schema users write ([`schema`]), its validation
//! (every error names the YAML key it is about), and the internal model
//! ([`Config`]) the rest of the gateway uses. Renaming a user-facing key only
//! touches this module.

mod endpoints;
mod env;
mod schema;

pub use crate::yaml::{deserialize_at, duration, ConfigError};

use crate::store::StoreConfig;
use pingora::tls::sign::CertifiedKey;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The configuration shipped in `conf/gateway.yaml`, used when no `-c` is
/// given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../conf/gateway.yaml");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStoreError {
    FailClosed,
    FailOpen,
}

#[derive(Clone, Debug)]
pub struct CookieSettings {
    pub name: String,
    pub domain: Option<String>,
    pub path: String,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
}

/// The protocol header names, all derived from `session.header`.
#[derive(Clone, Debug)]
pub struct HeaderNames {
    /// `X-Session`: data, both directions.
    pub data: String,
    /// `X-Session-Patch`: merge patch from the upstream.
    pub patch: String,
    /// `X-Session-Action`: actions from the upstream.
    pub action: String,
    /// `X-Session-Error`: set on requests when the store failed (fail_open).
    pub error: String,
    /// Lower-cased base name with `_` read as `-`; any header whose
    /// normalized name starts with it is stripped.
    pub strip_prefix: String,
}

impl HeaderNames {
    pub fn new(base: &str) -> Self {
        HeaderNames {
            data: base.to_string(),
            patch: format!("{base}-Patch"),
            action: format!("{base}-Action"),
            error: format!("{base}-Error"),
            strip_prefix: base.to_ascii_lowercase().replace('_', "-"),
        }
    }
}

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

#[derive(Clone, Debug)]
pub struct SessionSettings {
    pub headers: HeaderNames,
    pub permanent: bool,
    pub lifetime: Duration,
    pub refresh_each_request: bool,
    pub expiry_update_interval: Duration,
    pub key_prefix: String,
    pub id_bytes: usize,
    pub max_bytes: usize,
    pub on_store_error: OnStoreError,
    /// `session.exclude` as written (each starts with `/`); the proxy
    /// normalizes them for matching.
    pub exclude: Vec<String>,
    /// Store keys hashed, values encrypted under the session id.
    pub seal: bool,
    /// `session.seal_cache`: how many opened sealed sessions a gateway
    /// process keeps (0: none, every sealed read decrypts).
    pub seal_cache: usize,
}

#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// The `store:` section as written (after `${VAR}` substitution), to
    /// tell whether a reload changed it.
    pub source: serde_yaml::Value,
    pub backend: StoreConfig,
    /// The whole budget of one store operation, retries included.
    pub timeout: Duration,
    /// Extra attempts for idempotent operations after a failure.
    pub retries: u32,
    /// Background purge of expired entries; zero disables.
    pub cleanup_interval: Duration,
}

#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub threads: usize,
    pub grace_period: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_read_timeout: Option<Duration>,
    /// Peers whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `server.upstream_ca_file`: the CAs `https://` upstreams are verified
    /// against instead of the system roots.
    pub upstream_ca: Option<UpstreamCa>,
    /// `server.upstream_health_check`; `None`: off.
    pub upstream_health_check: Option<HealthCheckSettings>,
}

#[derive(Clone, Debug)]
pub struct UpstreamCa {
    pub file: PathBuf,
    /// The certificates of the file, DER, checked to parse.
    pub certs: Arc<Vec<Vec<u8>>>,
}

/// Active health checks of the upstreams (only run with two or more).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckSettings {
    pub interval: Duration,
    /// `None`: a TCP connect; otherwise `GET path` expecting a 2xx.
    pub path: Option<String>,
    /// Budget of one check (connect, TLS, response head).
    pub timeout: Duration,
}

/// One proxy listener: plain HTTP, or TLS (HTTP/2 and HTTP/1.1 by ALPN).
#[derive(Clone, Debug)]
pub struct Listener {
    /// `host:port` as written.
    pub addr: String,
    pub tls: Option<ListenerTls>,
}

#[derive(Clone, Debug)]
pub struct ListenerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The files' content, read and checked when the config was loaded.
    pub key: Arc<CertifiedKey>,
}

/// Listeners compare by address and file paths, not by certificate
/// content: a new certificate at the same path is a reload, a new path or
/// address needs a restart.
impl PartialEq for Listener {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
            && match (&self.tls, &other.tls) {
                (None, None) => true,
                (Some(a), Some(b)) => a.cert_file == b.cert_file && a.key_file == b.key_file,
                _ => false,
            }
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.addr)
    }
}

/// One upstream (the app): where to connect, and whether with TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamServer {
    pub addr: SocketAddr,
    /// `https://`: TLS, verified for `host`, which is also the SNI.
    pub tls: bool,
    /// The host as written (a name or an IP, without brackets).
    pub host: String,
    pub port: u16,
}

impl fmt::Display for UpstreamServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// The validated configuration the gateway runs on.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<Listener>,
    pub upstreams: Vec<UpstreamServer>,
    /// Secret keys, first signs, all verify.
    pub keys: Vec<Vec<u8>>,
    /// Where `secret_key_file` came from, for `--test` output.
    pub secret_key_file: Option<PathBuf>,
    pub cookie: CookieSettings,
    pub session: SessionSettings,
    pub store: StoreSettings,
    pub server: ServerSettings,
    pub log_level: String,
    pub log_format: LogFormat,
    /// One `access` log line per request.
    pub access_log: bool,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`); `None`: off.
    pub admin: Option<AdminSettings>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// JSON lines, for log shippers.
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminSettings {
    pub listen: String,
}

pub const MIN_SECRET_BYTES: usize = 32;

impl Config {
    /// Read, parse and validate a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                "",
                format!("cannot read config file {}: {e}", path.display()),
            )
        })?;
        Self::from_yaml(&text)
    }

    /// Parse and validate YAML text. Relative paths in it are relative to
    /// the working directory.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let mut value: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigError::new("", format!("invalid YAML: {e}")))?;
        env::substitute(&mut value, &mut String::new())?;
        let file: schema::File = deserialize_at(value, "")?;
        file.validate()
    }
}

/// Resolve one `host:port` (`key` names it in errors).
pub(crate) fn resolve_addr(key: &str, a: &str) -> Result<SocketAddr, ConfigError> {
    a.to_socket_addrs()
        .map_err(|e| ConfigError::new(key, format!("`{a}` is not a host:port address ({e})")))?
        .next()
        .ok_or_else(|| ConfigError::new(key, format!("`{a}` resolves to no address")))
}

impl Config {
    /// The keys that only take effect at start, which differ between `self`
    /// (what runs) and `new` (a reloaded file).
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.listen != new.listen {
            changed.push("listen");
        }
        if self.admin != new.admin {
            changed.push("admin");
        }
        if self.store.source != new.store.source {
            changed.push("store");
        }
        if self.server.threads != new.server.threads {
            changed.push("server.threads");
        }
        if self.server.grace_period != new.server.grace_period {
            changed.push("server.grace_period");
        }
        if self.log_format != new.log_format {
            changed.push("log_format");
        }
        changed
    }
}
