//! `store.type: memory`: an in-process, bounded map for development and
//! tests. Sessions die with the process and are not shared between gateways.

use crate::session::{
    Loaded, SessionRecord, SessionStore, StoreError, Update, UpdateFn, UpdateOutcome,
};
use async_trait::async_trait;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

const SHARDS: usize = 16;

struct Entry {
    record: SessionRecord,
    expires_at: SystemTime,
}

type Shard = Mutex<HashMap<String, Entry>>;

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
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            max_per_shard: max_entries.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        let idx = (self.hasher.hash_one(key) as usize) % SHARDS;
        // A panic while holding the lock cannot leave a map half-updated in a
        // way that matters here, so a poisoned lock is still usable.
        self.shards[idx].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn make_room(map: &mut HashMap<String, Entry>, max: usize, now: SystemTime) {
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
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        let now = SystemTime::now();
        let map = self.shard(key);
        Ok(map.get(key).filter(|e| e.expires_at > now).map(|e| Loaded {
            record: e.record.clone(),
            expires_at: e.expires_at,
        }))
    }

    async fn create(
        &self,
        key: &str,
        record: &SessionRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = SystemTime::now();
        let mut map = self.shard(key);
        if map.get(key).is_some_and(|e| e.expires_at > now) {
            return Ok(false);
        }
        Self::make_room(&mut map, self.max_per_shard, now);
        map.insert(
            key.to_string(),
            Entry {
                record: record.clone(),
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
        match f(entry.record.clone()).map_err(StoreError::Rejected)? {
            Update::Write(record) => {
                entry.record = record.clone();
                entry.expires_at = now + ttl;
                Ok(UpdateOutcome::Written(record))
            }
            Update::Delete => {
                map.remove(key);
                Ok(UpdateOutcome::Deleted)
            }
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
        let rec = SessionRecord::new(true);
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
