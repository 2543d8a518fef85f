//! Logging: `tracing` to stderr, level from `RUST_LOG` or `log_level`.
//! Pingora logs through the `log` crate; the bridge forwards it here so its
//! errors are not lost.

use tracing_subscriber::EnvFilter;

pub fn init(level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives(level)));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The filter for `log_level`. rustls (through the MongoDB driver, which
/// turns on its `logging` feature) logs every TLS handshake step at debug:
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
