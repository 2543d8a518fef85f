//! The session domain, independent of HTTP and of any store: signed ids
//! ([`id`]), the session record and its wire formats ([`record`]), and the
//! store interface every backend implements ([`store`]).
//!
//! Pingora's own `Session` type is an HTTP request; nothing here is named
//! `Session` so the two are never confused.

pub mod id;
pub mod record;
pub mod seal;
pub mod store;

pub use id::{CookieVerifier, SessionId};
pub use record::{merge_patch, SessionRecord, StoredSession};
pub use store::{
    decide, Loaded, NearCacheStats, SessionStore, Step, StoreError, Update, UpdateFn, UpdateOutcome,
};
