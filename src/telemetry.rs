//! Logging: `tracing` to stderr, level from `RUST_LOG` or `log_level`,
//! as text or JSON lines (`log_format`). Lines are handed to a writer
//! thread, so a request never waits for stderr (the access log writes one
//! line per request). Pingora logs through the `log` crate; the bridge
//! forwards it here so its errors are not lost. The level can be changed
//! at run time (SIGHUP reload).

use std::sync::{Mutex, OnceLock};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

/// The target of access log lines (`RUST_LOG=access=off` silences them).
pub const ACCESS: &str = "access";

type FilterHandle = reload::Handle<EnvFilter, Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();
/// Flushes the writer thread when dropped; taken by [`flush`] at exit.
static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// `RUST_LOG` when set, else the configured level.
fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives(level)))
}

/// Install the global subscriber (once; later calls change nothing).
pub fn init(level: &str, json: bool) {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // Never drop lines: under a flood, requests wait for the writer
        // rather than losing their access log entries.
        .lossy(false)
        .thread_name("session-gateway-log")
        .finish(std::io::stderr());
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
        *GUARD.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
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

/// Write out every queued line (before the process exits).
pub fn flush() {
    drop(GUARD.lock().unwrap_or_else(|p| p.into_inner()).take());
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
