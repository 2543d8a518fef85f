//! The admin listener (`admin.listen`, never the proxy's port):
//! - `GET /healthz` → 200 `ok` while the process serves;
//! - `GET /readyz` → 200 when the store answers its cheap check within
//!   `store.timeout`, else 503 with one line naming the store's YAML key and
//!   the error; also 503 while draining at shutdown. The result is cached
//!   for up to a second, so probes cannot hammer the store.
//! - `GET /metrics` → Prometheus text exposition ([`crate::metrics`]).

use crate::drain;
use crate::store::StoreHandle;
use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long a readiness verdict is reused.
const READY_CACHE: Duration = Duration::from_secs(1);

pub struct AdminApp {
    /// A handle of its own: the admin service runs on its own runtime.
    store: StoreHandle,
    timeout: Duration,
    /// The last verdict and when it was reached; one check at a time.
    ready: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl AdminApp {
    pub fn new(store: StoreHandle, timeout: Duration) -> Self {
        AdminApp {
            store,
            timeout,
            ready: Mutex::new(None),
        }
    }

    async fn readiness(&self) -> Result<(), String> {
        if drain::draining() {
            return Err("shutting down".into());
        }
        let mut cached = self.ready.lock().await;
        if let Some((at, verdict)) = cached.as_ref() {
            if at.elapsed() < READY_CACHE {
                return verdict.clone();
            }
        }
        let key = self.store.primary_key();
        let verdict = match tokio::time::timeout(self.timeout, async {
            self.store.get().await?.check().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{key}: {e}")),
            Err(_) => Err(format!(
                "{key}: store did not answer within store.timeout ({:?})",
                self.timeout
            )),
        };
        if let Err(reason) = &verdict {
            tracing::warn!(reason = %reason, "not ready");
        }
        *cached = Some((Instant::now(), verdict.clone()));
        verdict
    }
}

fn response(status: u16, content_type: &str, body: Vec<u8>) -> http::Response<Vec<u8>> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("a valid response")
}

const TEXT: &str = "text/plain; charset=utf-8";

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let req = session.req_header();
        if req.method != http::Method::GET && req.method != http::Method::HEAD {
            return response(405, TEXT, b"only GET\n".to_vec());
        }
        match req.uri.path() {
            "/healthz" => response(200, TEXT, b"ok\n".to_vec()),
            "/readyz" => match self.readiness().await {
                Ok(()) => response(200, TEXT, b"ready\n".to_vec()),
                Err(reason) => response(503, TEXT, format!("not ready: {reason}\n").into_bytes()),
            },
            "/metrics" => response(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::get().render(),
            ),
            _ => response(
                404,
                TEXT,
                b"not found: /healthz, /readyz, /metrics\n".to_vec(),
            ),
        }
    }
}
