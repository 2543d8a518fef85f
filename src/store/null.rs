//! `store.type: null`: sessions disabled, like Flask-Session's
//! NullSessionInterface. Nothing is ever found and nothing can be written;
//! the proxy refuses upstream updates before they reach this store.

use crate::session::{Loaded, SessionRecord, SessionStore, StoreError, UpdateFn, UpdateOutcome};
use async_trait::async_trait;
use std::time::Duration;

pub struct NullStore;

const DISABLED: &str = "sessions are disabled (store.type: null)";

#[async_trait]
impl SessionStore for NullStore {
    fn kind(&self) -> &'static str {
        "null"
    }
    async fn load(&self, _key: &str) -> Result<Option<Loaded>, StoreError> {
        Ok(None)
    }
    async fn create(
        &self,
        _key: &str,
        _record: &SessionRecord,
        _ttl: Duration,
    ) -> Result<bool, StoreError> {
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
