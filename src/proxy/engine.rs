//! The session engine: what happens to a session when a request arrives
//! ([`SessionEngine::load`]) and when the upstream's response arrives
//! ([`SessionEngine::commit`]). It knows the store, the cookie settings and
//! the protocol, but nothing of pingora, so every rule here is testable
//! without a socket.

use super::cookies::{self, Found};
use super::protocol::{Directives, RawDirectives};
use crate::config::{Config, CookieSettings, OnStoreError, SessionSettings};
use crate::metrics::{self, Op, Outcome, SessionEvent};
use crate::session::{
    merge_patch, seal, CookieVerifier, SessionId, SessionRecord, SessionStore, StoreError,
    StoredSession, Update, UpdateOutcome,
};
use crate::store::StoreHandle;
use bytes::Bytes;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// What the engine knows and records about one request: its id (in every
/// log line) and the time it spent waiting for the store (access log).
#[derive(Debug, Default)]
pub struct RequestInfo {
    pub id: String,
    store_nanos: AtomicU64,
}

impl RequestInfo {
    pub fn new(id: String) -> Self {
        RequestInfo {
            id,
            store_nanos: AtomicU64::new(0),
        }
    }

    /// Total time of this request's store operations.
    pub fn store_time(&self) -> Duration {
        Duration::from_nanos(self.store_nanos.load(Ordering::Relaxed))
    }
}

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
    Existing {
        id: SessionId,
        /// Its store key (sealed or plain form).
        key: String,
        stored: StoredSession,
        /// The value as the store held it (sealed, or a legacy form):
        /// what an update compares against (`update_seen`).
        seen: Bytes,
        expires_at: SystemTime,
        /// The presented cookie value when it is signed with the current
        /// key: exactly what signing the id again would give, so a
        /// response that sets the cookie again sends it without another
        /// HMAC.
        signed: Option<String>,
        /// Stored larger than `session.max_bytes` allows (written before
        /// the limit was lowered): the upstream gets `{}` and
        /// `X-Session-Error: too-large`, so it can reset or trim it.
        too_large: bool,
    },
    /// The store failed and `on_store_error: fail_open` let the request
    /// through without a session; nothing is written back.
    Unavailable,
}

impl SessionState {
    /// The `X-Session` value for the upstream; `None` on excluded paths.
    /// For a loaded session it shares the stored bytes: no copy, no JSON,
    /// no second scan.
    pub fn header_value(&self) -> Option<http::HeaderValue> {
        match self {
            SessionState::Excluded => None,
            SessionState::Existing {
                stored,
                too_large: false,
                ..
            } => Some(stored.header_value()),
            _ => Some(http::HeaderValue::from_static("{}")),
        }
    }

    /// The `X-Session-Error` value for the upstream, if any.
    pub fn error_value(&self) -> Option<&'static str> {
        match self {
            SessionState::Unavailable => Some("store-unavailable"),
            SessionState::Existing {
                too_large: true, ..
            } => Some("too-large"),
            _ => None,
        }
    }
}

/// A live session as [`SessionEngine::find`] loaded it.
struct LoadedSession {
    stored: StoredSession,
    seen: Bytes,
    expires_at: SystemTime,
}

/// The loaded session a response is committed for.
#[derive(Clone, Copy)]
struct Current<'a> {
    id: &'a SessionId,
    key: &'a str,
    stored: &'a StoredSession,
    seen: &'a Bytes,
    expires_at: SystemTime,
    /// See `SessionState::Existing::signed`.
    signed: Option<&'a str>,
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
    /// A new session was created by this request.
    pub created: bool,
}

/// Shared, immutable per-process state of the session logic.
pub struct SessionEngine {
    pub session: SessionSettings,
    pub cookie: CookieSettings,
    verifier: CookieVerifier,
    set_cookie: cookies::SetCookieCache,
    store: Arc<StoreHandle>,
    timeout: Duration,
    retries: u32,
    /// `session.seal`: hashed keys, values encrypted under the id.
    seal: bool,
    /// The open cache (`session.seal_cache`): only when sealing, and not
    /// with `seal_cache: 0`.
    opened: Option<seal::OpenCache>,
}

/// The value an update step sealed last, with the stored form inside it.
/// The step may run more than once (optimistic stores retry) and must stay
/// pure, so it only notes what it sealed here; the store's answer says
/// which value it wrote.
#[derive(Default)]
struct LastSealed(Mutex<Option<(Bytes, Bytes)>>);

impl LastSealed {
    fn set(&self, sealed: Bytes, plain: Bytes) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((sealed, plain));
    }

    /// The stored form sealed in `written`, if it is the value noted last.
    fn plain_of(self, written: &[u8]) -> Option<Bytes> {
        match self.0.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some((sealed, plain)) if seal::same_bytes(&sealed, written) => Some(plain),
            _ => None,
        }
    }
}

impl SessionEngine {
    pub fn new(config: &Config, store: Arc<StoreHandle>) -> Self {
        SessionEngine {
            session: config.session.clone(),
            cookie: config.cookie.clone(),
            verifier: CookieVerifier::new(&config.keys, config.session.id_bytes),
            set_cookie: cookies::SetCookieCache::new(&config.cookie, config.session.lifetime),
            store,
            timeout: config.store.timeout,
            retries: config.store.retries,
            seal: config.session.seal,
            opened: config
                .session
                .seal
                .then(|| seal::OpenCache::new(config.session.seal_cache))
                .flatten(),
        }
    }

    /// The store key of a session in the sealed or the plain form.
    fn key(&self, id: &SessionId, sealed: bool) -> String {
        if sealed {
            seal::store_key(&self.session.key_prefix, id)
        } else {
            id.store_key(&self.session.key_prefix)
        }
    }

    /// What to store for a stored form (`plain`) of `id` under `key`.
    fn encode(&self, id: &SessionId, key: &str, sealed: bool, plain: Bytes) -> Bytes {
        if sealed {
            seal::seal(&plain, id, key)
        } else {
            plain
        }
    }

    /// The stored form of what a store holds for `id` under `key`.
    fn decode(
        &self,
        id: &SessionId,
        key: &str,
        sealed: bool,
        value: Bytes,
    ) -> Result<StoredSession, String> {
        match (sealed, &self.opened) {
            (true, Some(cache)) => cache.open(&value, id, key),
            (true, None) => seal::open_stored(&value, id, key),
            (false, _) => StoredSession::decode(value),
        }
    }

    /// Note in the open cache (if any) that the store now holds `value`
    /// under `key`, sealed from `stored`.
    fn remember(&self, key: &str, value: &Bytes, stored: &StoredSession) {
        if let Some(cache) = &self.opened {
            cache.insert(key, value.clone(), stored.clone());
        }
    }

    /// Drop `key` from the open cache (if any): its session is gone, so
    /// its plaintext leaves memory now rather than when it ages out.
    fn forget(&self, key: &str) {
        if let Some(cache) = &self.opened {
            cache.remove(key);
        }
    }

    /// Run one store operation within `store.timeout` (the whole budget,
    /// retries included), counted in the metrics and the request's store
    /// time. Fast failures (connection refused) are retried with backoff
    /// when `retry` is set and the operation is idempotent. `classify`
    /// names the outcome of a successful call.
    async fn call<T, F, Fut>(
        &self,
        rq: &RequestInfo,
        kind: Op,
        retry: bool,
        classify: fn(&T) -> Outcome,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Arc<dyn SessionStore>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let started = Instant::now();
        let (result, timed_out) = self.call_within_budget(retry, op).await;
        let took = started.elapsed();
        rq.store_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        let outcome = match &result {
            Ok(v) => classify(v),
            Err(_) if timed_out => Outcome::Timeout,
            Err(StoreError::Rejected(_)) => Outcome::Rejected,
            Err(_) => Outcome::Error,
        };
        metrics::get().store_op(kind, outcome, took);
        result
    }

    /// [`Self::call`] without the bookkeeping; also says whether the
    /// budget ran out.
    async fn call_within_budget<T, F, Fut>(
        &self,
        retry: bool,
        mut op: F,
    ) -> (Result<T, StoreError>, bool)
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
                    let msg = format!("no answer within store.timeout ({:?})", self.timeout);
                    return (Err(StoreError::Unavailable(msg)), true);
                }
                Ok(Err(StoreError::Unavailable(msg))) if retry && attempt < self.retries => {
                    attempt += 1;
                    let backoff = Duration::from_millis(10u64 << attempt.min(6));
                    if Instant::now() + backoff >= deadline {
                        return (Err(StoreError::Unavailable(msg)), false);
                    }
                    tracing::debug!(attempt, error = %msg, "store call failed, retrying");
                    tokio::time::sleep(backoff).await;
                }
                Ok(other) => return (other, false),
            }
        }
    }

    /// Decide the session of a request from its path and session cookie.
    /// `Err` means: answer with this failure, do not contact the upstream.
    pub async fn load(
        &self,
        excluded: bool,
        cookie: Found,
        rq: &RequestInfo,
    ) -> Result<SessionState, Failure> {
        if excluded {
            return Ok(SessionState::Excluded);
        }
        if self.store.disables_sessions() {
            return Ok(SessionState::Disabled);
        }
        let cookie_present = cookie.is_present();
        let Some((id, signed)) = self.verify(cookie, rq) else {
            return Ok(SessionState::Fresh { cookie_present });
        };
        let key = self.key(&id, self.seal);
        match self.find(&id, &key, rq).await {
            Ok(Some(LoadedSession {
                stored,
                seen,
                expires_at,
            })) => {
                let too_large = stored.header_len() > self.session.max_bytes;
                if too_large {
                    tracing::warn!(
                        request_id = %rq.id,
                        bytes = stored.header_len(),
                        "stored session is larger than session.max_bytes; \
                         forwarding {{}} with X-Session-Error: too-large"
                    );
                }
                Ok(SessionState::Existing {
                    id,
                    key,
                    stored,
                    seen,
                    expires_at,
                    signed,
                    too_large,
                })
            }
            Ok(None) => {
                metrics::get().session(SessionEvent::Expired);
                tracing::debug!(
                    request_id = %rq.id,
                    "session not in store (expired or destroyed); starting fresh"
                );
                Ok(SessionState::Fresh { cookie_present })
            }
            Err(e) => match self.session.on_store_error {
                OnStoreError::FailClosed => {
                    tracing::error!(request_id = %rq.id, error = %e, "session load failed; answering 503 (fail_closed)");
                    Err(Failure::store_unavailable())
                }
                OnStoreError::FailOpen => {
                    tracing::warn!(request_id = %rq.id, error = %e, "session load failed; forwarding without session (fail_open)");
                    Ok(SessionState::Unavailable)
                }
            },
        }
    }

    /// The live session of `id` under `key` (the configured form). A
    /// session still kept in the other form (stored before `session.seal`
    /// was switched) is moved to this one on the way: created here, then
    /// deleted there, so no one is logged out by the switch.
    async fn find(
        &self,
        id: &SessionId,
        key: &str,
        rq: &RequestInfo,
    ) -> Result<Option<LoadedSession>, StoreError> {
        if let Some(found) = self.load_form(id, key, self.seal, rq).await? {
            return Ok(Some(found));
        }
        let old_key = self.key(id, !self.seal);
        let Some(LoadedSession { stored, .. }) =
            self.load_form(id, &old_key, !self.seal, rq).await?
        else {
            return Ok(None);
        };
        let value = self.encode(id, key, self.seal, stored.bytes().clone());
        let created = self
            .call(rq, Op::Create, false, written_or_conflict, |s| {
                let value = &value;
                async move { s.create(key, value, self.session.lifetime).await }
            })
            .await?;
        if !created {
            // Another request moved it first.
            return self.load_form(id, key, self.seal, rq).await;
        }
        self.remember(key, &value, &stored);
        self.call(
            rq,
            Op::Delete,
            true,
            |_| Outcome::Ok,
            |s| {
                let old_key = &old_key;
                async move { s.delete(old_key).await }
            },
        )
        .await?;
        tracing::info!(
            request_id = %rq.id,
            "session moved to the {} form (session.seal changed)",
            if self.seal { "sealed" } else { "plain" }
        );
        Ok(Some(LoadedSession {
            stored,
            seen: value,
            expires_at: SystemTime::now() + self.session.lifetime,
        }))
    }

    /// Load and decode one form; unreadable data counts as missing (logged):
    /// corrupt data must not lock a user out.
    async fn load_form(
        &self,
        id: &SessionId,
        key: &str,
        sealed: bool,
        rq: &RequestInfo,
    ) -> Result<Option<LoadedSession>, StoreError> {
        let loaded = self
            .call(rq, Op::Load, true, found_or_missing, |s| async move {
                s.load(key).await
            })
            .await?;
        let Some(loaded) = loaded else {
            if sealed {
                self.forget(key);
            }
            return Ok(None);
        };
        match self.decode(id, key, sealed, loaded.value.clone()) {
            Ok(stored) => Ok(Some(LoadedSession {
                stored,
                seen: loaded.value,
                expires_at: loaded.expires_at,
            })),
            Err(e) => {
                tracing::warn!(request_id = %rq.id, error = %e, "ignoring an unreadable stored session");
                Ok(None)
            }
        }
    }

    /// The session id of a verified cookie, if any, with the cookie value
    /// when it is signed with the current key.
    fn verify(&self, cookie: Found, rq: &RequestInfo) -> Option<(SessionId, Option<String>)> {
        let id = match cookie {
            Found::One(value) => self
                .verifier
                .verify_with_key(&value)
                .map(|(id, current)| (id, current.then_some(value))),
            Found::Absent => return None,
            Found::Duplicated => {
                metrics::get().session(SessionEvent::InvalidCookie);
                tracing::debug!(
                    request_id = %rq.id,
                    "several session cookies; treating as no session"
                );
                return None;
            }
        };
        if id.is_none() {
            metrics::get().session(SessionEvent::InvalidCookie);
            tracing::debug!(
                request_id = %rq.id,
                "session cookie did not verify; starting a fresh session"
            );
        }
        id
    }

    /// The cookie of a loaded session, sent again: the presented value
    /// when it is signed with the current key, else signed now.
    fn cookie_again(&self, current: &Current<'_>, permanent: bool) -> String {
        match current.signed {
            Some(value) => self.set_cookie.set_cookie(value, permanent),
            None => self.cookie_for(current.id, permanent),
        }
    }

    fn cookie_for(&self, id: &SessionId, permanent: bool) -> String {
        self.set_cookie
            .set_cookie(&self.verifier.sign(id), permanent)
    }

    /// The cookie and Vary of a response whose session is gone.
    fn gone(&self) -> CommitResult {
        CommitResult {
            set_cookie: Some(cookies::expire_cookie(&self.cookie)),
            vary_cookie: true,
            created: false,
        }
    }

    fn store_failure(&self, rq: &RequestInfo, what: &str, e: StoreError) -> Failure {
        match e {
            StoreError::Rejected(msg) => {
                tracing::error!(request_id = %rq.id, error = %msg, "upstream session update refused");
                Failure::bad_upstream(msg)
            }
            e => {
                tracing::error!(request_id = %rq.id, error = %e, "session {what} failed after the upstream answered; answering 503");
                Failure::store_unavailable()
            }
        }
    }

    /// Apply the upstream's directives (if any) and decide the cookie.
    pub async fn commit(
        &self,
        state: &SessionState,
        raw: &RawDirectives,
        rq: &RequestInfo,
    ) -> Result<CommitResult, Failure> {
        if let SessionState::Excluded = state {
            if raw.any {
                tracing::warn!(
                    request_id = %rq.id,
                    "upstream sent session headers on an excluded path; ignored"
                );
            }
            return Ok(CommitResult::default());
        }
        let directives = raw
            .parse(&self.session.headers, self.session.max_bytes)
            .map_err(|e| {
                tracing::error!(request_id = %rq.id, error = %e.0, "invalid session update from upstream; answering 502");
                Failure::bad_upstream(e.0)
            })?;
        match state {
            SessionState::Excluded => Ok(CommitResult::default()),
            SessionState::Disabled => {
                if directives.is_empty() {
                    Ok(CommitResult::default())
                } else {
                    tracing::error!(
                        request_id = %rq.id,
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
                        request_id = %rq.id,
                        "session store unavailable (fail_open): upstream's session update dropped"
                    );
                }
                Ok(CommitResult::default())
            }
            SessionState::Fresh { cookie_present } => {
                self.commit_fresh(*cookie_present, &directives, rq).await
            }
            SessionState::Existing {
                id,
                key,
                stored,
                seen,
                expires_at,
                signed,
                ..
            } => {
                let current = Current {
                    id,
                    key,
                    stored,
                    seen,
                    expires_at: *expires_at,
                    signed: signed.as_deref(),
                };
                self.commit_existing(current, &directives, rq).await
            }
        }
    }

    /// Apply replace, patch and permanence to `record` and encode the
    /// result, enforcing `session.max_bytes` on what the upstream would
    /// be sent.
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
        let value = record.encode();
        let len = value.len() - 1;
        if len > self.session.max_bytes {
            return Err(format!(
                "the session would be {len} bytes, more than session.max_bytes ({})",
                self.session.max_bytes
            ));
        }
        Ok(Update::Write(value))
    }

    /// [`Self::apply`] to a stored value of `id` under `key`, as a store's
    /// update step: a value that does not decode (or decrypt) is treated
    /// as no session. A sealed value the open cache holds is not
    /// decrypted; a value sealed here is noted in `last`.
    fn apply_stored(
        &self,
        id: &SessionId,
        key: &str,
        current: &[u8],
        d: &Directives,
        last: &LastSealed,
    ) -> Result<Update, String> {
        let record = if self.seal {
            self.open_current(id, key, current)
                .and_then(|plain| SessionRecord::from_stored(&plain))
        } else {
            SessionRecord::from_stored(current)
        };
        match record {
            Ok(record) => Ok(match self.apply(record, d)? {
                Update::Write(plain) if self.seal => {
                    let sealed = seal::seal(&plain, id, key);
                    last.set(sealed.clone(), plain);
                    Update::Write(sealed)
                }
                other => other,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "stored session unreadable during an update; treating it as gone");
                Ok(Update::Unreadable)
            }
        }
    }

    /// The stored form sealed in `current`, the value under `key`: the
    /// open cache's when it holds exactly this value, else decrypted.
    fn open_current(&self, id: &SessionId, key: &str, current: &[u8]) -> Result<Bytes, String> {
        match self.opened.as_ref().and_then(|c| c.get(key, current)) {
            Some(stored) => Ok(stored.bytes().clone()),
            None => seal::open(current, id, key).map(Bytes::from),
        }
    }

    /// Store the stored form `plain` under a new random id (sealed for it
    /// when `session.seal` is on). A client-chosen id is never adopted; the
    /// loop only guards against an (astronomically unlikely) collision with
    /// a live session.
    async fn create_with_new_id(
        &self,
        plain: &Bytes,
        rq: &RequestInfo,
        what: &str,
    ) -> Result<SessionId, Failure> {
        for _ in 0..3 {
            let id = SessionId::generate(self.session.id_bytes);
            let key = self.key(&id, self.seal);
            let value = &self.encode(&id, &key, self.seal, plain.clone());
            let created = self
                .call(rq, Op::Create, false, written_or_conflict, |s| {
                    let key = &key;
                    async move { s.create(key, value, self.session.lifetime).await }
                })
                .await
                .map_err(|e| self.store_failure(rq, what, e))?;
            if created {
                if self.opened.is_some() {
                    if let Ok(stored) = StoredSession::decode(plain.clone()) {
                        self.remember(&key, value, &stored);
                    }
                }
                return Ok(id);
            }
        }
        Err(self.store_failure(
            rq,
            what,
            StoreError::backend("could not find a free session id"),
        ))
    }

    async fn delete(&self, key: &str, rq: &RequestInfo, what: &str) -> Result<(), Failure> {
        self.forget(key);
        self.call(
            rq,
            Op::Delete,
            true,
            |_| Outcome::Ok,
            |s| async move { s.delete(key).await },
        )
        .await
        .map_err(|e| self.store_failure(rq, what, e))
    }

    async fn commit_fresh(
        &self,
        cookie_present: bool,
        d: &Directives,
        rq: &RequestInfo,
    ) -> Result<CommitResult, Failure> {
        if d.destroy {
            return Ok(CommitResult {
                set_cookie: cookie_present.then(|| cookies::expire_cookie(&self.cookie)),
                vary_cookie: cookie_present,
                created: false,
            });
        }
        let value = match self.apply(SessionRecord::new(self.session.permanent), d) {
            Ok(Update::Write(value)) => value,
            // Still empty: lazy, nothing stored, no cookie.
            Ok(_) => return Ok(CommitResult::default()),
            Err(msg) => return Err(self.store_failure(rq, "write", StoreError::Rejected(msg))),
        };
        let id = self.create_with_new_id(&value, rq, "create").await?;
        tracing::debug!(request_id = %rq.id, "new session created");
        metrics::get().session(SessionEvent::Created);
        Ok(CommitResult {
            set_cookie: Some(self.cookie_for(&id, value[0] == b'P')),
            vary_cookie: true,
            created: true,
        })
    }

    async fn commit_existing(
        &self,
        loaded: Current<'_>,
        d: &Directives,
        rq: &RequestInfo,
    ) -> Result<CommitResult, Failure> {
        let Current {
            id, key, stored, ..
        } = loaded;
        if d.destroy {
            self.delete(key, rq, "delete").await?;
            tracing::debug!(request_id = %rq.id, "session destroyed");
            metrics::get().session(SessionEvent::Destroyed);
            return Ok(self.gone());
        }
        let written = if d.modifies_record() {
            match self.update(id, key, loaded.seen, d, rq).await? {
                Some(written) => Some(written),
                None => return Ok(self.gone()),
            }
        } else {
            None
        };
        let current = written.as_ref().unwrap_or(stored);
        if d.regenerate {
            let new_id = self.regenerate(key, current.bytes(), rq).await?;
            return Ok(CommitResult {
                set_cookie: Some(self.cookie_for(&new_id, current.permanent())),
                vary_cookie: true,
                created: false,
            });
        }
        if written.is_some() {
            return Ok(CommitResult {
                set_cookie: Some(self.cookie_again(&loaded, current.permanent())),
                vary_cookie: true,
                created: false,
            });
        }
        self.refresh(&loaded, rq).await
    }

    /// Apply the directives atomically in the store. `None`: the session
    /// was emptied (deleted), or destroyed or expired while this request
    /// ran, in which case the write is dropped, never reviving the id
    /// (logout wins).
    /// `seen` is the value this request loaded: a store that can write
    /// against it skips reading it again.
    async fn update(
        &self,
        id: &SessionId,
        key: &str,
        seen: &Bytes,
        d: &Directives,
        rq: &RequestInfo,
    ) -> Result<Option<StoredSession>, Failure> {
        let last = LastSealed::default();
        let f = |current: &[u8]| self.apply_stored(id, key, current, d, &last);
        let outcome = self
            .call(rq, Op::Update, true, updated_or_missing, |s| {
                let f = &f;
                async move { s.update_seen(key, self.session.lifetime, seen, f).await }
            })
            .await
            .map_err(|e| self.store_failure(rq, "update", e))?;
        match outcome {
            UpdateOutcome::Written(value) => {
                // The stored form sealed in what was written is known: no
                // decryption (unless the store reports another value).
                let known = last.plain_of(&value).map(StoredSession::decode);
                let stored = match known {
                    Some(Ok(stored)) => {
                        self.remember(key, &value, &stored);
                        Ok(stored)
                    }
                    _ => self.decode(id, key, self.seal, value),
                };
                stored
                    .map(Some)
                    .map_err(|e| self.store_failure(rq, "update", StoreError::backend(e)))
            }
            UpdateOutcome::Deleted => {
                self.forget(key);
                metrics::get().session(SessionEvent::Destroyed);
                Ok(None)
            }
            UpdateOutcome::Missing => {
                self.forget(key);
                tracing::info!(
                    request_id = %rq.id,
                    "session vanished during the request; upstream's update dropped"
                );
                Ok(None)
            }
        }
    }

    /// Move the session to a new id: create the new key first, then
    /// delete the old one, so a failure in between leaves both, never
    /// neither.
    async fn regenerate(
        &self,
        old_key: &str,
        value: &Bytes,
        rq: &RequestInfo,
    ) -> Result<SessionId, Failure> {
        let new_id = self.create_with_new_id(value, rq, "regenerate").await?;
        self.delete(old_key, rq, "regenerate").await?;
        tracing::debug!(request_id = %rq.id, "session id regenerated");
        metrics::get().session(SessionEvent::Regenerated);
        Ok(new_id)
    }

    /// An unmodified request: refresh a permanent session's cookie on
    /// every request, but touch the stored expiry only once per
    /// `expiry_update_interval`.
    async fn refresh(
        &self,
        current: &Current<'_>,
        rq: &RequestInfo,
    ) -> Result<CommitResult, Failure> {
        let key = current.key;
        if !(self.session.refresh_each_request && current.stored.permanent()) {
            return Ok(CommitResult {
                set_cookie: None,
                vary_cookie: true,
                created: false,
            });
        }
        if self.needs_touch(current.expires_at) {
            let touched = self
                .call(rq, Op::Touch, true, written_or_missing, |s| async move {
                    s.touch(key, self.session.lifetime).await
                })
                .await;
            match touched {
                Ok(true) => {}
                Ok(false) => return Ok(self.gone()),
                Err(e) if self.session.on_store_error == OnStoreError::FailOpen => {
                    tracing::warn!(request_id = %rq.id, error = %e, "could not extend session expiry (fail_open: continuing)");
                }
                Err(e) => return Err(self.store_failure(rq, "refresh", e)),
            }
        }
        Ok(CommitResult {
            set_cookie: Some(self.cookie_again(current, true)),
            vary_cookie: true,
            created: false,
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

fn found_or_missing<T>(v: &Option<T>) -> Outcome {
    if v.is_some() {
        Outcome::Ok
    } else {
        Outcome::Missing
    }
}

/// `create`: `false` means a live entry holds the id.
fn written_or_conflict(created: &bool) -> Outcome {
    if *created {
        Outcome::Ok
    } else {
        Outcome::Conflict
    }
}

/// `touch`: `false` means there was no live entry.
fn written_or_missing(touched: &bool) -> Outcome {
    if *touched {
        Outcome::Ok
    } else {
        Outcome::Missing
    }
}

fn updated_or_missing(outcome: &UpdateOutcome) -> Outcome {
    match outcome {
        UpdateOutcome::Missing => Outcome::Missing,
        _ => Outcome::Ok,
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
        engine_with("")
    }

    /// [`YAML`] with more `session` keys, e.g. `, seal: true`.
    fn engine_with(session: &str) -> SessionEngine {
        let yaml = YAML.replace(
            "expiry_update_interval: 10}",
            &format!("expiry_update_interval: 10{session}}}"),
        );
        let config = Config::from_yaml(&yaml).unwrap();
        let store = StoreHandle::new(&config.store.backend).unwrap();
        SessionEngine::new(&config, Arc::new(store))
    }

    /// The cookie value of a `Set-Cookie` the engine made.
    fn cookie_value(set_cookie: &str) -> String {
        let pair = set_cookie.split(';').next().unwrap();
        pair.strip_prefix("session=").unwrap().to_string()
    }

    fn rq() -> RequestInfo {
        RequestInfo::new("t".into())
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
        let state = e.load(false, Found::Absent, &rq()).await.unwrap();
        assert_eq!(state.header_value().unwrap(), "{}");
        let nothing = e.commit(&state, &raw(&[]), &rq()).await.unwrap();
        assert_eq!(nothing, CommitResult::default());
        let created = e
            .commit(&state, &raw(&[("x-session-patch", r#"{"a":1}"#)]), &rq())
            .await
            .unwrap();
        let value = cookie_value(&created.set_cookie.unwrap());
        let state = e.load(false, Found::One(value), &rq()).await.unwrap();
        assert_eq!(state.header_value().unwrap(), r#"{"a":1}"#);
    }

    #[tokio::test]
    async fn excluded_and_null_paths() {
        let e = engine();
        let state = e.load(true, Found::One("x".into()), &rq()).await.unwrap();
        assert!(matches!(state, SessionState::Excluded));
        assert_eq!(state.header_value(), None);
        // Updates on excluded paths are ignored, not errors.
        let r = e
            .commit(&state, &raw(&[("x-session", "garbage")]), &rq())
            .await
            .unwrap();
        assert_eq!(r, CommitResult::default());
    }

    #[tokio::test]
    async fn bad_directives_are_502_and_fresh_destroy_only_expires_a_presented_cookie() {
        let e = engine();
        let state = e.load(false, Found::Absent, &rq()).await.unwrap();
        let err = e
            .commit(&state, &raw(&[("x-session", "[]")]), &rq())
            .await
            .unwrap_err();
        assert_eq!(err.status, 502);
        let r = e
            .commit(&state, &raw(&[("x-session-action", "destroy")]), &rq())
            .await
            .unwrap();
        assert_eq!(r.set_cookie, None);
        let with_cookie = e
            .load(false, Found::One("bogus".into()), &rq())
            .await
            .unwrap();
        let r = e
            .commit(
                &with_cookie,
                &raw(&[("x-session-action", "destroy")]),
                &rq(),
            )
            .await
            .unwrap();
        assert!(r.set_cookie.unwrap().contains("Max-Age=0"));
    }

    #[test]
    fn the_open_cache_exists_only_when_sealing_and_asked_for() {
        assert!(engine().opened.is_none());
        assert!(engine_with(", seal_cache: 5").opened.is_none());
        assert!(engine_with(", seal: true, seal_cache: 0").opened.is_none());
        // Off by default.
        assert!(engine_with(", seal: true").opened.is_none());
        assert!(engine_with(", seal: true, seal_cache: 5").opened.is_some());
    }

    #[tokio::test]
    async fn sealed_writes_fill_the_open_cache_reads_use_it_and_deletes_empty_it() {
        let e = engine_with(", seal: true, seal_cache: 10000");
        let cache = e.opened.as_ref().unwrap();
        let stored_value = |key: String| {
            let e = &e;
            async move {
                let store = e.store.get().await.unwrap();
                store.load(&key).await.unwrap().map(|l| l.value)
            }
        };
        let fresh = e.load(false, Found::Absent, &rq()).await.unwrap();
        let patch = |json: &str| raw(&[("x-session-patch", json)]);
        let created = e.commit(&fresh, &patch(r#"{"a":1}"#), &rq()).await.unwrap();
        let cookie = cookie_value(&created.set_cookie.unwrap());
        let id = e.verifier.verify(&cookie).unwrap();
        let key = e.key(&id, true);
        // Created: the value written is cached, opened.
        let value = stored_value(key.clone()).await.unwrap();
        let hit = cache.get(&key, &value).expect("the new session is cached");
        assert_eq!(hit.header(), Bytes::from_static(br#"{"a":1}"#));

        // A read uses the entry, and so does the update step: plant a
        // stored form the value does not hold; both return it.
        let planted = StoredSession::decode(Bytes::from_static(br#"P{"planted":true}"#)).unwrap();
        cache.insert(&key, value, planted);
        let state = e
            .load(false, Found::One(cookie.clone()), &rq())
            .await
            .unwrap();
        assert_eq!(state.header_value().unwrap(), r#"{"planted":true}"#);
        e.commit(&state, &patch(r#"{"b":2}"#), &rq()).await.unwrap();
        // The written value is cached with what was sealed into it.
        let value = stored_value(key.clone()).await.unwrap();
        let hit = cache.get(&key, &value).expect("the update is cached");
        assert_eq!(
            hit.header(),
            Bytes::from_static(br#"{"b":2,"planted":true}"#)
        );
        assert_eq!(seal::open_stored(&value, &id, &key), Ok(hit));

        // Regenerate: the old key is forgotten, the new one cached.
        let state = e.load(false, Found::One(cookie), &rq()).await.unwrap();
        let moved = e
            .commit(&state, &raw(&[("x-session-action", "regenerate")]), &rq())
            .await
            .unwrap();
        assert!(cache.get(&key, &value).is_none(), "old key still cached");
        assert_eq!(cache.len(), 1);
        let cookie = cookie_value(&moved.set_cookie.unwrap());
        let new_key = e.key(&e.verifier.verify(&cookie).unwrap(), true);
        let value = stored_value(new_key.clone()).await.unwrap();
        assert!(cache.get(&new_key, &value).is_some());

        // Destroy: gone from the cache.
        let state = e.load(false, Found::One(cookie), &rq()).await.unwrap();
        e.commit(&state, &raw(&[("x-session-action", "destroy")]), &rq())
            .await
            .unwrap();
        assert!(cache.is_empty());
        assert_eq!(stored_value(new_key).await, None);
    }
}
