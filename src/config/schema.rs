//! The YAML schema exactly as users write it. Every struct rejects unknown
//! keys; [`File::validate`] turns it into the internal [`Config`], checking
//! what serde cannot and naming the key of every problem.

use super::{
    duration, endpoints, resolve_addr, AdminSettings, Config, ConfigError, CookieSettings,
    HeaderNames, HealthCheckSettings, Listener, LogFormat, OnStoreError, SameSite, ServerSettings,
    SessionSettings, StoreSettings, UpstreamCa, MIN_SECRET_BYTES,
};
use crate::store::StoreContext;
use crate::yaml::deserialize_at;
use serde::Deserialize;
use serde_yaml::Value;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// One entry or a list; see [`endpoints`].
    listen: Value,
    upstream: Value,
    #[serde(default)]
    secret_keys: Vec<String>,
    #[serde(default)]
    secret_key_file: Option<PathBuf>,
    #[serde(default)]
    cookie: Cookie,
    #[serde(default)]
    session: Session,
    store: Value,
    #[serde(default)]
    server: Server,
    #[serde(default = "default_log_level")]
    log_level: String,
    #[serde(default = "default_true")]
    access_log: bool,
    #[serde(default = "default_log_format")]
    log_format: String,
    #[serde(default)]
    admin: Option<Admin>,
}

fn default_true() -> bool {
    true
}

fn default_log_format() -> String {
    "text".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Admin {
    listen: String,
}

fn default_log_level() -> String {
    "info".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Cookie {
    name: String,
    domain: Option<String>,
    path: String,
    secure: bool,
    http_only: bool,
    same_site: String,
}

impl Default for Cookie {
    fn default() -> Self {
        Cookie {
            name: "session".into(),
            domain: None,
            path: "/".into(),
            secure: false,
            http_only: true,
            same_site: "lax".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Session {
    header: String,
    permanent: bool,
    #[serde(deserialize_with = "duration::deserialize")]
    lifetime: Duration,
    refresh_each_request: bool,
    #[serde(deserialize_with = "duration::deserialize_opt")]
    expiry_update_interval: Option<Duration>,
    key_prefix: String,
    id_bytes: usize,
    max_bytes: usize,
    on_store_error: String,
    exclude: Vec<String>,
    seal: bool,
    seal_cache: usize,
}

/// `session.seal_cache` when not given: off, so no plaintext outlives its
/// request. Under load (1 024 live 1 KiB sessions, two gateways taking
/// turns in `cargo bench --bench load -- --alternate`) the cache gains
/// little: sealed Redis reads kept 95-96% of unsealed throughput with it
/// and 94-95% without, memory 96-98% with and 92-94% without (a hit reads
/// cold cached copies where opening writes fresh ones). See the README's
/// Sealed sessions.
pub const SEAL_CACHE_DEFAULT: usize = 0;
/// Largest `session.seal_cache`: its index is allocated up front (tens of
/// bytes an entry), and a million 1 KiB sessions are already 2 GiB.
const SEAL_CACHE_MAX: usize = 1_000_000;

impl Default for Session {
    fn default() -> Self {
        Session {
            header: "X-Session".into(),
            permanent: true,
            lifetime: Duration::from_secs(31 * 86_400),
            refresh_each_request: true,
            expiry_update_interval: None,
            key_prefix: "session:".into(),
            id_bytes: 32,
            max_bytes: 8192,
            on_store_error: "fail_closed".into(),
            exclude: Vec::new(),
            seal: false,
            seal_cache: SEAL_CACHE_DEFAULT,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Server {
    threads: Option<usize>,
    #[serde(deserialize_with = "duration::deserialize")]
    grace_period: Duration,
    #[serde(deserialize_with = "duration::deserialize")]
    upstream_connect_timeout: Duration,
    #[serde(deserialize_with = "duration::deserialize_opt")]
    upstream_read_timeout: Option<Duration>,
    trusted_proxies: Vec<String>,
    upstream_ca_file: Option<PathBuf>,
    /// On by default; `null` turns it off.
    upstream_health_check: Option<HealthCheck>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            threads: None,
            grace_period: Duration::from_secs(30),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_read_timeout: None,
            trusted_proxies: Vec::new(),
            upstream_ca_file: None,
            upstream_health_check: Some(HealthCheck::default()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct HealthCheck {
    #[serde(deserialize_with = "duration::deserialize")]
    interval: Duration,
    path: Option<String>,
    #[serde(deserialize_with = "duration::deserialize")]
    timeout: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(5),
            path: None,
            timeout: Duration::from_secs(1),
        }
    }
}

impl HealthCheck {
    fn validate(self) -> Result<HealthCheckSettings, ConfigError> {
        let key = "server.upstream_health_check";
        if self.interval.is_zero() {
            return Err(ConfigError::new(
                format!("{key}.interval"),
                "must be greater than zero (set upstream_health_check: null to turn checks off)",
            ));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new(
                format!("{key}.timeout"),
                "must be greater than zero",
            ));
        }
        if let Some(path) = &self.path {
            if !path.starts_with('/') || http::uri::PathAndQuery::try_from(path.as_str()).is_err() {
                return Err(ConfigError::new(
                    format!("{key}.path"),
                    format!("`{path}` must be a request path starting with `/` (or null for a TCP check)"),
                ));
            }
        }
        Ok(HealthCheckSettings {
            interval: self.interval,
            path: self.path,
            timeout: self.timeout,
        })
    }
}

/// Keys every store type accepts besides its own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StoreCommon {
    #[serde(deserialize_with = "duration::deserialize")]
    timeout: Duration,
    retries: u32,
    #[serde(deserialize_with = "duration::deserialize")]
    cleanup_interval: Duration,
}

impl Default for StoreCommon {
    fn default() -> Self {
        StoreCommon {
            timeout: Duration::from_millis(500),
            retries: 2,
            cleanup_interval: Duration::from_secs(300),
        }
    }
}

const COMMON_STORE_KEYS: [&str; 3] = ["timeout", "retries", "cleanup_interval"];

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn parse_store(value: Value, session: &SessionSettings) -> Result<StoreSettings, ConfigError> {
    let source = value.clone();
    let Value::Mapping(mut map) = value else {
        return Err(ConfigError::new(
            "store",
            "expected a mapping with at least `type`",
        ));
    };
    let kind = match map.remove("type") {
        Some(Value::String(s)) => s,
        // YAML reads a bare `type: null` as the null value, not the string.
        Some(Value::Null) => "null".to_string(),
        Some(_) => return Err(ConfigError::new("store.type", "expected a string")),
        None => return Err(ConfigError::new("store.type", "required key is missing")),
    };
    let mut common = serde_yaml::Mapping::new();
    for k in COMMON_STORE_KEYS {
        if let Some(v) = map.remove(k) {
            common.insert(Value::String(k.into()), v);
        }
    }
    let common: StoreCommon = deserialize_at(Value::Mapping(common), "store")?;
    if common.timeout.is_zero() {
        return Err(ConfigError::new(
            "store.timeout",
            "must be greater than zero",
        ));
    }
    let ctx = StoreContext {
        timeout: common.timeout,
        retries: common.retries,
        cleanup_interval: common.cleanup_interval,
        key_prefix: session.key_prefix.clone(),
        // A sealed key is the prefix and a base64url SHA-256 (43 chars).
        max_key_len: session.key_prefix.len()
            + (session.id_bytes * 4)
                .div_ceil(3)
                .max(if session.seal { 43 } else { 0 }),
        // Flag byte; sealed: magic, nonce and tag.
        max_value_len: session.max_bytes
            + 1
            + if session.seal {
                crate::session::seal::OVERHEAD
            } else {
                0
            },
    };
    let backend = crate::store::parse(&kind, Value::Mapping(map), &ctx)?;
    Ok(StoreSettings {
        source,
        backend,
        timeout: common.timeout,
        retries: common.retries,
        cleanup_interval: common.cleanup_interval,
    })
}

fn load_secret_file(path: &PathBuf) -> Result<Vec<u8>, ConfigError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let key = "secret_key_file";
    match std::fs::read_to_string(path) {
        Ok(text) => {
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    eprintln!(
                        "warning: secret_key_file {} is readable by other users; chmod 600 it",
                        path.display()
                    );
                }
            }
            Ok(text.trim().as_bytes().to_vec())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // First run: generate a random key nobody else has.
            let secret = crate::session::SessionId::generate(48);
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    ConfigError::new(
                        key,
                        format!("cannot create directory {}: {e}", parent.display()),
                    )
                })?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    ConfigError::new(key, format!("cannot create {}: {e}", path.display()))
                })?;
            writeln!(f, "{}", secret.as_str()).map_err(|e| {
                ConfigError::new(key, format!("cannot write {}: {e}", path.display()))
            })?;
            eprintln!(
                "generated a new secret key in {} (mode 0600)",
                path.display()
            );
            Ok(secret.as_str().as_bytes().to_vec())
        }
        Err(e) => Err(ConfigError::new(
            key,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

impl File {
    /// Check everything serde cannot and build the internal model. Each
    /// step names the key of the first problem it finds.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen = endpoints::listeners(self.listen)?;
        let upstreams = endpoints::upstreams(self.upstream)?;
        let keys = secret_keys(&self.secret_keys, self.secret_key_file.as_ref())?;
        let cookie = self.cookie.validate()?;
        let session = self.session.validate()?;
        let server = self.server.validate()?;
        let store = parse_store(self.store, &session)?;
        let log_level = validate_log_level(self.log_level)?;
        let log_format = match self.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::new(
                    "log_format",
                    format!("`{other}`: expected text | json"),
                ))
            }
        };
        let admin = self.admin.map(|a| a.validate(&listen)).transpose()?;
        Ok(Config {
            listen,
            upstreams,
            keys,
            secret_key_file: self.secret_key_file,
            cookie,
            session,
            store,
            server,
            log_level,
            log_format,
            access_log: self.access_log,
            admin,
        })
    }
}

impl Admin {
    fn validate(self, proxy_listen: &[Listener]) -> Result<AdminSettings, ConfigError> {
        let addr = resolve_addr("admin.listen", &self.listen)?;
        let mut clash = false;
        for l in proxy_listen {
            // Already resolved once when `listen` was checked.
            let p = resolve_addr("listen", &l.addr)?;
            clash |= p.port() == addr.port()
                && (p.ip() == addr.ip() || p.ip().is_unspecified() || addr.ip().is_unspecified());
        }
        if clash {
            return Err(ConfigError::new(
                "admin.listen",
                format!(
                    "`{}` is also a proxy address; the admin endpoints need a listener of their own",
                    self.listen
                ),
            ));
        }
        Ok(AdminSettings {
            listen: self.listen,
        })
    }
}

/// `secret_keys` then the key of `secret_key_file`: the first signs.
fn secret_keys(
    secret_keys: &[String],
    secret_key_file: Option<&PathBuf>,
) -> Result<Vec<Vec<u8>>, ConfigError> {
    let mut keys = Vec::new();
    for (i, k) in secret_keys.iter().enumerate() {
        if k.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::new(
                format!("secret_keys[{i}]"),
                format!(
                    "secret is {} bytes; at least {MIN_SECRET_BYTES} are required (e.g. `openssl rand -base64 48`)",
                    k.len()
                ),
            ));
        }
        keys.push(k.as_bytes().to_vec());
    }
    if let Some(path) = secret_key_file {
        let k = load_secret_file(path)?;
        if k.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::new(
                "secret_key_file",
                format!(
                    "{} holds {} bytes; at least {MIN_SECRET_BYTES} are required",
                    path.display(),
                    k.len()
                ),
            ));
        }
        keys.push(k);
    }
    if keys.is_empty() {
        return Err(ConfigError::new(
            "secret_keys",
            "at least one secret key is required (or set secret_key_file)",
        ));
    }
    Ok(keys)
}

impl Cookie {
    fn validate(self) -> Result<CookieSettings, ConfigError> {
        if !is_token(&self.name) {
            return Err(ConfigError::new(
                "cookie.name",
                format!("`{}` is not a valid cookie name", self.name),
            ));
        }
        if !self.path.starts_with('/')
            || self.path.bytes().any(|b| b == b';' || b.is_ascii_control())
        {
            return Err(ConfigError::new(
                "cookie.path",
                "must start with `/` and contain no `;`",
            ));
        }
        if let Some(d) = &self.domain {
            if d.is_empty()
                || d.bytes().any(|b| {
                    b == b';' || b == b',' || b.is_ascii_whitespace() || b.is_ascii_control()
                })
            {
                return Err(ConfigError::new(
                    "cookie.domain",
                    format!("`{d}` is not a valid domain"),
                ));
            }
        }
        let same_site = match self.same_site.to_ascii_lowercase().as_str() {
            "lax" => SameSite::Lax,
            "strict" => SameSite::Strict,
            "none" => SameSite::None,
            other => {
                return Err(ConfigError::new(
                    "cookie.same_site",
                    format!("`{other}`: expected lax | strict | none"),
                ))
            }
        };
        if same_site == SameSite::None && !self.secure {
            return Err(ConfigError::new(
                "cookie.same_site",
                "`none` requires `cookie.secure: true` (browsers drop SameSite=None cookies without Secure)",
            ));
        }
        self.check_name_prefix()?;
        Ok(CookieSettings {
            name: self.name,
            domain: self.domain,
            path: self.path,
            secure: self.secure,
            http_only: self.http_only,
            same_site,
        })
    }
}

impl Cookie {
    /// Browsers silently drop `__Host-`/`__Secure-` cookies that break the
    /// prefix's rules (matched case-insensitively, as RFC 6265bis does), so
    /// sessions would never stick: refuse such a config.
    fn check_name_prefix(&self) -> Result<(), ConfigError> {
        let lower = self.name.to_ascii_lowercase();
        let host = lower.starts_with("__host-");
        if (host || lower.starts_with("__secure-")) && !self.secure {
            return Err(ConfigError::new(
                "cookie.secure",
                format!(
                    "cookie `{}` needs `secure: true`: browsers drop {} cookies without Secure",
                    self.name,
                    if host { "__Host-" } else { "__Secure-" }
                ),
            ));
        }
        if host && self.domain.is_some() {
            return Err(ConfigError::new(
                "cookie.domain",
                format!(
                    "cookie `{}` must not have a domain: browsers drop __Host- cookies with one",
                    self.name
                ),
            ));
        }
        if host && self.path != "/" {
            return Err(ConfigError::new(
                "cookie.path",
                format!(
                    "cookie `{}` needs `path: /`: browsers drop __Host- cookies with another path",
                    self.name
                ),
            ));
        }
        Ok(())
    }
}

/// Headers the gateway itself adds to requests; `session.header` strips
/// every header it is a prefix of, so it must not cover these.
const GATEWAY_HEADERS: [&str; 4] = [
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Request-Id",
];

fn check_protocol_header(header: &str) -> Result<(), ConfigError> {
    if !is_token(header) {
        return Err(ConfigError::new(
            "session.header",
            format!("`{header}` is not a valid header name"),
        ));
    }
    // Every header starting with it is stripped from requests and
    // responses: `Content` would take Content-Type and Content-Length.
    if header.len() < 3 || !header[..2].eq_ignore_ascii_case("x-") {
        return Err(ConfigError::new(
            "session.header",
            format!(
                "`{header}` must start with `X-` and name something after it (e.g. X-Session): every header it is a prefix of is stripped"
            ),
        ));
    }
    let prefix = HeaderNames::new(header).strip_prefix;
    if let Some(clash) = GATEWAY_HEADERS
        .iter()
        .find(|h| super::is_protocol_header(h, &prefix))
    {
        return Err(ConfigError::new(
            "session.header",
            format!(
                "`{header}` is a prefix of {clash}, which the gateway adds to every request; choose another name"
            ),
        ));
    }
    Ok(())
}

impl Session {
    fn validate(self) -> Result<SessionSettings, ConfigError> {
        check_protocol_header(&self.header)?;
        if self.lifetime < Duration::from_secs(1) {
            return Err(ConfigError::new("session.lifetime", "must be at least 1s"));
        }
        let expiry_update_interval = match self.expiry_update_interval {
            Some(i) if i >= self.lifetime => {
                return Err(ConfigError::new(
                    "session.expiry_update_interval",
                    "must be shorter than session.lifetime",
                ))
            }
            Some(i) => i,
            None => self.lifetime / 100,
        };
        if !(16..=64).contains(&self.id_bytes) {
            return Err(ConfigError::new(
                "session.id_bytes",
                format!("{} is out of range 16..=64", self.id_bytes),
            ));
        }
        if self.max_bytes == 0 || self.max_bytes > 1 << 20 {
            return Err(ConfigError::new(
                "session.max_bytes",
                "must be between 1 and 1048576",
            ));
        }
        if self.key_prefix.len() > 128 {
            return Err(ConfigError::new(
                "session.key_prefix",
                "must be at most 128 bytes",
            ));
        }
        let on_store_error = match self.on_store_error.as_str() {
            "fail_closed" => OnStoreError::FailClosed,
            "fail_open" => OnStoreError::FailOpen,
            other => {
                return Err(ConfigError::new(
                    "session.on_store_error",
                    format!("`{other}`: expected fail_closed | fail_open"),
                ))
            }
        };
        if self.seal_cache > SEAL_CACHE_MAX {
            return Err(ConfigError::new(
                "session.seal_cache",
                format!(
                    "{} is out of range 0..={SEAL_CACHE_MAX} (0 turns the cache off)",
                    self.seal_cache
                ),
            ));
        }
        for (i, p) in self.exclude.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(ConfigError::new(
                    format!("session.exclude[{i}]"),
                    format!("`{p}` must start with `/`"),
                ));
            }
        }
        Ok(SessionSettings {
            headers: HeaderNames::new(&self.header),
            permanent: self.permanent,
            lifetime: self.lifetime,
            refresh_each_request: self.refresh_each_request,
            expiry_update_interval,
            key_prefix: self.key_prefix,
            id_bytes: self.id_bytes,
            max_bytes: self.max_bytes,
            on_store_error,
            exclude: self.exclude,
            seal: self.seal,
            seal_cache: self.seal_cache,
        })
    }
}

impl Server {
    fn validate(self) -> Result<ServerSettings, ConfigError> {
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 {
            return Err(ConfigError::new("server.threads", "must be at least 1"));
        }
        let mut trusted_proxies = Vec::new();
        for (i, text) in self.trusted_proxies.iter().enumerate() {
            let net = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    ConfigError::new(
                        format!("server.trusted_proxies[{i}]"),
                        format!("`{text}` is not an IP address or CIDR range (e.g. 10.0.0.0/8, 192.0.2.7, fd00::/8)"),
                    )
                })?;
            trusted_proxies.push(net.trunc());
        }
        let upstream_ca = match self.upstream_ca_file {
            None => None,
            Some(file) => {
                let certs = crate::tls::load_ca_file(&file)
                    .map_err(|e| ConfigError::new("server.upstream_ca_file", e))?;
                Some(UpstreamCa {
                    file,
                    certs: std::sync::Arc::new(certs),
                })
            }
        };
        Ok(ServerSettings {
            threads,
            grace_period: self.grace_period,
            upstream_connect_timeout: self.upstream_connect_timeout,
            upstream_read_timeout: self.upstream_read_timeout,
            trusted_proxies,
            upstream_ca,
            upstream_health_check: self
                .upstream_health_check
                .map(HealthCheck::validate)
                .transpose()?,
        })
    }
}

fn validate_log_level(level: String) -> Result<String, ConfigError> {
    if !["trace", "debug", "info", "warn", "error", "off"].contains(&level.as_str()) {
        return Err(ConfigError::new(
            "log_level",
            format!("`{level}`: expected trace | debug | info | warn | error | off"),
        ));
    }
    Ok(level)
}
