//! A near cache for stores that can tell every gateway about changes: an
//! in-process copy of recently read sessions ([`cache`]) that answers
//! reads without a round trip, trusted only while the store's change
//! notifications are known to arrive. A backend provides the notifications
//! as a [`Notifier`] (Redis: `CLIENT TRACKING` pushes; PostgreSQL:
//! `LISTEN`/`NOTIFY` from a trigger); everything else is here: the
//! `store.near_cache` keys, the round loop that (re)establishes the
//! notifications with backoff and empties the cache whenever they may have
//! been missed, the lazy start on the server's runtime, and the read path
//! with its tickets.
//!
//! A store without such notifications must not have a near cache: another
//! gateway's change would go unnoticed.

pub mod cache;

use crate::session::{Loaded, NearCacheStats, StoreError};
use crate::yaml::ConfigError;
use async_trait::async_trait;
use bytes::Bytes;
pub use cache::{Fetched, Lookup, NearCache};
use serde::Deserialize;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;

/// `store.near_cache.max_entries` when not given.
pub const DEFAULT_ENTRIES: usize = 100_000;
/// Longest wait of the first load for the notifications to come up (a
/// quarter of `store.timeout` if that is less): long enough for a healthy
/// server (a few round trips), short enough that a notification connection
/// that hangs costs the request little. Later loads never wait.
pub const FIRST_ROUND_WAIT: Duration = Duration::from_millis(100);
/// How often a notification connection is probed.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A probe unanswered this long means notifications may be lost.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// `store.near_cache` as written: off unless `enabled: true`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNearCache {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    max_entries: Option<u64>,
}

impl RawNearCache {
    /// `max_entries` if the cache is enabled, checked even when it is not
    /// (a typo should not wait until someone enables it).
    pub fn max_entries(&self) -> Result<Option<NonZeroUsize>, ConfigError> {
        let n = self.max_entries.unwrap_or(DEFAULT_ENTRIES as u64);
        let n = usize::try_from(n)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| {
                ConfigError::new("store.near_cache.max_entries", "must be at least 1")
            })?;
        Ok(self.enabled.then_some(n))
    }
}

/// Why the last round failed, for `--test` (cleared when a round is live).
#[derive(Default)]
pub struct Status {
    last_error: Mutex<Option<(bool, String)>>,
}

impl Status {
    fn set(&self, e: &StoreError) {
        let entry = match e {
            StoreError::Unavailable(m) => (true, m.clone()),
            StoreError::Backend(m) | StoreError::Rejected(m) => (false, m.clone()),
        };
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(entry);
    }

    /// A round is live.
    pub fn clear(&self) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn error(&self) -> Option<StoreError> {
        let guard = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(|(unavailable, msg)| {
            if *unavailable {
                StoreError::Unavailable(msg.clone())
            } else {
                StoreError::Backend(msg.clone())
            }
        })
    }
}

/// A store's change notifications, one round at a time.
#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    /// Names the cache in log lines, e.g. `redis near cache`.
    fn label(&self) -> &'static str;

    /// One round: connect, subscribe to every change, then
    /// [`NearCache::go_live`] with `generation` (and [`Status::clear`]);
    /// apply notifications as they come; return why the round ended (a
    /// connection lost or in doubt). Whatever it returns, the caller
    /// empties the cache before anything can be served again.
    async fn round(&self, generation: u64) -> StoreError;
}

/// Run rounds of `notifier` until `stop` fires (the store was dropped).
/// `quiet`: the first failure is reported by whoever started this
/// (`--test`), so it is only logged at debug level.
async fn run<N: Notifier>(
    notifier: N,
    cache: Arc<NearCache>,
    status: Arc<Status>,
    quiet: bool,
    mut stop: oneshot::Receiver<()>,
) {
    let label = notifier.label();
    let mut backoff = MIN_BACKOFF;
    // After the first warning, failures are logged at debug level until
    // the notifications have been live again.
    let mut quiet_now = quiet;
    let mut first_quiet = quiet;
    loop {
        let generation = cache.begin_round();
        let started = Instant::now();
        let error = tokio::select! {
            _ = &mut stop => return,
            e = notifier.round(generation) => e,
        };
        let was_live = cache.is_live();
        cache.go_down();
        status.set(&error);
        if was_live || !quiet_now {
            tracing::warn!(
                error = %error,
                "{label}: change notifications lost; cache emptied and bypassed until they are back"
            );
            quiet_now = true;
        } else if !std::mem::take(&mut first_quiet) {
            tracing::debug!(error = %error, "{label}: notifications still down");
        }
        if started.elapsed() > 10 * MAX_BACKOFF {
            backoff = MIN_BACKOFF;
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A store's near cache and its notifier.
pub struct Near<N: Notifier> {
    pub cache: Arc<NearCache>,
    /// The notifier until the first load (or check) starts it on the
    /// caller's runtime: a store opened only for background purging never
    /// opens notification connections.
    notifier: Mutex<Option<(N, oneshot::Receiver<()>)>>,
    started: AtomicBool,
    status: Arc<Status>,
    first_round_wait: Duration,
    /// How long `--test` waits for the first round.
    check_wait: Duration,
    /// Dropped with the store, which ends the rounds.
    _stop: oneshot::Sender<()>,
}

impl<N: Notifier> Near<N> {
    /// A cache of `max_entries`; `notifier` is given the cache and the
    /// status it must apply its notifications to and report to (see
    /// [`Notifier::round`]).
    pub fn new(
        max_entries: NonZeroUsize,
        notifier: impl FnOnce(Arc<NearCache>, Arc<Status>) -> N,
        first_round_wait: Duration,
        check_wait: Duration,
    ) -> Self {
        let cache = Arc::new(NearCache::new(max_entries));
        let status = Arc::new(Status::default());
        let notifier = notifier(cache.clone(), status.clone());
        let (stop, stopped) = oneshot::channel();
        Near {
            cache,
            notifier: Mutex::new(Some((notifier, stopped))),
            started: AtomicBool::new(false),
            status,
            first_round_wait,
            check_wait,
            _stop: stop,
        }
    }

    /// Start the notifications on the caller's runtime if nobody did yet;
    /// the caller that starts them waits (briefly) for the first round, so
    /// a gateway's cache works from its first requests on and tests see it
    /// at once. Everyone else is served by the store until it is live.
    async fn start(&self, quiet: bool) {
        if self.started.load(Ordering::Acquire) {
            return;
        }
        let taken = self
            .notifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((notifier, stopped)) = taken {
            self.started.store(true, Ordering::Release);
            let (cache, status) = (self.cache.clone(), self.status.clone());
            tokio::spawn(run(notifier, cache, status, quiet, stopped));
            let _ = self.first_round(self.first_round_wait).await;
        }
    }

    /// Wait up to `limit` for the notifications to be live; else the last
    /// round's error (or a timeout).
    async fn first_round(&self, limit: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + limit;
        loop {
            if self.cache.is_live() {
                return Ok(());
            }
            if let Some(e) = self.status.error() {
                return Err(e);
            }
            if Instant::now() > deadline {
                return Err(StoreError::Unavailable(
                    "near cache: change notifications not established in time".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// For `--test`: the notifications must come up.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.start(true).await;
        self.first_round(self.check_wait).await
    }

    /// Load `key` through the cache: a live entry, or `fetch` (the store's
    /// own read, giving the value and its remaining TTL) with its reply
    /// kept if nothing changed the key meanwhile.
    pub async fn load<Fut>(
        &self,
        key: &str,
        fetch: impl FnOnce() -> Fut,
    ) -> Result<Option<Loaded>, StoreError>
    where
        Fut: Future<Output = Result<Option<(Bytes, Duration)>, StoreError>>,
    {
        self.start(false).await;
        let ticket = match self.cache.lookup(key) {
            Lookup::Hit(loaded) => return Ok(Some(loaded)),
            Lookup::Miss(ticket) => ticket,
        };
        // Taken before sending: the expiry it gives is never later than
        // the store's.
        let sent = Fetched {
            sent: Instant::now(),
            sent_wall: SystemTime::now(),
        };
        let found = fetch().await;
        if let Some(ticket) = ticket {
            match &found {
                Ok(Some((value, ttl))) if !ttl.is_zero() => {
                    self.cache.fill(key, ticket, value.clone(), sent, *ttl)
                }
                _ => self.cache.cancel(key, ticket),
            }
        }
        Ok(found?.map(|(value, ttl)| Loaded {
            value,
            expires_at: sent.sent_wall + ttl,
        }))
    }

    /// Drop `key` after this process changed it, so its next read here
    /// sees the change even before the store's notification arrives.
    pub fn forget(&self, key: &str) {
        self.cache.invalidate(key);
    }

    pub fn stats(&self) -> NearCacheStats {
        self.cache.stats()
    }
}
