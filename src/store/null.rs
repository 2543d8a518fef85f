//! `store.type: null`: sessions disabled, like Flask-Session's
//! NullSessionInterface. Nothing is ever found and nothing can be written;
//! the proxy refuses upstream updates before they reach this store.

use super::{no_keys, StoreContext, StoreSpec};
use crate::session::{Loaded, SessionStore, StoreError, UpdateFn, UpdateOutcome};
use crate::yaml::ConfigError;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

pub fn parse(keys: serde_yaml::Value, _: &StoreContext) -> Result<Arc<dyn StoreSpec>, ConfigError> {
    no_keys(keys)?;
    Ok(Arc::new(NullSpec))
}

#[derive(Debug)]
struct NullSpec;

impl StoreSpec for NullSpec {
    fn describe(&self) -> String {
        "null (sessions disabled)".into()
    }

    fn open_in_process(&self) -> Option<Result<Arc<dyn SessionStore>, ConfigError>> {
        Some(Ok(Arc::new(NullStore)))
    }

    fn disables_sessions(&self) -> bool {
        true
    }
}

pub struct NullStore;

const DISABLED: &str = "sessions are disabled (store.type: null)";

#[async_trait]
impl SessionStore for NullStore {
    async fn load(&self, _key: &str) -> Result<Option<Loaded>, StoreError> {
        Ok(None)
    }
    async fn create(&self, _key: &str, _value: &Bytes, _ttl: Duration) -> Result<bool, StoreError> {
        Err(StoreError::Rejected(DISABLED.into()))
    }
    async fn update(
        &self,
        _key: &str,
        _ttl: Duration,
        _f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        Err(StoreError::Rejected(DISABLED.into()))
    }
    async fn delete(&self, _key: &str) -> Result<(), StoreError> {
        Ok(())
    }
    async fn touch(&self, _key: &str, _ttl: Duration) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
