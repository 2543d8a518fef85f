//! The YAML schema exactly as users write it. Every struct rejects unknown
//! keys; [`File::validate`] turns it into the internal [`Config`], checking
//! what serde cannot and naming the key of every problem.

use super::{
    duration, resolve_addrs, Config, ConfigError, CookieSettings, HeaderNames, OnStoreError,
    SameSite, ServerSettings, SessionSettings, StoreSettings, MIN_SECRET_BYTES,
};
use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_yaml::Value;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    listen: OneOrMany,
    upstream: OneOrMany,
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
}

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
}

impl Default for Server {
    fn default() -> Self {
        Server {
            threads: None,
            grace_period: Duration::from_secs(30),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_read_timeout: None,
        }
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

fn parse_store(value: Value) -> Result<StoreSettings, ConfigError> {
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
    #[allow(unused_mut)]
    let mut backend = crate::store::StoreConfig::parse(&kind, Value::Mapping(map))?;
    // A dead database should fail a request within its budget, not wait
    // for a pooled connection longer than that.
    #[cfg(feature = "sql")]
    if let crate::store::StoreConfig::Sql(sql) = &mut backend {
        sql.acquire_timeout = common.timeout.max(Duration::from_millis(250));
    }
    Ok(StoreSettings {
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
    pub fn validate(self) -> Result<Config, ConfigError> {
        // listen / upstream
        if self.listen.0.is_empty() {
            return Err(ConfigError::new(
                "listen",
                "at least one address is required",
            ));
        }
        resolve_addrs("listen", &self.listen.0)?;
        if self.upstream.0.is_empty() {
            return Err(ConfigError::new(
                "upstream",
                "at least one address is required",
            ));
        }
        let upstreams = resolve_addrs("upstream", &self.upstream.0)?;

        // secrets
        let mut keys = Vec::new();
        for (i, k) in self.secret_keys.iter().enumerate() {
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
        if let Some(path) = &self.secret_key_file {
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

        // cookie
        let c = self.cookie;
        if !is_token(&c.name) {
            return Err(ConfigError::new(
                "cookie.name",
                format!("`{}` is not a valid cookie name", c.name),
            ));
        }
        if !c.path.starts_with('/') || c.path.bytes().any(|b| b == b';' || b.is_ascii_control()) {
            return Err(ConfigError::new(
                "cookie.path",
                "must start with `/` and contain no `;`",
            ));
        }
        if let Some(d) = &c.domain {
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
        let same_site = match c.same_site.to_ascii_lowercase().as_str() {
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
        if same_site == SameSite::None && !c.secure {
            return Err(ConfigError::new(
                "cookie.same_site",
                "`none` requires `cookie.secure: true` (browsers drop SameSite=None cookies without Secure)",
            ));
        }

        // session
        let s = self.session;
        if !is_token(&s.header) {
            return Err(ConfigError::new(
                "session.header",
                format!("`{}` is not a valid header name", s.header),
            ));
        }
        if s.lifetime < Duration::from_secs(1) {
            return Err(ConfigError::new("session.lifetime", "must be at least 1s"));
        }
        let expiry_update_interval = match s.expiry_update_interval {
            Some(i) if i >= s.lifetime => {
                return Err(ConfigError::new(
                    "session.expiry_update_interval",
                    "must be shorter than session.lifetime",
                ))
            }
            Some(i) => i,
            None => s.lifetime / 100,
        };
        if !(16..=64).contains(&s.id_bytes) {
            return Err(ConfigError::new(
                "session.id_bytes",
                format!("{} is out of range 16..=64", s.id_bytes),
            ));
        }
        if s.max_bytes == 0 || s.max_bytes > 1 << 20 {
            return Err(ConfigError::new(
                "session.max_bytes",
                "must be between 1 and 1048576",
            ));
        }
        if s.key_prefix.len() > 128 {
            return Err(ConfigError::new(
                "session.key_prefix",
                "must be at most 128 bytes",
            ));
        }
        let on_store_error = match s.on_store_error.as_str() {
            "fail_closed" => OnStoreError::FailClosed,
            "fail_open" => OnStoreError::FailOpen,
            other => {
                return Err(ConfigError::new(
                    "session.on_store_error",
                    format!("`{other}`: expected fail_closed | fail_open"),
                ))
            }
        };
        let mut exclude = Vec::new();
        for (i, p) in s.exclude.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(ConfigError::new(
                    format!("session.exclude[{i}]"),
                    format!("`{p}` must start with `/`"),
                ));
            }
            exclude.push(crate::proxy::path::normalize(p));
        }

        // server
        let threads = self
            .server
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 {
            return Err(ConfigError::new("server.threads", "must be at least 1"));
        }

        let store = parse_store(self.store)?;

        if !["trace", "debug", "info", "warn", "error", "off"].contains(&self.log_level.as_str()) {
            return Err(ConfigError::new(
                "log_level",
                format!(
                    "`{}`: expected trace | debug | info | warn | error | off",
                    self.log_level
                ),
            ));
        }

        Ok(Config {
            listen: self.listen.0,
            upstreams,
            keys,
            secret_key_file: self.secret_key_file,
            cookie: CookieSettings {
                name: c.name,
                domain: c.domain,
                path: c.path,
                secure: c.secure,
                http_only: c.http_only,
                same_site,
            },
            session: SessionSettings {
                headers: HeaderNames::new(&s.header),
                permanent: s.permanent,
                lifetime: s.lifetime,
                refresh_each_request: s.refresh_each_request,
                expiry_update_interval,
                key_prefix: s.key_prefix,
                id_bytes: s.id_bytes,
                max_bytes: s.max_bytes,
                on_store_error,
                exclude,
            },
            store,
            server: ServerSettings {
                threads,
                grace_period: self.server.grace_period,
                upstream_connect_timeout: self.server.upstream_connect_timeout,
                upstream_read_timeout: self.server.upstream_read_timeout,
            },
            log_level: self.log_level,
        })
    }
}
