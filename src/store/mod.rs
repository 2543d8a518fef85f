//! Store backends and the registry that maps `store.type` to one.
//!
//! Adding a backend is one module here plus one line in [`REGISTRY`]: the
//! module exposes `parse(keys, ctx) -> Arc<dyn StoreSpec>` (its YAML keys,
//! validated, naming the key of every problem), and the [`StoreSpec`] it
//! returns says everything else the gateway needs (description, the key to
//! blame, how to open it). Nothing else in the gateway names a backend.
//! Networked backends sit behind a cargo feature of the same name as their
//! `type`; a build without it still recognizes the type and says which
//! feature is missing.

pub mod cas;
#[cfg(feature = "dynamodb")]
pub mod dynamodb;
pub mod filesystem;
#[cfg(feature = "memcached")]
pub mod memcached;
pub mod memory;
#[cfg(feature = "mongodb")]
pub mod mongodb;
#[cfg(any(feature = "redis", feature = "sql"))]
pub mod near;
pub mod null;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sql")]
pub mod sql;

use crate::session::{SessionStore, StoreError};
use crate::yaml::ConfigError;
use async_trait::async_trait;
use serde_yaml::Value;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

/// Settings outside a backend's own keys that it may need to validate or
/// size itself: the common `store:` keys and the shape of store keys.
#[derive(Clone, Debug)]
pub struct StoreContext {
    /// `store.timeout`: the whole budget of one store operation.
    pub timeout: Duration,
    /// `store.retries`.
    pub retries: u32,
    /// `store.cleanup_interval` (zero: no background purge).
    pub cleanup_interval: Duration,
    /// `session.key_prefix`, which starts every store key.
    pub key_prefix: String,
    /// The longest store key the gateway will use (prefix + encoded id).
    pub max_key_len: usize,
    /// The longest value the gateway will store (`session.max_bytes`, the
    /// stored form's flag byte, and the sealing overhead if on).
    pub max_value_len: usize,
}

/// A configured backend: everything the gateway needs from it besides the
/// [`SessionStore`] itself.
#[async_trait]
pub trait StoreSpec: fmt::Debug + Send + Sync {
    /// One line for `--test` and the start-up log, without credentials.
    fn describe(&self) -> String;

    /// The YAML key to name when the store is unreachable or refuses to
    /// work (`store.url`, `store.dir`, ...).
    fn primary_key(&self) -> &'static str {
        "store"
    }

    /// In-process stores are opened here, once, at start-up (a bad
    /// directory is reported with its key), and shared by every runtime.
    /// Networked stores return `None` and are connected lazily.
    fn open_in_process(&self) -> Option<Result<Arc<dyn SessionStore>, ConfigError>> {
        None
    }

    /// Connect a networked store. Called on the runtime that will use it
    /// (clients spawn their I/O tasks there), again after a failure.
    async fn connect(&self) -> Result<Arc<dyn SessionStore>, StoreError> {
        Err(StoreError::backend("this store is opened at start-up"))
    }

    /// `store.type: null`: sessions are off; the engine refuses updates.
    fn disables_sessions(&self) -> bool {
        false
    }
}

/// Reads a backend's keys (everything under `store:` but `type` and the
/// common keys) given the [`StoreContext`].
pub type ParseFn = fn(Value, &StoreContext) -> Result<Arc<dyn StoreSpec>, ConfigError>;

/// One line of the registry.
pub struct Entry {
    /// The `store.type` value.
    pub name: &'static str,
    /// `None` in a build without the backend's cargo feature.
    parse: Option<ParseFn>,
}

/// A registry line for a backend behind the cargo feature named like it.
macro_rules! optional {
    ($name:literal, $module:ident) => {{
        #[cfg(feature = $name)]
        const ENTRY: Entry = Entry {
            name: $name,
            parse: Some($module::parse),
        };
        #[cfg(not(feature = $name))]
        const ENTRY: Entry = Entry {
            name: $name,
            parse: None,
        };
        ENTRY
    }};
}

/// Every store type, in the order error messages list them.
pub const REGISTRY: &[Entry] = &[
    Entry {
        name: "memory",
        parse: Some(memory::parse),
    },
    Entry {
        name: "filesystem",
        parse: Some(filesystem::parse),
    },
    Entry {
        name: "null",
        parse: Some(null::parse),
    },
    optional!("redis", redis),
    optional!("sql", sql),
    optional!("memcached", memcached),
    optional!("mongodb", mongodb),
    optional!("dynamodb", dynamodb),
];

/// The `store:` section, parsed: which backend and its settings.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The `store.type` value.
    pub kind: &'static str,
    pub spec: Arc<dyn StoreSpec>,
}

/// Parse a backend's keys by its `store.type`.
pub fn parse(kind: &str, keys: Value, ctx: &StoreContext) -> Result<StoreConfig, ConfigError> {
    let Some(entry) = REGISTRY.iter().find(|e| e.name == kind) else {
        let known: Vec<&str> = REGISTRY.iter().map(|e| e.name).collect();
        return Err(ConfigError::new(
            "store.type",
            format!(
                "unknown store type `{kind}`, expected one of {}",
                known.join(" | ")
            ),
        ));
    };
    let Some(parse) = entry.parse else {
        return Err(ConfigError::new(
            "store.type",
            format!(
                "this build has no {0} support (cargo feature {0})",
                entry.name
            ),
        ));
    };
    Ok(StoreConfig {
        kind: entry.name,
        spec: parse(keys, ctx)?,
    })
}

/// For backends without keys of their own: refuse any key.
pub fn no_keys(keys: Value) -> Result<(), ConfigError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoKeys {}
    let _: NoKeys = crate::yaml::deserialize_at(keys, "store")?;
    Ok(())
}

/// A store that is built once, on first use, on the runtime that uses it.
///
/// Pingora runs each service on its own tokio runtime; clients of networked
/// stores spawn their I/O tasks on the runtime they are created on, so they
/// must be created lazily from inside the proxy, not up front. In-process
/// stores are created eagerly so every user of the handle shares them.
pub struct StoreHandle {
    config: StoreConfig,
    ready: OnceCell<Arc<dyn SessionStore>>,
    in_process: bool,
}

impl StoreHandle {
    /// Create the handle; in-process stores are opened here, so a bad
    /// directory is reported at start-up with its key.
    pub fn new(config: &StoreConfig) -> Result<Self, ConfigError> {
        let ready = OnceCell::new();
        let in_process = match config.spec.open_in_process() {
            Some(store) => {
                let _ = ready.set(store?);
                true
            }
            None => false,
        };
        Ok(StoreHandle {
            config: config.clone(),
            ready,
            in_process,
        })
    }

    /// A handle for another runtime: shares in-process stores (they must be
    /// one instance), connects networked stores anew on first use there.
    pub fn sibling(&self) -> StoreHandle {
        let ready = OnceCell::new();
        if let (true, Some(store)) = (self.in_process, self.ready.get()) {
            let _ = ready.set(store.clone());
        }
        StoreHandle {
            config: self.config.clone(),
            ready,
            in_process: self.in_process,
        }
    }

    pub fn disables_sessions(&self) -> bool {
        self.config.spec.disables_sessions()
    }

    /// The YAML key to blame for a failure of this store.
    pub fn primary_key(&self) -> &'static str {
        self.config.spec.primary_key()
    }

    /// The store, connecting first if needed. A failed connection is not
    /// cached: the next call tries again, so the gateway recovers on its own
    /// once the store is back.
    pub async fn get(&self) -> Result<&Arc<dyn SessionStore>, StoreError> {
        self.ready
            .get_or_try_init(|| self.config.spec.connect())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> StoreContext {
        StoreContext {
            timeout: Duration::from_millis(500),
            retries: 2,
            cleanup_interval: Duration::from_secs(300),
            key_prefix: "session:".into(),
            max_key_len: 51,
            max_value_len: 8193,
        }
    }

    #[test]
    fn unknown_types_list_the_registry() {
        let err = parse("mongo", Value::Mapping(Default::default()), &ctx()).unwrap_err();
        assert_eq!(err.key, "store.type");
        for entry in REGISTRY {
            assert!(err.message.contains(entry.name), "{err}");
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in REGISTRY.iter().enumerate() {
            assert!(
                REGISTRY[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
        }
    }
}
