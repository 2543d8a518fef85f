//! The pingora proxy. [`SessionProxy`] is deliberately thin: each phase
//! hands its work to the [`engine`], [`cookies`], [`protocol`] and [`path`]
//! units and only moves headers in and out of pingora's types.
//!
//! Phases used:
//! - `request_filter`: decide the session (exclude, cookie, store load);
//!   may answer 503 itself (`fail_closed`).
//! - `upstream_request_filter`: strip forged protocol headers and our
//!   cookie, add `X-Session`.
//! - `response_filter`: read and strip the upstream's protocol headers,
//!   write the store, set the cookie. A failure here becomes an error that
//!   `fail_to_proxy` turns into our plain-text 502/503 (the upstream's
//!   headers and body never reach the client).
//! - `logging`: metrics and the access log line, after the response.
//!
//! Everything reloadable lives in one [`Runtime`], swapped whole by a
//! reload; each request takes the current one when it starts and keeps it
//! to the end, so requests in flight finish with the config they began
//! with.

pub mod cookies;
pub mod engine;
pub mod forwarded;
pub mod path;
pub mod protocol;
pub mod upstream;

use crate::config::Config;
use crate::drain::InflightGuard;
use crate::metrics;
use crate::store::StoreHandle;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use engine::{Failure, RequestInfo, SessionEngine, SessionState};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{Error, ErrorSource, ErrorType};
use protocol::{is_protocol_header, RawDirectives};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Per-request state.
pub struct RequestCtx {
    /// The configuration this request runs with, start to end.
    rt: Arc<Runtime>,
    pub rq: RequestInfo,
    started: Instant,
    state: Option<SessionState>,
    /// The failure to answer with from `fail_to_proxy`.
    failure: Option<Failure>,
    committed: bool,
    /// This request created a session (for the access log).
    created: bool,
    /// The response was cut off after its head went out.
    aborted: bool,
    _inflight: InflightGuard,
}

/// What requests run with; replaced as a whole on reload (SIGHUP).
pub struct Runtime {
    engine: Arc<SessionEngine>,
    pub upstreams: upstream::Upstreams,
    /// `session.header` as pingora takes it, built once: cloning it per
    /// request is a reference count, not an allocation and a copy.
    data_header: Bytes,
    /// `session.exclude`, normalized like request paths.
    exclude: Vec<String>,
    /// `server.trusted_proxies`.
    trusted_proxies: Vec<ipnet::IpNet>,
    access_log: bool,
}

impl Runtime {
    /// The runtime of a config; `store` outlives reloads (a changed
    /// `store:` needs a restart).
    pub fn new(config: &Config, store: Arc<StoreHandle>) -> Runtime {
        let engine = Arc::new(SessionEngine::new(config, store));
        Runtime {
            data_header: Bytes::from(engine.session.headers.data.clone()),
            exclude: engine
                .session
                .exclude
                .iter()
                .map(|p| path::normalize(p))
                .collect(),
            engine,
            upstreams: upstream::Upstreams::new(config),
            trusted_proxies: config.server.trusted_proxies.clone(),
            access_log: config.access_log,
        }
    }
}

/// Shared state of the proxy service.
pub struct SessionProxy {
    current: Arc<ArcSwap<Runtime>>,
}

impl SessionProxy {
    pub fn new(current: Arc<ArcSwap<Runtime>>) -> Self {
        SessionProxy { current }
    }
}

/// Request ids: a random per-process prefix and a counter, unique and cheap.
fn new_request_id() -> String {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 4];
        getrandom::getrandom(&mut b).expect("OS random number generator failed");
        u32::from_le_bytes(b)
    });
    format!(
        "{prefix:08x}{:08x}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// An incoming `X-Request-Id` is reused when it is a short token, so logs
/// can be correlated across proxies; anything else is replaced.
fn incoming_request_id(req: &RequestHeader) -> Option<String> {
    let v = req.headers.get("x-request-id")?.to_str().ok()?;
    (!v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
    .then(|| v.to_string())
}

/// Write a short plain-text response and end it.
async fn send_plain(
    session: &mut Session,
    status: u16,
    message: &str,
    request_id: &str,
) -> Result<()> {
    let body = Bytes::from(format!("{message} (request id {request_id})\n"));
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header("Content-Type", "text/plain; charset=utf-8")?;
    resp.insert_header("Content-Length", body.len().to_string())?;
    resp.insert_header("Cache-Control", "no-store")?;
    resp.insert_header("X-Request-Id", request_id)?;
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Mark a response that sets the session cookie as private to the client:
/// shared caches must not store it.
fn make_private(resp: &mut ResponseHeader) -> Result<()> {
    // The common case (the app said nothing about caching) needs no parsing.
    if !resp.headers.contains_key(http::header::CACHE_CONTROL) {
        return resp.insert_header("Cache-Control", "private");
    }
    let mut directives: Vec<String> = Vec::new();
    for v in resp.headers.get_all(http::header::CACHE_CONTROL) {
        for d in String::from_utf8_lossy(v.as_bytes()).split(',') {
            let d = d.trim();
            if !d.is_empty() {
                directives.push(d.to_string());
            }
        }
    }
    let lower = |d: &String| d.to_ascii_lowercase();
    if directives.iter().any(|d| {
        let l = lower(d);
        l == "private" || l.starts_with("private=") || l == "no-store"
    }) {
        return Ok(());
    }
    directives.retain(|d| {
        let l = lower(d);
        l != "public" && !l.starts_with("s-maxage")
    });
    directives.push("private".into());
    resp.insert_header("Cache-Control", directives.join(", "))?;
    Ok(())
}

/// The gateway owns the session cookie: a `Set-Cookie` for the same name
/// from the app would fight it, so it is dropped (other cookies pass).
fn strip_app_session_cookie(resp: &mut ResponseHeader, name: &str, request_id: &str) -> Result<()> {
    let values: Vec<http::HeaderValue> = resp
        .headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    let ours = |v: &http::HeaderValue| {
        let bytes = v.as_bytes();
        let end = bytes.iter().position(|&b| b == b'=').unwrap_or(bytes.len());
        bytes[..end].trim_ascii() == name.as_bytes()
    };
    if !values.iter().any(ours) {
        return Ok(());
    }
    tracing::warn!(
        request_id,
        "upstream tried to set the session cookie `{name}`; dropped"
    );
    resp.remove_header(&http::header::SET_COOKIE);
    for v in values.into_iter().filter(|v| !ours(v)) {
        resp.append_header("Set-Cookie", v)?;
    }
    Ok(())
}

/// What happened to the session of a request, for the access log.
fn session_outcome(ctx: &RequestCtx) -> &'static str {
    match &ctx.state {
        _ if ctx.created => "new",
        Some(SessionState::Existing { .. }) => "existing",
        Some(SessionState::Excluded) => "excluded",
        Some(SessionState::Fresh {
            cookie_present: true,
        }) => "invalid",
        Some(SessionState::Unavailable) => "unavailable",
        // No cookie, sessions disabled, or refused before loading.
        _ => "none",
    }
}

/// One line per request on the `access` target: no query string (it may
/// carry secrets), nothing of the session's content. Written straight into
/// the log buffer ([`crate::telemetry::write_access`]), or as a `tracing`
/// event where that is not available (coloured terminal output).
fn access_log(session: &Session, e: Option<&Error>, ctx: &RequestCtx, status: u16, took: Duration) {
    if !tracing::enabled!(target: crate::telemetry::ACCESS, tracing::Level::INFO) {
        return;
    }
    let req = session.req_header();
    let client = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    let line = crate::telemetry::AccessLine {
        request_id: &ctx.rq.id,
        client,
        method: req.method.as_str(),
        path: req.uri.path(),
        status,
        duration_us: took.as_micros() as u64,
        bytes: session.body_bytes_sent(),
        session: session_outcome(ctx),
        store_us: ctx.rq.store_time().as_micros() as u64,
        aborted: ctx.aborted,
        error: e.map(|e| e as &dyn std::fmt::Display),
    };
    if !crate::telemetry::write_access(&line) {
        crate::telemetry::trace_access(&line);
    }
}

fn add_vary_cookie(resp: &mut ResponseHeader) -> Result<()> {
    let already = resp.headers.get_all(http::header::VARY).iter().any(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("cookie") || t.trim() == "*")
    });
    if !already {
        resp.append_header("Vary", "Cookie")?;
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for SessionProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            rt: self.current.load_full(),
            rq: RequestInfo::default(),
            started: Instant::now(),
            state: None,
            failure: None,
            committed: false,
            created: false,
            aborted: false,
            _inflight: InflightGuard::new(),
        }
    }

    /// Decide the session before anything goes upstream.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        ctx.rq = RequestInfo::new(incoming_request_id(req).unwrap_or_else(new_request_id));
        let rt = &ctx.rt;
        let excluded = path::is_excluded(
            req.uri.path_and_query().map_or("/", |p| p.as_str()),
            &rt.exclude,
        );
        let found = if excluded {
            cookies::Found::Absent
        } else {
            cookies::find(
                req.headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .map(|v| v.as_bytes()),
                &rt.engine.cookie.name,
            )
        };
        match rt.engine.load(excluded, found, &ctx.rq).await {
            Ok(state) => {
                ctx.state = Some(state);
                Ok(false)
            }
            Err(failure) => {
                send_plain(session, failure.status, &failure.message, &ctx.rq.id).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Ok(ctx.rt.upstreams.pick())
    }

    /// pingora 0.9.1 writes the chunked terminator twice when an HTTP/2
    /// request body ends with an empty DATA frame and the upstream speaks
    /// HTTP/1.1 (cloudflare/pingora#935), which desynchronizes the pooled
    /// upstream connection. Ending the body with no chunk avoids it.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        if end_of_stream && body.as_ref().is_some_and(|b| b.is_empty()) {
            *body = None;
        }
        Ok(())
    }

    /// Strip what the client must not control and add the session data.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let peer = forwarded::Peer {
            addr: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
            https: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
        };
        let rt = ctx.rt.clone();
        forwarded::apply(upstream_request, peer, &rt.trusted_proxies)?;
        let names = &rt.engine.session.headers;
        let forged: Vec<http::HeaderName> = upstream_request
            .headers
            .keys()
            .filter(|n| is_protocol_header(n.as_str(), &names.strip_prefix))
            .cloned()
            .collect();
        for name in forged {
            upstream_request.remove_header(&name);
        }
        // The upstream gets the data, never the id: the session cookie is
        // removed on every path, excluded ones included (no verification or
        // store access happens there, only this removal).
        if upstream_request.headers.contains_key(http::header::COOKIE) {
            let kept = cookies::without(
                upstream_request
                    .headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .map(|v| v.as_bytes()),
                &rt.engine.cookie.name,
            );
            upstream_request.remove_header(&http::header::COOKIE);
            if let Some(kept) = kept {
                upstream_request.insert_header(http::header::COOKIE, kept)?;
            }
        }
        let state = ctx.state.as_ref();
        if let Some(value) = state.and_then(|s| s.header_value()) {
            upstream_request.insert_header(rt.data_header.clone(), value)?;
        }
        if let Some(error) = state.and_then(SessionState::error_value) {
            upstream_request.insert_header(names.error.clone(), error)?;
        }
        // Always the id the gateway logs and answers with: a client's id
        // that was not reused must not reach the app either.
        upstream_request.insert_header("X-Request-Id", ctx.rq.id.as_str())?;
        Ok(())
    }

    /// Apply the upstream's session directives and set the cookie.
    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let rt = ctx.rt.clone();
        let names = &rt.engine.session.headers;
        let mut raw = RawDirectives::default();
        let mut protocol_names: Vec<http::HeaderName> = Vec::new();
        for (name, value) in resp.headers.iter() {
            if raw.offer(name.as_str(), value.as_bytes(), names) && !protocol_names.contains(name) {
                protocol_names.push(name.clone());
            }
        }
        for name in &protocol_names {
            resp.remove_header(name);
        }
        strip_app_session_cookie(resp, &rt.engine.cookie.name, &ctx.rq.id)?;
        // The id the gateway logs under, for a user's report to be found.
        if !resp.headers.contains_key("x-request-id") {
            resp.insert_header("X-Request-Id", ctx.rq.id.as_str())?;
        }
        // Interim (1xx) responses carry no session; the final one does.
        if ctx.committed || (resp.status.is_informational() && resp.status != 101) {
            return Ok(());
        }
        ctx.committed = true;
        let Some(state) = ctx.state.as_ref() else {
            return Ok(());
        };
        match rt.engine.commit(state, &raw, &ctx.rq).await {
            Ok(result) => {
                ctx.created = result.created;
                if let Some(cookie) = result.set_cookie {
                    resp.append_header("Set-Cookie", cookie)?;
                    make_private(resp)?;
                }
                if result.vary_cookie {
                    add_vary_cookie(resp)?;
                }
                Ok(())
            }
            Err(failure) => {
                let status = failure.status;
                ctx.failure = Some(failure);
                Err(Error::explain(
                    ErrorType::HTTPStatus(status),
                    "session commit failed",
                ))
            }
        }
    }

    /// Answer errors with a short plain-text body naming the problem.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        // Once a final response head is on the wire, an error text would
        // only corrupt the body (and a chunked body would even look
        // complete): abort the connection instead, so the client and any
        // cache in front see a transport error, never a complete response.
        let head_sent = session
            .response_written()
            .is_some_and(|r| !r.status.is_informational() || r.status.as_u16() == 101);
        if ctx.failure.is_none() && e.esource() == &ErrorSource::Upstream {
            metrics::get().upstream_errors.inc();
        }
        if head_sent {
            ctx.aborted = true;
            tracing::warn!(
                request_id = %ctx.rq.id,
                status = session.response_written().map(|r| r.status.as_u16()),
                error = %e,
                "upstream failed after the response started; connection aborted"
            );
            // H1: flush what is buffered, then close; H2: reset the stream.
            // Bounded: a client that stopped reading must not hold us.
            let _ = tokio::time::timeout(Duration::from_secs(1), session.shutdown()).await;
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let (code, message) = match ctx.failure.take() {
            Some(f) => (f.status, f.message),
            None => {
                let code = match e.etype() {
                    ErrorType::HTTPStatus(code) => *code,
                    _ => match e.esource() {
                        ErrorSource::Upstream => 502,
                        ErrorSource::Downstream => match e.etype() {
                            ErrorType::WriteError
                            | ErrorType::ReadError
                            | ErrorType::ConnectionClosed => 0,
                            _ => 400,
                        },
                        ErrorSource::Internal | ErrorSource::Unset => 500,
                    },
                };
                if code > 0 {
                    tracing::warn!(request_id = %ctx.rq.id, status = code, error = %e, "request failed");
                }
                let message = match code {
                    502 => "upstream unavailable or failed".to_string(),
                    400 => "bad request".to_string(),
                    c => format!("request failed ({c})"),
                };
                (code, message)
            }
        };
        if code > 0 {
            let id = if ctx.rq.id.is_empty() {
                new_request_id()
            } else {
                ctx.rq.id.clone()
            };
            if let Err(err) = send_plain(session, code, &message, &id).await {
                tracing::debug!(request_id = %id, error = %err, "could not send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Our own failures are logged where they are decided, with the request
    /// id; pingora's generic line would only repeat them.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        true
    }

    /// After the response: metrics, and the access log line. Runs once per
    /// request, also for requests answered by the gateway itself.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let took = ctx.started.elapsed();
        metrics::get().request(status, took);
        if ctx.rt.access_log {
            access_log(session, e, ctx, status, took);
        }
    }
}
