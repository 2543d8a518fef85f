//! Logging: `tracing` to stderr, level from `RUST_LOG` or `log_level`,
//! as text or JSON lines (`log_format`). Lines are appended to a shared
//! buffer that a writer thread empties into stderr at most every
//! [`FLUSH_INTERVAL`], so a request never waits for stderr and a busy
//! gateway writes its access log in a few large writes per second rather
//! than one write (and one thread wake-up) per request: per line that cost
//! about 12 µs of CPU, a quarter of a whole proxied request, in the load
//! bench. Pingora logs through the `log` crate; the bridge
//! forwards it here so its errors are not lost. The level can be changed
//! at run time (SIGHUP reload).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

/// The target of access log lines (`RUST_LOG=access=off` silences them).
pub const ACCESS: &str = "access";

type FilterHandle = reload::Handle<EnvFilter, Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();
/// The log buffer of the installed subscriber, for [`flush`].
static SINK: OnceLock<Arc<Sink>> = OnceLock::new();
/// How access lines are written directly (see [`write_access`]); unset
/// when the fmt layer colours its output for a terminal.
static DIRECT: OnceLock<Format> = OnceLock::new();

/// `log_format`, as access lines are written by [`write_access`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

/// The longest a line waits in the buffer before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// Above this many buffered bytes, loggers wait for the writer thread
/// (stderr is blocked or slower than the log): lines are never dropped,
/// and memory stays bounded.
const MAX_BUFFERED: usize = 8 << 20;

/// Lines not yet written, and the writer thread's signals.
struct Sink {
    buf: Mutex<Vec<u8>>,
    /// Lines arrived in an empty buffer (the writer waits for them).
    filled: Condvar,
    /// The buffer was emptied (loggers over [`MAX_BUFFERED`] wait for it).
    drained: Condvar,
    /// Held while writing to stderr, so lines leave in order.
    out: Mutex<()>,
}

impl Sink {
    fn new() -> Arc<Sink> {
        Arc::new(Sink {
            buf: Mutex::new(Vec::with_capacity(64 * 1024)),
            filled: Condvar::new(),
            drained: Condvar::new(),
            out: Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(&self, line: &[u8]) {
        let mut buf = self.lock();
        while buf.len() > MAX_BUFFERED {
            buf = self.drained.wait(buf).unwrap_or_else(|p| p.into_inner());
        }
        let was_empty = buf.is_empty();
        buf.extend_from_slice(line);
        if was_empty {
            self.filled.notify_one();
        }
    }

    /// Write out everything buffered now.
    fn write_out(&self) {
        let _out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let lines = std::mem::take(&mut *self.lock());
        self.drained.notify_all();
        if !lines.is_empty() {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&lines);
            let _ = err.flush();
        }
    }

    /// The writer thread: wait for lines, let more gather for
    /// [`FLUSH_INTERVAL`], write them all at once.
    fn run(&self) {
        loop {
            {
                let mut buf = self.lock();
                while buf.is_empty() {
                    buf = self.filled.wait(buf).unwrap_or_else(|p| p.into_inner());
                }
            }
            std::thread::sleep(FLUSH_INTERVAL);
            self.write_out();
        }
    }
}

/// What the fmt layer writes each formatted line to.
#[derive(Clone)]
struct SinkWriter(Arc<Sink>);

impl Write for SinkWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.0.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SinkWriter {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> SinkWriter {
        self.clone()
    }
}

/// `RUST_LOG` when set, else the configured level.
fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives(level)))
}

/// Install the global subscriber (once; later calls change nothing).
pub fn init(level: &str, json: bool) {
    let sink = Sink::new();
    let writer = SinkWriter(sink.clone());
    let (filter, handle) = reload::Layer::new(filter(level));
    let ansi = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(ansi);
    let installed = if json {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json().flatten_event(true).with_current_span(false))
            .try_init()
    } else {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init()
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
        let _ = SINK.set(sink.clone());
        if !ansi {
            let _ = DIRECT.set(if json { Format::Json } else { Format::Text });
        }
        let spawned = std::thread::Builder::new()
            .name("session-gateway-log".into())
            .spawn(move || sink.run());
        if let Err(e) = spawned {
            eprintln!("session-gateway: cannot start the log writer thread: {e}");
            std::process::exit(1);
        }
    }
}

/// Change the level (unless `RUST_LOG` is set, which keeps precedence).
pub fn set_level(level: &str) {
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    if let Some(handle) = FILTER.get() {
        if let Err(e) = handle.reload(filter(level)) {
            tracing::warn!(error = %e, "could not change the log level");
        }
    }
}

/// Write out every buffered line (before the process exits).
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.write_out();
    }
}

/// The fields of one access line.
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub client: Option<std::net::IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub duration_us: u64,
    pub bytes: usize,
    pub session: &'static str,
    pub store_us: u64,
    pub aborted: bool,
    pub error: Option<&'a dyn std::fmt::Display>,
}

/// Append an access line to the log buffer, formatted here byte for byte
/// as the fmt layer formats the same `tracing` event (text or JSON), but
/// without its field visitors and dynamic formatting: a line costs about
/// a tenth of the instructions (callgrind: 16k of a proxied request's
/// ~150k went to the `tracing` line). The caller has checked that the
/// `access` target is enabled. `false`: not available (no subscriber
/// installed, or coloured terminal output); log through `tracing` then.
pub fn write_access(line: &AccessLine<'_>) -> bool {
    let (Some(format), Some(sink)) = (DIRECT.get(), SINK.get()) else {
        return false;
    };
    thread_local! {
        static LINE: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(512));
    }
    let now = std::time::SystemTime::now();
    LINE.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        match format {
            Format::Text => access_text(&mut buf, line, now),
            Format::Json => access_json(&mut buf, line, now),
        }
        sink.append(buf.as_bytes());
    });
    true
}

/// The access line as a `tracing` event (the fmt layer formats it as
/// [`write_access`] does).
pub fn trace_access(l: &AccessLine<'_>) {
    tracing::info!(
        target: ACCESS,
        request_id = %l.request_id,
        client = l.client.map(tracing::field::display),
        method = %l.method,
        path = l.path,
        status = l.status,
        duration_us = l.duration_us,
        bytes = l.bytes,
        session = l.session,
        store_us = l.store_us,
        aborted = l.aborted,
        error = l.error.map(tracing::field::display),
        "access"
    );
}

fn access_text(out: &mut String, l: &AccessLine<'_>, now: std::time::SystemTime) {
    use std::fmt::Write as _;
    let mut n = itoa::Buffer::new();
    push_timestamp(out, now);
    out.push_str("  INFO access request_id=");
    out.push_str(l.request_id);
    if let Some(ip) = l.client {
        let _ = write!(out, " client={ip}");
    }
    out.push_str(" method=");
    out.push_str(l.method);
    out.push_str(" path=");
    // As `{:?}` writes a str; paths rarely need its escapes.
    if l.path
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push('"');
        out.push_str(l.path);
        out.push('"');
    } else {
        let _ = write!(out, "{:?}", l.path);
    }
    out.push_str(" status=");
    out.push_str(n.format(l.status));
    out.push_str(" duration_us=");
    out.push_str(n.format(l.duration_us));
    out.push_str(" bytes=");
    out.push_str(n.format(l.bytes));
    out.push_str(" session=\"");
    out.push_str(l.session);
    out.push_str("\" store_us=");
    out.push_str(n.format(l.store_us));
    out.push_str(if l.aborted {
        " aborted=true"
    } else {
        " aborted=false"
    });
    if let Some(e) = l.error {
        let _ = write!(out, " error={e}");
    }
    out.push('\n');
}

fn access_json(out: &mut String, l: &AccessLine<'_>, now: std::time::SystemTime) {
    use std::fmt::Write as _;
    let mut n = itoa::Buffer::new();
    out.push_str("{\"timestamp\":\"");
    push_timestamp(out, now);
    out.push_str("\",\"level\":\"INFO\",\"message\":\"access\",\"request_id\":");
    push_json_str(out, l.request_id);
    if let Some(ip) = l.client {
        let _ = write!(out, ",\"client\":\"{ip}\"");
    }
    out.push_str(",\"method\":");
    push_json_str(out, l.method);
    out.push_str(",\"path\":");
    push_json_str(out, l.path);
    out.push_str(",\"status\":");
    out.push_str(n.format(l.status));
    out.push_str(",\"duration_us\":");
    out.push_str(n.format(l.duration_us));
    out.push_str(",\"bytes\":");
    out.push_str(n.format(l.bytes));
    out.push_str(",\"session\":");
    push_json_str(out, l.session);
    out.push_str(",\"store_us\":");
    out.push_str(n.format(l.store_us));
    out.push_str(if l.aborted {
        ",\"aborted\":true"
    } else {
        ",\"aborted\":false"
    });
    if let Some(e) = l.error {
        out.push_str(",\"error\":");
        push_json_str(out, &e.to_string());
    }
    out.push_str("}\n");
}

/// A JSON string, escaped as serde_json escapes it.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            use std::fmt::Write as _;
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `2026-11-26T18:10:54.802008Z`, as the fmt layer's default timer
/// writes UTC time (RFC 3339, microseconds).
fn push_timestamp(out: &mut String, now: std::time::SystemTime) {
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let digits = |out: &mut String, v: u64, width: usize| {
        let mut b = itoa::Buffer::new();
        let s = b.format(v);
        for _ in s.len()..width {
            out.push('0');
        }
        out.push_str(s);
    };
    digits(out, year as u64, 4);
    out.push('-');
    digits(out, month as u64, 2);
    out.push('-');
    digits(out, day as u64, 2);
    out.push('T');
    digits(out, rem / 3600, 2);
    out.push(':');
    digits(out, rem % 3600 / 60, 2);
    out.push(':');
    digits(out, rem % 60, 2);
    out.push('.');
    digits(out, u64::from(since.subsec_micros()), 6);
    out.push('Z');
}

/// The filter for `log_level`. rustls (a store client dependency turns on
/// its `logging` feature) logs every TLS handshake step at debug:
/// at `debug` and `trace` it stays at info, so the gateway's own decisions
/// are readable and a `--test` failure stays one line. `RUST_LOG` can
/// still ask for it.
fn directives(level: &str) -> String {
    match level {
        "debug" | "trace" => format!("{level},rustls=info"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the fmt layer writes for [`trace_access`] (as configured in
    /// [`init`]).
    fn traced(line: &AccessLine<'_>, json: bool) -> String {
        let sink = Sink::new();
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(SinkWriter(sink.clone()))
            .with_target(false)
            .with_ansi(false);
        if json {
            let sub =
                Registry::default().with(fmt.json().flatten_event(true).with_current_span(false));
            tracing::subscriber::with_default(sub, || trace_access(line));
        } else {
            tracing::subscriber::with_default(Registry::default().with(fmt), || trace_access(line));
        }
        let bytes = std::mem::take(&mut *sink.lock());
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn direct_access_lines_are_the_fmt_layers_lines() {
        let error = "Upstream ConnectRefused \"x\"\tcause: refused";
        let lines = [
            AccessLine {
                request_id: "8f3a29c10000002a",
                client: Some("203.0.113.7".parse().unwrap()),
                method: "GET",
                path: "/cart",
                status: 200,
                duration_us: 412,
                bytes: 1534,
                session: "existing",
                store_us: 96,
                aborted: false,
                error: None,
            },
            AccessLine {
                request_id: "r-1",
                client: Some("2001:db8::1".parse().unwrap()),
                method: "PURGE",
                path: "/a\"b\\c/\u{e9}\u{1}",
                status: 502,
                duration_us: 0,
                bytes: 0,
                session: "none",
                store_us: 18_446_744_073_709,
                aborted: true,
                error: Some(&error),
            },
            AccessLine {
                request_id: "x",
                client: None,
                method: "POST",
                path: "/",
                status: 0,
                duration_us: u64::MAX,
                bytes: usize::MAX,
                session: "new",
                store_us: 1,
                aborted: false,
                error: None,
            },
        ];
        for line in &lines {
            let now = std::time::SystemTime::now();
            let mut text = String::new();
            access_text(&mut text, line, now);
            let expected = traced(line, false);
            // Equal after the timestamp (the fmt layer took its own).
            assert_eq!(text[27..], expected[27..], "{expected}");
            assert_eq!(&text[..27].len(), &expected[..27].len());

            let mut json = String::new();
            access_json(&mut json, line, now);
            assert!(json.ends_with('\n'));
            let mut ours: serde_json::Value = serde_json::from_str(&json).unwrap();
            let mut theirs: serde_json::Value = serde_json::from_str(&traced(line, true)).unwrap();
            assert_eq!(ours["timestamp"].as_str().unwrap().len(), 27);
            ours["timestamp"] = serde_json::Value::Null;
            theirs["timestamp"] = serde_json::Value::Null;
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u32| {
            let mut s = String::new();
            push_timestamp(
                &mut s,
                std::time::UNIX_EPOCH + Duration::new(secs, micros * 1000),
            );
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_795_717_854, 802_008), "2026-11-26T18:30:54.802008Z");
        assert_eq!(at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999Z");
        // The fmt layer's own timer writes the same shape.
        let now = std::time::SystemTime::now();
        let mut ours = String::new();
        push_timestamp(&mut ours, now);
        let mut theirs = String::new();
        tracing_subscriber::fmt::time::FormatTime::format_time(
            &tracing_subscriber::fmt::time::SystemTime,
            &mut tracing_subscriber::fmt::format::Writer::new(&mut theirs),
        )
        .unwrap();
        let shape = |s: &str| -> String {
            s.chars()
                .map(|c| if c.is_ascii_digit() { '0' } else { c })
                .collect()
        };
        assert_eq!(shape(&ours), shape(&theirs), "{ours} vs {theirs}");
    }

    #[test]
    fn tls_chatter_is_capped_at_info() {
        assert_eq!(directives("debug"), "debug,rustls=info");
        assert_eq!(directives("trace"), "trace,rustls=info");
        // Below info nothing is raised.
        assert_eq!(directives("warn"), "warn");
        assert_eq!(directives("off"), "off");
    }
}
