//! Reload without restart: SIGHUP re-reads the config file. Secret keys
//! (and `secret_key_file`), cookie and session settings, `exclude`,
//! upstreams, the upstream timeouts, `trusted_proxies`, the log level and
//! the access log switch take effect for new requests; requests in flight
//! finish with the config they started with, and no connection is
//! dropped. `listen`, `admin`, `store`, `server.threads`,
//! `server.grace_period` and `log_format` only change with a restart: a
//! change to them is logged and otherwise ignored. An invalid file changes
//! nothing: the gateway keeps running and logs one error naming the key.

use crate::config::Config;
use crate::proxy::Runtime;
use crate::store::StoreHandle;
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
}

impl Reloader {
    /// Read the file again and, if it is valid, switch to it.
    pub fn reload(&self) {
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
                self.current
                    .store(Arc::new(Runtime::new(&new, self.store.clone())));
                crate::telemetry::set_level(&new.log_level);
                crate::metrics::get().reload(true);
                tracing::info!(
                    "configuration reloaded from {} ({} secret key(s), upstream {})",
                    path.display(),
                    new.keys.len(),
                    new.upstreams
                        .iter()
                        .map(|u| u.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
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
                    self.reload();
                }
            }
        }
    }
}
