//! `store.type: memory`: an in-process, bounded map for development and
//! tests. Sessions die with the process and are not shared between gateways.

use super::{StoreContext, StoreSpec};
use crate::session::{decide, Loaded, SessionStore, Step, StoreError, UpdateFn, UpdateOutcome};
use crate::yaml::{deserialize_at, ConfigError};
use async_trait::async_trait;
use bytes::Bytes;
use foldhash::fast::RandomState;
use serde::Deserialize;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const SHARDS: usize = 16;

/// `store:` keys of `type: memory`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Most sessions kept; when full, those closest to expiry are dropped.
    pub max_entries: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_entries: 100_000,
        }
    }
}

pub fn parse(keys: serde_yaml::Value, _: &StoreContext) -> Result<Arc<dyn StoreSpec>, ConfigError> {
    let config: MemoryConfig = deserialize_at(keys, "store")?;
    if config.max_entries == 0 {
        return Err(ConfigError::new("store.max_entries", "must be at least 1"));
    }
    Ok(Arc::new(config))
}

impl StoreSpec for MemoryConfig {
    fn describe(&self) -> String {
        format!("memory (max_entries {})", self.max_entries)
    }

    fn open_in_process(&self) -> Option<Result<Arc<dyn SessionStore>, ConfigError>> {
        Some(Ok(Arc::new(MemoryStore::new(self.max_entries))))
    }
}

struct Entry {
    /// Shared with every request that loads it: a read is a reference
    /// count, not a copy.
    value: Bytes,
    expires_at: SystemTime,
}

/// Keys are `key_prefix` + an id the gateway generated (or verified with
/// its HMAC key), which no client can choose: a fast seeded hash (foldhash)
/// rather than SipHash, for the shard and within it.
type Map = HashMap<String, Entry, RandomState>;
type Shard = Mutex<Map>;

/// Sharded so concurrent requests of different sessions rarely contend; each
/// operation holds one shard's lock for a few map operations only, which is
/// also what makes `update` atomic.
pub struct MemoryStore {
    shards: Vec<Shard>,
    hasher: RandomState,
    max_per_shard: usize,
}

impl MemoryStore {
    /// A store holding at most about `max_entries` sessions; when full, expired
    /// entries go first, then those closest to expiry.
    pub fn new(max_entries: usize) -> Self {
        MemoryStore {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(RandomState::default())))
                .collect(),
            hasher: RandomState::default(),
            max_per_shard: max_entries.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Map> {
        let idx = (self.hasher.hash_one(key) as usize) % SHARDS;
        // A panic while holding the lock cannot leave a map half-updated in a
        // way that matters here, so a poisoned lock is still usable.
        self.shards[idx].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn make_room(map: &mut Map, max: usize, now: SystemTime) {
        if map.len() < max {
            return;
        }
        map.retain(|_, e| e.expires_at > now);
        while map.len() >= max {
            let Some(victim) = map
                .iter()
                .min_by_key(|(_, e)| e.expires_at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&victim);
        }
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        let now = SystemTime::now();
        let map = self.shard(key);
        Ok(map.get(key).filter(|e| e.expires_at > now).map(|e| Loaded {
            value: e.value.clone(),
            expires_at: e.expires_at,
        }))
    }

    async fn create(&self, key: &str, value: &Bytes, ttl: Duration) -> Result<bool, StoreError> {
        let now = SystemTime::now();
        let mut map = self.shard(key);
        if map.get(key).is_some_and(|e| e.expires_at > now) {
            return Ok(false);
        }
        Self::make_room(&mut map, self.max_per_shard, now);
        map.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                expires_at: now + ttl,
            },
        );
        Ok(true)
    }

    async fn update(
        &self,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        let now = SystemTime::now();
        let mut map = self.shard(key);
        let Some(entry) = map.get_mut(key).filter(|e| e.expires_at > now) else {
            map.remove(key);
            return Ok(UpdateOutcome::Missing);
        };
        match decide(Some(&entry.value), f)? {
            Step::Write(value) => {
                entry.value = value.clone();
                entry.expires_at = now + ttl;
                Ok(UpdateOutcome::Written(value))
            }
            Step::Delete => {
                map.remove(key);
                Ok(UpdateOutcome::Deleted)
            }
            Step::Missing => Ok(UpdateOutcome::Missing),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.shard(key).remove(key);
        Ok(())
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = SystemTime::now();
        let mut map = self.shard(key);
        match map.get_mut(key).filter(|e| e.expires_at > now) {
            Some(e) => {
                e.expires_at = now + ttl;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = SystemTime::now();
        let mut purged = 0;
        for shard in &self.shards {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = map.len();
            map.retain(|_, e| e.expires_at > now);
            purged += (before - map.len()) as u64;
        }
        Ok(purged)
    }

    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_evicts_soonest_expiring() {
        let store = MemoryStore::new(SHARDS); // one entry per shard
        let rec = Bytes::from_static(b"P{}");
        // Find two keys in the same shard.
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        let idx = |k: &str| (store.hasher.hash_one(k) as usize) % SHARDS;
        let first = &keys[0];
        let second = keys.iter().skip(1).find(|k| idx(k) == idx(first)).unwrap();
        assert!(store
            .create(first, &rec, Duration::from_secs(10))
            .await
            .unwrap());
        assert!(store
            .create(second, &rec, Duration::from_secs(20))
            .await
            .unwrap());
        assert!(store.load(first).await.unwrap().is_none());
        assert!(store.load(second).await.unwrap().is_some());
    }
}
