//! A real HTTP/1.1 upstream (hyper) that echoes what it received as JSON
//! and answers with whatever the test asks for:
//! - request header `x-reply-<name>: <value>` -> response header `<name>`
//!   (so `x-reply-x-session-patch: {...}` makes the app send a patch);
//! - `x-reply-raw-<name>: <base64>` -> response header `<name>` with the
//!   decoded bytes (for values a client cannot send, such as raw UTF-8);
//! - `x-reply-status: 500` -> that status;
//! - `x-delay-ms: 200` -> answer after that long.
//!
//! The response body is `{"session": <X-Session as JSON or null>,
//! "headers": {name: value}, "path": "..."}`; every response carries
//! `x-upstream-port: <its port>`, so a test can tell which of several
//! upstreams answered. It can also serve HTTPS ([`Upstream::start_tls`]),
//! be stopped and started again on its port (an outage), and answer 503
//! to everything while [`Upstream::set_failing`] (a sick app).

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

pub struct Upstream {
    pub port: u16,
    hits: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    tls: Option<TlsAcceptor>,
    /// The accept loop and every connection: a stop aborts them all, so
    /// no kept-alive connection outlives it.
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Self::serve(None).await
    }

    /// An HTTPS upstream presenting `cert` (PEM chain) with `key`.
    pub async fn start_tls(cert: &Path, key: &Path) -> Upstream {
        let certs = rustls_pemfile::certs(&mut std::fs::read(cert).unwrap().as_slice())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut std::fs::read(key).unwrap().as_slice())
            .unwrap()
            .expect("a private key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Self::serve(Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(tls: Option<TlsAcceptor>) -> Upstream {
        let mut up = Upstream {
            port: 0,
            hits: Arc::new(AtomicUsize::new(0)),
            failing: Arc::new(AtomicBool::new(false)),
            tls,
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        up.port = listener.local_addr().unwrap().port();
        up.accept(listener);
        up
    }

    fn accept(&self, listener: TcpListener) {
        let (counter, failing, tls, tasks) = (
            self.hits.clone(),
            self.failing.clone(),
            self.tls.clone(),
            self.tasks.clone(),
        );
        let port = self.port;
        let accept_loop = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (counter, failing, tls) = (counter.clone(), failing.clone(), tls.clone());
                let conn = tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        handle(req, port, failing.load(Ordering::SeqCst))
                    });
                    let builder = http1::Builder::new();
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    }
                });
                let mut tasks = tasks.lock().unwrap();
                tasks.retain(|t| !t.is_finished());
                tasks.push(conn.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept_loop.abort_handle());
    }

    /// How many requests reached the upstream.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Answer every request with 503 (`true`) or normally again.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Stop listening and drop every connection: connects are refused.
    pub fn stop(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Listen again on the same port after [`Self::stop`].
    pub async fn start_again(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                // The aborted listener may take a moment to be dropped.
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot listen on port {} again: {e}", self.port),
            }
        };
        self.accept(listener);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn handle(
    req: Request<Incoming>,
    port: u16,
    failing: bool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if failing {
        return Ok(Response::builder()
            .status(503)
            .header("x-upstream-port", port)
            .body(Full::new(Bytes::from_static(b"failing on purpose\n")))
            .unwrap());
    }
    let mut headers = Map::new();
    for (name, value) in req.headers() {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&v);
            }
            _ => {
                headers.insert(name.as_str().to_string(), Value::String(v));
            }
        }
    }
    let session = req
        .headers()
        .get("x-session")
        .map(|v| {
            serde_json::from_slice::<Value>(v.as_bytes())
                .unwrap_or(Value::String("<invalid json>".into()))
        })
        .unwrap_or(Value::Null);
    if let Some(ms) = req
        .headers()
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let body = json!({"session": session, "headers": headers, "path": req.uri().to_string()});
    let mut resp = Response::builder()
        .header("content-type", "application/json")
        .header("x-upstream-port", port);
    for (name, value) in req.headers() {
        if let Some(target) = name.as_str().strip_prefix("x-reply-raw-") {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(value.as_bytes())
                .expect("x-reply-raw-* is base64");
            resp = resp.header(
                target,
                hyper::header::HeaderValue::from_bytes(&raw).unwrap(),
            );
        } else if let Some(target) = name.as_str().strip_prefix("x-reply-") {
            if target == "status" {
                let status: u16 = value.to_str().unwrap().parse().unwrap();
                resp = resp.status(status);
            } else {
                resp = resp.header(target, value.clone());
            }
        }
    }
    Ok(resp.body(Full::new(Bytes::from(body.to_string()))).unwrap())
}
