//! `store.type: filesystem`: one file per session in a directory, like
//! Flask-Session's FileSystemCache.
//!
//! - File names are the SHA-256 of the store key, so any `key_prefix` is safe.
//! - A file is `SGW1` + expiry (u64 big-endian, ms since the epoch) + the
//!   stored record; files are mode 0600, the directory 0700.
//! - Every write goes to a temp file in the same directory and is renamed
//!   over the target, so a reader sees the old or the new file, never half.
//! - Writers of one key serialize on an async lock stripe chosen by the file
//!   name, held across read-modify-write, which makes `update` atomic within
//!   one gateway process. Several gateway
//!   processes sharing one directory are not supported (use Redis or SQL).
//! - Expiry is checked on every read; `purge_expired` removes stale files,
//!   and `threshold` caps the number of files like FileSystemCache does.

use super::{StoreContext, StoreSpec};
use crate::session::{decide, Loaded, SessionStore, Step, StoreError, UpdateFn, UpdateOutcome};
use crate::yaml::{deserialize_at, ConfigError};
use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Mutex, MutexGuard};

/// `store:` keys of `type: filesystem`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesystemConfig {
    /// Directory holding one file per session (created 0700 if missing).
    pub dir: PathBuf,
    /// Most session files kept (FileSystemCache's threshold); 0 = unlimited.
    pub threshold: usize,
}

impl Default for FilesystemConfig {
    fn default() -> Self {
        FilesystemConfig {
            dir: PathBuf::from("./sessions"),
            threshold: 10_000,
        }
    }
}

pub fn parse(keys: serde_yaml::Value, _: &StoreContext) -> Result<Arc<dyn StoreSpec>, ConfigError> {
    let config: FilesystemConfig = deserialize_at(keys, "store")?;
    Ok(Arc::new(config))
}

impl StoreSpec for FilesystemConfig {
    fn describe(&self) -> String {
        format!(
            "filesystem (dir {}, threshold {})",
            self.dir.display(),
            self.threshold
        )
    }

    fn primary_key(&self) -> &'static str {
        "store.dir"
    }

    fn open_in_process(&self) -> Option<Result<Arc<dyn SessionStore>, ConfigError>> {
        Some(
            FilesystemStore::open(&self.dir, self.threshold)
                .map(|s| Arc::new(s) as Arc<dyn SessionStore>)
                .map_err(|e| {
                    ConfigError::new(
                        "store.dir",
                        format!("cannot use {}: {e}", self.dir.display()),
                    )
                }),
        )
    }
}

const MAGIC: &[u8; 4] = b"SGW1";
const HEADER: usize = 12;
const STRIPES: usize = 64;
const TMP_PREFIX: &str = ".tmp.";

pub struct FilesystemStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    threshold: usize,
    stripes: Vec<Mutex<()>>,
    /// Approximate count of session files, kept to avoid a directory scan
    /// on every create.
    count: AtomicUsize,
    /// A threshold prune is running.
    pruning: std::sync::atomic::AtomicBool,
}

impl FilesystemStore {
    /// Open (creating if needed) the directory. `threshold` is the most
    /// session files kept; 0 means unlimited.
    pub fn open(dir: impl Into<PathBuf>, threshold: usize) -> io::Result<Self> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let count = session_files(&dir)?.count();
        Ok(FilesystemStore {
            inner: Arc::new(Inner {
                dir,
                threshold,
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                count: AtomicUsize::new(count),
                pruning: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || op(&inner))
            .await
            .map_err(|e| StoreError::backend(format!("filesystem task failed: {e}")))?
    }
}

fn file_name(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut name = String::with_capacity(64);
    for b in digest {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

fn session_files(dir: &Path) -> io::Result<impl Iterator<Item = fs::DirEntry>> {
    Ok(fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().len() == 64 && !e.file_name().to_string_lossy().starts_with('.')))
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The content of a session file: `SGW1`, the expiry (u64 big-endian, ms
/// since the epoch), the stored value.
pub fn encode_file(value: &[u8], expires_at: SystemTime) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER + value.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&to_ms(expires_at).to_be_bytes());
    buf.extend_from_slice(value);
    buf
}

/// The expiry and stored value of a session file's content, whether or not
/// it has expired; `None` if it is not a session file. Public so the fuzz
/// target can reach the read path without the directory around it.
pub fn decode_file(mut bytes: Vec<u8>) -> Option<Loaded> {
    if bytes.len() < HEADER || &bytes[..4] != MAGIC {
        return None;
    }
    let expires_ms = u64::from_be_bytes(bytes[4..HEADER].try_into().expect("8 bytes"));
    // Past what SystemTime holds (not on 64-bit Linux, but elsewhere) is
    // not a file this store wrote.
    let expires_at = UNIX_EPOCH.checked_add(Duration::from_millis(expires_ms))?;
    bytes.drain(..HEADER);
    Some(Loaded {
        value: Bytes::from(bytes),
        expires_at,
    })
}

fn io_err(e: io::Error) -> StoreError {
    StoreError::backend(format!("filesystem: {e}"))
}

impl Inner {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn stripe_of(&self, name: &str) -> &Mutex<()> {
        let idx = usize::from_str_radix(&name[..2], 16).unwrap_or(0) % STRIPES;
        &self.stripes[idx]
    }

    /// Lock a stripe from blocking code (purge, threshold).
    fn stripe(&self, name: &str) -> MutexGuard<'_, ()> {
        self.stripe_of(name).blocking_lock()
    }

    /// Read a file: `Ok(None)` if absent, expired or not a session file.
    fn read(&self, name: &str) -> Result<Option<Loaded>, StoreError> {
        let bytes = match fs::read(self.path(name)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let Some(loaded) = decode_file(bytes) else {
            tracing::warn!(file = name, "ignoring corrupt session file");
            return Ok(None);
        };
        Ok((loaded.expires_at > SystemTime::now()).then_some(loaded))
    }

    /// Atomically replace (or create) a file: temp file + rename.
    fn write(&self, name: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let mut tmp_name = String::from(TMP_PREFIX);
        tmp_name.push_str(crate::session::SessionId::generate(12).as_str());
        let tmp = self.path(&tmp_name);
        let result = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&encode_file(value, SystemTime::now() + ttl))?;
            fs::rename(&tmp, self.path(name))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err)
    }

    fn remove(&self, name: &str) -> Result<bool, StoreError> {
        match fs::remove_file(self.path(name)) {
            Ok(()) => {
                let _ = self
                    .count
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(e)),
        }
    }

    /// Expiry of a file from its header; `None` for unreadable files.
    fn expiry_of(&self, name: &str) -> Option<u64> {
        use std::io::Read;
        let mut header = [0u8; HEADER];
        let mut f = fs::File::open(self.path(name)).ok()?;
        f.read_exact(&mut header).ok()?;
        (&header[..4] == MAGIC)
            .then(|| u64::from_be_bytes(header[4..12].try_into().expect("8 bytes")))
    }

    /// Remove expired (and corrupt) files and stale temp files.
    fn purge(&self) -> Result<u64, StoreError> {
        self.sweep().map(|(purged, _)| purged)
    }

    /// One pass over the directory: remove expired (and corrupt) files and
    /// stale temp files; return how many sessions were removed and the live
    /// ones with their expiry.
    fn sweep(&self) -> Result<(u64, Vec<(u64, String)>), StoreError> {
        let now = to_ms(SystemTime::now());
        let mut purged = 0;
        let mut live = Vec::new();
        for entry in fs::read_dir(&self.dir)
            .map_err(io_err)?
            .filter_map(Result::ok)
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) {
                // A temp file older than a minute belongs to a crashed write.
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60));
                if stale {
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            }
            if name.len() != 64 {
                continue;
            }
            match self.expiry_of(&name) {
                Some(exp) if exp > now => live.push((exp, name)),
                _ => {
                    // Re-check under the lock: it may have been rewritten.
                    let _guard = self.stripe(&name);
                    if self.expiry_of(&name).is_none_or(|exp| exp <= now) && self.remove(&name)? {
                        purged += 1;
                    }
                }
            }
        }
        Ok((purged, live))
    }

    /// Keep the number of files under the threshold: expired files first,
    /// then those closest to expiry.
    fn enforce_threshold(&self) -> Result<(), StoreError> {
        if self.threshold == 0 || self.count.load(Ordering::Relaxed) < self.threshold {
            return Ok(());
        }
        // One pruner at a time: concurrent creates that find the directory
        // full go ahead (briefly over the threshold) instead of each
        // scanning every file, which the load bench showed starving creates
        // past the store timeout.
        if self.pruning.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Evict down to 90% of the threshold, not one file, so the scan is
        // paid once per many creates.
        let result = self.prune_to(self.threshold - self.threshold.div_ceil(10));
        self.pruning.store(false, Ordering::Release);
        result
    }

    /// Remove expired files, then, if more than `keep` live ones remain,
    /// those closest to expiry.
    fn prune_to(&self, keep: usize) -> Result<(), StoreError> {
        let (_, mut live) = self.sweep()?;
        self.count.store(live.len(), Ordering::Relaxed);
        if live.len() <= keep {
            return Ok(());
        }
        live.sort_unstable();
        let excess = live.len() - keep;
        for (_, name) in live.into_iter().take(excess) {
            let _guard = self.stripe(&name);
            self.remove(&name)?;
        }
        Ok(())
    }
}

#[async_trait]
impl SessionStore for FilesystemStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        let name = file_name(key);
        self.run(move |inner| inner.read(&name)).await
    }

    async fn create(&self, key: &str, value: &Bytes, ttl: Duration) -> Result<bool, StoreError> {
        let name = file_name(key);
        let value = value.clone();
        self.run(|inner| inner.enforce_threshold()).await?;
        let _guard = self.inner.stripe_of(&name).lock().await;
        self.run(move |inner| {
            let existed = inner.path(&name).exists();
            if existed && inner.read(&name)?.is_some() {
                return Ok(false);
            }
            inner.write(&name, &value, ttl)?;
            if !existed {
                inner.count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(true)
        })
        .await
    }

    async fn update(
        &self,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        let name = file_name(key);
        // Held across read, `f` and write: no other writer of this key can
        // interleave. `f` borrows from the caller, so it runs here, between
        // two blocking sections.
        let _guard = self.inner.stripe_of(&name).lock().await;
        let current = {
            let name = name.clone();
            self.run(move |inner| inner.read(&name)).await?
        };
        match decide(current.as_ref().map(|l| &l.value[..]), f)? {
            Step::Write(value) => {
                let written = value.clone();
                self.run(move |inner| inner.write(&name, &value, ttl))
                    .await?;
                Ok(UpdateOutcome::Written(written))
            }
            Step::Delete => {
                self.run(move |inner| inner.remove(&name)).await?;
                Ok(UpdateOutcome::Deleted)
            }
            Step::Missing => Ok(UpdateOutcome::Missing),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let name = file_name(key);
        let _guard = self.inner.stripe_of(&name).lock().await;
        self.run(move |inner| inner.remove(&name).map(|_| ())).await
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let name = file_name(key);
        let _guard = self.inner.stripe_of(&name).lock().await;
        self.run(move |inner| match inner.read(&name)? {
            Some(loaded) => inner.write(&name, &loaded.value, ttl).map(|_| true),
            None => Ok(false),
        })
        .await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.run(|inner| inner.purge()).await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.run(|inner| {
            let probe = inner.dir.join(".write-check");
            fs::write(&probe, b"ok")
                .and_then(|_| fs::remove_file(&probe))
                .map_err(|e| {
                    StoreError::backend(format!(
                        "directory {} is not writable: {e}",
                        inner.dir.display()
                    ))
                })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn files_are_private_and_named_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(dir.path(), 0).unwrap();
        assert!(store
            .create(
                "session:../../etc/x",
                &Bytes::from_static(b"P{}"),
                Duration::from_secs(60)
            )
            .await
            .unwrap());
        let entries: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].file_name().len(), 64);
        let mode = entries[0].metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn threshold_caps_the_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(dir.path(), 5).unwrap();
        for i in 0..20 {
            let ttl = Duration::from_secs(100 + i);
            assert!(store
                .create(&format!("k{i}"), &Bytes::from_static(b"P{}"), ttl)
                .await
                .unwrap());
        }
        let n = session_files(dir.path()).unwrap().count();
        assert!(n <= 5, "{n} files");
        // The newest (longest-lived) session survived.
        assert!(store.load("k19").await.unwrap().is_some());
    }

    #[test]
    fn file_format_round_trips() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let file = encode_file(b"P{\"a\":1}", at);
        assert_eq!(&file[..4], b"SGW1");
        assert_eq!(&file[4..12], &1_700_000_000_123u64.to_be_bytes());
        let loaded = decode_file(file).unwrap();
        assert_eq!(&loaded.value[..], b"P{\"a\":1}");
        assert_eq!(loaded.expires_at, at);
        // An empty value is still a file (the engine judges the value).
        assert_eq!(&decode_file(encode_file(b"", at)).unwrap().value[..], b"");
        for bad in [
            &b""[..],
            b"SGW1",
            b"SGW1\0\0\0\0\0\0\0",
            b"SGW2\0\0\0\0\0\0\0\0P{}",
        ] {
            assert!(decode_file(bad.to_vec()).is_none(), "{bad:?}");
        }
        let far = decode_file(encode_file(
            b"P{}",
            UNIX_EPOCH + Duration::from_millis(u64::MAX),
        ));
        assert!(far.is_none_or(|l| l.expires_at > SystemTime::now()));
    }

    #[tokio::test]
    async fn corrupt_file_reads_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(dir.path(), 0).unwrap();
        fs::write(dir.path().join(file_name("k")), b"garbage").unwrap();
        // Not a session file at all; undecodable contents are the
        // engine's business (it treats them as no session).
        assert_eq!(store.load("k").await.unwrap(), None);
        assert_eq!(store.purge_expired().await.unwrap(), 1);
    }
}
