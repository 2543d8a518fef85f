//! `store.type: redis`: sessions in Redis (standalone or Redis Cluster),
//! shared by any number of gateways.
//!
//! - One key per session, `key_prefix + id` (the engine builds it), holding
//!   [`SessionRecord::to_stored`]; expiry is the key's own TTL (`SET .. PX`,
//!   `PEXPIRE`), so nothing ever needs purging.
//! - `load` reads the value and its PTTL in one small Lua script, so the
//!   expiry the engine throttles refreshes on comes from the server.
//! - `update` is optimistic: GET, apply the update function in Rust, then a
//!   compare-and-set script writes (or deletes) only if the value is still
//!   the one read; on a conflict it reads again. When the request already
//!   loaded the value (`update_seen`, every update the engine makes), the
//!   first compare-and-set goes against that value with no GET: one round
//!   trip per update unless the session changed during the request. Every script touches one
//!   key, so all of this works unchanged on Redis Cluster. Within one
//!   process, updates of a key also queue on a local lock, so concurrent
//!   patches cost one round of GET + script each instead of racing.
//! - Connections are multiplexed and reconnect by themselves
//!   ([`ConnectionManager`] standalone, [`cluster::ClusterPool`] on a
//!   cluster); a failed first connection is an error the store handle does
//!   not cache, so the gateway recovers once Redis is back.
//! - With `near_cache` enabled, loads are answered from an in-process copy
//!   ([`near_cache`]) kept coherent by Redis' invalidation pushes
//!   ([`tracking`]); every write through this store also drops its key
//!   from the copy before returning, so this process reads its own writes.

mod cluster;
mod tracking;

use super::cas::{Cas, CasOps};
use super::near::{self, Near, RawNearCache};
use super::{StoreContext, StoreSpec};
use crate::session::{Loaded, NearCacheStats, SessionStore, StoreError, UpdateFn, UpdateOutcome};
use crate::yaml::{deserialize_at, ConfigError};
use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::{Cmd, ErrorKind, FromRedisValue, IntoConnectionInfo, RedisError, Value};
use serde::Deserialize;
use serde_yaml::Value as Yaml;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
pub use tracking::CLIENT_NAME as TRACKING_CLIENT_NAME;

/// Bound on establishing one connection (TCP, TLS, AUTH, SELECT). The
/// engine's `store.timeout` is usually shorter and wins on the request
/// path; this one keeps `--test` and background work from hanging on a
/// server that accepts connections but never answers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one command's reply, for the same reason.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// `{value, pttl}` of a key, or nil if it does not exist. One script so the
/// two can never disagree about whether the key exists.
const LOAD_LUA: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('PTTL', KEYS[1])}
"#;

/// Compare-and-set: if the key still holds ARGV[1], either SET it to
/// ARGV[3] with a TTL of ARGV[4] ms (ARGV[2] = 'set') or DEL it
/// (ARGV[2] = 'del'). Returns 1 if it acted, 0 if the value changed or the
/// key is gone.
const CAS_LUA: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == 'del' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
return 1
"#;

// ------------------------------------------------------------------ config

/// The Redis-specific keys of `store:` (`timeout`, `retries` and
/// `cleanup_interval` are common to every store and parsed elsewhere).
#[derive(Clone)]
pub struct RedisConfig {
    target: Target,
    /// PEM material for `rediss://` beyond the public roots (private CA,
    /// client certificate for mutual TLS), read at config time.
    tls: Option<redis::TlsCertificates>,
    /// `near_cache.max_entries` when the near cache is enabled.
    near_cache: Option<NonZeroUsize>,
    /// `session.key_prefix`: the near cache is told about changes of keys
    /// under it only (empty: every key).
    key_prefix: String,
    /// How long the first load waits for tracking to come up (see
    /// [`Near::start`]).
    first_round_wait: Duration,
    /// `store.timeout`: bounds the cluster client's connects and replies
    /// (see [`RedisStore::connect`]).
    op_timeout: Duration,
}

#[derive(Clone)]
enum Target {
    /// `url:` one server (or a proxy in front of several).
    Single { url: String, shown: String },
    /// `cluster:` seed nodes of a Redis Cluster; the rest is discovered.
    Cluster {
        urls: Vec<String>,
        shown: Vec<String>,
    },
}

/// The YAML as written; `url` and `cluster` are checked for exclusivity
/// after parsing so the error can name both.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    cluster: Option<Vec<String>>,
    /// PEM CA certificate(s) to verify the server with, instead of the
    /// public roots (a private CA).
    #[serde(default)]
    tls_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate and key, for servers that require mutual TLS
    /// (`tls-auth-clients yes`).
    #[serde(default)]
    tls_cert_file: Option<std::path::PathBuf>,
    #[serde(default)]
    tls_key_file: Option<std::path::PathBuf>,
    #[serde(default)]
    near_cache: Option<RawNearCache>,
}

/// Read one PEM file named by `key`, refusing anything that is not PEM.
fn read_pem(key: &str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ConfigError::new(
            key,
            format!("{} is not a PEM file", path.display()),
        ));
    }
    Ok(bytes)
}

/// Manual so that a `{:?}` of the config never prints a password.
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RedisConfig");
        match &self.target {
            Target::Single { shown, .. } => d.field("url", shown),
            Target::Cluster { shown, .. } => d.field("cluster", shown),
        };
        d.field("near_cache", &self.near_cache).finish()
    }
}

/// The registry's entry point: `store.type: redis`.
pub fn parse(keys: Yaml, ctx: &StoreContext) -> Result<Arc<dyn StoreSpec>, ConfigError> {
    let mut config = RedisConfig::parse(keys)?;
    config.key_prefix = ctx.key_prefix.clone();
    config.first_round_wait = near::FIRST_ROUND_WAIT.min(ctx.timeout / 4);
    config.op_timeout = ctx.timeout;
    Ok(Arc::new(config))
}

#[async_trait]
impl StoreSpec for RedisConfig {
    fn describe(&self) -> String {
        RedisConfig::describe(self)
    }

    fn primary_key(&self) -> &'static str {
        RedisConfig::primary_key(self)
    }

    async fn connect(&self) -> Result<Arc<dyn SessionStore>, StoreError> {
        Ok(Arc::new(RedisStore::connect(self).await?))
    }
}

impl RedisConfig {
    /// Parse the keys of `store:` other than `type` and the common ones:
    /// exactly one of `url` and `cluster`. (The near cache then tracks
    /// every key; the registry's [`parse`] narrows it to
    /// `session.key_prefix`.)
    pub fn parse(rest: Yaml) -> Result<Self, ConfigError> {
        let raw: RawConfig = deserialize_at(rest, "store")?;
        let tls = Self::parse_tls(&raw)?;
        let near_cache = match &raw.near_cache {
            Some(nc) => nc.max_entries()?,
            None => None,
        };
        let target = match (raw.url, raw.cluster) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "store.cluster",
                    "give either `url` (one server) or `cluster` (Redis Cluster nodes), not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "store.url",
                    "required key is missing (e.g. `url: redis://127.0.0.1:6379/0`, or `cluster: [...]` for Redis Cluster)",
                ))
            }
            (Some(url), None) => {
                let (shown, _) = check_url("store.url", &url)?;
                Target::Single { url, shown }
            }
            (None, Some(urls)) => {
                if urls.is_empty() {
                    return Err(ConfigError::new(
                        "store.cluster",
                        "at least one node URL is required (e.g. [redis://10.0.0.1:7000, redis://10.0.0.2:7000])",
                    ));
                }
                let mut shown = Vec::with_capacity(urls.len());
                let mut first_scheme = None;
                for (i, url) in urls.iter().enumerate() {
                    let key = format!("store.cluster[{i}]");
                    let (s, info) = check_url(&key, url)?;
                    if info.redis.db != 0 {
                        return Err(ConfigError::new(
                            key,
                            "Redis Cluster only has database 0; drop the /db part of the URL",
                        ));
                    }
                    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
                    match &first_scheme {
                        None => first_scheme = scheme,
                        Some(first) if Some(first) != scheme.as_ref() => {
                            return Err(ConfigError::new(
                                key,
                                "all cluster nodes must use the same scheme (all redis:// or all rediss://)",
                            ))
                        }
                        Some(_) => {}
                    }
                    shown.push(s);
                }
                Target::Cluster { urls, shown }
            }
        };
        if tls.is_some() {
            let tls_urls = match &target {
                Target::Single { url, .. } => url.to_ascii_lowercase().starts_with("rediss://"),
                Target::Cluster { urls, .. } => {
                    urls[0].to_ascii_lowercase().starts_with("rediss://")
                }
            };
            if !tls_urls {
                let key = if raw.tls_ca_file.is_some() {
                    "store.tls_ca_file"
                } else {
                    "store.tls_cert_file"
                };
                return Err(ConfigError::new(key, "only used with rediss:// (TLS) URLs"));
            }
        }
        Ok(RedisConfig {
            target,
            tls,
            near_cache,
            key_prefix: String::new(),
            first_round_wait: near::FIRST_ROUND_WAIT,
            op_timeout: RESPONSE_TIMEOUT,
        })
    }

    fn parse_tls(raw: &RawConfig) -> Result<Option<redis::TlsCertificates>, ConfigError> {
        let root_cert = match &raw.tls_ca_file {
            Some(p) => Some(read_pem("store.tls_ca_file", p)?),
            None => None,
        };
        let client_tls = match (&raw.tls_cert_file, &raw.tls_key_file) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: read_pem("store.tls_cert_file", c)?,
                client_key: read_pem("store.tls_key_file", k)?,
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "store.tls_key_file",
                    "required with store.tls_cert_file",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "store.tls_cert_file",
                    "required with store.tls_key_file",
                ))
            }
        };
        Ok(
            (root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
                client_tls,
                root_cert,
            }),
        )
    }

    /// The YAML key to name when Redis cannot be reached.
    pub fn primary_key(&self) -> &'static str {
        match self.target {
            Target::Single { .. } => "store.url",
            Target::Cluster { .. } => "store.cluster",
        }
    }

    /// One line for `--test`, passwords masked.
    pub fn describe(&self) -> String {
        let target = match &self.target {
            Target::Single { shown, .. } => format!("redis ({shown})"),
            Target::Cluster { shown, .. } => {
                format!(
                    "redis cluster ({} seed node(s): {})",
                    shown.len(),
                    shown.join(", ")
                )
            }
        };
        match self.near_cache {
            Some(n) => format!("{target} with a near cache of up to {n} sessions"),
            None => target,
        }
    }
}

/// Validate one URL; returns it with the password masked, and its parsed
/// form. Error messages never echo the URL itself: it may hold a password.
fn check_url(key: &str, raw: &str) -> Result<(String, redis::ConnectionInfo), ConfigError> {
    const EXPECTED: &str =
        "expected redis://[user:password@]host[:port][/db] or rediss://... (TLS)";
    match raw.split_once("://") {
        Some((scheme, _)) if matches!(scheme.to_ascii_lowercase().as_str(), "redis" | "rediss") => {
        }
        Some((scheme, _)) => {
            return Err(ConfigError::new(
                key,
                format!("unsupported URL scheme `{scheme}`; {EXPECTED}"),
            ))
        }
        None => return Err(ConfigError::new(key, format!("not a URL; {EXPECTED}"))),
    }
    let Some(mut parsed) = redis::parse_redis_url(raw) else {
        return Err(ConfigError::new(
            key,
            format!("not a valid URL; {EXPECTED}"),
        ));
    };
    if parsed.fragment().is_some() {
        // redis-rs reads `#insecure` as "skip certificate verification",
        // which this build leaves out (no tls-rustls-insecure feature).
        return Err(ConfigError::new(
            key,
            "a #fragment is not supported: rediss:// always verifies the server's certificate \
             (against the public roots, or store.tls_ca_file for a private CA)",
        ));
    }
    let info = raw
        .into_connection_info()
        .map_err(|e| ConfigError::new(key, format!("{}; {EXPECTED}", message(&e))))?;
    if parsed.password().is_some() {
        // Only fails for URLs that cannot have a password, which this one has.
        let _ = parsed.set_password(Some("***"));
    }
    Ok((parsed.to_string(), info))
}

// ------------------------------------------------------------------- store

/// A multiplexed connection of either kind; both are cheap to clone and
/// safe to use from many requests at once. (Boxed: the manager is ten
/// times the size of the cluster handle.)
enum Conn {
    Single(Box<ConnectionManager>),
    Cluster(Arc<cluster::ClusterPool>),
}

pub struct RedisStore {
    conn: Conn,
    load_sha: String,
    cas_sha: String,
    cas: Cas,
    near: Option<Near<tracking::Tracker>>,
    /// `session.key_prefix`: only keys under it may be cached, Redis
    /// tells us nothing about the others.
    near_prefix: String,
}

impl RedisStore {
    /// Connect (standalone or cluster). Fails fast when Redis is down: the
    /// caller retries on its next use instead of caching the failure.
    pub async fn connect(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        let (conn, nodes) = match &config.target {
            Target::Single { url, .. } => {
                let client = match &config.tls {
                    Some(certs) => redis::Client::build_with_tls(url.as_str(), certs.clone()),
                    None => redis::Client::open(url.as_str()),
                }
                .map_err(map_err)?;
                // No reconnect retries inside the manager: a failed
                // reconnect is retried on the next command anyway, and a
                // back-off here would keep failing requests for seconds
                // after Redis is back.
                let manager_config = ConnectionManagerConfig::new()
                    .set_number_of_retries(0)
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(RESPONSE_TIMEOUT);
                let manager = ConnectionManager::new_with_config(client, manager_config)
                    .await
                    .map_err(map_err)?;
                let nodes =
                    tracking::Nodes::Single(url.as_str().into_connection_info().map_err(map_err)?);
                (Conn::Single(Box::new(manager)), nodes)
            }
            Target::Cluster { urls, .. } => {
                // Few, short retries: they cover MOVED/ASK redirections and
                // a node being replaced; a node that is down should fail
                // its requests quickly (the engine applies on_store_error)
                // rather than hold them until store.timeout.
                let connect_timeout = CONNECT_TIMEOUT.min(config.op_timeout);
                let mut builder = ClusterClient::builder(urls.iter().map(String::as_str));
                if let Some(certs) = &config.tls {
                    builder = builder.certs(certs.clone());
                }
                let client = builder
                    .connection_timeout(connect_timeout)
                    .response_timeout(RESPONSE_TIMEOUT.min(config.op_timeout))
                    .retries(3)
                    .min_retry_wait(5)
                    .max_retry_wait(100)
                    .build()
                    .map_err(map_err)?;
                let pool = cluster::ClusterPool::open(client, connect_timeout)
                    .await
                    .map_err(map_err)?;
                let nodes = tracking::Nodes::Cluster {
                    template: urls[0].as_str().into_connection_info().map_err(map_err)?,
                    pool: pool.clone(),
                };
                (Conn::Cluster(pool), nodes)
            }
        };
        let near = config.near_cache.map(|max_entries| {
            let tracker = |cache, status| tracking::Tracker {
                cache,
                nodes,
                tls: config.tls.clone(),
                prefix: config.key_prefix.clone(),
                status,
            };
            let check_wait = CONNECT_TIMEOUT + near::HEARTBEAT_TIMEOUT;
            Near::new(max_entries, tracker, config.first_round_wait, check_wait)
        });
        Ok(RedisStore {
            conn,
            load_sha: redis::Script::new(LOAD_LUA).get_hash().to_string(),
            cas_sha: redis::Script::new(CAS_LUA).get_hash().to_string(),
            cas: Cas::default(),
            near,
            near_prefix: config.key_prefix.clone(),
        })
    }

    /// Drop `key` from the near cache after this process changed it, so
    /// its next read here sees the change even before Redis' push arrives.
    fn forget(&self, key: &str) {
        if let Some(near) = &self.near {
            near.forget(key);
        }
    }

    /// The value and remaining TTL of `key`, from Redis.
    async fn fetch(&self, key: &str) -> Result<Option<(Bytes, Duration)>, StoreError> {
        let found: Option<(Vec<u8>, i64)> = self.eval(&self.load_sha, LOAD_LUA, key, &[]).await?;
        // -1 (no TTL) is never written by us; report it as expiring now so
        // the engine's next refresh puts a TTL back on it.
        Ok(found.map(|(bytes, pttl)| {
            (
                Bytes::from(bytes),
                Duration::from_millis(u64::try_from(pttl).unwrap_or(0)),
            )
        }))
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.query_raw(cmd).await.map_err(map_err)
    }

    async fn query_raw<T: FromRedisValue>(&self, cmd: &Cmd) -> redis::RedisResult<T> {
        match self.query_once(cmd).await {
            // The connection was refused or had dropped: the manager is
            // already reconnecting, so one more try usually lands on the new
            // connection; this is what makes the first request after an
            // outage succeed, whatever command it starts with. Repeating is
            // harmless for every command this store sends: reads, DEL and
            // PEXPIRE are idempotent, a compare-and-set that did land makes
            // its repeat fail (and `update` reads again), and a repeated
            // SET NX reports a collision, so the engine picks another id
            // (the first key, if it did land, expires unused).
            Err(e) if e.is_connection_refusal() || e.is_connection_dropped() => {
                self.query_once(cmd).await
            }
            other => other,
        }
    }

    async fn query_once<T: FromRedisValue>(&self, cmd: &Cmd) -> redis::RedisResult<T> {
        match &self.conn {
            Conn::Single(c) => cmd.query_async(&mut (**c).clone()).await,
            Conn::Cluster(pool) => pool.query(cmd).await,
        }
    }

    /// Run a one-key script by hash, sending its source only when the
    /// server does not know it yet. (Not `redis::Script`: on a cluster it
    /// loads scripts on every primary, which fails while any node is down.)
    async fn eval<T: FromRedisValue>(
        &self,
        sha: &str,
        source: &str,
        key: &str,
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let build = |name: &str, body: &str| {
            let mut cmd = redis::cmd(name);
            cmd.arg(body).arg(1).arg(key);
            for a in args {
                cmd.arg(*a);
            }
            cmd
        };
        match self.query_raw(&build("EVALSHA", sha)).await {
            // EVAL also caches the script, so the next EVALSHA works.
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                self.query(&build("EVAL", source)).await
            }
            other => other.map_err(map_err),
        }
    }
}

/// The compare-and-set primitives: the version of a value is the value
/// itself (the script compares bytes), so no extra field is stored.
#[async_trait]
impl CasOps for RedisStore {
    type Version = Bytes;

    async fn read(&self, key: &str) -> Result<Option<(Bytes, Bytes)>, StoreError> {
        let current: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(key)).await?;
        Ok(current.map(|v| {
            let v = Bytes::from(v);
            (v.clone(), v)
        }))
    }

    async fn write_if(
        &self,
        key: &str,
        old: &Bytes,
        value: &Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let ttl = ttl_ms(ttl).to_string();
        let swapped: i64 = self
            .eval(
                &self.cas_sha,
                CAS_LUA,
                key,
                &[old, b"set", value, ttl.as_bytes()],
            )
            .await?;
        Ok(swapped == 1)
    }

    async fn delete_if(&self, key: &str, old: &Bytes) -> Result<bool, StoreError> {
        let swapped: i64 = self
            .eval(&self.cas_sha, CAS_LUA, key, &[old, b"del", b"", b""])
            .await?;
        Ok(swapped == 1)
    }

    /// A value is its own version: an update can compare-and-set against
    /// the value its request loaded, without a GET first.
    fn version_of(&self, value: &Bytes) -> Option<Bytes> {
        Some(value.clone())
    }
}

/// TTL in milliseconds as Redis wants it: at least 1 (PX 0 is an error).
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The error as a sentence: redis-rs prints its error kind in Debug form
/// (`Invalid database number- InvalidClientConfig`), which only adds noise
/// for a user.
fn message(e: &RedisError) -> String {
    let text = e.to_string();
    let kind = format!("{:?}", e.kind());
    if let Some(desc) = text.strip_suffix(&format!("- {kind}")) {
        return desc.trim_end().to_string();
    }
    text.replacen(&format!(" - {kind}: "), ": ", 1)
}

/// Unreachable, slow or (partly) down => `Unavailable`, which the engine
/// retries and answers per `on_store_error`; anything Redis itself refused
/// (bad password, wrong type, script error) => `Backend`.
/// The connection, or the cluster behind it, is in trouble (rather than
/// the command being refused): the cluster watch reacts to these.
fn connection_trouble(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || matches!(
            e.kind(),
            ErrorKind::ClusterDown | ErrorKind::ClusterConnectionNotFound
        )
}

fn map_err(e: RedisError) -> StoreError {
    let unavailable = connection_trouble(&e)
        || matches!(
            e.kind(),
            ErrorKind::MasterDown | ErrorKind::TryAgain | ErrorKind::BusyLoadingError
        );
    if matches!(e.kind(), ErrorKind::Moved | ErrorKind::Ask) {
        return StoreError::Backend(
            "redis: the server is a Redis Cluster node (it answered MOVED); \
             list the nodes under store.cluster instead of store.url"
                .into(),
        );
    }
    let msg = format!("redis: {}", message(&e));
    if unavailable {
        StoreError::Unavailable(msg)
    } else {
        StoreError::Backend(msg)
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        match &self.near {
            Some(near) if key.starts_with(&self.near_prefix) => {
                near.load(key, || self.fetch(key)).await
            }
            _ => {
                let sent = SystemTime::now();
                Ok(self.fetch(key).await?.map(|(value, pttl)| Loaded {
                    value,
                    expires_at: sent + pttl,
                }))
            }
        }
    }

    async fn create(&self, key: &str, value: &Bytes, ttl: Duration) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(&value[..])
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms(ttl));
        let reply: Result<Value, _> = self.query(&cmd).await;
        self.forget(key);
        Ok(!matches!(reply?, Value::Nil))
    }

    async fn update(
        &self,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        let outcome = self.cas.update(self, key, ttl, f).await;
        self.forget(key);
        outcome
    }

    async fn update_seen(
        &self,
        key: &str,
        ttl: Duration,
        seen: &Bytes,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        let outcome = self.cas.update_seen(self, key, ttl, Some(seen), f).await;
        self.forget(key);
        outcome
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let deleted: Result<i64, _> = self.query(redis::cmd("DEL").arg(key)).await;
        self.forget(key);
        deleted.map(|_| ())
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        // PEXPIRE only acts on an existing key: it can never revive one.
        // Dropping the entry (rather than moving its expiry) keeps the rule
        // simple: an entry only ever carries an expiry Redis reported.
        let set: Result<i64, _> = self
            .query(redis::cmd("PEXPIRE").arg(key).arg(ttl_ms(ttl)))
            .await;
        self.forget(key);
        Ok(set? == 1)
    }

    async fn check(&self) -> Result<(), StoreError> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        if let Conn::Single(_) = self.conn {
            // A cluster node answers PING but MOVEs most keys elsewhere:
            // catch that at `--test`, not on the first request.
            let info: String = self.query(redis::cmd("INFO").arg("cluster")).await?;
            if info.contains("cluster_enabled:1") {
                return Err(StoreError::Backend(
                    "redis: the server is a Redis Cluster node; list the nodes under \
                     store.cluster instead of store.url"
                        .into(),
                ));
            }
        }
        if let Some(near) = &self.near {
            near.check().await?;
        }
        Ok(())
    }

    fn near_cache_stats(&self) -> Option<NearCacheStats> {
        self.near.as_ref().map(Near::stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<RedisConfig, ConfigError> {
        RedisConfig::parse(serde_yaml::from_str(yaml).unwrap())
    }

    fn err_key(yaml: &str) -> String {
        parse(yaml).unwrap_err().key
    }

    #[test]
    fn url_or_cluster_exactly_one() {
        assert_eq!(
            parse("{url: redis://127.0.0.1:6379/0}")
                .unwrap()
                .primary_key(),
            "store.url"
        );
        let c = parse("{cluster: [redis://127.0.0.1:7000, redis://127.0.0.1:7001]}").unwrap();
        assert_eq!(c.primary_key(), "store.cluster");
        assert_eq!(err_key("{}"), "store.url");
        assert_eq!(
            err_key("{url: redis://a:1, cluster: [redis://b:2]}"),
            "store.cluster"
        );
        assert_eq!(err_key("{cluster: []}"), "store.cluster");
    }

    #[test]
    fn bad_urls_name_their_key() {
        assert_eq!(err_key("{url: http://127.0.0.1:6379}"), "store.url");
        assert_eq!(err_key("{url: 127.0.0.1:6379}"), "store.url");
        assert_eq!(err_key("{url: redis+unix:///tmp/redis.sock}"), "store.url");
        assert_eq!(err_key("{url: redis://127.0.0.1:6379/notadb}"), "store.url");
        assert_eq!(
            err_key("{cluster: [redis://a:7000, http://b:7001]}"),
            "store.cluster[1]"
        );
        assert_eq!(err_key("{cluster: [redis://a:7000/3]}"), "store.cluster[0]");
        assert_eq!(
            err_key("{cluster: [redis://a:7000, rediss://b:7001]}"),
            "store.cluster[1]"
        );
        assert_eq!(err_key("{url: \"rediss://a:6380#insecure\"}"), "store.url");
        let e = parse("{url: redis://127.0.0.1:6379, pool: 3}").unwrap_err();
        assert_eq!(e.key, "store.pool");
        assert!(e.message.contains("unknown key"), "{e}");
    }

    #[test]
    fn near_cache_keys() {
        let url = "url: redis://127.0.0.1:6379/0";
        assert_eq!(parse(&format!("{{{url}}}")).unwrap().near_cache, None);
        assert_eq!(
            parse(&format!("{{{url}, near_cache: {{max_entries: 5}}}}"))
                .unwrap()
                .near_cache,
            None,
            "off unless enabled"
        );
        let c = parse(&format!("{{{url}, near_cache: {{enabled: true}}}}")).unwrap();
        assert_eq!(
            c.near_cache.map(NonZeroUsize::get),
            Some(near::DEFAULT_ENTRIES)
        );
        assert!(c.describe().contains("near cache of up to 100000"), "{c:?}");
        let c = parse(&format!(
            "{{{url}, near_cache: {{enabled: true, max_entries: 7}}}}"
        ))
        .unwrap();
        assert_eq!(c.near_cache.map(NonZeroUsize::get), Some(7));
        let c = parse("{cluster: [redis://a:7000], near_cache: {enabled: true}}").unwrap();
        assert!(c.near_cache.is_some());
        assert_eq!(
            err_key(&format!(
                "{{{url}, near_cache: {{enabled: true, max_entries: 0}}}}"
            )),
            "store.near_cache.max_entries"
        );
        assert_eq!(
            err_key(&format!("{{{url}, near_cache: {{max_entries: -1}}}}")),
            "store.near_cache.max_entries"
        );
        assert_eq!(
            err_key(&format!(
                "{{{url}, near_cache: {{enabled: true, size: 3}}}}"
            )),
            "store.near_cache.size"
        );
        assert_eq!(
            err_key(&format!("{{{url}, near_cache: {{enabled: maybe}}}}")),
            "store.near_cache.enabled"
        );
        assert_eq!(
            err_key(&format!("{{{url}, near_cache: true}}")),
            "store.near_cache"
        );
    }

    #[test]
    fn passwords_are_never_shown() {
        let c = parse("{url: \"rediss://app:hunter2@redis.example:6380/2\"}").unwrap();
        let shown = format!("{} {c:?}", c.describe());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("rediss://app:***@redis.example:6380/2"),
            "{shown}"
        );
        let c = parse("{cluster: [\"redis://:hunter2@a:7000\"]}").unwrap();
        let shown = format!("{} {c:?}", c.describe());
        assert!(!shown.contains("hunter2"), "{shown}");
        let e = parse("{url: \"redis://:hunter2@a:1/x\"}").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
