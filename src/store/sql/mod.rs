//! `store.type: sql`: one row per session in a PostgreSQL, MySQL/MariaDB or
//! SQLite table, through `sqlx`. This module owns what the three dialects
//! share: the `store:` keys and their validation, the table name (checked
//! here so nothing but identifier characters ever reaches SQL text), the
//! time encoding, error classification and the [`SqlStore`] facade the
//! factory builds. Each dialect module holds its SQL and its locking.
//!
//! Every dialect keeps the same logical row — `id` (the prefixed store key,
//! primary key), `data` (the record's stored form) and `expires` (UTC, with
//! an index) — and follows the same rules:
//! - expiry is filtered in every query (`expires > now`), so an expired row
//!   is invisible to `load`/`update`/`touch` before any cleanup ran;
//! - "now" is the gateway's clock, bound as a parameter, so the engine's
//!   expiry arithmetic and the rows agree (keep gateways NTP-synced);
//! - `update` is a transaction holding a row lock across read-modify-write;
//! - `purge_expired` deletes in bounded batches.

mod batch;
mod listen;
pub use listen::APPLICATION_NAME as LISTEN_APPLICATION_NAME;
mod mysql;
mod pool;
mod postgres;
mod sqlite;

use super::near::{self, RawNearCache};
use super::{StoreContext, StoreSpec};
use crate::session::{self, Loaded, SessionStore, StoreError, UpdateFn, UpdateOutcome};
use crate::yaml::{deserialize_at, ConfigError};
use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use serde_yaml::Value;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Rows deleted per purge statement: small enough that each statement
/// holds its locks for milliseconds, so requests and other gateways'
/// purges are never stalled behind a cleanup.
const PURGE_BATCH: u64 = 1000;

/// Batches per `purge_expired` call (a million rows); the rest waits for
/// the next run, which keeps every purge bounded.
const PURGE_MAX_BATCHES: u64 = 1000;

/// How often an `update` (or a MySQL purge batch) is re-run when the
/// database aborts it to break a deadlock. `UpdateFn` is pure, so running
/// it again is allowed.
const CONFLICT_RETRIES: u32 = 3;

/// Until this instant expiry values are representable in every dialect
/// (MySQL's DATETIME ends with year 9999).
const MAX_EXPIRY_MICROS: i64 = 253_402_300_799_000_000;

/// The database behind a URL, chosen by its scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
    Sqlite,
}

impl Dialect {
    fn from_url(url: &str) -> Option<Dialect> {
        let scheme = url.split_once(':')?.0.to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            "mysql" | "mariadb" => Some(Dialect::MySql),
            "sqlite" => Some(Dialect::Sqlite),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::MySql => "mysql",
            Dialect::Sqlite => "sqlite",
        }
    }
}

/// A validated table name: one identifier, optionally prefixed by one
/// schema (PostgreSQL schema, MySQL database, SQLite attached database).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && s.len() <= 63
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl TableName {
    /// Accept `name` or `schema.name`, each `[A-Za-z_][A-Za-z0-9_]{0,62}`.
    pub fn parse(s: &str) -> Option<TableName> {
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, s),
        };
        if !is_identifier(name) || !schema.is_none_or(is_identifier) {
            return None;
        }
        Some(TableName {
            schema: schema.map(str::to_string),
            name: name.to_string(),
        })
    }

    /// The name quoted with `q` (`"` or `` ` ``). Quoting keeps reserved
    /// words usable; validation guarantees `q` never occurs inside.
    fn quoted(&self, q: char) -> String {
        match &self.schema {
            Some(schema) => format!("{q}{schema}{q}.{q}{}{q}", self.name),
            None => format!("{q}{}{q}", self.name),
        }
    }

    /// The expiry index's name (unqualified): `<table>_expires_idx`, cut to
    /// the 63 characters every dialect accepts.
    fn index_name(&self) -> String {
        let mut name = format!("{}_expires_idx", self.name);
        name.truncate(63);
        name
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// The keys of `store:` for `type: sql` (besides the common `timeout`,
/// `retries` and `cleanup_interval`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    /// `postgres://`, `postgresql://`, `mysql://`, `mariadb://` or
    /// `sqlite://` URL.
    url: String,
    /// Table holding the sessions.
    #[serde(default = "default_table")]
    table: String,
    /// Create the table and its expiry index if missing.
    #[serde(default = "default_create_table")]
    create_table: bool,
    /// Most pooled connections per gateway process.
    #[serde(default = "default_max_connections")]
    max_connections: u32,
    /// PostgreSQL only: an in-process copy of read sessions, kept
    /// coherent by a trigger and `LISTEN`/`NOTIFY`.
    #[serde(default)]
    near_cache: Option<RawNearCache>,
}

fn default_table() -> String {
    "sessions".into()
}

fn default_create_table() -> bool {
    true
}

fn default_max_connections() -> u32 {
    16
}

/// `store.type: sql`, validated.
#[derive(Clone)]
pub struct SqlConfig {
    url: String,
    dialect: Dialect,
    table: TableName,
    create_table: bool,
    max_connections: u32,
    /// How long a caller waits for a pooled connection, including opening
    /// a new one. A dead database then fails within this bound even where
    /// no `store.timeout` applies (background purge, `cleanup`). The
    /// engine's `store.timeout` still bounds every request on its own.
    pub acquire_timeout: Duration,
    /// `near_cache.max_entries` when the near cache is enabled
    /// (PostgreSQL only).
    near_cache: Option<NonZeroUsize>,
    /// How long the first load waits for the near cache's notifications.
    first_round_wait: Duration,
}

/// Default of [`SqlConfig::acquire_timeout`]: near the default
/// `store.timeout` (500ms), with room for a TLS handshake.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

impl SqlConfig {
    /// Parse the keys of `store:` other than `type` and the common ones.
    /// The URL is parsed here too, so a malformed one is reported at
    /// start-up with its key, not on the first request.
    pub fn parse(rest: Value) -> Result<Self, ConfigError> {
        let keys: Keys = deserialize_at(rest, "store")?;
        let dialect = Dialect::from_url(&keys.url).ok_or_else(|| {
            ConfigError::new(
                "store.url",
                format!(
                    "`{}`: unsupported scheme; expected postgres://, postgresql://, mysql://, mariadb:// or sqlite://",
                    redact_url(&keys.url)
                ),
            )
        })?;
        let invalid = |e: sqlx::Error| {
            ConfigError::new(
                "store.url",
                format!("`{}` is not a valid URL: {e}", redact_url(&keys.url)),
            )
        };
        match dialect {
            Dialect::Postgres => drop(postgres::options(&keys.url).map_err(invalid)?),
            Dialect::MySql => drop(mysql::options(&keys.url).map_err(invalid)?),
            Dialect::Sqlite => {
                sqlite::options(&keys.url).map_err(invalid)?;
                let lower = keys.url.to_ascii_lowercase();
                if lower.contains(":memory:") || lower.contains("mode=memory") {
                    return Err(ConfigError::new(
                        "store.url",
                        "an in-memory SQLite database is private to one connection; use a file (sqlite://./sessions.db) or store.type: memory",
                    ));
                }
            }
        }
        let table = TableName::parse(&keys.table).ok_or_else(|| {
            ConfigError::new(
                "store.table",
                format!(
                    "`{}` is not a valid table name: use letters, digits and `_` (not starting with a digit, at most 63), optionally after one `schema.`",
                    keys.table
                ),
            )
        })?;
        let near_cache = match &keys.near_cache {
            Some(nc) => nc.max_entries()?,
            None => None,
        };
        if near_cache.is_some() && dialect != Dialect::Postgres {
            return Err(ConfigError::new(
                "store.near_cache",
                format!(
                    "only PostgreSQL can notify gateways of each other's changes \
                     (LISTEN/NOTIFY); a near cache on {} would serve stale sessions",
                    dialect.name()
                ),
            ));
        }
        if keys.max_connections == 0 {
            return Err(ConfigError::new(
                "store.max_connections",
                "must be at least 1",
            ));
        }
        Ok(SqlConfig {
            url: keys.url,
            dialect,
            table,
            create_table: keys.create_table,
            max_connections: keys.max_connections,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            near_cache,
            first_round_wait: near::FIRST_ROUND_WAIT,
        })
    }

    /// One line for `--test`, without the password.
    pub fn describe(&self) -> String {
        let near = match self.near_cache {
            Some(n) => format!(
                ", near_cache {n} entries, channel {}",
                listen::Trigger::new(&self.table).channel
            ),
            None => String::new(),
        };
        format!(
            "sql {} ({}, table {}, create_table {}, max_connections {}{near})",
            self.dialect.name(),
            redact_url(&self.url),
            self.table,
            self.create_table,
            self.max_connections
        )
    }
}

impl fmt::Debug for SqlConfig {
    // Hand-written so the password never reaches a log through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &redact_url(&self.url))
            .field("table", &self.table.to_string())
            .field("create_table", &self.create_table)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

/// The URL with the password (userinfo or a `password=` query parameter)
/// replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let start = scheme_end + 3;
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = url[..start].to_string();
    match authority.rfind('@') {
        Some(at) => {
            match authority[..at].split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str(&authority[..at]),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                        format!("{k}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            out.push_str(&pairs.join("&"));
            if let Some(f) = fragment {
                out.push('#');
                out.push_str(f);
            }
        }
        None => out.push_str(tail),
    }
    out
}

// ------------------------------------------------------------------ time

/// Microseconds since the Unix epoch: the one time unit bound to SQL.
fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
        .min(MAX_EXPIRY_MICROS)
}

fn from_micros(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us.max(0) as u64)
}

/// `(now, now + ttl)` in microseconds, from one reading of the clock.
fn now_and_expiry(ttl: Duration) -> (i64, i64) {
    let now = SystemTime::now();
    let expires = now.checked_add(ttl).map_or(MAX_EXPIRY_MICROS, micros);
    (micros(now), expires)
}

fn now_micros() -> i64 {
    micros(SystemTime::now())
}

/// The session in `row`: its `data` at column `at`, `expires_us` at the
/// next one (every dialect's load statements select them so).
fn loaded<R: sqlx::Row>(row: &R, at: usize) -> Result<Loaded, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    Vec<u8>: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let data: Vec<u8> = row.try_get(at)?;
    let expires_us: i64 = row.try_get(at + 1)?;
    Ok(Loaded {
        value: Bytes::from(data),
        expires_at: from_micros(expires_us),
    })
}

// ---------------------------------------------------------------- errors

/// Whether an error means "the database is not there right now" (retry
/// later, apply `session.on_store_error`) rather than "it answered no".
fn is_unavailable(e: &sqlx::Error, transient_code: impl Fn(&str) -> bool) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => transient_code(db.code().as_deref().unwrap_or("")),
        _ => false,
    }
}

fn classify(dialect: Dialect, e: sqlx::Error, transient_code: impl Fn(&str) -> bool) -> StoreError {
    let message = match &e {
        sqlx::Error::PoolTimedOut => {
            "no database connection available in time (database down, unreachable, or all store.max_connections busy)"
                .to_string()
        }
        other => other.to_string(),
    };
    if is_unavailable(&e, transient_code) {
        StoreError::Unavailable(format!("{}: {message}", dialect.name()))
    } else {
        StoreError::Backend(format!("{}: {message}", dialect.name()))
    }
}

/// The error of a failed table probe: name the key to fix and the ways out.
fn missing_table(dialect: Dialect, table: &TableName, e: sqlx::Error) -> StoreError {
    StoreError::Backend(format!(
        "store.table: table `{table}` is missing or lacks the columns id, data, expires ({}: {}); create it with the schema in the README or set store.create_table: true",
        dialect.name(),
        e.to_string().replace('\n', " ")
    ))
}

/// What an update attempt does with the row it locked, decided the same
/// way for every dialect; only the SQL around it differs.
enum Locked {
    /// Roll back and return this: no live row, unreadable data, or the
    /// update function refused.
    Done(Result<UpdateOutcome, String>),
    Write(Bytes),
    Delete,
}

fn decide(data: Option<&[u8]>, f: &UpdateFn<'_>) -> Locked {
    match session::decide(data, f) {
        Ok(session::Step::Write(value)) => Locked::Write(value),
        Ok(session::Step::Delete) => Locked::Delete,
        Ok(session::Step::Missing) => Locked::Done(Ok(UpdateOutcome::Missing)),
        Err(StoreError::Rejected(msg)) => Locked::Done(Err(msg)),
        Err(other) => Locked::Done(Err(other.to_string())),
    }
}

/// The fast path of `update_seen` in the dialects with a conditional
/// write (PostgreSQL, MySQL/MariaDB): decide on `seen`, the value this
/// request loaded, and write (or delete) with a statement that matches
/// only a live row still holding exactly `seen`; `write` and `delete` run
/// that statement and say whether it matched the row. `None`: the row
/// changed or vanished, or `f` did not decide to write or delete (a
/// refusal is decided on the current row, by the update transaction).
async fn write_if_unchanged(
    seen: &Bytes,
    f: &UpdateFn<'_>,
    write: impl AsyncFnOnce(&Bytes) -> Result<bool, StoreError>,
    delete: impl AsyncFnOnce() -> Result<bool, StoreError>,
) -> Result<Option<UpdateOutcome>, StoreError> {
    Ok(match decide(Some(seen), f) {
        Locked::Write(value) => write(&value)
            .await?
            .then_some(UpdateOutcome::Written(value)),
        Locked::Delete => delete().await?.then_some(UpdateOutcome::Deleted),
        Locked::Done(_) => None,
    })
}

/// Result of one update attempt before error conversion: the outer `Err`
/// is the database's, `Ok(Err(msg))` is the update function's refusal.
type Attempt = Result<Result<UpdateOutcome, String>, sqlx::Error>;

// ----------------------------------------------------------------- store

/// The registry's entry point: `store.type: sql`.
pub fn parse(keys: Value, ctx: &StoreContext) -> Result<Arc<dyn StoreSpec>, ConfigError> {
    let mut config = SqlConfig::parse(keys)?;
    // A dead database should fail a request within its budget, not wait
    // for a pooled connection longer than that.
    config.acquire_timeout = ctx.timeout.max(Duration::from_millis(250));
    config.first_round_wait = near::FIRST_ROUND_WAIT.min(ctx.timeout / 4);
    Ok(Arc::new(config))
}

#[async_trait]
impl StoreSpec for SqlConfig {
    fn describe(&self) -> String {
        SqlConfig::describe(self)
    }

    fn primary_key(&self) -> &'static str {
        "store.url"
    }

    async fn connect(&self) -> Result<Arc<dyn SessionStore>, StoreError> {
        connect(self).await
    }
}

/// Open the pool, establish one connection (so a wrong URL or a dead
/// database fails here, and is retried by the caller on the next request
/// rather than cached) and create the table if configured.
pub async fn connect(cfg: &SqlConfig) -> Result<Arc<dyn SessionStore>, StoreError> {
    let store: Arc<dyn SessionStore> = match cfg.dialect {
        Dialect::Postgres => Arc::new(postgres::PgStore::connect(cfg).await?),
        Dialect::MySql => Arc::new(mysql::MySqlStore::connect(cfg).await?),
        Dialect::Sqlite => Arc::new(sqlite::SqliteStore::connect(cfg).await?),
    };
    tracing::debug!("sql store ready: {}", cfg.describe());
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert_eq!(
            TableName::parse("sessions"),
            Some(TableName {
                schema: None,
                name: "sessions".into()
            })
        );
        let t = TableName::parse("app_1.Sessions_2").unwrap();
        assert_eq!(t.schema.as_deref(), Some("app_1"));
        assert_eq!(t.quoted('"'), "\"app_1\".\"Sessions_2\"");
        assert_eq!(t.quoted('`'), "`app_1`.`Sessions_2`");
        assert!(TableName::parse(&"a".repeat(63)).is_some());
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "a.b.c",
            ".a",
            "a.",
            "s\"x",
            "x;drop table y",
            "sessions`",
            "tablé",
            &"a".repeat(64),
        ] {
            assert_eq!(TableName::parse(bad), None, "{bad:?} accepted");
        }
        assert_eq!(
            TableName::parse(&"b".repeat(60))
                .unwrap()
                .index_name()
                .len(),
            63
        );
    }

    #[test]
    fn urls_are_redacted() {
        for (url, want) in [
            (
                "postgres://u:secret@db:5432/x",
                "postgres://u:***@db:5432/x",
            ),
            ("mysql://root@127.0.0.1/test", "mysql://root@127.0.0.1/test"),
            (
                "postgres://u:p@ss@db/x?sslmode=require&password=pw#f",
                "postgres://u:***@db/x?sslmode=require&password=***#f",
            ),
            ("sqlite://./s.db", "sqlite://./s.db"),
            ("sqlite:s.db", "sqlite:s.db"),
        ] {
            assert_eq!(redact_url(url), want);
        }
    }

    #[test]
    fn dialect_from_scheme() {
        assert_eq!(
            Dialect::from_url("PostgreSQL://x/y"),
            Some(Dialect::Postgres)
        );
        assert_eq!(Dialect::from_url("mariadb://x/y"), Some(Dialect::MySql));
        assert_eq!(Dialect::from_url("sqlite::memory:"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::from_url("redis://x"), None);
        assert_eq!(Dialect::from_url("sessions.db"), None);
    }

    fn parse(yaml: &str) -> Result<SqlConfig, ConfigError> {
        SqlConfig::parse(serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn config_errors_name_their_key() {
        for (yaml, key) in [
            ("{table: x}", "store.url"),
            ("{url: 'redis://x'}", "store.url"),
            ("{url: 'postgres://x:notaport/db'}", "store.url"),
            ("{url: 'sqlite::memory:'}", "store.url"),
            ("{url: 'sqlite://x.db', table: 'x; drop'}", "store.table"),
            (
                "{url: 'sqlite://x.db', max_connections: 0}",
                "store.max_connections",
            ),
            ("{url: 'sqlite://x.db', colour: blue}", "store.colour"),
        ] {
            assert_eq!(parse(yaml).unwrap_err().key, key, "{yaml}");
        }
        let c = parse("{url: 'postgres://u:pw@h/db'}").unwrap();
        assert_eq!(c.table.to_string(), "sessions");
        assert!(c.create_table);
        assert!(!c.describe().contains("pw"), "{}", c.describe());
        assert!(!format!("{c:?}").contains("pw"));
    }

    #[test]
    fn expiry_saturates() {
        let (now, exp) = now_and_expiry(Duration::from_secs(60));
        assert_eq!(exp - now, 60_000_000);
        let (_, far) = now_and_expiry(Duration::MAX);
        assert_eq!(far, MAX_EXPIRY_MICROS);
        assert_eq!(from_micros(now_micros()).elapsed().unwrap().as_secs(), 0);
    }
}
