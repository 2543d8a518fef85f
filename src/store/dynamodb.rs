//! `store.type: dynamodb`: one item per session in an Amazon DynamoDB
//! table, through `aws-sdk-dynamodb`, shared by any number of gateways
//! without a server of our own to run.
//!
//! - The item: `id` (S, partition key) = the store key, `data` (B) = the
//!   record's stored form, `expires` (N, epoch seconds, rounded up) = the
//!   table's TTL attribute, `expires_ms` (N, epoch milliseconds) = the
//!   expiry every read and condition uses, `v` (N) = a random version, new
//!   on every write.
//! - DynamoDB's TTL deletes expired items "typically within a few days", so
//!   expiry is enforced at read time: an item with `expires_ms <= now` is
//!   missing to `load`, `update` and `touch`, and `create` may replace it.
//!   TTL only reclaims the space. Seconds are what TTL accepts; the
//!   milliseconds keep short lifetimes and the refresh throttle exact.
//! - Every read is strongly consistent (`ConsistentRead`): a session a
//!   gateway destroyed is gone for the next request on any other gateway.
//! - Writes are conditional: `create` only over a missing or expired item,
//!   `update` through the shared compare-and-set loop ([`Cas`]) on `v`,
//!   `touch` only on a live item. A failed condition is an answer (taken,
//!   changed, gone), never an error.
//! - The SDK retries throttling, 5xx and network errors itself, within
//!   timeouts derived from `store.timeout`. A retried conditional write
//!   whose first attempt landed reports a failed condition; the random
//!   version (echoed back by `ReturnValuesOnConditionCheckFailure`) tells
//!   our own write from someone else's.
//! - `create_table: true` creates the table (on-demand) and turns on TTL
//!   on `expires` at connect time, and again if the table disappears.

use super::cas::{Cas, CasOps};
use super::{StoreContext, StoreSpec};
use crate::session::{Loaded, SessionStore, StoreError, UpdateFn, UpdateOutcome};
use crate::yaml::{deserialize_at, ConfigError};
use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableDescription, TableStatus,
    TimeToLiveSpecification, TimeToLiveStatus,
};
use aws_sdk_dynamodb::Client;
use aws_smithy_http_client::{tls, Builder as HttpClientBuilder};
use bytes::Bytes;
use serde::Deserialize;
use serde_yaml::Value as Yaml;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Attribute names of the item (always sent as `#aliases`: DynamoDB
/// reserves `data` and hundreds of other words in expressions).
const ID: &str = "id";
const DATA: &str = "data";
const EXPIRES: &str = "expires";
const EXPIRES_MS: &str = "expires_ms";
const VERSION: &str = "v";

/// DynamoDB's limit on a partition key value.
const MAX_KEY_BYTES: usize = 2048;

/// DynamoDB's item size limit (400 KB), attribute names and values.
const MAX_ITEM_BYTES: usize = 409_600;

/// Our attributes besides the key and the value: their names, two
/// expiries and the version as numbers (at most 21 bytes each).
const ITEM_ATTRIBUTES_BYTES: usize = 128;

/// How long `create_table` waits for a new table to become ACTIVE (real
/// DynamoDB: seconds; requests arriving meanwhile fail and retry).
const TABLE_ACTIVE_WAIT: Duration = Duration::from_secs(60);
const TABLE_POLL: Duration = Duration::from_millis(250);

/// Bound on resolving the region and credential sources when the client is
/// built (the region chain may ask instance metadata).
const LOAD_TIMEOUT: Duration = Duration::from_secs(3);

/// SDK attempts per call (the first one included): the SDK retries
/// throttling, 5xx and network errors, all within `store.timeout`.
const SDK_MAX_ATTEMPTS: u32 = 3;

// ------------------------------------------------------------------ config

/// The DynamoDB keys of `store:` (`timeout`, `retries` and
/// `cleanup_interval` are common to every store and parsed elsewhere).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    /// The table holding the sessions.
    #[serde(default = "default_table")]
    table: String,
    /// AWS region; default: the SDK's chain (AWS_REGION, profile, instance
    /// metadata).
    #[serde(default)]
    region: Option<String>,
    /// Another endpoint: DynamoDB Local, a test server, a VPC endpoint.
    #[serde(default)]
    endpoint_url: Option<String>,
    /// Create the table (and enable TTL) if missing.
    #[serde(default = "default_create_table")]
    create_table: bool,
}

fn default_table() -> String {
    "sessions".into()
}

fn default_create_table() -> bool {
    true
}

/// `store.type: dynamodb`, validated. Holds no secret (credentials come
/// from the AWS chain; an endpoint URL with userinfo is refused), so the
/// derived `Debug` is safe.
#[derive(Clone, Debug)]
pub struct DynamoConfig {
    table: String,
    region: Option<String>,
    endpoint_url: Option<String>,
    create_table: bool,
    /// `store.timeout`: the SDK's whole-call timeout, retries included.
    timeout: Duration,
}

/// The registry's entry point: `store.type: dynamodb`.
pub fn parse(keys: Yaml, ctx: &StoreContext) -> Result<Arc<dyn StoreSpec>, ConfigError> {
    Ok(Arc::new(DynamoConfig::parse(keys, ctx)?))
}

#[async_trait]
impl StoreSpec for DynamoConfig {
    fn describe(&self) -> String {
        format!(
            "dynamodb (table {}, region {}, endpoint {}, create_table {})",
            self.table,
            self.region.as_deref().unwrap_or("from the AWS environment"),
            self.endpoint_url.as_deref().unwrap_or("AWS"),
            self.create_table
        )
    }

    fn primary_key(&self) -> &'static str {
        "store.table"
    }

    async fn connect(&self) -> Result<Arc<dyn SessionStore>, StoreError> {
        Ok(Arc::new(DynamoStore::connect(self).await?))
    }
}

impl DynamoConfig {
    /// Parse the keys of `store:` other than `type` and the common ones.
    pub fn parse(rest: Yaml, ctx: &StoreContext) -> Result<Self, ConfigError> {
        let keys: Keys = deserialize_at(rest, "store")?;
        check_table_name(&keys.table)?;
        if let Some(region) = &keys.region {
            let valid = !region.is_empty()
                && region.len() <= 64
                && region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(ConfigError::new(
                    "store.region",
                    format!("`{region}` is not an AWS region name (e.g. us-east-1)"),
                ));
            }
        }
        if let Some(url) = &keys.endpoint_url {
            check_endpoint(url)?;
        }
        if ctx.max_key_len > MAX_KEY_BYTES {
            return Err(ConfigError::new(
                "session.key_prefix",
                format!(
                    "store keys would be up to {} bytes; DynamoDB allows {MAX_KEY_BYTES} in a partition key",
                    ctx.max_key_len
                ),
            ));
        }
        // An item holds the key, the value and a few small attributes; it
        // may be at most 400 KB (409 600 bytes, attribute names included).
        let item = ctx.max_key_len + ctx.max_value_len + ITEM_ATTRIBUTES_BYTES;
        if item > MAX_ITEM_BYTES {
            return Err(ConfigError::new(
                "session.max_bytes",
                format!(
                    "sessions of up to this size make DynamoDB items of {item} bytes; \
                     the limit is {MAX_ITEM_BYTES}: lower session.max_bytes"
                ),
            ));
        }
        Ok(DynamoConfig {
            table: keys.table,
            region: keys.region,
            endpoint_url: keys.endpoint_url,
            create_table: keys.create_table,
            timeout: ctx.timeout,
        })
    }
}

/// DynamoDB's table naming rule: 3 to 255 of `[A-Za-z0-9_.-]`.
fn check_table_name(name: &str) -> Result<(), ConfigError> {
    let valid = (3..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ConfigError::new(
            "store.table",
            format!(
                "`{name}` is not a DynamoDB table name: 3 to 255 letters, digits, `_`, `.` or `-`"
            ),
        ))
    }
}

/// `http(s)://host[:port][/path]`, without userinfo (credentials never go
/// in the YAML). The message never echoes a URL with userinfo.
fn check_endpoint(url: &str) -> Result<(), ConfigError> {
    const EXPECTED: &str =
        "expected http://host:port or https://host (e.g. http://127.0.0.1:8000 for DynamoDB Local)";
    let key = "store.endpoint_url";
    let uri: http::Uri = url
        .parse()
        .map_err(|_| ConfigError::new(key, format!("`{url}` is not a URL; {EXPECTED}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(ConfigError::new(
                key,
                format!("`{url}`: unsupported scheme; {EXPECTED}"),
            ))
        }
    }
    let Some(authority) = uri.authority() else {
        return Err(ConfigError::new(
            key,
            format!("`{url}` has no host; {EXPECTED}"),
        ));
    };
    if authority.as_str().contains('@') {
        return Err(ConfigError::new(
            key,
            "credentials do not belong in the URL: they come from the AWS chain \
             (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile, web identity, instance role)",
        ));
    }
    if authority.host().is_empty() {
        return Err(ConfigError::new(
            key,
            format!("`{url}` has no host; {EXPECTED}"),
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------- store

/// A call's failure before it becomes a [`StoreError`]: a missing table is
/// kept apart so `create_table: true` can create it and try again.
enum Failure {
    MissingTable,
    Store(StoreError),
}

/// A live item, as read.
struct Live {
    data: Bytes,
    expires_ms: i64,
    /// `v` exactly as stored, sent back in the write condition.
    version: String,
}

pub struct DynamoStore {
    client: Client,
    table: String,
    create_table: bool,
    /// Where requests go, for messages (`the AWS endpoint of us-east-1`).
    target: String,
    timeout: Duration,
    cas: Cas,
    /// One table creation at a time per store.
    ensure_lock: tokio::sync::Mutex<()>,
}

impl DynamoStore {
    /// Build the client (bounded timeouts and retries, credentials from the
    /// AWS chain) and, with `create_table`, make sure the table exists.
    pub async fn connect(config: &DynamoConfig) -> Result<DynamoStore, StoreError> {
        // Each SDK attempt gets half the budget, so one slow attempt leaves
        // room for a retry; the whole call, backoff included, never
        // outlives store.timeout.
        let attempt = config.timeout / 2;
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(attempt)
            .operation_attempt_timeout(attempt)
            .operation_timeout(config.timeout)
            .build();
        let retries = RetryConfig::standard()
            .with_max_attempts(SDK_MAX_ATTEMPTS)
            .with_initial_backoff(Duration::from_millis(20))
            .with_max_backoff(config.timeout / 4);
        // rustls on ring (shared with the rest of the gateway), not the
        // SDK's default aws-lc; plain http:// endpoints work too.
        let http = HttpClientBuilder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts)
            .retry_config(retries);
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        let sdk = tokio::time::timeout(LOAD_TIMEOUT, loader.load())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "dynamodb: could not determine the AWS region within {LOAD_TIMEOUT:?}; set store.region"
                ))
            })?;
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            return Err(StoreError::Backend(
                "dynamodb: no AWS region: set store.region or AWS_REGION".into(),
            ));
        };
        let target = match &config.endpoint_url {
            Some(url) => format!("{url} (store.endpoint_url)"),
            None => format!("the AWS endpoint of {region}"),
        };
        let store = DynamoStore {
            client: Client::new(&sdk),
            table: config.table.clone(),
            create_table: config.create_table,
            target,
            timeout: config.timeout,
            cas: Cas::default(),
            ensure_lock: tokio::sync::Mutex::new(()),
        };
        if store.create_table {
            store.ensure_table().await?;
        }
        Ok(store)
    }

    /// Run `op`; if the table is missing and `create_table` is on, create
    /// it and run `op` once more (a table deleted under running gateways,
    /// or a test server that lost its state).
    async fn with_table<T, Fut>(&self, op: impl Fn() -> Fut) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, Failure>>,
    {
        match op().await {
            Err(Failure::MissingTable) if self.create_table => {
                tracing::warn!(table = %self.table, "dynamodb table missing; creating it again");
                self.ensure_table().await?;
                op().await.map_err(|f| self.store_error(f))
            }
            other => other.map_err(|f| self.store_error(f)),
        }
    }

    fn store_error(&self, f: Failure) -> StoreError {
        match f {
            Failure::Store(e) => e,
            Failure::MissingTable => StoreError::Backend(format!(
                "dynamodb: table `{}` (store.table) does not exist at {}; create it \
                 (partition key `id`, type S; TTL on `expires`) or set store.create_table: true",
                self.table, self.target
            )),
        }
    }

    /// Classify an SDK error. Throttling, 5xx, network errors and timeouts
    /// (the SDK already retried them) are `Unavailable`, so the engine
    /// applies `on_store_error`; anything DynamoDB refused is `Backend`.
    fn failure<E>(&self, e: SdkError<E>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let unavailable = |what: String| {
            Failure::Store(StoreError::Unavailable(format!(
                "dynamodb at {}: {what}",
                self.target
            )))
        };
        match &e {
            SdkError::TimeoutError(_) => {
                unavailable(format!("no answer within {:?}", self.timeout))
            }
            // Refused, reset or cut connections (`other` with a retry
            // kind: an answer cut short); not credential problems, which
            // are `other` without one.
            SdkError::DispatchFailure(d)
                if d.is_io() || d.is_timeout() || d.as_other().is_some() =>
            {
                unavailable(causes(&e))
            }
            SdkError::ServiceError(s) => {
                let code = s.err().code().unwrap_or("");
                if code == "ResourceNotFoundException" {
                    return Failure::MissingTable;
                }
                let throttled = matches!(
                    code,
                    "ProvisionedThroughputExceededException"
                        | "ThrottlingException"
                        | "RequestLimitExceeded"
                        | "InternalServerError"
                );
                let message = format!("{code}: {}", s.err().message().unwrap_or("(no message)"));
                if throttled || s.raw().status().is_server_error() {
                    unavailable(message)
                } else {
                    Failure::Store(StoreError::Backend(format!("dynamodb: {message}")))
                }
            }
            SdkError::ResponseError(r) if r.raw().status().is_server_error() => {
                unavailable(causes(&e))
            }
            // Credentials that could not be found or loaded, a request the
            // SDK could not build, an answer that is not DynamoDB's.
            _ => Failure::Store(StoreError::Backend(format!("dynamodb: {}", causes(&e)))),
        }
    }

    // --------------------------------------------------------- table setup

    /// Create the table if missing, wait until it is ACTIVE, and enable TTL
    /// on `expires` unless it is on (DynamoDB refuses a second
    /// UpdateTimeToLive within an hour).
    async fn ensure_table(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.ensure_lock.lock().await;
        let status = match self.table_status().await {
            Ok(status) => status,
            Err(Failure::MissingTable) => {
                self.create().await?;
                None
            }
            Err(f) => return Err(self.store_error(f)),
        };
        if status != Some(TableStatus::Active) {
            self.wait_active().await?;
        }
        let (status, attribute) = self.ttl().await?;
        let attribute = attribute.as_deref();
        match status {
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling) => {
                if attribute != Some(EXPIRES) {
                    // Changing it would disable TTL for the other attribute;
                    // that is the table owner's decision. `--test` warns.
                    tracing::warn!(
                        table = %self.table,
                        "TTL is enabled on `{}`, not `{EXPIRES}`: DynamoDB will not delete expired sessions",
                        attribute.unwrap_or("?")
                    );
                }
                Ok(())
            }
            Some(TimeToLiveStatus::Disabling) => {
                tracing::warn!(table = %self.table, "TTL is being disabled; enable it on `{EXPIRES}` later");
                Ok(())
            }
            _ => {
                let spec = TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name(EXPIRES)
                    .build()
                    .map_err(StoreError::backend)?;
                self.client
                    .update_time_to_live()
                    .table_name(&self.table)
                    .time_to_live_specification(spec)
                    .send()
                    .await
                    .map_err(|e| self.store_error(self.failure(e)))?;
                tracing::info!(table = %self.table, "enabled TTL on `{EXPIRES}`");
                Ok(())
            }
        }
    }

    /// The table's TTL status and attribute.
    async fn ttl(&self) -> Result<(Option<TimeToLiveStatus>, Option<String>), StoreError> {
        let out = self
            .client
            .describe_time_to_live()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| self.store_error(self.failure(e)))?;
        let desc = out.time_to_live_description();
        Ok((
            desc.and_then(|d| d.time_to_live_status()).cloned(),
            desc.and_then(|d| d.attribute_name()).map(str::to_string),
        ))
    }

    /// The table's status; `Err(MissingTable)` if there is none.
    async fn table_status(&self) -> Result<Option<TableStatus>, Failure> {
        Ok(self
            .describe()
            .await?
            .and_then(|t| t.table_status().cloned()))
    }

    /// DescribeTable; `Err(MissingTable)` if there is none.
    async fn describe(&self) -> Result<Option<TableDescription>, Failure> {
        let out = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| self.failure(e))?;
        Ok(out.table().cloned())
    }

    /// CreateTable, on-demand, `id` (S) as the only key. Another gateway
    /// creating it at the same moment is fine.
    async fn create(&self) -> Result<(), StoreError> {
        let key = KeySchemaElement::builder()
            .attribute_name(ID)
            .key_type(KeyType::Hash)
            .build()
            .map_err(StoreError::backend)?;
        let attribute = AttributeDefinition::builder()
            .attribute_name(ID)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(StoreError::backend)?;
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key)
            .attribute_definitions(attribute)
            .send()
            .await;
        match created {
            Ok(_) => {
                tracing::info!(table = %self.table, "created dynamodb table (on-demand)");
                Ok(())
            }
            Err(SdkError::ServiceError(e))
                if matches!(e.err(), CreateTableError::ResourceInUseException(_)) =>
            {
                Ok(())
            }
            Err(e) => Err(self.store_error(self.failure(e))),
        }
    }

    async fn wait_active(&self) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + TABLE_ACTIVE_WAIT;
        loop {
            match self.table_status().await {
                Ok(Some(TableStatus::Active)) => return Ok(()),
                // Just created: DescribeTable may not see it for a moment.
                Ok(_) | Err(Failure::MissingTable) => {}
                Err(f) => return Err(self.store_error(f)),
            }
            if tokio::time::Instant::now() + TABLE_POLL > deadline {
                return Err(StoreError::Unavailable(format!(
                    "dynamodb: table `{}` did not become ACTIVE within {TABLE_ACTIVE_WAIT:?}",
                    self.table
                )));
            }
            tokio::time::sleep(TABLE_POLL).await;
        }
    }

    // ------------------------------------------------------------- requests

    /// The live item under `key` (strongly consistent read).
    async fn get_live(&self, key: &str) -> Result<Option<Live>, Failure> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(ID, AttributeValue::S(key.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.failure(e))?;
        Ok(out.item().and_then(|item| live(item, now_ms())))
    }

    /// PutItem of a whole item under `condition`; `Ok(false)` if the
    /// condition failed and the item there is not the one we wrote (an
    /// attempt that landed but whose answer was lost looks like a failed
    /// condition on the SDK's retry: the version tells).
    async fn put_if(
        &self,
        key: &str,
        value: &Bytes,
        ttl: Duration,
        condition: &str,
        names: &[(&str, &str)],
        values: Vec<(&str, AttributeValue)>,
    ) -> Result<bool, Failure> {
        let version = new_version();
        let expires_ms =
            now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        let item = HashMap::from([
            (ID.to_string(), AttributeValue::S(key.to_string())),
            (
                DATA.to_string(),
                AttributeValue::B(Blob::new(value.to_vec())),
            ),
            (EXPIRES.to_string(), number(ttl_seconds(expires_ms))),
            (EXPIRES_MS.to_string(), number(expires_ms)),
            (VERSION.to_string(), AttributeValue::N(version.clone())),
        ]);
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(condition)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        for (alias, name) in names {
            req = req.expression_attribute_names(*alias, *name);
        }
        for (alias, v) in values {
            req = req.expression_attribute_values(alias, v);
        }
        match req.send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                let current = match e.err() {
                    aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c) => c.item(),
                    _ => None,
                };
                Ok(current.is_some_and(|item| n_attr(item, VERSION) == Some(version.as_str())))
            }
            Err(e) => Err(self.failure(e)),
        }
    }
}

/// An error and its causes on one line (`dispatch failure: io error: …:
/// Connection refused`), without the SDK's debug dump.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        // Wrappers often repeat their cause's text.
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// The current time in epoch milliseconds: the gateway's clock, as in the
/// conditions (keep gateways NTP-synced).
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The TTL attribute: whole seconds, rounded up so TTL never deletes an
/// item before its read-time expiry.
fn ttl_seconds(expires_ms: i64) -> i64 {
    expires_ms.div_euclid(1000) + i64::from(expires_ms.rem_euclid(1000) != 0)
}

fn number(n: i64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

/// A random version: unique per write, so an item carrying it is ours.
fn new_version() -> String {
    let mut buf = [0u8; 8];
    getrandom::getrandom(&mut buf).expect("the OS random number generator works");
    // 63 bits: any DynamoDB number holds it, and it prints canonically.
    (u64::from_le_bytes(buf) >> 1).to_string()
}

fn n_attr<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::N(n)) => Some(n),
        _ => None,
    }
}

/// The item as a live session: `None` if it expired (whether or not TTL
/// deleted it yet) or is not in our layout (another writer's item is no
/// session).
fn live(item: &HashMap<String, AttributeValue>, now_ms: i64) -> Option<Live> {
    let expires_ms: i64 = n_attr(item, EXPIRES_MS)?.parse().ok()?;
    if expires_ms <= now_ms {
        return None;
    }
    let Some(AttributeValue::B(data)) = item.get(DATA) else {
        return None;
    };
    Some(Live {
        data: Bytes::copy_from_slice(data.as_ref()),
        expires_ms,
        version: n_attr(item, VERSION)?.to_string(),
    })
}

/// The compare-and-set primitives, conditioned on `v`.
#[async_trait]
impl CasOps for DynamoStore {
    type Version = String;

    async fn read(&self, key: &str) -> Result<Option<(Bytes, String)>, StoreError> {
        let found = self.with_table(|| self.get_live(key)).await?;
        Ok(found.map(|l| (l.data, l.version)))
    }

    async fn write_if(
        &self,
        key: &str,
        version: &String,
        value: &Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.with_table(|| {
            self.put_if(
                key,
                value,
                ttl,
                "#v = :v AND #m > :now",
                &[("#v", VERSION), ("#m", EXPIRES_MS)],
                vec![
                    (":v", AttributeValue::N(version.clone())),
                    (":now", number(now_ms())),
                ],
            )
        })
        .await
    }

    async fn delete_if(&self, key: &str, version: &String) -> Result<bool, StoreError> {
        self.with_table(|| async {
            let sent = self
                .client
                .delete_item()
                .table_name(&self.table)
                .key(ID, AttributeValue::S(key.to_string()))
                .condition_expression("#v = :v")
                .expression_attribute_names("#v", VERSION)
                .expression_attribute_values(":v", AttributeValue::N(version.clone()))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .send()
                .await;
            match sent {
                Ok(_) => Ok(true),
                // No item left: deleted, by us (a retried attempt) or by
                // someone else; the outcome is the same.
                Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                    Ok(match e.err() {
                        aws_sdk_dynamodb::operation::delete_item::DeleteItemError::ConditionalCheckFailedException(c) => c.item().is_none(),
                        _ => false,
                    })
                }
                Err(e) => Err(self.failure(e)),
            }
        })
        .await
    }
}

#[async_trait]
impl SessionStore for DynamoStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        let found = self.with_table(|| self.get_live(key)).await?;
        Ok(found.map(|l| Loaded {
            value: l.data,
            expires_at: UNIX_EPOCH
                + Duration::from_millis(u64::try_from(l.expires_ms).unwrap_or(0)),
        }))
    }

    async fn create(&self, key: &str, value: &Bytes, ttl: Duration) -> Result<bool, StoreError> {
        // Over nothing, or over an expired leftover TTL has not removed yet.
        self.with_table(|| {
            self.put_if(
                key,
                value,
                ttl,
                "attribute_not_exists(#id) OR #m <= :now",
                &[("#id", ID), ("#m", EXPIRES_MS)],
                vec![(":now", number(now_ms()))],
            )
        })
        .await
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
        self.with_table(|| async {
            self.client
                .delete_item()
                .table_name(&self.table)
                .key(ID, AttributeValue::S(key.to_string()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.failure(e))
        })
        .await
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        // Only the two expiry attributes change; the condition keeps an
        // expired or deleted item from being revived (UpdateItem would
        // otherwise create it). Repeating it is harmless, so an SDK retry
        // after a lost answer succeeds again.
        self.with_table(|| async {
            let expires_ms =
                now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
            let sent = self
                .client
                .update_item()
                .table_name(&self.table)
                .key(ID, AttributeValue::S(key.to_string()))
                .update_expression("SET #e = :e, #m = :m")
                .condition_expression("attribute_exists(#id) AND #m > :now")
                .expression_attribute_names("#e", EXPIRES)
                .expression_attribute_names("#m", EXPIRES_MS)
                .expression_attribute_names("#id", ID)
                .expression_attribute_values(":e", number(ttl_seconds(expires_ms)))
                .expression_attribute_values(":m", number(expires_ms))
                .expression_attribute_values(":now", number(now_ms()))
                .send()
                .await;
            match sent {
                Ok(_) => Ok(true),
                Err(SdkError::ServiceError(e))
                    if e.err().is_conditional_check_failed_exception() =>
                {
                    Ok(false)
                }
                Err(e) => Err(self.failure(e)),
            }
        })
        .await
    }

    /// The table exists with `id` (S) as its only key, items can be read,
    /// and TTL is on `expires` (a warning if not: expired sessions are
    /// still never served, but DynamoDB keeps them).
    async fn check(&self) -> Result<(), StoreError> {
        let described = self.describe().await.map_err(|f| self.store_error(f))?;
        let table = described.as_ref();
        let keys: Vec<(&str, &KeyType)> = table
            .map(|t| {
                t.key_schema()
                    .iter()
                    .map(|k| (k.attribute_name(), k.key_type()))
                    .collect()
            })
            .unwrap_or_default();
        let id_type = table.and_then(|t| {
            t.attribute_definitions()
                .iter()
                .find(|a| a.attribute_name() == ID)
                .map(|a| a.attribute_type())
        });
        if keys != [(ID, &KeyType::Hash)] || id_type != Some(&ScalarAttributeType::S) {
            let shown: Vec<String> = keys
                .iter()
                .map(|(n, t)| format!("{n} {}", t.as_str()))
                .collect();
            return Err(StoreError::Backend(format!(
                "dynamodb: table `{}` has the key [{}]; session-gateway needs `id` (type S) as its only key (partition key, no sort key)",
                self.table,
                shown.join(", ")
            )));
        }
        let (status, attribute) = self.ttl().await?;
        let attribute = attribute.as_deref();
        let on = matches!(
            status,
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
        );
        if !on || attribute != Some(EXPIRES) {
            tracing::warn!(
                "dynamodb table `{}`: TTL is not enabled on `{EXPIRES}` (status {}, attribute {}): \
                 expired sessions are never served, but DynamoDB keeps them; enable TTL on `{EXPIRES}` \
                 (or set store.create_table: true)",
                self.table,
                status.as_ref().map(|s| s.as_str()).unwrap_or("unknown"),
                attribute.unwrap_or("none"),
            );
        }
        // A read proves the data-plane permissions and the endpoint.
        self.with_table(|| self.get_live("session-gateway-check"))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> StoreContext {
        StoreContext {
            timeout: Duration::from_millis(500),
            retries: 2,
            cleanup_interval: Duration::from_secs(300),
            key_prefix: "session:".into(),
            max_key_len: 51,
            max_value_len: 8193,
        }
    }

    fn parse(yaml: &str) -> Result<DynamoConfig, ConfigError> {
        DynamoConfig::parse(serde_yaml::from_str(yaml).unwrap(), &ctx())
    }

    fn err(yaml: &str) -> ConfigError {
        parse(yaml).unwrap_err()
    }

    #[test]
    fn defaults() {
        let c = parse("{}").unwrap();
        assert_eq!(c.table, "sessions");
        assert_eq!(c.region, None);
        assert_eq!(c.endpoint_url, None);
        assert!(c.create_table);
        assert_eq!(c.timeout, Duration::from_millis(500));
        let c = parse(
            "{table: app.sessions-1, region: eu-west-1, endpoint_url: \"http://127.0.0.1:8000\", create_table: false}",
        )
        .unwrap();
        assert_eq!(c.table, "app.sessions-1");
        assert!(!c.create_table);
        assert_eq!(
            c.describe(),
            "dynamodb (table app.sessions-1, region eu-west-1, endpoint http://127.0.0.1:8000, create_table false)"
        );
        assert_eq!(
            parse("{endpoint_url: null, region: null}").unwrap().region,
            None
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(err("{table: ab}").key, "store.table");
        assert_eq!(err("{table: \"a b c\"}").key, "store.table");
        assert_eq!(err("{region: US_EAST_1}").key, "store.region");
        assert_eq!(err("{region: \"\"}").key, "store.region");
        assert_eq!(
            err("{endpoint_url: localhost:8000}").key,
            "store.endpoint_url"
        );
        assert_eq!(
            err("{endpoint_url: \"ftp://h:1\"}").key,
            "store.endpoint_url"
        );
        assert_eq!(
            err("{endpoint_url: \"not a url\"}").key,
            "store.endpoint_url"
        );
        assert_eq!(err("{create_table: maybe}").key, "store.create_table");
        let e = err("{table: sessions, url: \"http://x\"}");
        assert_eq!(e.key, "store.url");
        assert!(e.message.contains("unknown key"), "{e}");
    }

    #[test]
    fn credentials_never_go_in_the_url() {
        let e = err("{endpoint_url: \"https://AKIA:hunter2@dynamodb.example\"}");
        assert_eq!(e.key, "store.endpoint_url");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn keys_must_fit_a_partition_key() {
        let mut ctx = ctx();
        ctx.max_key_len = MAX_KEY_BYTES + 1;
        let e = DynamoConfig::parse(serde_yaml::from_str("{}").unwrap(), &ctx).unwrap_err();
        assert_eq!(e.key, "session.key_prefix");
    }

    #[test]
    fn sessions_must_fit_an_item() {
        let mut ctx = ctx();
        ctx.max_value_len = 1 << 20;
        let e = DynamoConfig::parse(serde_yaml::from_str("{}").unwrap(), &ctx).unwrap_err();
        assert_eq!(e.key, "session.max_bytes");
        ctx.max_value_len = 400_000;
        DynamoConfig::parse(serde_yaml::from_str("{}").unwrap(), &ctx).unwrap();
    }

    #[test]
    fn ttl_seconds_round_up() {
        assert_eq!(ttl_seconds(1_700_000_000_000), 1_700_000_000);
        assert_eq!(ttl_seconds(1_700_000_000_001), 1_700_000_001);
        assert_eq!(ttl_seconds(1_700_000_000_999), 1_700_000_001);
    }

    #[test]
    fn items_are_live_until_expires_ms() {
        let item = |ms: &str| {
            HashMap::from([
                (ID.to_string(), AttributeValue::S("k".into())),
                (
                    DATA.to_string(),
                    AttributeValue::B(Blob::new(b"P{}".to_vec())),
                ),
                (EXPIRES.to_string(), AttributeValue::N("2".into())),
                (EXPIRES_MS.to_string(), AttributeValue::N(ms.into())),
                (VERSION.to_string(), AttributeValue::N("7".into())),
            ])
        };
        let l = live(&item("1001"), 1000).unwrap();
        assert_eq!(
            (&l.data[..], l.expires_ms, l.version.as_str()),
            (&b"P{}"[..], 1001, "7")
        );
        assert!(
            live(&item("1000"), 1000).is_none(),
            "expired at its instant"
        );
        assert!(live(&item("x"), 0).is_none());
        let mut foreign = item("5000");
        foreign.remove(DATA);
        assert!(live(&foreign, 0).is_none(), "not our layout");
    }

    #[test]
    fn causes_are_one_line_without_repeats() {
        #[derive(Debug)]
        struct Wrap(std::io::Error, &'static str);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.1)
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(
            causes(&Wrap(refused(), "dispatch failure")),
            "dispatch failure: refused"
        );
        assert_eq!(causes(&Wrap(refused(), "io: refused")), "io: refused");
    }

    #[test]
    fn versions_are_distinct_canonical_numbers() {
        let a = new_version();
        let b = new_version();
        assert_ne!(a, b);
        assert_eq!(a.parse::<u64>().unwrap().to_string(), a);
    }
}
