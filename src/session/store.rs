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
//!
//! Stores keep opaque bytes: encoding (the header-ready form of
//! [`super::record`], sealing) is the engine's business, so a store never
//! parses session data and a new encoding never touches a backend.

use async_trait::async_trait;
use bytes::Bytes;
use std::time::{Duration, SystemTime};

/// A store-neutral error; each backend converts its own errors into this.
#[derive(Clone, Debug, thiserror::Error)]
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

/// A session as loaded: the stored value and when the store will expire it.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    pub value: Bytes,
    pub expires_at: SystemTime,
}

/// What an update function wants done with the current value.
#[derive(Debug, PartialEq)]
pub enum Update {
    /// Store this value (and reset the expiry to the given TTL).
    Write(Bytes),
    /// Delete the entry (the session became empty).
    Delete,
    /// The current value cannot be read (corrupt, or sealed under another
    /// id): treat the session as gone. Nothing is written or deleted; the
    /// store reports [`UpdateOutcome::Missing`].
    Unreadable,
}

/// The read-modify-write step of [`SessionStore::update`]: given the
/// current stored value, decide the new one. It may run more than once
/// (optimistic stores retry on a conflict), so it must be pure.
/// `Err(msg)` refuses the update (for example `session.max_bytes`).
pub type UpdateFn<'a> = dyn Fn(&[u8]) -> Result<Update, String> + Send + Sync + 'a;

/// What [`SessionStore::update`] did.
#[derive(Debug, PartialEq)]
pub enum UpdateOutcome {
    Written(Bytes),
    Deleted,
    /// No live (readable) entry under the key: destroyed or expired
    /// meanwhile. Nothing was written.
    Missing,
}

/// An update function's decision for a store to carry out, with the
/// missing and unreadable cases folded into one: every backend calls
/// [`decide`] between its read and its write.
#[derive(Debug, PartialEq)]
pub enum Step {
    Write(Bytes),
    Delete,
    /// Report [`UpdateOutcome::Missing`]; write nothing.
    Missing,
}

/// Run `f` on the current value (`None`: no live entry).
pub fn decide(current: Option<&[u8]>, f: &UpdateFn<'_>) -> Result<Step, StoreError> {
    let Some(current) = current else {
        return Ok(Step::Missing);
    };
    Ok(match f(current).map_err(StoreError::Rejected)? {
        Update::Write(value) => Step::Write(value),
        Update::Delete => Step::Delete,
        Update::Unreadable => Step::Missing,
    })
}

/// Counters of a store's near cache: an in-process copy of recently read
/// sessions that answers reads without a round trip (the Redis store's
/// `store.near_cache`). A snapshot; the counters only grow, except
/// `entries` and `live`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NearCacheStats {
    /// Loads answered from the cache.
    pub hits: u64,
    /// Loads that went to the store (not cached, expired, or the cache
    /// bypassed while `live` is false).
    pub misses: u64,
    /// Sessions held now (at most the configured maximum).
    pub entries: u64,
    /// Entries dropped because the store said (or this process knew) that
    /// they changed.
    pub invalidations: u64,
    /// Times the whole cache was emptied (invalidation channel lost, store
    /// flushed).
    pub flushes: u64,
    /// The store's change notifications are known to arrive, so entries
    /// are served; `false` means every load goes to the store.
    pub live: bool,
}

#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// The live entry under `key`, or `None` if there is none or it expired.
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError>;

    /// Insert a new entry that expires after `ttl`. Returns `false` (and
    /// writes nothing) if a live entry already exists under `key`.
    async fn create(&self, key: &str, value: &Bytes, ttl: Duration) -> Result<bool, StoreError>;

    /// Atomically apply `f` to the live entry under `key`: no other update
    /// of the same key may interleave between reading and writing. A
    /// `Write` resets the expiry to `ttl`. If `f` returns `Err(msg)`
    /// nothing is written and the call fails with [`StoreError::Rejected`].
    /// Backends run `f` through [`decide`].
    async fn update(
        &self,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError>;

    /// [`Self::update`] when the caller has seen the entry's value
    /// (`seen`: the bytes `load` returned earlier in this request). A
    /// backend whose conditional write compares the value itself may try
    /// that write against `seen` first and read only if it lost, which
    /// saves the read in the common case where nothing changed in
    /// between; the result is the same as [`Self::update`]'s either way.
    /// The default ignores `seen`.
    async fn update_seen(
        &self,
        key: &str,
        ttl: Duration,
        seen: &Bytes,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        let _ = seen;
        self.update(key, ttl, f).await
    }

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

    /// The counters of the store's near cache, for metrics; `None` (the
    /// default) for stores without one or with it disabled. Cheap enough
    /// to call on every metrics scrape, not meant for every request.
    fn near_cache_stats(&self) -> Option<NearCacheStats> {
        None
    }
}
