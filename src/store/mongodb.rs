//! `store.type: mongodb`: sessions in a MongoDB collection, through the
//! official async driver, shared by any number of gateways.
//!
//! - One document per session: `_id` (the store key), `data` (the
//!   [stored form](crate::session::SessionRecord::to_stored) as BSON binary:
//!   opaque bytes, so BSON's nesting depth and key rules never meet session
//!   data), `expires` (a BSON date) and `v` (an Int64 version, bumped by
//!   every write). A TTL index on `expires` (`expireAfterSeconds: 0`) lets
//!   the server delete expired documents, but its monitor only runs about
//!   once a minute, so every read and write also filters on
//!   `expires > now`: an expired session is never served, touched, updated
//!   or revived.
//! - `create` is an upsert that matches only an *expired* document with the
//!   key: a live one makes the insert fail with a duplicate key ("exists"),
//!   an expired leftover the TTL monitor has not removed yet is replaced.
//!   `update` is the shared compare-and-set loop ([`Cas`]) on `v`; `touch`
//!   sets `expires` of a live document only; `delete` is `deleteOne`.
//! - Writes use write concern `majority`, reads go to the primary with
//!   read concern `majority`: an acknowledged write survives failover, and
//!   a read sees every write the primary acknowledged before it, from any
//!   gateway (read-your-writes across a browser's requests). Causally
//!   consistent sessions are not used: they order the operations of one
//!   driver session, while a browser's requests may reach different
//!   gateway processes. Right after an election the new primary may serve
//!   its previous majority snapshot for a moment; the version and expiry
//!   filters keep every write correct even then.
//! - The client is created on the runtime that uses it; its server
//!   selection and connect timeouts follow `store.timeout`, so a request
//!   never waits longer for a server that is down, and the driver's own
//!   monitor finds the server again when it is back.

use super::cas::{Cas, CasOps};
use super::{StoreContext, StoreSpec};
use crate::session::{Loaded, SessionStore, StoreError, UpdateFn, UpdateOutcome};
use crate::yaml::{deserialize_at, ConfigError};
use async_trait::async_trait;
use bytes::Bytes;
use mongodb::bson::{doc, spec::BinarySubtype, Binary, Bson, DateTime, Document};
use mongodb::error::{Error, ErrorKind, WriteFailure};
use mongodb::options::{
    Acknowledgment, ClientOptions, ConnectionString, IndexOptions, ReadConcern, ReadConcernLevel,
    ReadPreference, SelectionCriteria,
};
use mongodb::{Client, Collection, IndexModel};
use serde::Deserialize;
use serde_yaml::Value;
use std::fmt;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

/// The TTL index's name. Fixed, so `create_index` is idempotent: MongoDB
/// refuses a second index on the same key under another name.
pub const INDEX_NAME: &str = "expires_ttl";

/// The shortest server selection / connect timeout, whatever
/// `store.timeout` says: below this a healthy server on a busy machine
/// starts to look down (the engine's `store.timeout` still bounds every
/// request on its own).
const MIN_DRIVER_TIMEOUT: Duration = Duration::from_millis(250);

/// Pooled connections idle this long are closed by the driver. SecantusDB
/// closes connections idle for 300 s, and so may a firewall or load
/// balancer; closing them first avoids a failed request on a dead one.
const MAX_IDLE: Duration = Duration::from_secs(240);

/// Expiry dates stop at the end of year 9999, which every tool displays.
const MAX_EXPIRY_MILLIS: i64 = 253_402_300_799_999;

/// Duplicate key: a live document already has the `_id`.
const DUPLICATE_KEY: i32 = 11000;
/// An index with the same name or key but other options already exists
/// (85 IndexOptionsConflict on mongod, 86 IndexKeySpecsConflict on mongod
/// for a name clash and on SecantusDB for both).
const INDEX_CONFLICT: [i32; 2] = [85, 86];
/// The collection (or database) does not exist yet.
const NAMESPACE_NOT_FOUND: i32 = 26;

/// Server error codes that mean "not now" rather than "no": a primary
/// stepping down or shutting down, an election, network errors the server
/// reports, time limits, write concern timeouts.
const TRANSIENT_CODES: [i32; 15] = [
    6, 7, 50, 64, 89, 91, 134, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,
];

// ------------------------------------------------------------------ config

/// The keys of `store:` for `type: mongodb` (besides the common `timeout`,
/// `retries` and `cleanup_interval`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    /// Any connection string the driver accepts: `mongodb://` (one host or
    /// a replica set's seed list) or `mongodb+srv://`, with credentials,
    /// TLS and driver options as URL parameters.
    url: String,
    #[serde(default = "default_database")]
    database: String,
    /// Flask-Session's default collection name.
    #[serde(default = "default_collection")]
    collection: String,
    /// Create the TTL index on `expires` if it is missing.
    #[serde(default = "default_create_index")]
    create_index: bool,
}

fn default_database() -> String {
    "session_gateway".into()
}

fn default_collection() -> String {
    "sessions".into()
}

fn default_create_index() -> bool {
    true
}

/// `store.type: mongodb`, validated.
#[derive(Clone)]
pub struct MongoConfig {
    url: String,
    /// `url` without its secrets, for `--test`, logs and `Debug`.
    shown: String,
    /// Every secret in `url` (password, key file password, AWS session
    /// token), masked in anything the driver says too.
    secrets: Vec<String>,
    database: String,
    collection: String,
    create_index: bool,
    /// Server selection and connect timeout; also the bound on each call.
    pub driver_timeout: Duration,
}

/// Manual so that a `{:?}` of the config never prints a password.
impl fmt::Debug for MongoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoConfig")
            .field("url", &self.shown)
            .field("database", &self.database)
            .field("collection", &self.collection)
            .field("create_index", &self.create_index)
            .field("driver_timeout", &self.driver_timeout)
            .finish()
    }
}

/// The registry's entry point: `store.type: mongodb`.
pub fn parse(keys: Value, ctx: &StoreContext) -> Result<Arc<dyn StoreSpec>, ConfigError> {
    let mut config = MongoConfig::parse(keys)?;
    config.driver_timeout = ctx.timeout.max(MIN_DRIVER_TIMEOUT);
    Ok(Arc::new(config))
}

#[async_trait]
impl StoreSpec for MongoConfig {
    fn describe(&self) -> String {
        MongoConfig::describe(self)
    }

    fn primary_key(&self) -> &'static str {
        "store.url"
    }

    async fn connect(&self) -> Result<Arc<dyn SessionStore>, StoreError> {
        Ok(Arc::new(MongoStore::connect(self).await?))
    }
}

impl MongoConfig {
    /// Parse the keys of `store:` other than `type` and the common ones.
    /// The connection string is parsed here (without DNS lookups), so a
    /// malformed one is reported at start-up with its key.
    pub fn parse(rest: Value) -> Result<Self, ConfigError> {
        let keys: Keys = deserialize_at(rest, "store")?;
        let (shown, secrets) = match ConnectionString::parse(&keys.url) {
            Ok(cs) => {
                let secrets = secrets_of(&keys.url, &cs);
                check_consistency_options(&cs)?;
                (redact(&keys.url), secrets)
            }
            Err(e) => {
                // The driver's message may quote the URL: mask what looks
                // like a password before anything is shown.
                let guess = userinfo_password(&keys.url).into_iter().collect::<Vec<_>>();
                let mut text = scrub(&message(&e), &guess);
                if text.contains("feature") {
                    // Its advice to enable a cargo feature is for the
                    // driver's users, not the gateway's.
                    text.push_str("; this build of session-gateway does not support it");
                }
                return Err(ConfigError::new(
                    "store.url",
                    format!(
                        "not a valid MongoDB connection string ({}); expected \
                         mongodb://[user:password@]host[:port][,host2…][/authdb][?options] \
                         or mongodb+srv://…",
                        text
                    ),
                ));
            }
        };
        check_database(&keys.database)?;
        check_collection(&keys.database, &keys.collection)?;
        Ok(MongoConfig {
            url: keys.url,
            shown,
            secrets,
            database: keys.database,
            collection: keys.collection,
            create_index: keys.create_index,
            driver_timeout: Duration::from_millis(500),
        })
    }

    /// One line for `--test`, without secrets.
    pub fn describe(&self) -> String {
        format!(
            "mongodb ({}, database {}, collection {}, create_index {})",
            self.shown, self.database, self.collection, self.create_index
        )
    }
}

/// The store's guarantees rest on majority writes and majority reads from
/// the primary; a URL asking for weaker ones is refused rather than
/// silently overridden.
fn check_consistency_options(cs: &ConnectionString) -> Result<(), ConfigError> {
    const WHY: &str = "the store always uses w=majority, readConcernLevel=majority and \
                       readPreference=primary (see README, MongoDB consistency); remove it from the URL";
    if let Some(w) = cs.write_concern.as_ref().and_then(|wc| wc.w.as_ref()) {
        if *w != Acknowledgment::Majority {
            return Err(ConfigError::new("store.url", format!("`w` option: {WHY}")));
        }
    }
    if let Some(rc) = &cs.read_concern {
        if rc.level != ReadConcernLevel::Majority {
            return Err(ConfigError::new(
                "store.url",
                format!("`readConcernLevel` option: {WHY}"),
            ));
        }
    }
    if let Some(rp) = &cs.read_preference {
        if !matches!(rp, ReadPreference::Primary) {
            return Err(ConfigError::new(
                "store.url",
                format!("`readPreference` option: {WHY}"),
            ));
        }
    }
    Ok(())
}

/// MongoDB's database name rules (the strictest platform's).
fn check_database(name: &str) -> Result<(), ConfigError> {
    let bad = name.is_empty()
        || name.len() > 63
        || name
            .chars()
            .any(|c| "/\\. \"$*<>:|?\0".contains(c) || c.is_control());
    if bad {
        return Err(ConfigError::new(
            "store.database",
            format!(
                "`{name}` is not a valid MongoDB database name: 1 to 63 bytes, none of / \\ . space \" $ * < > : | ?"
            ),
        ));
    }
    Ok(())
}

/// MongoDB's collection name rules, and the 255-byte namespace limit.
fn check_collection(database: &str, name: &str) -> Result<(), ConfigError> {
    let problem = if name.is_empty() {
        Some("must not be empty")
    } else if name.contains('$') || name.contains('\0') {
        Some("must not contain `$` or NUL")
    } else if name.starts_with("system.") {
        Some("`system.` collections are reserved by MongoDB")
    } else if database.len() + 1 + name.len() > 255 {
        Some("database.collection must be at most 255 bytes")
    } else {
        None
    };
    match problem {
        Some(p) => Err(ConfigError::new(
            "store.collection",
            format!("`{name}` is not a valid MongoDB collection name: {p}"),
        )),
        None => Ok(()),
    }
}

/// The secrets a connection string can carry, decoded as the driver uses
/// them and percent-encoded as they may appear in the URL.
fn secrets_of(url: &str, cs: &ConnectionString) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(cred) = &cs.credential {
        out.extend(cred.password.clone());
        if let Some(props) = &cred.mechanism_properties {
            for (k, v) in props {
                if k.to_ascii_uppercase().contains("TOKEN") {
                    out.extend(v.as_str().map(str::to_string));
                }
            }
        }
    }
    // Option values the driver keeps to itself (a key file password).
    let query = url.split_once('?').map_or("", |(_, q)| q);
    for option in query.split('&') {
        if let Some((k, v)) = option.split_once('=') {
            if k.to_ascii_lowercase().contains("password") {
                out.push(v.to_string());
            }
        }
    }
    let encoded: Vec<String> = out
        .iter()
        .map(|s| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        })
        .collect();
    out.extend(encoded);
    out.retain(|s| !s.is_empty());
    // Longest first, so a secret containing another is masked whole.
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out.dedup();
    out
}

/// The raw password of `scheme://user:password@host…`, if any.
fn userinfo_password(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then(|| password.to_string())
}

/// `text` with every secret replaced by `***`.
fn scrub(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .fold(text.to_string(), |t, s| t.replace(s.as_str(), "***"))
}

/// The URL for display: the userinfo password and the values of secret
/// options (`tlsCertificateKeyFilePassword`, `authMechanismProperties`,
/// which may hold a session token) masked by position, so a short
/// password cannot mask parts of host names.
fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut shown = match (userinfo_password(base), base.split_once("://")) {
        (Some(pw), Some((scheme, rest))) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let at = rest[..authority_end].rfind('@').unwrap_or(0);
            let user_end = at - pw.len() - 1;
            format!("{scheme}://{}:***{}", &rest[..user_end], &rest[at..])
        }
        _ => base.to_string(),
    };
    if let Some(query) = query {
        let options: Vec<String> = query
            .split('&')
            .map(|option| match option.split_once('=') {
                Some((k, _))
                    if k.to_ascii_lowercase().contains("password")
                        || k.eq_ignore_ascii_case("authMechanismProperties") =>
                {
                    format!("{k}=***")
                }
                _ => option.to_string(),
            })
            .collect();
        shown = format!("{shown}?{}", options.join("&"));
    }
    shown
}

// ------------------------------------------------------------------ errors

/// What the driver said, as one line: its `Display` of write errors is a
/// `Debug` dump.
fn message(e: &Error) -> String {
    let text = match &*e.kind {
        ErrorKind::Command(c) => format!("{} ({}): {}", c.code_name, c.code, c.message),
        ErrorKind::Write(WriteFailure::WriteError(w)) => {
            format!("write error {}: {}", w.code, w.message)
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            format!(
                "write concern error {} ({}): {}",
                w.code_name, w.code, w.message
            )
        }
        // The kind alone: the error's own Display adds empty labels.
        kind => kind.to_string(),
    };
    text.replace('\n', " ")
}

/// The server's error code, if the error is one the server returned.
fn code(e: &Error) -> Option<i32> {
    match &*e.kind {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        _ => None,
    }
}

/// Unreachable, no primary, a network error, an election or shutdown in
/// progress, a time limit => `Unavailable` (the engine retries and applies
/// `on_store_error`); what the server refused (authentication, a bad
/// operation, permissions) => `Backend`.
fn classify(e: &Error, secrets: &[String]) -> StoreError {
    let unavailable = matches!(
        &*e.kind,
        ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::DnsResolve { .. }
            | ErrorKind::Shutdown
    ) || code(e).is_some_and(|c| TRANSIENT_CODES.contains(&c))
        || e.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
        || e.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR);
    let msg = format!("mongodb: {}", scrub(&message(e), secrets));
    if unavailable {
        StoreError::Unavailable(msg)
    } else {
        StoreError::Backend(msg)
    }
}

fn is_duplicate_key(e: &Error) -> bool {
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == DUPLICATE_KEY)
}

// ------------------------------------------------------------------- time

/// A BSON date `ttl` after `now`, saturating at the end of year 9999.
fn expiry(now: DateTime, ttl: Duration) -> DateTime {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    DateTime::from_millis(
        now.timestamp_millis()
            .saturating_add(ttl_ms)
            .min(MAX_EXPIRY_MILLIS),
    )
}

fn binary(value: &[u8]) -> Binary {
    Binary {
        subtype: BinarySubtype::Generic,
        bytes: value.to_vec(),
    }
}

// ------------------------------------------------------------------- store

pub struct MongoStore {
    client: Client,
    sessions: Collection<Document>,
    cas: Cas,
    config: MongoConfig,
}

/// A live session document as read.
struct Found {
    data: Bytes,
    expires: DateTime,
    version: Bson,
}

impl MongoStore {
    /// Build the client (server discovery runs in the background) and, with
    /// `create_index`, make sure the TTL index exists: that first round
    /// trip is also what makes a server that is down fail here, so the
    /// store handle tries again on the next request instead of caching a
    /// store that never worked.
    pub async fn connect(config: &MongoConfig) -> Result<MongoStore, StoreError> {
        let secrets = &config.secrets;
        let mut options = ClientOptions::parse(config.url.as_str())
            .await
            .map_err(|e| classify(&e, secrets))?;
        options.app_name = Some("session-gateway".into());
        options.server_selection_timeout = Some(config.driver_timeout);
        options.connect_timeout = Some(config.driver_timeout);
        options.max_idle_time = Some(MAX_IDLE);
        // `w` is always majority (other values were refused at config
        // time) and journaled unless the URL says `journal=false`, which
        // is mongod's default for majority writes made explicit (and what
        // makes a SecantusDB test server durable). A `wtimeoutMS` stays.
        let mut wc = options.write_concern.take().unwrap_or_default();
        wc.w = Some(Acknowledgment::Majority);
        wc.journal.get_or_insert(true);
        options.write_concern = Some(wc);
        options.read_concern = Some(ReadConcern::majority());
        options.selection_criteria =
            Some(SelectionCriteria::ReadPreference(ReadPreference::Primary));
        let client = Client::with_options(options).map_err(|e| classify(&e, secrets))?;
        let sessions = client
            .database(&config.database)
            .collection::<Document>(&config.collection);
        let store = MongoStore {
            client,
            sessions,
            cas: Cas::default(),
            config: config.clone(),
        };
        if config.create_index {
            store.ensure_index().await?;
        } else {
            store.ping().await?;
        }
        tracing::debug!("mongodb store ready: {}", config.describe());
        Ok(store)
    }

    /// Run one driver call within the driver timeout: the driver has no
    /// reply timeout of its own, and a frozen server would otherwise hold
    /// `--test` until its whole budget ends. The inner result is the
    /// driver's, for callers that look at particular errors.
    async fn within<T>(
        &self,
        call: impl IntoFuture<Output = mongodb::error::Result<T>>,
    ) -> Result<mongodb::error::Result<T>, StoreError> {
        tokio::time::timeout(self.config.driver_timeout, call.into_future())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "mongodb: no answer within {:?}",
                    self.config.driver_timeout
                ))
            })
    }

    /// [`within`](Self::within), with every driver error classified.
    async fn bounded<T>(
        &self,
        call: impl IntoFuture<Output = mongodb::error::Result<T>>,
    ) -> Result<T, StoreError> {
        self.within(call).await?.map_err(|e| self.error(&e))
    }

    fn error(&self, e: &Error) -> StoreError {
        classify(e, &self.config.secrets)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(self.client.database("admin").run_command(doc! {"ping": 1}))
            .await
            .map(drop)
    }

    /// The session's live document, if any.
    async fn find_live(&self, key: &str) -> Result<Option<Found>, StoreError> {
        let filter = doc! {"_id": key, "expires": {"$gt": DateTime::now()}};
        let found = self
            .bounded(
                self.sessions
                    .find_one(filter)
                    .projection(doc! {"data": 1, "expires": 1, "v": 1}),
            )
            .await?;
        Ok(found.map(|mut d| Found {
            // Anything but binary data (a foreign writer) is an unreadable
            // value: the engine treats it as no session.
            data: match d.remove("data") {
                Some(Bson::Binary(b)) => Bytes::from(b.bytes),
                _ => Bytes::new(),
            },
            // The filter only matches dates.
            expires: d.get_datetime("expires").copied().unwrap_or(DateTime::MIN),
            version: d.remove("v").unwrap_or(Bson::Null),
        }))
    }

    /// Whether the collection has a TTL index on `expires` alone with
    /// `expireAfterSeconds: 0` (under any name). `Err` for another index
    /// on `expires` that is not one.
    async fn ttl_index_present(&self) -> Result<bool, StoreError> {
        let mut cursor = match self.within(self.sessions.list_indexes()).await? {
            Ok(c) => c.with_type::<Document>(),
            // A collection that does not exist yet has no indexes.
            Err(e) if code(&e) == Some(NAMESPACE_NOT_FOUND) => return Ok(false),
            Err(e) => return Err(self.error(&e)),
        };
        let mut other = None;
        while self.bounded(cursor.advance()).await? {
            let index: Document = cursor.deserialize_current().map_err(|e| self.error(&e))?;
            let on_expires = index
                .get_document("key")
                .is_ok_and(|k| k.len() == 1 && k.contains_key("expires"));
            if !on_expires {
                continue;
            }
            let ttl = index.get("expireAfterSeconds").and_then(as_i64);
            if ttl == Some(0) {
                return Ok(true);
            }
            other = Some(format!(
                "`{}` ({})",
                index.get_str("name").unwrap_or("?"),
                match ttl {
                    Some(s) => format!("expireAfterSeconds: {s}"),
                    None => "not a TTL index".into(),
                }
            ));
        }
        match other {
            None => Ok(false),
            Some(index) => Err(StoreError::Backend(format!(
                "store.collection: {}.{} has an index {index} on `expires` where the store needs \
                 a TTL index with expireAfterSeconds: 0; drop that index (the gateway then creates \
                 its own) or use another collection",
                self.config.database, self.config.collection
            ))),
        }
    }

    /// Create the TTL index unless an equivalent one exists.
    async fn ensure_index(&self) -> Result<(), StoreError> {
        if self.ttl_index_present().await? {
            return Ok(());
        }
        let index = IndexModel::builder()
            .keys(doc! {"expires": 1})
            .options(
                IndexOptions::builder()
                    .name(INDEX_NAME.to_string())
                    .expire_after(Duration::ZERO)
                    .build(),
            )
            .build();
        match self.within(self.sessions.create_index(index)).await? {
            Ok(_) => Ok(()),
            Err(e) if code(&e).is_some_and(|c| INDEX_CONFLICT.contains(&c)) => {
                Err(StoreError::Backend(format!(
                    "store.collection: {}.{} already has an index named `{INDEX_NAME}` or on \
                     `expires` with other options ({}); drop it (the gateway then creates the TTL \
                     index) or use another collection",
                    self.config.database,
                    self.config.collection,
                    scrub(&message(&e), &self.config.secrets)
                )))
            }
            Err(e) => Err(self.error(&e)),
        }
    }

    /// `--test` with `create_index: false`: the index must be there.
    async fn require_index(&self) -> Result<(), StoreError> {
        if self.ttl_index_present().await? {
            return Ok(());
        }
        Err(StoreError::Backend(format!(
            "store.create_index: {db}.{coll} has no TTL index on `expires`; create it with \
             `db.getSiblingDB(\"{db}\").{coll}.createIndex({{expires: 1}}, {{name: \"{INDEX_NAME}\", \
             expireAfterSeconds: 0}})` or set store.create_index: true",
            db = self.config.database,
            coll = self.config.collection
        )))
    }
}

/// A BSON number as an integer (servers report `expireAfterSeconds` as
/// int32, int64 or double).
fn as_i64(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        Bson::Double(f) if f.fract() == 0.0 => Some(*f as i64),
        _ => None,
    }
}

/// The compare-and-set primitives on the version field `v`.
#[async_trait]
impl CasOps for MongoStore {
    /// `v` as stored (`Null` if a foreign document has none: the filter
    /// `v: null` matches exactly such documents).
    type Version = Bson;

    async fn read(&self, key: &str) -> Result<Option<(Bytes, Bson)>, StoreError> {
        Ok(self.find_live(key).await?.map(|f| (f.data, f.version)))
    }

    async fn write_if(
        &self,
        key: &str,
        version: &Bson,
        value: &Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = DateTime::now();
        // `$inc` on a missing `v` sets it to 1; on `null` it would fail,
        // so a foreign document without `v` gets one by `$set`.
        let update = if matches!(version, Bson::Null) {
            doc! {"$set": {"data": binary(value), "expires": expiry(now, ttl), "v": 1_i64}}
        } else {
            doc! {"$set": {"data": binary(value), "expires": expiry(now, ttl)}, "$inc": {"v": 1_i64}}
        };
        let result = self
            .bounded(self.sessions.update_one(
                doc! {"_id": key, "v": version.clone(), "expires": {"$gt": now}},
                update,
            ))
            .await?;
        Ok(result.matched_count == 1)
    }

    async fn delete_if(&self, key: &str, version: &Bson) -> Result<bool, StoreError> {
        let result = self
            .bounded(
                self.sessions
                    .delete_one(doc! {"_id": key, "v": version.clone()}),
            )
            .await?;
        Ok(result.deleted_count == 1)
    }
}

#[async_trait]
impl SessionStore for MongoStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        Ok(self.find_live(key).await?.map(|f| Loaded {
            value: f.data,
            expires_at: f.expires.to_system_time(),
        }))
    }

    async fn create(&self, key: &str, value: &Bytes, ttl: Duration) -> Result<bool, StoreError> {
        let now = DateTime::now();
        // Matches only an expired leftover, which is replaced (`v` keeps
        // counting, so a writer that read the old document cannot match
        // the new one). With no document the upsert inserts one; with a
        // live one it tries to insert a second `_id`, which the unique
        // `_id` index refuses: the session exists.
        let upsert = self
            .sessions
            .update_one(
                doc! {"_id": key, "expires": {"$lte": now}},
                doc! {
                    "$set": {"data": binary(value), "expires": expiry(now, ttl)},
                    "$inc": {"v": 1_i64},
                },
            )
            .upsert(true);
        match self.within(upsert).await? {
            Ok(r) => Ok(r.matched_count == 1 || r.upserted_id.is_some()),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(self.error(&e)),
        }
    }

    async fn update(
        &self,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        self.cas.update(self, key, ttl, f).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.bounded(self.sessions.delete_one(doc! {"_id": key}))
            .await
            .map(drop)
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = DateTime::now();
        // Never an upsert: an expired or deleted session stays gone.
        let result = self
            .bounded(self.sessions.update_one(
                doc! {"_id": key, "expires": {"$gt": now}},
                doc! {"$set": {"expires": expiry(now, ttl)}},
            ))
            .await?;
        Ok(result.matched_count == 1)
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.ping().await?;
        if self.config.create_index {
            self.ensure_index().await
        } else {
            self.require_index().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<MongoConfig, ConfigError> {
        MongoConfig::parse(serde_yaml::from_str(yaml).unwrap())
    }

    fn err_key(yaml: &str) -> String {
        parse(yaml).unwrap_err().key
    }

    #[test]
    fn defaults() {
        let c = parse("{url: 'mongodb://127.0.0.1:27017'}").unwrap();
        assert_eq!(c.database, "session_gateway");
        assert_eq!(c.collection, "sessions");
        assert!(c.create_index);
        assert_eq!(
            c.describe(),
            "mongodb (mongodb://127.0.0.1:27017, database session_gateway, collection sessions, create_index true)"
        );
    }

    #[test]
    fn config_errors_name_their_key() {
        for (yaml, key) in [
            ("{}", "store.url"),
            ("{url: 'redis://127.0.0.1'}", "store.url"),
            ("{url: '127.0.0.1:27017'}", "store.url"),
            ("{url: 'mongodb://h:notaport'}", "store.url"),
            ("{url: 'mongodb+srv://a.example:27017'}", "store.url"),
            ("{url: 'mongodb://h/?w=1'}", "store.url"),
            ("{url: 'mongodb://h/?readConcernLevel=local'}", "store.url"),
            (
                "{url: 'mongodb://h/?readPreference=secondary'}",
                "store.url",
            ),
            ("{url: 'mongodb://h', database: 'a.b'}", "store.database"),
            ("{url: 'mongodb://h', database: ''}", "store.database"),
            ("{url: 'mongodb://h', collection: ''}", "store.collection"),
            (
                "{url: 'mongodb://h', collection: 'a$b'}",
                "store.collection",
            ),
            (
                "{url: 'mongodb://h', collection: 'system.x'}",
                "store.collection",
            ),
            (
                "{url: 'mongodb://h', create_index: maybe}",
                "store.create_index",
            ),
            ("{url: 'mongodb://h', table: x}", "store.table"),
        ] {
            assert_eq!(err_key(yaml), key, "{yaml}");
        }
        let long = format!("{{url: 'mongodb://h', collection: '{}'}}", "c".repeat(250));
        assert_eq!(err_key(&long), "store.collection");
        // What the store would use anyway is accepted.
        parse("{url: 'mongodb://h/?w=majority&readConcernLevel=majority&readPreference=primary&wtimeoutMS=2000'}")
            .unwrap();
        parse("{url: 'mongodb+srv://cluster0.example.net/?retryWrites=true'}").unwrap();
        parse("{url: 'mongodb://a:27017,b:27017,c:27017/?replicaSet=rs0&tls=true'}").unwrap();
    }

    #[test]
    fn secrets_are_never_shown() {
        let c = parse(
            "{url: 'mongodb://app:hunter2@db1.example:27017,db2.example:27017/admin?replicaSet=rs0&tls=true&tlsCAFile=/etc/ssl/ca.pem'}",
        )
        .unwrap();
        let shown = format!("{} {c:?}", c.describe());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("tlsCAFile=/etc/ssl/ca.pem"), "{shown}");
        assert!(
            shown.contains(
                "mongodb://app:***@db1.example:27017,db2.example:27017/admin?replicaSet=rs0"
            ),
            "{shown}"
        );
        // A short password does not mask host names.
        let c = parse("{url: 'mongodb://u:a@a.example/'}").unwrap();
        assert!(
            c.describe()
                .starts_with("mongodb (mongodb://u:***@a.example/, database"),
            "{}",
            c.describe()
        );
        // Percent-encoded passwords.
        let c = parse("{url: 'mongodb://app:p%40ss@h/?authSource=admin'}").unwrap();
        let shown = format!("{} {c:?}", c.describe());
        assert!(!shown.contains("p%40ss"), "{shown}");
        assert!(shown.contains("app:***@h/?authSource=admin"), "{shown}");
        // Options that may hold a token or a key password.
        assert_eq!(
            redact("mongodb://h/?authMechanismProperties=AWS_SESSION_TOKEN:t0k&tlsCertificateKeyFilePassword=pw&tls=true"),
            "mongodb://h/?authMechanismProperties=***&tlsCertificateKeyFilePassword=***&tls=true"
        );
        // The driver's errors are scrubbed of every secret.
        assert_eq!(
            scrub("auth failed for p@ss", &["p@ss".to_string()]),
            "auth failed for ***"
        );
        // Nor in errors about the URL.
        let e = parse("{url: 'mongodb://u:hunter2@h:notaport/'}").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn expiry_saturates() {
        let now = DateTime::from_millis(1_000);
        assert_eq!(
            expiry(now, Duration::from_secs(60)).timestamp_millis(),
            61_000
        );
        assert_eq!(
            expiry(now, Duration::MAX).timestamp_millis(),
            MAX_EXPIRY_MILLIS
        );
    }
}
