//! Store backends and the factory that maps `store:` config to a
//! [`SessionStore`]. One module per backend; networked backends sit behind
//! cargo features.

pub mod filesystem;
pub mod memory;
pub mod null;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sql")]
pub mod sql;

use crate::config::ConfigError;
use crate::session::{SessionStore, StoreError};
use serde::Deserialize;
use serde_yaml::Value;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::OnceCell;

/// The backend-specific part of `store:`.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    Memory(MemoryConfig),
    Filesystem(FilesystemConfig),
    Null,
    #[cfg(feature = "redis")]
    Redis(redis::RedisConfig),
    #[cfg(feature = "sql")]
    Sql(sql::SqlConfig),
}

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

const KNOWN_TYPES: &str = "memory | filesystem | null | redis | sql";

impl StoreConfig {
    /// Parse the keys of `store:` other than `type` and the common ones.
    pub fn parse(kind: &str, rest: Value) -> Result<StoreConfig, ConfigError> {
        use crate::config::deserialize_at;
        match kind {
            "memory" => Ok(StoreConfig::Memory(deserialize_at(rest, "store")?)),
            "filesystem" => Ok(StoreConfig::Filesystem(deserialize_at(rest, "store")?)),
            "null" => {
                let _: NoKeys = deserialize_at(rest, "store")?;
                Ok(StoreConfig::Null)
            }
            #[cfg(feature = "redis")]
            "redis" => redis::RedisConfig::parse(rest).map(StoreConfig::Redis),
            #[cfg(feature = "sql")]
            "sql" => sql::SqlConfig::parse(rest).map(StoreConfig::Sql),
            #[cfg(not(feature = "redis"))]
            "redis" => Err(ConfigError::new(
                "store.type",
                "this build has no redis support (rebuild with cargo feature `redis`)",
            )),
            #[cfg(not(feature = "sql"))]
            "sql" => Err(ConfigError::new(
                "store.type",
                "this build has no sql support (rebuild with cargo feature `sql`)",
            )),
            other => Err(ConfigError::new(
                "store.type",
                format!("unknown store type `{other}`, expected one of {KNOWN_TYPES}"),
            )),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::Memory(_) => "memory",
            StoreConfig::Filesystem(_) => "filesystem",
            StoreConfig::Null => "null",
            #[cfg(feature = "redis")]
            StoreConfig::Redis(_) => "redis",
            #[cfg(feature = "sql")]
            StoreConfig::Sql(_) => "sql",
        }
    }

    /// The YAML key to name when the store cannot be reached.
    pub fn primary_key(&self) -> &'static str {
        match self {
            StoreConfig::Memory(_) | StoreConfig::Null => "store",
            StoreConfig::Filesystem(_) => "store.dir",
            #[cfg(feature = "redis")]
            StoreConfig::Redis(r) => r.primary_key(),
            #[cfg(feature = "sql")]
            StoreConfig::Sql(_) => "store.url",
        }
    }

    /// One line describing the store, without credentials (for `--test`).
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Memory(m) => format!("memory (max_entries {})", m.max_entries),
            StoreConfig::Filesystem(f) => {
                format!(
                    "filesystem (dir {}, threshold {})",
                    f.dir.display(),
                    f.threshold
                )
            }
            StoreConfig::Null => "null (sessions disabled)".into(),
            #[cfg(feature = "redis")]
            StoreConfig::Redis(r) => r.describe(),
            #[cfg(feature = "sql")]
            StoreConfig::Sql(s) => s.describe(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

/// A store that is built once, on first use, on the runtime that uses it.
///
/// Pingora runs each service on its own tokio runtime; clients of networked
/// stores spawn their I/O tasks on the runtime they are created on, so they
/// must be created lazily from inside the proxy, not up front. In-process
/// stores are created eagerly so every user of the handle shares them.
pub struct StoreHandle {
    config: StoreConfig,
    ready: OnceCell<Arc<dyn SessionStore>>,
}

impl StoreHandle {
    /// Create the handle; in-process stores are opened here, so a bad
    /// directory is reported at start-up with its key.
    pub fn new(config: StoreConfig) -> Result<Self, ConfigError> {
        let ready = OnceCell::new();
        let eager: Option<Arc<dyn SessionStore>> = match &config {
            StoreConfig::Memory(m) => Some(Arc::new(memory::MemoryStore::new(m.max_entries))),
            StoreConfig::Filesystem(f) => Some(Arc::new(
                filesystem::FilesystemStore::open(&f.dir, f.threshold).map_err(|e| {
                    ConfigError::new("store.dir", format!("cannot use {}: {e}", f.dir.display()))
                })?,
            )),
            StoreConfig::Null => Some(Arc::new(null::NullStore)),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        if let Some(store) = eager {
            let _ = ready.set(store);
        }
        Ok(StoreHandle { config, ready })
    }

    /// A handle for another runtime: shares in-process stores (they must be
    /// one instance), connects networked stores anew on first use there.
    pub fn sibling(&self) -> StoreHandle {
        let ready = OnceCell::new();
        if let (true, Some(store)) = (self.is_in_process(), self.ready.get()) {
            let _ = ready.set(store.clone());
        }
        StoreHandle {
            config: self.config.clone(),
            ready,
        }
    }

    fn is_in_process(&self) -> bool {
        matches!(
            self.config,
            StoreConfig::Memory(_) | StoreConfig::Filesystem(_) | StoreConfig::Null
        )
    }

    pub fn is_null(&self) -> bool {
        matches!(self.config, StoreConfig::Null)
    }

    /// The store, connecting first if needed. A failed connection is not
    /// cached: the next call tries again, so the gateway recovers on its own
    /// once the store is back.
    pub async fn get(&self) -> Result<&Arc<dyn SessionStore>, StoreError> {
        self.ready.get_or_try_init(|| connect(&self.config)).await
    }
}

async fn connect(config: &StoreConfig) -> Result<Arc<dyn SessionStore>, StoreError> {
    match config {
        #[cfg(feature = "redis")]
        StoreConfig::Redis(r) => Ok(Arc::new(redis::RedisStore::connect(r).await?)),
        #[cfg(feature = "sql")]
        StoreConfig::Sql(s) => Ok(Arc::new(sql::SqlStore::connect(s).await?)),
        // In-process stores are always set in `StoreHandle::new`.
        _ => Err(StoreError::backend("in-process store was not initialized")),
    }
}
