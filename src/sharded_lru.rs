//! A bounded map `String -> V` that forgets the least recently used
//! entries first, split into shards so that concurrent requests rarely
//! wait on the same lock. Shared by the Redis store's near cache and the
//! open cache of sealed sessions ([`crate::session::seal::OpenCache`]).
//!
//! LRU order is kept per shard (up to 16 shards, each `max_entries /
//! shards` entries), so the bound on entries is exact and the eviction
//! order is approximately global LRU. Locks are plain mutexes; callers
//! hold one for a map operation only, never across an await.

use foldhash::fast::RandomState;
use lru::LruCache;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};

/// Most shards; fewer when `max_entries` is smaller, so each has room.
const MAX_SHARDS: usize = 16;

pub(crate) struct ShardedLru<V> {
    shards: Box<[Mutex<LruCache<String, V>>]>,
    /// Picks the shard. Keys are store keys of ids the gateway generated
    /// or verified (no client chooses them), so a fast seeded hash
    /// (foldhash, as `lru`'s maps use) rather than SipHash.
    hasher: RandomState,
}

impl<V> ShardedLru<V> {
    pub fn new(max_entries: NonZeroUsize) -> Self {
        let shards = max_entries.get().min(MAX_SHARDS);
        let per_shard = NonZeroUsize::new(max_entries.get() / shards).unwrap_or(NonZeroUsize::MIN);
        ShardedLru {
            shards: (0..shards)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            hasher: RandomState::default(),
        }
    }

    /// The shard that holds `key`, locked.
    pub fn shard(&self, key: &str) -> MutexGuard<'_, LruCache<String, V>> {
        let i = (self.hasher.hash_one(key) % self.shards.len() as u64) as usize;
        lock(&self.shards[i])
    }

    /// Every shard, each locked in turn while the caller looks at it.
    pub fn shards(&self) -> impl Iterator<Item = MutexGuard<'_, LruCache<String, V>>> {
        self.shards.iter().map(lock)
    }
}

// A panic while holding a shard cannot leave a half-made entry (every
// operation is one map call), so a poisoned lock is usable.
fn lock<V>(shard: &Mutex<LruCache<String, V>>) -> MutexGuard<'_, LruCache<String, V>> {
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries<V>(m: &ShardedLru<V>) -> usize {
        m.shards().map(|s| s.len()).sum()
    }

    #[test]
    fn the_bound_is_exact_and_the_newest_entries_stay() {
        let m = ShardedLru::new(NonZeroUsize::new(2).unwrap());
        for k in ["a", "b", "c"] {
            m.shard(k).put(k.to_string(), ());
        }
        // Two shards of one entry each.
        assert!(entries(&m) <= 2);
        assert!(m.shard("c").contains("c"));

        let m = ShardedLru::new(NonZeroUsize::new(1000).unwrap());
        for i in 0..5000 {
            let k = format!("k{i}");
            m.shard(&k).put(k.clone(), i);
        }
        let n = entries(&m);
        assert!((900..=1000).contains(&n), "{n}");
        assert!(m.shard("k4999").contains("k4999"));
    }
}
