//! Optimistic compare-and-set updates, for backends without a lock the
//! gateway can hold across read-modify-write (most networked stores). A
//! backend says how to read a value with its version and how
//! to write or delete conditioned on that version ([`CasOps`]); [`Cas`]
//! runs the loop: read, apply the update function, write if unchanged,
//! otherwise read again.
//!
//! Within one gateway process, updates of one key also queue on a local
//! lock stripe: the conditional write keeps them atomic either way (and is
//! what protects against other gateways), but N local writers racing cost
//! O(N^2) round trips, queued ones O(N).

use crate::session::{decide, Step, StoreError, UpdateFn, UpdateOutcome};
use async_trait::async_trait;
use bytes::Bytes;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, SystemTime};

/// Lock stripes serializing local updates.
const STRIPES: usize = 64;

/// Rounds before an update gives up. Each lost round means another writer
/// of the same session won, so this is only reached under sustained
/// contention on one session.
pub const MAX_ATTEMPTS: u32 = 200;

/// A backend's conditional primitives.
#[async_trait]
pub trait CasOps: Send + Sync {
    /// What identifies the value that was read: the value itself, a CAS
    /// token, a version number.
    type Version: Send + Sync;

    /// The live value under `key` and its version; `None` if there is none
    /// (or it expired).
    async fn read(&self, key: &str) -> Result<Option<(Bytes, Self::Version)>, StoreError>;

    /// Replace the value, resetting its expiry to `ttl`, only if it is
    /// still at `version` and live. `false`: it changed or vanished.
    async fn write_if(
        &self,
        key: &str,
        version: &Self::Version,
        value: &Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Delete the value only if it is still at `version`. `false`: it
    /// changed or vanished.
    async fn delete_if(&self, key: &str, version: &Self::Version) -> Result<bool, StoreError>;
}

/// The update loop and its local queue; one per store instance.
pub struct Cas {
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Picks the stripe of a key and seeds the jitter between rounds.
    hasher: RandomState,
}

impl Default for Cas {
    fn default() -> Self {
        Cas {
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Cas {
    /// [`crate::session::SessionStore::update`] for an optimistic backend.
    pub async fn update<O: CasOps + ?Sized>(
        &self,
        ops: &O,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        let stripe = (self.hasher.hash_one(key) % STRIPES as u64) as usize;
        // Held across read, `f` and write; dropped with the future if the
        // engine's timeout cancels the update.
        let _local = self.stripes[stripe].lock().await;
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                self.back_off(attempt).await;
            }
            let Some((current, version)) = ops.read(key).await? else {
                return Ok(UpdateOutcome::Missing);
            };
            match decide(Some(&current), f)? {
                Step::Missing => return Ok(UpdateOutcome::Missing),
                Step::Write(value) => {
                    if ops.write_if(key, &version, &value, ttl).await? {
                        return Ok(UpdateOutcome::Written(value));
                    }
                }
                Step::Delete => {
                    if ops.delete_if(key, &version).await? {
                        return Ok(UpdateOutcome::Deleted);
                    }
                }
            }
            // Someone else wrote (or deleted) in between: read again.
        }
        Err(StoreError::Unavailable(format!(
            "session {key} changed under {MAX_ATTEMPTS} consecutive update attempts"
        )))
    }

    /// A short random pause between rounds, growing with the number of
    /// conflicts, so many writers of one session spread out instead of
    /// colliding in lockstep.
    async fn back_off(&self, attempt: u32) {
        let cap_ms = u64::from(attempt.min(10));
        let ms = self.hasher.hash_one((attempt, SystemTime::now())) % (cap_ms + 1);
        if ms == 0 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Update;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// An in-memory versioned map that lets a test inject conflicting
    /// writes between a read and the conditional write.
    #[derive(Default)]
    struct Versioned {
        map: Mutex<HashMap<String, (Bytes, u64)>>,
        /// Writes to make "behind the back" of the next `n` conditional writes.
        interfere: Mutex<u32>,
    }

    #[async_trait]
    impl CasOps for Versioned {
        type Version = u64;
        async fn read(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
            Ok(self.map.lock().unwrap().get(key).cloned())
        }
        async fn write_if(
            &self,
            key: &str,
            version: &u64,
            value: &Bytes,
            _ttl: Duration,
        ) -> Result<bool, StoreError> {
            let mut map = self.map.lock().unwrap();
            let mut interfere = self.interfere.lock().unwrap();
            if *interfere > 0 {
                *interfere -= 1;
                let entry = map.get_mut(key).unwrap();
                entry.0 = Bytes::from(format!("{}+", String::from_utf8_lossy(&entry.0)));
                entry.1 += 1;
            }
            match map.get_mut(key) {
                Some(entry) if entry.1 == *version => {
                    *entry = (value.clone(), version + 1);
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
        async fn delete_if(&self, key: &str, version: &u64) -> Result<bool, StoreError> {
            let mut map = self.map.lock().unwrap();
            if map.get(key).is_some_and(|e| e.1 == *version) {
                map.remove(key);
                return Ok(true);
            }
            Ok(false)
        }
    }

    fn append_x(current: &[u8]) -> Result<Update, String> {
        let mut v = current.to_vec();
        v.push(b'x');
        Ok(Update::Write(Bytes::from(v)))
    }

    #[tokio::test]
    async fn conflicts_are_retried_against_the_new_value() {
        let ops = Versioned::default();
        ops.map
            .lock()
            .unwrap()
            .insert("k".into(), (Bytes::from_static(b"a"), 1));
        *ops.interfere.lock().unwrap() = 2;
        let out = Cas::default()
            .update(&ops, "k", Duration::from_secs(1), &append_x)
            .await
            .unwrap();
        // Two interfering writes each appended `+`; ours applies last.
        assert_eq!(out, UpdateOutcome::Written(Bytes::from_static(b"a++x")));
        assert_eq!(ops.map.lock().unwrap()["k"].0, Bytes::from_static(b"a++x"));
    }

    #[tokio::test]
    async fn missing_unreadable_and_rejected() {
        let ops = Versioned::default();
        let cas = Cas::default();
        let ttl = Duration::from_secs(1);
        assert_eq!(
            cas.update(&ops, "none", ttl, &append_x).await.unwrap(),
            UpdateOutcome::Missing
        );
        ops.map
            .lock()
            .unwrap()
            .insert("k".into(), (Bytes::from_static(b"a"), 1));
        assert_eq!(
            cas.update(&ops, "k", ttl, &|_| Ok(Update::Unreadable))
                .await
                .unwrap(),
            UpdateOutcome::Missing
        );
        let err = cas
            .update(&ops, "k", ttl, &|_| Err("no".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Rejected(ref m) if m == "no"));
        assert_eq!(
            cas.update(&ops, "k", ttl, &|_| Ok(Update::Delete))
                .await
                .unwrap(),
            UpdateOutcome::Deleted
        );
        assert!(ops.map.lock().unwrap().is_empty());
    }
}
