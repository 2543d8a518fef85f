//! The load generator: keep-alive HTTP/1.1 over raw `TcpStream`s, like wrk
//! but with a cookie per virtual client. Each connection cycles through its
//! own virtual clients; a request is timed from the first byte written to
//! the last body byte read. Only responses that complete inside the measured
//! window count, so warm-up and the in-flight tail never skew the numbers.

use crate::hist::Histogram;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The most a single request may take before it counts as an error and the
/// connection is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the load generator needs from one response.
pub struct Response {
    pub status: u16,
    /// `name=value` of the first `Set-Cookie`, attributes dropped.
    pub set_cookie: Option<String>,
    /// The server will close the connection after this response.
    pub close: bool,
}

/// One keep-alive connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn header_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    buf[start..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| start + p + 4)
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Parse a response head: status, body length, `Set-Cookie`, `Connection`.
fn parse_head(head: &[u8]) -> io::Result<(Response, usize)> {
    let mut lines = head.split(|&b| b == b'\n');
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    if status_line.len() < 12 || !status_line.starts_with(b"HTTP/1.") {
        return Err(bad("not an HTTP/1.x response"));
    }
    let status = std::str::from_utf8(&status_line[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status code"))?;
    let mut resp = Response {
        status,
        set_cookie: None,
        close: status_line.starts_with(b"HTTP/1.0"),
    };
    let mut length = None;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        } else if name.eq_ignore_ascii_case(b"set-cookie") {
            if resp.set_cookie.is_none() {
                let pair = value.split(|&b| b == b';').next().unwrap_or(b"");
                resp.set_cookie = Some(String::from_utf8_lossy(pair).trim().to_string());
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            resp.close = value.eq_ignore_ascii_case(b"close");
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(bad("chunked responses are not expected"));
        }
    }
    let length = match (length, status) {
        (Some(n), _) => n,
        (None, 204 | 304) | (None, 100..=199) => 0,
        (None, _) => return Err(bad("response without Content-Length")),
    };
    Ok((resp, length))
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(8192),
        })
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8192);
        }
        match self.stream.read_buf(&mut self.buf).await? {
            0 => Err(io::ErrorKind::UnexpectedEof.into()),
            _ => Ok(()),
        }
    }

    /// Send one request (complete bytes) and read the whole response.
    pub async fn request(&mut self, req: &[u8]) -> io::Result<Response> {
        self.buf.clear();
        self.stream.write_all(req).await?;
        let mut scanned = 0;
        let end = loop {
            if let Some(end) = header_end(&self.buf, scanned) {
                break end;
            }
            scanned = self.buf.len();
            if scanned > 1 << 20 {
                return Err(bad("response head over 1 MiB"));
            }
            self.fill().await?;
        };
        let (resp, body) = parse_head(&self.buf[..end])?;
        while self.buf.len() < end + body {
            self.fill().await?;
        }
        Ok(resp)
    }

    /// `request` within [`REQUEST_TIMEOUT`].
    pub async fn request_timed(&mut self, req: &[u8]) -> io::Result<Response> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.request(req)).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }
}

/// A GET request with optional cookie, as complete bytes.
pub fn get(addr: SocketAddr, path: &str, cookie: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: session-gateway-bench\r\nAccept: */*\r\n"
    );
    if let Some(c) = cookie {
        r.push_str("Cookie: ");
        r.push_str(c);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// Create `per_conn` sessions of `size` bytes over each of `conns`
/// connections (`GET /p/<size>` without a cookie) and return their cookies
/// (`session=<id>.<sig>`), grouped by connection.
pub async fn precreate(
    addr: SocketAddr,
    conns: usize,
    per_conn: usize,
    size: usize,
    deadline: Duration,
) -> Result<Vec<Vec<String>>, String> {
    let req = get(addr, &format!("/p/{size}"), None);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let req = req.clone();
            tokio::spawn(async move {
                let mut conn = Conn::connect(addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let mut cookies = Vec::with_capacity(per_conn);
                for _ in 0..per_conn {
                    let resp = conn
                        .request_timed(&req)
                        .await
                        .map_err(|e| format!("creating a session: {e}"))?;
                    match (resp.status, resp.set_cookie) {
                        (200, Some(c)) if c.len() > "session=".len() => cookies.push(c),
                        (200, _) => return Err("no Set-Cookie for a new session".to_string()),
                        (s, _) => return Err(format!("creating a session answered {s}")),
                    }
                    if resp.close {
                        conn = Conn::connect(addr)
                            .await
                            .map_err(|e| format!("reconnect: {e}"))?;
                    }
                }
                Ok::<_, String>(cookies)
            })
        })
        .collect();
    let all = async {
        let mut out = Vec::with_capacity(conns);
        for t in tasks {
            out.push(t.await.map_err(|e| format!("task failed: {e}"))??);
        }
        Ok::<_, String>(out)
    };
    tokio::time::timeout(deadline, all)
        .await
        .map_err(|_| format!("creating sessions took longer than {deadline:?}"))?
}

/// What each connection of a load run sends.
pub struct ConnPlan {
    /// Requests of the connection's virtual clients for the common request.
    pub reads: Vec<Vec<u8>>,
    /// The same clients' write requests (used for `write_ratio` of requests).
    pub writes: Vec<Vec<u8>>,
    pub write_ratio: f64,
    /// Send one request per interval (paced load) instead of back to back.
    pub interval: Option<Duration>,
    /// When the first paced request goes out (spreads the connections).
    pub start_offset: Duration,
    /// Send only in this gate's time slices (`--alternate`).
    pub gate: Option<Gate>,
}

/// Time cut into slices of `slice` from `anchor`; a gate of `phase` 0 is
/// open in the even slices, of phase 1 in the odd ones. Two gateways, one
/// per phase, thus take turns under the same load.
#[derive(Clone, Copy, Debug)]
pub struct Gate {
    pub anchor: Instant,
    pub slice: Duration,
    pub phase: u32,
}

impl Gate {
    /// None while the gate is open at `now`; otherwise when it next opens.
    pub fn next_open(&self, now: Instant) -> Option<Instant> {
        let slice = self.slice.as_nanos().max(1);
        let k = now.saturating_duration_since(self.anchor).as_nanos() / slice;
        if k % 2 == u128::from(self.phase) {
            None
        } else {
            Some(self.anchor + Duration::from_nanos(((k + 1) * slice) as u64))
        }
    }
}

/// The result of one connection (merged over connections by the caller).
#[derive(Default)]
pub struct Tally {
    pub latency: Histogram,
    /// Non-2xx answers, I/O errors and timeouts inside the window.
    pub errors: u64,
    pub writes: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

impl Tally {
    pub fn merge(&mut self, other: Tally) {
        self.latency.merge(&other.latency);
        self.errors += other.errors;
        self.writes += other.writes;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Drive one connection until `end`; count what completes in
/// `[start, end]`.
pub async fn drive(addr: SocketAddr, plan: ConnPlan, start: Instant, end: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<Conn> = None;
    let mut k: u64 = 0;
    let mut client = 0usize;
    let n = plan.reads.len().max(1);
    let note = |tally: &mut Tally, at: Instant, what: String| {
        if at >= start {
            tally.errors += 1;
            if tally.first_error.is_none() {
                tally.first_error = Some(what);
            }
        }
    };
    // Paced connections start spread over one interval, not all at once.
    let mut next_send = plan.interval.map(|_| Instant::now() + plan.start_offset);
    // Bounded by time: every iteration either completes a request or waits
    // out a timeout, and the loop stops at `end`.
    while Instant::now() < end {
        if let (Some(at), Some(interval)) = (next_send.as_mut(), plan.interval) {
            if *at >= end {
                break;
            }
            tokio::time::sleep_until(*at).await;
            // Behind schedule (the gateway cannot keep up): go on without
            // bunching up the missed sends.
            *at = (*at + interval).max(Instant::now());
        }
        if let Some(at) = plan.gate.and_then(|g| g.next_open(Instant::now())) {
            if at >= end {
                break;
            }
            tokio::time::sleep_until(at).await;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(addr).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    note(&mut tally, Instant::now(), format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        // Exactly `write_ratio` of each connection's requests are writes,
        // spread evenly.
        let is_write =
            ((k + 1) as f64 * plan.write_ratio).floor() > (k as f64 * plan.write_ratio).floor();
        k += 1;
        let req = if is_write {
            &plan.writes[client]
        } else {
            &plan.reads[client]
        };
        client = (client + 1) % n;
        let t0 = Instant::now();
        let result = c.request_timed(req).await;
        let t1 = Instant::now();
        let in_window = t1 >= start && t1 <= end;
        match result {
            Ok(resp) => {
                if resp.close {
                    conn = None;
                }
                if !(200..300).contains(&resp.status) {
                    note(&mut tally, t1, format!("HTTP {}", resp.status));
                    continue;
                }
                if in_window {
                    tally.latency.record((t1 - t0).as_nanos() as u64);
                    tally.writes += is_write as u64;
                }
            }
            Err(e) => {
                conn = None;
                note(&mut tally, t1, format!("{e}"));
            }
        }
    }
    tally
}

/// Scrape `GET /metrics` of the admin listener at `admin` every `every`
/// from `start` until `end` over one keep-alive connection, as Prometheus
/// would (usually only every 15 s or more); returns the 200 answers.
pub async fn scrape_metrics(
    admin: SocketAddr,
    every: Duration,
    start: Instant,
    end: Instant,
) -> u64 {
    let req = get(admin, "/metrics", None);
    let mut ok = 0;
    let mut conn: Option<Conn> = None;
    let mut next = start;
    // Bounded by time: one scrape (or one failed connect) per `every`.
    while next < end {
        tokio::time::sleep_until(next).await;
        next += every;
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(admin).await {
                Ok(c) => conn.insert(c),
                Err(_) => continue,
            },
        };
        match c.request_timed(&req).await {
            Ok(resp) if resp.status == 200 => {
                ok += 1;
                if resp.close {
                    conn = None;
                }
            }
            _ => conn = None,
        }
    }
    ok
}
