//! The near cache's memory: a bounded, sharded LRU map `key -> (value,
//! expiry)` that is only trusted while the store's change notifications
//! (Redis' invalidation pushes, PostgreSQL's `NOTIFY`) are known to reach
//! it (the store's [`super::Notifier`] says so through
//! [`NearCache::go_live`] and withdraws it through [`NearCache::go_down`] /
//! [`NearCache::lost`]).
//!
//! What it guarantees, whatever the order in which replies, pushes and
//! connection losses arrive:
//! - an entry is served only before the expiry it was loaded with;
//! - a reply is stored only if nothing invalidated its key (and no flush
//!   happened) between the moment the read was *sent* and the moment the
//!   reply is stored. A read first leaves a pending [`Ticket`] under its
//!   key; an invalidation or a flush removes it; the reply is stored only
//!   over its own ticket. This closes the classic race of a reply carrying
//!   the old value that arrives after the invalidation of that value;
//! - while tracking is not live, nothing is served and nothing is stored,
//!   and every transition empties the map.
//!
//! The map is a [`ShardedLru`]: the bound on entries is exact, eviction is
//! approximately global LRU, and a shard's lock is held for a map
//! operation only, never across an await.

use crate::session::{Loaded, NearCacheStats};
use crate::sharded_lru::ShardedLru;
use bytes::Bytes;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

enum Slot {
    /// A read of this key is in flight; its reply may be stored.
    Pending(u64),
    Ready {
        value: Bytes,
        /// When the key expires in the store, on this process' monotonic
        /// clock (never later than the server's expiry: see [`Fetched`]).
        deadline: Instant,
        /// The same moment as wall-clock time, as the engine wants it.
        expires_at: SystemTime,
    },
}

/// The right to store the reply of one read (see the module docs).
#[derive(Debug)]
pub struct Ticket(u64);

pub enum Lookup {
    Hit(Loaded),
    /// Read from the store. `Some`: then offer the reply to
    /// [`NearCache::fill`]; `None`: the cache is bypassed (tracking down).
    Miss(Option<Ticket>),
}

/// When a read was sent, taken before sending: `sent + TTL` (the TTL the
/// store reported as remaining) is never later than the key's real
/// expiry, so an entry cannot outlive it.
#[derive(Clone, Copy)]
pub struct Fetched {
    pub sent: Instant,
    pub sent_wall: SystemTime,
}

/// Tracking state changes, serialized (rare; never on the read path).
struct Control {
    /// Incremented by every tracking round.
    generation: u64,
    /// The current round's connection was lost before or after going live.
    dead: bool,
}

pub struct NearCache {
    map: ShardedLru<Slot>,
    /// Entries may be served and stored. Only changed under `control`,
    /// read under a shard lock.
    live: AtomicBool,
    control: Mutex<Control>,
    next_ticket: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
}

impl NearCache {
    pub fn new(max_entries: NonZeroUsize) -> NearCache {
        NearCache {
            map: ShardedLru::new(max_entries),
            live: AtomicBool::new(false),
            control: Mutex::new(Control {
                generation: 0,
                dead: true,
            }),
            next_ticket: AtomicU64::new(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    /// The live entry of `key`, or a ticket to read it from the store.
    pub fn lookup(&self, key: &str) -> Lookup {
        let now = Instant::now();
        let mut map = self.map.shard(key);
        if !self.live.load(Ordering::Acquire) {
            drop(map);
            self.count_miss();
            return Lookup::Miss(None);
        }
        if let Some(Slot::Ready {
            value,
            deadline,
            expires_at,
        }) = map.get(key)
        {
            if *deadline > now {
                let loaded = Loaded {
                    value: value.clone(),
                    expires_at: *expires_at,
                };
                drop(map);
                self.hits.fetch_add(1, Ordering::Relaxed);
                crate::metrics::get().near_cache_hits.inc();
                return Lookup::Hit(loaded);
            }
        }
        // Missing, pending or expired: this read's ticket replaces it (an
        // older read still in flight then just does not store its reply).
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        map.put(key.to_owned(), Slot::Pending(ticket));
        drop(map);
        self.count_miss();
        Lookup::Miss(Some(Ticket(ticket)))
    }

    /// A read the cache could not answer (also a Prometheus counter).
    fn count_miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        crate::metrics::get().near_cache_misses.inc();
    }

    /// Store the reply of the read `ticket` was issued for: `value`, which
    /// the store reported would expire `pttl` after `fetched.sent`. Does
    /// nothing if the key was invalidated (or the cache flushed) since.
    pub fn fill(
        &self,
        key: &str,
        ticket: Ticket,
        value: Bytes,
        fetched: Fetched,
        pttl: std::time::Duration,
    ) {
        let mut map = self.map.shard(key);
        if let Some(slot) = map.peek_mut(key) {
            if matches!(slot, Slot::Pending(t) if *t == ticket.0) {
                *slot = Slot::Ready {
                    value,
                    deadline: fetched.sent + pttl,
                    expires_at: fetched.sent_wall + pttl,
                };
            }
        }
    }

    /// The read of `ticket` found nothing to store (no key, an error).
    pub fn cancel(&self, key: &str, ticket: Ticket) {
        let mut map = self.map.shard(key);
        if matches!(map.peek(key), Some(Slot::Pending(t)) if *t == ticket.0) {
            map.pop(key);
        }
    }

    /// Forget `key` (the store said it changed, or this process changed it).
    pub fn invalidate(&self, key: &str) {
        if self.map.shard(key).pop(key).is_some() {
            self.invalidations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forget everything but stay live (the store was flushed: Redis FLUSHALL, a TRUNCATE).
    pub fn invalidate_all(&self) {
        let _control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        self.flush();
    }

    fn clear(&self) {
        for mut shard in self.map.shards() {
            shard.clear();
        }
    }

    /// [`Self::clear`], counted: the cache lost what it held.
    fn flush(&self) {
        self.clear();
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// A new tracking round starts: stop serving, empty the map, and
    /// return the round's generation for [`Self::go_live`] and
    /// [`Self::lost`].
    pub fn begin_round(&self) -> u64 {
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        control.generation += 1;
        control.dead = false;
        self.live.store(false, Ordering::Release);
        self.clear();
        control.generation
    }

    /// Tracking of round `generation` is established on every node: serve
    /// and store from now on. `false` if that round was lost meanwhile.
    pub fn go_live(&self, generation: u64) -> bool {
        let control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        if control.generation != generation || control.dead {
            return false;
        }
        self.clear();
        self.live.store(true, Ordering::Release);
        true
    }

    /// A connection of round `generation` is gone (or in doubt): stop
    /// serving and empty the map at once. Losses reported by connections
    /// of earlier rounds change nothing.
    pub fn lost(&self, generation: u64) {
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        if control.generation == generation && !control.dead {
            control.dead = true;
            self.live.store(false, Ordering::Release);
            self.flush();
        }
    }

    /// Stop serving and empty the map, whatever the round.
    pub fn go_down(&self) {
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        control.dead = true;
        if self.live.swap(false, Ordering::AcqRel) {
            self.flush();
        } else {
            self.clear();
        }
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> NearCacheStats {
        let entries = self
            .map
            .shards()
            .map(|s| {
                s.iter()
                    .filter(|(_, slot)| matches!(slot, Slot::Ready { .. }))
                    .count() as u64
            })
            .sum();
        NearCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries,
            invalidations: self.invalidations.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            live: self.is_live(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cache(max: usize) -> NearCache {
        let c = NearCache::new(NonZeroUsize::new(max).unwrap());
        let g = c.begin_round();
        assert!(c.go_live(g));
        c
    }

    fn now() -> Fetched {
        Fetched {
            sent: Instant::now(),
            sent_wall: SystemTime::now(),
        }
    }

    const MIN: Duration = Duration::from_secs(60);

    fn ticket(c: &NearCache, key: &str) -> Ticket {
        match c.lookup(key) {
            Lookup::Miss(Some(t)) => t,
            Lookup::Miss(None) => panic!("{key}: bypassed"),
            Lookup::Hit(_) => panic!("{key}: unexpected hit"),
        }
    }

    fn hit(c: &NearCache, key: &str) -> Option<Bytes> {
        match c.lookup(key) {
            Lookup::Hit(l) => Some(l.value),
            Lookup::Miss(_) => None,
        }
    }

    #[test]
    fn a_filled_read_is_served_with_its_expiry() {
        let c = cache(10);
        let t = ticket(&c, "k");
        let at = now();
        c.fill("k", t, Bytes::from_static(b"v"), at, MIN);
        let Lookup::Hit(l) = c.lookup("k") else {
            panic!("miss")
        };
        assert_eq!(l.value, Bytes::from_static(b"v"));
        assert_eq!(l.expires_at, at.sent_wall + MIN);
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.entries), (1, 1, 1));
    }

    #[test]
    fn an_invalidation_between_send_and_reply_wins() {
        let c = cache(10);
        let t = ticket(&c, "k");
        c.invalidate("k");
        c.fill("k", t, Bytes::from_static(b"old"), now(), MIN);
        assert_eq!(hit(&c, "k"), None, "the stale reply was stored");
    }

    #[test]
    fn a_flush_or_lost_tracking_between_send_and_reply_wins() {
        let c = cache(10);
        let t = ticket(&c, "k");
        c.invalidate_all();
        c.fill("k", t, Bytes::from_static(b"old"), now(), MIN);
        assert_eq!(hit(&c, "k"), None);

        let c = NearCache::new(NonZeroUsize::new(10).unwrap());
        let g = c.begin_round();
        assert!(c.go_live(g));
        let t = ticket(&c, "k");
        c.lost(g);
        assert!(matches!(c.lookup("k"), Lookup::Miss(None)), "bypassed");
        // Back live in a new round: the old read still must not store.
        let g2 = c.begin_round();
        assert!(c.go_live(g2));
        c.fill("k", t, Bytes::from_static(b"old"), now(), MIN);
        assert_eq!(hit(&c, "k"), None);
    }

    #[test]
    fn a_round_lost_before_going_live_stays_down() {
        let c = NearCache::new(NonZeroUsize::new(10).unwrap());
        let g = c.begin_round();
        c.lost(g);
        assert!(!c.go_live(g));
        assert!(matches!(c.lookup("k"), Lookup::Miss(None)));
        // A loss reported by an older round's connection is ignored.
        let g2 = c.begin_round();
        c.lost(g);
        assert!(c.go_live(g2));
        assert!(c.is_live());
    }

    #[test]
    fn losing_tracking_empties_the_cache_before_any_use() {
        let c = cache(10);
        let g = c.begin_round();
        assert!(c.go_live(g));
        let t = ticket(&c, "k");
        c.fill("k", t, Bytes::from_static(b"v"), now(), MIN);
        c.lost(g);
        assert!(matches!(c.lookup("k"), Lookup::Miss(None)));
        assert_eq!(c.stats().entries, 0);
        let g2 = c.begin_round();
        assert!(c.go_live(g2));
        assert_eq!(hit(&c, "k"), None, "an entry survived the loss");
    }

    #[test]
    fn expired_entries_are_never_served() {
        let c = cache(10);
        let t = ticket(&c, "k");
        // Sent 2 s ago with 1 s to live: expired a second ago.
        let at = Fetched {
            sent: Instant::now() - Duration::from_secs(2),
            sent_wall: SystemTime::now() - Duration::from_secs(2),
        };
        c.fill("k", t, Bytes::from_static(b"v"), at, Duration::from_secs(1));
        assert_eq!(hit(&c, "k"), None);
    }

    #[test]
    fn only_the_latest_read_of_a_key_stores() {
        let c = cache(10);
        let first = ticket(&c, "k");
        let second = ticket(&c, "k");
        c.fill("k", first, Bytes::from_static(b"1"), now(), MIN);
        assert_eq!(hit(&c, "k"), None);
        // The lookup above issued a third ticket; the second one is stale.
        c.fill("k", second, Bytes::from_static(b"2"), now(), MIN);
        assert_eq!(hit(&c, "k"), None);
        let third = ticket(&c, "k");
        c.fill("k", third, Bytes::from_static(b"3"), now(), MIN);
        assert_eq!(hit(&c, "k"), Some(Bytes::from_static(b"3")));
    }

    #[test]
    fn entries_are_bounded_least_recently_used_first() {
        let c = cache(2);
        for k in ["a", "b", "c"] {
            let t = ticket(&c, k);
            c.fill(k, t, Bytes::from(k), now(), MIN);
        }
        // Two shards of one entry each: the newest entry is kept, and the
        // total never exceeds the bound.
        assert!(c.stats().entries <= 2);
        assert!(hit(&c, "c").is_some());

        let c = cache(1000);
        for i in 0..5000 {
            let k = format!("k{i}");
            let t = ticket(&c, &k);
            c.fill(&k, t, Bytes::new(), now(), MIN);
        }
        let entries = c.stats().entries;
        assert!((900..=1000).contains(&entries), "{entries}");
    }

    #[test]
    fn cancel_and_invalidate_remove_only_what_they_own() {
        let c = cache(10);
        let t = ticket(&c, "k");
        c.cancel("k", t);
        let t = ticket(&c, "k");
        c.fill("k", t, Bytes::from_static(b"v"), now(), MIN);
        // A cancel with a stale ticket does not remove the live entry.
        let stale = Ticket(0);
        c.cancel("k", stale);
        assert!(hit(&c, "k").is_some());
        c.invalidate("k");
        assert_eq!(hit(&c, "k"), None);
        assert_eq!(c.stats().invalidations, 1);
    }
}
