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
    let sink = Arc::new(Sink {
        buf: Mutex::new(Vec::with_capacity(64 * 1024)),
        filled: Condvar::new(),
        drained: Condvar::new(),
        out: Mutex::new(()),
    });
    let writer = SinkWriter(sink.clone());
    let (filter, handle) = reload::Layer::new(filter(level));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(!json && std::io::IsTerminal::is_terminal(&std::io::stderr()));
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

    #[test]
    fn tls_chatter_is_capped_at_info() {
        assert_eq!(directives("debug"), "debug,rustls=info");
        assert_eq!(directives("trace"), "trace,rustls=info");
        // Below info nothing is raised.
        assert_eq!(directives("warn"), "warn");
        assert_eq!(directives("off"), "off");
    }
}
