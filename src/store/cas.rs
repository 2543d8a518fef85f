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

    /// The version of a value seen earlier, when a value is its own
    /// version (the conditional write compares bytes); `None` (the
    /// default) when the version is kept beside the value and must be read.
    fn version_of(&self, value: &Bytes) -> Option<Self::Version> {
        let _ = value;
        None
    }
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
        self.update_seen(ops, key, ttl, None, f).await
    }

    /// [`crate::session::SessionStore::update_seen`] for an optimistic
    /// backend: when the backend can tell the version of `seen`, the first
    /// round writes against it without reading; losing that round (the
    /// value changed since it was seen, or is gone) costs one round trip
    /// and continues as [`Self::update`] does, straight to a fresh read.
    pub async fn update_seen<O: CasOps + ?Sized>(
        &self,
        ops: &O,
        key: &str,
        ttl: Duration,
        seen: Option<&Bytes>,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        let stripe = (self.hasher.hash_one(key) % STRIPES as u64) as usize;
        // Held across read, `f` and write; dropped with the future if the
        // engine's timeout cancels the update.
        let _local = self.stripes[stripe].lock().await;
        if let Some((seen, version)) = seen.and_then(|v| Some((v, ops.version_of(v)?))) {
            // Only a write or delete is tried on the seen value: its
            // conditional step proves the value is still current. Any
            // other decision (missing, refused) might differ on the value
            // the store holds now, so it is made on a fresh read below.
            if let Ok(step @ (Step::Write(_) | Step::Delete)) = decide(Some(seen), f) {
                if let Some(done) = Self::carry_out(ops, key, ttl, step, &version).await? {
                    return Ok(done);
                }
            }
        }
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                self.back_off(attempt).await;
            }
            let Some((current, version)) = ops.read(key).await? else {
                return Ok(UpdateOutcome::Missing);
            };
            let step = decide(Some(&current), f)?;
            if let Some(done) = Self::carry_out(ops, key, ttl, step, &version).await? {
                return Ok(done);
            }
            // Someone else wrote (or deleted) in between: read again.
        }
        Err(StoreError::Unavailable(format!(
            "session {key} changed under {MAX_ATTEMPTS} consecutive update attempts"
        )))
    }

    /// Carry out an update function's decision for the value at
    /// `version`: `None` if the conditional write (or delete) lost to
    /// another writer.
    async fn carry_out<O: CasOps + ?Sized>(
        ops: &O,
        key: &str,
        ttl: Duration,
        step: Step,
        version: &O::Version,
    ) -> Result<Option<UpdateOutcome>, StoreError> {
        Ok(match step {
            Step::Missing => Some(UpdateOutcome::Missing),
            Step::Write(value) => ops
                .write_if(key, version, &value, ttl)
                .await?
                .then_some(UpdateOutcome::Written(value)),
            Step::Delete => ops
                .delete_if(key, version)
                .await?
                .then_some(UpdateOutcome::Deleted),
        })
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

    /// A map whose values are their own versions (as in Redis), counting
    /// the reads the update loop makes.
    #[derive(Default)]
    struct ByValue {
        map: Mutex<HashMap<String, Bytes>>,
        reads: Mutex<u32>,
    }

    #[async_trait]
    impl CasOps for ByValue {
        type Version = Bytes;
        async fn read(&self, key: &str) -> Result<Option<(Bytes, Bytes)>, StoreError> {
            *self.reads.lock().unwrap() += 1;
            Ok(self
                .map
                .lock()
                .unwrap()
                .get(key)
                .map(|v| (v.clone(), v.clone())))
        }
        async fn write_if(
            &self,
            key: &str,
            version: &Bytes,
            value: &Bytes,
            _ttl: Duration,
        ) -> Result<bool, StoreError> {
            let mut map = self.map.lock().unwrap();
            match map.get_mut(key) {
                Some(v) if v == version => {
                    *v = value.clone();
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
        async fn delete_if(&self, key: &str, version: &Bytes) -> Result<bool, StoreError> {
            let mut map = self.map.lock().unwrap();
            if map.get(key) == Some(version) {
                map.remove(key);
                return Ok(true);
            }
            Ok(false)
        }
        fn version_of(&self, value: &Bytes) -> Option<Bytes> {
            Some(value.clone())
        }
    }

    impl ByValue {
        fn with(key: &str, value: &'static [u8]) -> Self {
            let ops = ByValue::default();
            ops.map
                .lock()
                .unwrap()
                .insert(key.into(), Bytes::from_static(value));
            ops
        }
        fn reads(&self) -> u32 {
            *self.reads.lock().unwrap()
        }
        fn get(&self, key: &str) -> Option<Bytes> {
            self.map.lock().unwrap().get(key).cloned()
        }
    }

    #[tokio::test]
    async fn a_seen_value_still_current_is_written_without_a_read() {
        let ttl = Duration::from_secs(1);
        let (cas, seen) = (Cas::default(), Bytes::from_static(b"a"));
        let ops = ByValue::with("k", b"a");
        let out = cas.update_seen(&ops, "k", ttl, Some(&seen), &append_x);
        assert_eq!(out.await.unwrap(), UpdateOutcome::Written("ax".into()));
        assert_eq!((ops.reads(), ops.get("k")), (0, Some("ax".into())));

        let delete = |_: &[u8]| Ok(Update::Delete);
        let seen = Bytes::from_static(b"ax");
        let out = cas.update_seen(&ops, "k", ttl, Some(&seen), &delete);
        assert_eq!(out.await.unwrap(), UpdateOutcome::Deleted);
        assert_eq!((ops.reads(), ops.get("k")), (0, None));
    }

    #[tokio::test]
    async fn a_stale_seen_value_costs_a_read_and_never_decides() {
        let ttl = Duration::from_secs(1);
        let (cas, seen) = (Cas::default(), Bytes::from_static(b"old"));
        // Changed since seen: the update applies to the value held now.
        let ops = ByValue::with("k", b"new");
        let out = cas.update_seen(&ops, "k", ttl, Some(&seen), &append_x);
        assert_eq!(out.await.unwrap(), UpdateOutcome::Written("newx".into()));
        assert_eq!((ops.reads(), ops.get("k")), (1, Some("newx".into())));

        // Gone since seen: nothing is written, nothing revived.
        let ops = ByValue::default();
        let out = cas.update_seen(&ops, "k", ttl, Some(&seen), &append_x);
        assert_eq!(out.await.unwrap(), UpdateOutcome::Missing);
        assert_eq!((ops.reads(), ops.get("k")), (1, None));

        // A refusal or "unreadable" on the seen value is not trusted: the
        // value held now decides.
        let picky = |v: &[u8]| match v {
            b"old" => Err("too large".to_string()),
            b"bad" => Ok(Update::Unreadable),
            _ => append_x(v),
        };
        let ops = ByValue::with("k", b"new");
        let out = cas.update_seen(&ops, "k", ttl, Some(&seen), &picky);
        assert_eq!(out.await.unwrap(), UpdateOutcome::Written("newx".into()));
        let bad = Bytes::from_static(b"bad");
        let out = cas.update_seen(&ops, "k", ttl, Some(&bad), &picky);
        assert_eq!(out.await.unwrap(), UpdateOutcome::Written("newxx".into()));
        assert_eq!(ops.reads(), 2);
    }

    #[tokio::test]
    async fn a_seen_value_is_ignored_where_the_version_is_kept_apart() {
        let ops = Versioned::default();
        ops.map
            .lock()
            .unwrap()
            .insert("k".into(), (Bytes::from_static(b"a"), 1));
        // Versioned has no `version_of`: a stale seen value cannot be
        // written against, the loop reads as `update` does.
        let seen = Bytes::from_static(b"stale");
        let out = Cas::default()
            .update_seen(&ops, "k", Duration::from_secs(1), Some(&seen), &append_x)
            .await
            .unwrap();
        assert_eq!(out, UpdateOutcome::Written(Bytes::from_static(b"ax")));
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
