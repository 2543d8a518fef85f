//! `store.type: sql` (placeholder until the Sql store lands).

use crate::config::ConfigError;
use crate::session::StoreError;
use serde_yaml::Value;

#[derive(Clone, Debug)]
pub struct SqlConfig {}

impl SqlConfig {
    pub fn parse(_rest: Value) -> Result<Self, ConfigError> {
        Err(ConfigError::new(
            "store.type",
            "the sql store is not implemented yet",
        ))
    }
    pub fn describe(&self) -> String {
        "sql".into()
    }
}

pub struct SqlStore;

impl SqlStore {
    pub async fn connect(_c: &SqlConfig) -> Result<crate::store::memory::MemoryStore, StoreError> {
        Err(StoreError::backend("not implemented"))
    }
}
