//! Reload without restart: SIGHUP re-reads the config file. Secret keys
//! (and `secret_key_file`), cookie and session settings, `exclude`,
//! upstreams (with their health checks and CA), the upstream timeouts,
//! `trusted_proxies`, the log level, the access log switch and the
//! certificates of TLS listeners (re-read from the same paths) take effect
//! for new requests and handshakes; requests in flight finish with the
//! config they started with, and no connection is dropped. `listen`
//! (including a TLS listener's file paths), `admin`, `store`,
//! `server.threads`, `server.grace_period` and `log_format` only change
//! with a restart: a change to them is logged and otherwise ignored. An
//! invalid file (an unreadable certificate included) changes nothing: the
//! gateway keeps running and logs one error naming the key.

use crate::config::{Config, Listener};
use crate::proxy::Runtime;
use crate::store::StoreHandle;
use crate::tls::ReloadableCert;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

pub struct Reloader {
    /// The `-c` file; `None` when running on the embedded default.
    pub path: Option<PathBuf>,
    /// The config the process started with (restart-only keys come from it).
    pub started: Config,
    pub current: Arc<ArcSwap<Runtime>>,
    pub store: Arc<StoreHandle>,
    /// The certificate of each TLS listener, as started.
    pub certs: Vec<(Listener, Arc<ReloadableCert>)>,
}

impl Reloader {
    /// Read the file again and, if it is valid, switch to it.
    pub async fn reload(&self) {
        let Some(path) = &self.path else {
            tracing::warn!(
                "SIGHUP: running on the embedded default config (no -c); nothing to reload"
            );
            return;
        };
        match Config::from_file(path) {
            Err(e) => {
                crate::metrics::get().reload(false);
                tracing::error!(
                    "reload of {} failed, still running on the previous configuration: {e}",
                    path.display()
                );
            }
            Ok(new) => {
                for key in self.started.restart_only_changes(&new) {
                    tracing::warn!(
                        "reload: `{key}` changed in {}; it takes effect only after a restart",
                        path.display()
                    );
                }
                let runtime = Runtime::new(&new, self.store.clone());
                // New upstreams start out as healthy: check them once before
                // they take requests (bounded by the check's timeout).
                runtime.upstreams.check().await;
                self.current.store(Arc::new(runtime));
                self.swap_certificates(&new);
                crate::telemetry::set_level(&new.log_level);
                crate::metrics::get().reload(true);
                tracing::info!(
                    "configuration reloaded from {} ({} secret key(s), upstream {})",
                    path.display(),
                    new.keys.len(),
                    crate::app::join(&new.upstreams)
                );
            }
        }
    }

    /// Certificates loaded from a TLS listener's (unchanged) paths serve
    /// new handshakes from now on.
    fn swap_certificates(&self, new: &Config) {
        for (listener, resolver) in &self.certs {
            let Some(fresh) = new.listen.iter().find(|l| *l == listener) else {
                continue; // moved or changed: a restart applies it
            };
            if let Some(tls) = &fresh.tls {
                resolver.replace(tls.key.clone());
                tracing::info!(
                    "certificate of {listener} reloaded from {}",
                    tls.cert_file.display()
                );
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGHUP: reload is unavailable");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    tracing::info!("SIGHUP received: reloading the configuration");
                    self.reload().await;
                }
            }
        }
    }
}
