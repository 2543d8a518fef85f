//! The application behind the gateway: a tiny, fast HTTP/1.1 server on raw
//! tokio sockets, so the gateway (not the app) is what the bench measures.
//!
//! Paths (the gateway strips client headers starting with `X-Session`, so
//! the load generator chooses the answer through the path):
//! - `/r`: `200 ok`, no session change (a read);
//! - `/w`: `200 ok` + `X-Session-Patch: {"n":<counter>}` (a small write);
//! - `/p/<bytes>`: `200 ok` + `X-Session-Patch` that makes the session data
//!   `<bytes>` long (creates a session for a request without a cookie).
//!
//! It also counts the requests that arrived with session data (an
//! `X-Session` header other than `{}`), so a read scenario can prove it
//! really read live sessions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
pub struct Stats {
    /// Requests on `/r` and `/w`.
    pub reads_writes: AtomicU64,
    /// Of those, how many carried session data.
    pub with_session: AtomicU64,
}

pub struct Upstream {
    pub port: u16,
    pub stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// JSON object text of exactly `size` bytes (at least `{"b":""}`), the
/// session data a `/p/<size>` request creates.
pub fn session_json(size: usize) -> String {
    const EMPTY: usize = r#"{"blob":""}"#.len();
    let fill = size.saturating_sub(EMPTY);
    let mut s = String::with_capacity(EMPTY + fill);
    s.push_str(r#"{"blob":""#);
    s.extend((0..fill).map(|i| (b'a' + (i % 26) as u8) as char));
    s.push_str(r#""}"#);
    s
}

impl Upstream {
    pub async fn start() -> std::io::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let stats = Arc::new(Stats::default());
        let shared = stats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of file descriptors or similar: back off briefly.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        Ok(Upstream { port, stats, task })
    }
}

fn header_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    buf[start..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| start + p + 4)
}

/// Does the request carry an `X-Session` header with data?
fn has_session_data(head: &[u8]) -> bool {
    head.split(|&b| b == b'\n').any(|line| {
        line.len() > 11
            && line[..10].eq_ignore_ascii_case(b"x-session:")
            && line[10..].trim_ascii() != b"{}"
    })
}

fn content_length(head: &[u8]) -> usize {
    head.split(|&b| b == b'\n')
        .find_map(|line| {
            (line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
                .then(|| std::str::from_utf8(&line[15..]).ok()?.trim().parse().ok())?
        })
        .unwrap_or(0)
}

async fn serve(mut stream: TcpStream, stats: Arc<Stats>) {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(8 * 1024);
    let mut writes: u64 = 0;
    loop {
        // Read one request head (GET requests: no body expected, but a
        // Content-Length body is skipped to stay in sync).
        let mut scanned = 0;
        let end = loop {
            if let Some(end) = header_end(&buf, scanned) {
                break end;
            }
            scanned = buf.len();
            if buf.len() > 1 << 20 {
                return;
            }
            buf.reserve(8192);
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let body = content_length(&buf[..end]);
        while buf.len() < end + body {
            buf.reserve(8192);
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        let head = &buf[..end];
        let path = head.split(|&b| b == b' ').nth(1).unwrap_or(b"/");
        let answer = match path {
            b"/r" | b"/w" => {
                stats.reads_writes.fetch_add(1, Ordering::Relaxed);
                if has_session_data(head) {
                    stats.with_session.fetch_add(1, Ordering::Relaxed);
                }
                if path == b"/w" {
                    writes += 1;
                    Some(Some(format!("{{\"n\":{writes}}}")))
                } else {
                    Some(None)
                }
            }
            p if p.starts_with(b"/p/") => std::str::from_utf8(&p[3..])
                .ok()
                .and_then(|n| n.parse::<usize>().ok())
                .map(|n| Some(session_json(n))),
            _ => None,
        };
        buf.drain(..end + body);
        out.clear();
        match answer {
            None => out.extend_from_slice(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
            Some(patch) => {
                out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n");
                if let Some(patch) = patch {
                    out.extend_from_slice(b"X-Session-Patch: ");
                    out.extend_from_slice(patch.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"Content-Length: 2\r\n\r\nok");
            }
        }
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}
