//! The store interface. Every backend (memory, filesystem, null, Redis, SQL,
//! ...) implements [`SessionStore`] and nothing else; the proxy never knows
//! which one it talks to.
//!
//! The interface is shaped by the protocol's guarantees:
//! - `create` only inserts, `update` only changes an existing entry, so a
//!   write for a session another request destroyed never revives its id;
//! - `update` is an atomic read-modify-write, so concurrent
//!   `X-Session-Patch`es on one session never lose each other's keys;
//! - `touch` extends the expiry without rewriting the data;
//! - expiry is the store's own metadata, reported by `load`.

use super::record::SessionRecord;
use async_trait::async_trait;
use std::time::{Duration, SystemTime};

/// A store-neutral error; each backend converts its own errors into this.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time. The proxy
    /// applies `session.on_store_error` to these.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with an error (bad credentials, missing table, ...).
    #[error("store error: {0}")]
    Backend(String),
    /// The update function refused the new value (for example it exceeds
    /// `session.max_bytes`); nothing was written.
    #[error("{0}")]
    Rejected(String),
}

impl StoreError {
    pub fn backend(e: impl std::fmt::Display) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// A session as loaded: the record and when the store will expire it.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    pub record: SessionRecord,
    pub expires_at: SystemTime,
}

/// What an update function wants done with the current record.
#[derive(Debug)]
pub enum Update {
    /// Store this record (and reset the expiry to the given TTL).
    Write(SessionRecord),
    /// Delete the entry (the session became empty).
    Delete,
}

/// The read-modify-write step of [`SessionStore::update`]. It may run more
/// than once (optimistic stores retry on a conflict), so it must be pure.
pub type UpdateFn<'a> = dyn Fn(SessionRecord) -> Result<Update, String> + Send + Sync + 'a;

/// What [`SessionStore::update`] did.
#[derive(Debug, PartialEq)]
pub enum UpdateOutcome {
    Written(SessionRecord),
    Deleted,
    /// No live entry under the key: destroyed or expired meanwhile. Nothing
    /// was written.
    Missing,
}

#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Short name for logs (`memory`, `redis`, ...).
    fn kind(&self) -> &'static str;

    /// The live entry under `key`, or `None` if there is none or it expired.
    /// An entry that cannot be decoded is reported as `None` (and logged by
    /// the store), never as an error: corrupt data must not lock a user out.
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError>;

    /// Insert a new entry that expires after `ttl`. Returns `false` (and
    /// writes nothing) if a live entry already exists under `key`.
    async fn create(
        &self,
        key: &str,
        record: &SessionRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Atomically apply `f` to the live entry under `key`: no other update
    /// of the same key may interleave between reading and writing. A
    /// `Write` resets the expiry to `ttl`. If `f` returns `Err(msg)`
    /// nothing is written and the call fails with [`StoreError::Rejected`].
    async fn update(
        &self,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError>;

    /// Remove the entry; removing a missing entry is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Reset the expiry of a live entry to `ttl` from now without rewriting
    /// its data where the backend allows. Returns `false` if there is none.
    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Remove expired entries; returns how many. Stores with native expiry
    /// (Redis TTL) keep the default, which does nothing.
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Check that the store is reachable and usable (used by `--test` and
    /// at start-up).
    async fn check(&self) -> Result<(), StoreError>;
}
