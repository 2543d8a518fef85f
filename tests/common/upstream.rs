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
//! "headers": {name: value}, "path": "..."}`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

pub struct Upstream {
    pub port: u16,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        handle(req)
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { port, hits, task }
    }

    /// How many requests reached the upstream.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
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
    let mut resp = Response::builder().header("content-type", "application/json");
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
