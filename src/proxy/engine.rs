//! The session engine: what happens to a session when a request arrives
//! ([`SessionEngine::load`]) and when the upstream's response arrives
//! ([`SessionEngine::commit`]). It knows the store, the cookie settings and
//! the protocol, but nothing of pingora, so every rule here is testable
//! without a socket.

use super::cookies::{self, Found};
use super::protocol::{Directives, RawDirectives};
use crate::config::{Config, CookieSettings, OnStoreError, SessionSettings};
use crate::session::{
    merge_patch, CookieVerifier, Loaded, SessionId, SessionRecord, SessionStore, StoreError,
    Update, UpdateOutcome,
};
use crate::store::StoreHandle;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The session of one request, as found when the request arrived.
#[derive(Debug)]
pub enum SessionState {
    /// Path under `session.exclude`: no session work at all.
    Excluded,
    /// `store.type: null`.
    Disabled,
    /// No valid session: the upstream sees `{}`; a session is created only
    /// if the upstream stores something (lazy).
    Fresh { cookie_present: bool },
    /// A live session loaded from the store.
    Existing { id: SessionId, loaded: Loaded },
    /// The store failed and `on_store_error: fail_open` let the request
    /// through without a session; nothing is written back.
    Unavailable,
}

impl SessionState {
    /// The `X-Session` value for the upstream; `None` on excluded paths.
    pub fn header_value(&self) -> Option<String> {
        match self {
            SessionState::Excluded => None,
            SessionState::Existing { loaded, .. } => Some(loaded.record.header_value()),
            _ => Some("{}".to_string()),
        }
    }
}

/// A request-time failure: the status and short text the client gets.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub status: u16,
    pub message: String,
}

impl Failure {
    fn bad_upstream(message: impl Into<String>) -> Self {
        Failure {
            status: 502,
            message: message.into(),
        }
    }
    fn store_unavailable() -> Self {
        Failure {
            status: 503,
            message: "session store unavailable".into(),
        }
    }
}

/// What the response gets after a successful commit.
#[derive(Debug, Default, PartialEq)]
pub struct CommitResult {
    pub set_cookie: Option<String>,
    /// Add `Vary: Cookie` (the request had a session or got a cookie).
    pub vary_cookie: bool,
}

/// Shared, immutable per-process state of the session logic.
pub struct SessionEngine {
    pub session: SessionSettings,
    pub cookie: CookieSettings,
    verifier: CookieVerifier,
    set_cookie: cookies::SetCookieCache,
    store: StoreHandle,
    timeout: Duration,
    retries: u32,
}

impl SessionEngine {
    pub fn new(config: &Config, store: StoreHandle) -> Self {
        SessionEngine {
            session: config.session.clone(),
            cookie: config.cookie.clone(),
            verifier: CookieVerifier::new(&config.keys, config.session.id_bytes),
            set_cookie: cookies::SetCookieCache::new(&config.cookie, config.session.lifetime),
            store,
            timeout: config.store.timeout,
            retries: config.store.retries,
        }
    }

    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    fn key(&self, id: &SessionId) -> String {
        id.store_key(&self.session.key_prefix)
    }

    /// Run one store operation within `store.timeout` (the whole budget,
    /// retries included). Fast failures (connection refused) are retried
    /// with backoff when `retry` is set and the operation is idempotent.
    async fn call<T, F, Fut>(&self, retry: bool, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Arc<dyn SessionStore>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut attempt = 0u32;
        loop {
            let result = tokio::time::timeout_at(deadline, async {
                let store = self.store.get().await?.clone();
                op(store).await
            })
            .await;
            match result {
                Err(_) => {
                    return Err(StoreError::Unavailable(format!(
                        "no answer within store.timeout ({:?})",
                        self.timeout
                    )))
                }
                Ok(Err(StoreError::Unavailable(msg))) if retry && attempt < self.retries => {
                    attempt += 1;
                    let backoff = Duration::from_millis(10u64 << attempt.min(6));
                    if Instant::now() + backoff >= deadline {
                        return Err(StoreError::Unavailable(msg));
                    }
                    tracing::debug!(attempt, error = %msg, "store call failed, retrying");
                    tokio::time::sleep(backoff).await;
                }
                Ok(other) => return other,
            }
        }
    }

    /// Decide the session of a request from its path and session cookie.
    /// `Err` means: answer with this failure, do not contact the upstream.
    pub async fn load(
        &self,
        excluded: bool,
        cookie: Found,
        request_id: &str,
    ) -> Result<SessionState, Failure> {
        if excluded {
            return Ok(SessionState::Excluded);
        }
        if self.store.is_null() {
            return Ok(SessionState::Disabled);
        }
        let cookie_present = cookie.is_present();
        let id = match cookie {
            Found::One(value) => self.verifier.verify(&value),
            Found::Absent => None,
            Found::Duplicated => {
                tracing::debug!(
                    request_id,
                    "several session cookies; treating as no session"
                );
                None
            }
        };
        let Some(id) = id else {
            if cookie_present {
                tracing::debug!(
                    request_id,
                    "session cookie did not verify; starting a fresh session"
                );
            }
            return Ok(SessionState::Fresh { cookie_present });
        };
        let key = self.key(&id);
        match self
            .call(true, |s| {
                let key = &key;
                async move { s.load(key).await }
            })
            .await
        {
            Ok(Some(loaded)) => Ok(SessionState::Existing { id, loaded }),
            Ok(None) => {
                tracing::debug!(
                    request_id,
                    "session not in store (expired or destroyed); starting fresh"
                );
                Ok(SessionState::Fresh { cookie_present })
            }
            Err(e) => match self.session.on_store_error {
                OnStoreError::FailClosed => {
                    tracing::error!(request_id, error = %e, "session load failed; answering 503 (fail_closed)");
                    Err(Failure::store_unavailable())
                }
                OnStoreError::FailOpen => {
                    tracing::warn!(request_id, error = %e, "session load failed; forwarding without session (fail_open)");
                    Ok(SessionState::Unavailable)
                }
            },
        }
    }

    fn cookie_for(&self, id: &SessionId, permanent: bool) -> String {
        self.set_cookie
            .set_cookie(&self.verifier.sign(id), permanent)
    }

    fn store_failure(&self, request_id: &str, what: &str, e: StoreError) -> Failure {
        match e {
            StoreError::Rejected(msg) => {
                tracing::error!(request_id, error = %msg, "upstream session update refused");
                Failure::bad_upstream(msg)
            }
            e => {
                tracing::error!(request_id, error = %e, "session {what} failed after the upstream answered; answering 503");
                Failure::store_unavailable()
            }
        }
    }

    /// Apply the upstream's directives (if any) and decide the cookie.
    pub async fn commit(
        &self,
        state: &SessionState,
        raw: &RawDirectives,
        request_id: &str,
    ) -> Result<CommitResult, Failure> {
        let directives = match state {
            SessionState::Excluded => {
                if raw.any {
                    tracing::warn!(request_id, "upstream sent session headers on an excluded path; ignored");
                }
                return Ok(CommitResult::default());
            }
            _ => raw
                .parse(&self.session.headers, self.session.max_bytes)
                .map_err(|e| {
                    tracing::error!(request_id, error = %e.0, "invalid session update from upstream; answering 502");
                    Failure::bad_upstream(e.0)
                })?,
        };
        match state {
            SessionState::Excluded => unreachable!("handled above"),
            SessionState::Disabled => {
                if directives.is_empty() {
                    Ok(CommitResult::default())
                } else {
                    tracing::error!(
                        request_id,
                        "upstream tried to change a session but store.type is null; answering 502"
                    );
                    Err(Failure::bad_upstream(
                        "sessions are disabled (store.type: null); the upstream's session update was refused",
                    ))
                }
            }
            SessionState::Unavailable => {
                if !directives.is_empty() {
                    tracing::warn!(
                        request_id,
                        "session store unavailable (fail_open): upstream's session update dropped"
                    );
                }
                Ok(CommitResult::default())
            }
            SessionState::Fresh { cookie_present } => {
                self.commit_fresh(*cookie_present, &directives, request_id)
                    .await
            }
            SessionState::Existing { id, loaded } => {
                self.commit_existing(id, loaded, &directives, request_id)
                    .await
            }
        }
    }

    /// Apply replace, patch and permanence to `record`, enforcing max_bytes.
    fn apply(&self, mut record: SessionRecord, d: &Directives) -> Result<Update, String> {
        if let Some(replace) = &d.replace {
            record.data = replace.clone();
        }
        if let Some(patch) = &d.patch {
            merge_patch(&mut record.data, patch);
        }
        if let Some(permanent) = d.permanence {
            record.permanent = permanent;
        }
        if record.data.is_empty() {
            return Ok(Update::Delete);
        }
        let len = record.data_len();
        if len > self.session.max_bytes {
            return Err(format!(
                "the session would be {len} bytes, more than session.max_bytes ({})",
                self.session.max_bytes
            ));
        }
        Ok(Update::Write(record))
    }

    async fn commit_fresh(
        &self,
        cookie_present: bool,
        d: &Directives,
        request_id: &str,
    ) -> Result<CommitResult, Failure> {
        let expire = || CommitResult {
            set_cookie: cookie_present.then(|| cookies::expire_cookie(&self.cookie)),
            vary_cookie: cookie_present,
        };
        if d.destroy {
            return Ok(expire());
        }
        let record = match self.apply(SessionRecord::new(self.session.permanent), d) {
            Ok(Update::Write(record)) => record,
            // Still empty: lazy, nothing stored, no cookie.
            Ok(Update::Delete) => return Ok(CommitResult::default()),
            Err(msg) => {
                return Err(self.store_failure(request_id, "write", StoreError::Rejected(msg)))
            }
        };
        // A new id every time: a client-chosen id is never adopted. The
        // loop only guards against the (astronomically unlikely) collision.
        for _ in 0..3 {
            let id = SessionId::generate(self.session.id_bytes);
            let key = self.key(&id);
            let created = self
                .call(false, |s| {
                    let (key, record) = (&key, &record);
                    async move { s.create(key, record, self.session.lifetime).await }
                })
                .await
                .map_err(|e| self.store_failure(request_id, "create", e))?;
            if created {
                tracing::debug!(request_id, "new session created");
                return Ok(CommitResult {
                    set_cookie: Some(self.cookie_for(&id, record.permanent)),
                    vary_cookie: true,
                });
            }
        }
        Err(self.store_failure(
            request_id,
            "create",
            StoreError::backend("could not find a free session id"),
        ))
    }

    async fn commit_existing(
        &self,
        id: &SessionId,
        loaded: &Loaded,
        d: &Directives,
        request_id: &str,
    ) -> Result<CommitResult, Failure> {
        let key = self.key(id);
        let gone = || CommitResult {
            set_cookie: Some(cookies::expire_cookie(&self.cookie)),
            vary_cookie: true,
        };
        if d.destroy {
            self.call(true, |s| {
                let key = &key;
                async move { s.delete(key).await }
            })
            .await
            .map_err(|e| self.store_failure(request_id, "delete", e))?;
            tracing::debug!(request_id, "session destroyed");
            return Ok(gone());
        }

        // The loaded record is only read from here on; a read-only request
        // (the common case) must not pay for copying it.
        let mut written: Option<SessionRecord> = None;
        if d.modifies_record() {
            let f = |current: SessionRecord| self.apply(current, d);
            let outcome = self
                .call(true, |s| {
                    let (key, f) = (&key, &f);
                    async move { s.update(key, self.session.lifetime, f).await }
                })
                .await
                .map_err(|e| self.store_failure(request_id, "update", e))?;
            match outcome {
                UpdateOutcome::Written(r) => written = Some(r),
                UpdateOutcome::Deleted => return Ok(gone()),
                UpdateOutcome::Missing => {
                    // Destroyed or expired while this request ran: the write
                    // is dropped, never reviving the id (logout wins).
                    tracing::info!(
                        request_id,
                        "session vanished during the request; upstream's update dropped"
                    );
                    return Ok(gone());
                }
            }
        }

        let mut modified = written.is_some();
        let record = written.as_ref().unwrap_or(&loaded.record);
        let mut regenerated: Option<SessionId> = None;
        if d.regenerate {
            // New key first, then delete the old one: a failure in between
            // leaves both, never neither.
            let mut new_id = None;
            for _ in 0..3 {
                let candidate = SessionId::generate(self.session.id_bytes);
                let new_key = self.key(&candidate);
                let created = self
                    .call(false, |s| {
                        let (k, r) = (&new_key, record);
                        async move { s.create(k, r, self.session.lifetime).await }
                    })
                    .await
                    .map_err(|e| self.store_failure(request_id, "regenerate", e))?;
                if created {
                    new_id = Some(candidate);
                    break;
                }
            }
            let new_id = new_id.ok_or_else(|| {
                self.store_failure(
                    request_id,
                    "regenerate",
                    StoreError::backend("could not find a free session id"),
                )
            })?;
            self.call(true, |s| {
                let key = &key;
                async move { s.delete(key).await }
            })
            .await
            .map_err(|e| self.store_failure(request_id, "regenerate", e))?;
            tracing::debug!(request_id, "session id regenerated");
            regenerated = Some(new_id);
            modified = true;
        }
        let id = regenerated.as_ref().unwrap_or(id);

        if modified {
            return Ok(CommitResult {
                set_cookie: Some(self.cookie_for(id, record.permanent)),
                vary_cookie: true,
            });
        }

        // Unmodified: refresh a permanent session's cookie on every request,
        // but touch the stored expiry only once per expiry_update_interval.
        if !(self.session.refresh_each_request && record.permanent) {
            return Ok(CommitResult {
                set_cookie: None,
                vary_cookie: true,
            });
        }
        if self.needs_touch(loaded.expires_at) {
            let touched = self
                .call(true, |s| {
                    let key = &key;
                    async move { s.touch(key, self.session.lifetime).await }
                })
                .await;
            match touched {
                Ok(true) => {}
                Ok(false) => return Ok(gone()),
                Err(e) if self.session.on_store_error == OnStoreError::FailOpen => {
                    tracing::warn!(request_id, error = %e, "could not extend session expiry (fail_open: continuing)");
                }
                Err(e) => return Err(self.store_failure(request_id, "refresh", e)),
            }
        }
        Ok(CommitResult {
            set_cookie: Some(self.cookie_for(id, true)),
            vary_cookie: true,
        })
    }

    /// Was the stored expiry last extended more than expiry_update_interval
    /// ago? (It was extended to `lifetime` from then.)
    fn needs_touch(&self, expires_at: SystemTime) -> bool {
        let remaining = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let since_extended = self.session.lifetime.saturating_sub(remaining);
        since_extended >= self.session.expiry_update_interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const YAML: &str = r#"
listen: 127.0.0.1:1
upstream: 127.0.0.1:2
secret_keys: ["0123456789abcdef0123456789abcdef-unit"]
session: {lifetime: 100, expiry_update_interval: 10}
store: {type: memory}
"#;

    fn engine() -> SessionEngine {
        let config = Config::from_yaml(YAML).unwrap();
        let store = StoreHandle::new(config.store.backend.clone()).unwrap();
        SessionEngine::new(&config, store)
    }

    fn raw(headers: &[(&str, &str)]) -> RawDirectives {
        let e = engine();
        let mut r = RawDirectives::default();
        for (n, v) in headers {
            r.offer(n, v.as_bytes(), &e.session.headers);
        }
        r
    }

    #[test]
    fn touch_is_throttled_by_the_interval() {
        let e = engine();
        let now = SystemTime::now();
        // Extended 5s ago (95s left): within the 10s interval.
        assert!(!e.needs_touch(now + Duration::from_secs(95)));
        // Extended 20s ago.
        assert!(e.needs_touch(now + Duration::from_secs(80)));
    }

    #[tokio::test]
    async fn fresh_session_is_lazy_and_created_on_first_write() {
        let e = engine();
        let state = e.load(false, Found::Absent, "t").await.unwrap();
        assert_eq!(state.header_value().as_deref(), Some("{}"));
        let nothing = e.commit(&state, &raw(&[]), "t").await.unwrap();
        assert_eq!(nothing, CommitResult::default());
        let created = e
            .commit(&state, &raw(&[("x-session-patch", r#"{"a":1}"#)]), "t")
            .await
            .unwrap();
        let cookie = created.set_cookie.unwrap();
        let value = cookie
            .split(';')
            .next()
            .unwrap()
            .strip_prefix("session=")
            .unwrap();
        let state = e
            .load(false, Found::One(value.to_string()), "t")
            .await
            .unwrap();
        assert_eq!(state.header_value().as_deref(), Some(r#"{"a":1}"#));
    }

    #[tokio::test]
    async fn excluded_and_null_paths() {
        let e = engine();
        let state = e.load(true, Found::One("x".into()), "t").await.unwrap();
        assert!(matches!(state, SessionState::Excluded));
        assert_eq!(state.header_value(), None);
        // Updates on excluded paths are ignored, not errors.
        let r = e
            .commit(&state, &raw(&[("x-session", "garbage")]), "t")
            .await
            .unwrap();
        assert_eq!(r, CommitResult::default());
    }

    #[tokio::test]
    async fn bad_directives_are_502_and_fresh_destroy_only_expires_a_presented_cookie() {
        let e = engine();
        let state = e.load(false, Found::Absent, "t").await.unwrap();
        let err = e
            .commit(&state, &raw(&[("x-session", "[]")]), "t")
            .await
            .unwrap_err();
        assert_eq!(err.status, 502);
        let r = e
            .commit(&state, &raw(&[("x-session-action", "destroy")]), "t")
            .await
            .unwrap();
        assert_eq!(r.set_cookie, None);
        let with_cookie = e
            .load(false, Found::One("bogus".into()), "t")
            .await
            .unwrap();
        let r = e
            .commit(&with_cookie, &raw(&[("x-session-action", "destroy")]), "t")
            .await
            .unwrap();
        assert!(r.set_cookie.unwrap().contains("Max-Age=0"));
    }
}
