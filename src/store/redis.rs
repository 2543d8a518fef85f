//! `store.type: redis` (placeholder until the Redis store lands).

use crate::config::ConfigError;
use crate::session::StoreError;
use serde_yaml::Value;

#[derive(Clone, Debug)]
pub struct RedisConfig {}

impl RedisConfig {
    pub fn parse(_rest: Value) -> Result<Self, ConfigError> {
        Err(ConfigError::new(
            "store.type",
            "the redis store is not implemented yet",
        ))
    }
    pub fn primary_key(&self) -> &'static str {
        "store.url"
    }
    pub fn describe(&self) -> String {
        "redis".into()
    }
}

pub struct RedisStore;

impl RedisStore {
    pub async fn connect(
        _c: &RedisConfig,
    ) -> Result<crate::store::memory::MemoryStore, StoreError> {
        Err(StoreError::backend("not implemented"))
    }
}
