//! Wiring: config -> store -> proxy runtime -> pingora server (proxy
//! listeners, plain and TLS, admin listener, upstream health checks, purge,
//! SIGHUP reload), plus the one-shot commands (`check`, `cleanup`).

use crate::admin::AdminApp;
use crate::config::Config;
use crate::drain::DrainOnSignal;
use crate::proxy::upstream::HealthChecker;
use crate::proxy::{Runtime, SessionProxy};
use crate::reload::Reloader;
use crate::store::StoreHandle;
use crate::tls::ReloadableCert;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Run the gateway until SIGTERM/SIGINT. With `demo`, also serve the
/// bundled demo app on the first upstream address. `path` is the config
/// file SIGHUP re-reads (`None`: the embedded default).
pub fn run(config: Config, path: Option<PathBuf>, demo: bool) -> Result<(), String> {
    // Until the reload handler is installed, a SIGHUP must not kill us
    // (its default action); tokio's handler replaces this later.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let store = Arc::new(StoreHandle::new(&config.store.backend).map_err(|e| e.to_string())?);
    let purge_store = store.sibling();
    let current = Arc::new(ArcSwap::from_pointee(Runtime::new(&config, store.clone())));

    let conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.grace_period.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        SessionProxy::new(current.clone()),
        "session-gateway",
    );
    let mut certs = Vec::new();
    for listener in &config.listen {
        match &listener.tls {
            None => proxy.add_tcp(&listener.addr),
            Some(tls) => {
                let resolver = Arc::new(ReloadableCert::new(tls.key.clone()));
                // The paths stay empty: with a resolver, pingora's rustls
                // listener never reads files (and cannot panic on them).
                let mut settings = TlsSettings::intermediate("", "").map_err(|e| e.to_string())?;
                settings.set_cert_resolver(resolver.clone());
                settings.enable_h2();
                proxy.add_tls_with_settings(&listener.addr, None, settings);
                certs.push((listener.clone(), resolver));
            }
        }
    }
    server.add_service(proxy);
    server.add_service(background_service(
        "upstream health checks",
        HealthChecker {
            current: current.clone(),
        },
    ));

    if let Some(admin) = &config.admin {
        let mut service = pingora::services::listening::Service::new(
            "admin".to_string(),
            AdminApp::new(store.sibling(), config.store.timeout),
        );
        service.add_tcp(&admin.listen);
        server.add_service(service);
        tracing::info!(
            "admin endpoints on http://{}/ (healthz, readyz, metrics)",
            admin.listen
        );
    }

    server.add_service(background_service(
        "config reload",
        Reloader {
            path,
            started: config.clone(),
            current,
            store: store.clone(),
            certs,
        },
    ));

    if !config.store.cleanup_interval.is_zero() {
        server.add_service(background_service(
            "session purge",
            Purger {
                store: purge_store,
                interval: config.store.cleanup_interval,
            },
        ));
    }

    if demo {
        if config.upstreams[0].tls {
            return Err(format!(
                "upstream: --demo serves plain HTTP on the first upstream, which is {}",
                config.upstreams[0]
            ));
        }
        let addr = config.upstreams[0].addr.to_string();
        let mut app = pingora::services::listening::Service::new(
            "demo upstream".to_string(),
            crate::demo::DemoApp {
                header: config.session.headers.data.clone(),
            },
        );
        app.add_tcp(&addr);
        server.add_service(app);
        tracing::info!("demo upstream serving on http://{addr}");
    }

    for listener in &config.listen {
        tracing::info!(
            "session-gateway listening on {listener}{} -> {} (store: {})",
            if listener.tls.is_some() {
                " (HTTP/2 and HTTP/1.1)"
            } else {
                ""
            },
            join(&config.upstreams),
            config.store.backend.kind
        );
    }
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnSignal {
            grace_period: config.server.grace_period,
        }),
    });
    Ok(())
}

/// Periodic removal of expired sessions for stores without native expiry.
struct Purger {
    store: StoreHandle,
    interval: Duration,
}

#[async_trait]
impl BackgroundService for Purger {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.tick().await; // the first tick is immediate; start after one interval
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticker.tick() => {}
            }
            match self.store.get().await {
                Ok(store) => match store.purge_expired().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("purged {n} expired session(s)"),
                    Err(e) => tracing::warn!(error = %e, "purging expired sessions failed"),
                },
                Err(e) => tracing::warn!(error = %e, "purge skipped: store unavailable"),
            }
        }
    }
}

/// `a, b, c` of anything displayable.
pub(crate) fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn one_shot_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))
}

/// `--test` / `check`: connect to the store (unless `connect` is false:
/// `--no-connect`) and describe what would run.
pub fn check(config: &Config, connect: bool) -> Result<String, String> {
    let store = StoreHandle::new(&config.store.backend).map_err(|e| e.to_string())?;
    let key = store.primary_key();
    // Connecting may take longer than one request's budget (TLS, a pool's
    // first connection), so --test waits at least 5s.
    let budget = config.store.timeout.max(Duration::from_secs(5));
    if connect {
        check_store(&store, key, budget)?;
    }
    Ok(describe(config, connect))
}

fn check_store(store: &StoreHandle, key: &str, budget: Duration) -> Result<(), String> {
    one_shot_runtime()?.block_on(async {
        let result = tokio::time::timeout(budget, async { store.get().await?.check().await }).await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{key}: {e}")),
            Err(_) => Err(format!("{key}: store did not answer within {budget:?}")),
        }
    })
}

/// The `--test` summary.
fn describe(config: &Config, connected: bool) -> String {
    let c = &config.cookie;
    let s = &config.session;
    format!(
        "configuration OK\n\
         listen:    {}\n\
         upstream:  {} ({})\n\
         store:     {} ({})\n\
         cookie:    {}; Path={}{}{}{}; SameSite={:?}\n\
         sessions:  {}, lifetime {:?}, refresh_each_request {}, expiry update interval {:?}, max {} bytes, {:?}\n\
         keys:      {} secret key(s){}\n\
         exclude:   {:?}",
        join(&config.listen),
        join(&config.upstreams),
        match (config.upstreams.len(), &config.server.upstream_health_check) {
            (1, _) => "single".to_string(),
            (_, None) => "round-robin".to_string(),
            (_, Some(h)) => format!(
                "round-robin, health check every {:?}: {}",
                h.interval,
                h.path.as_ref().map_or("TCP connect".to_string(), |p| format!("GET {p}"))
            ),
        },
        config.store.backend.spec.describe(),
        if connected { "reachable" } else { "not contacted: --no-connect" },
        c.name,
        c.path,
        c.domain.as_ref().map(|d| format!("; Domain={d}")).unwrap_or_default(),
        if c.secure { "; Secure" } else { "" },
        if c.http_only { "; HttpOnly" } else { "" },
        c.same_site,
        if s.permanent { "permanent" } else { "transient" },
        s.lifetime,
        s.refresh_each_request,
        s.expiry_update_interval,
        s.max_bytes,
        s.on_store_error,
        config.keys.len(),
        config
            .secret_key_file
            .as_ref()
            .map(|p| format!(" (incl. {})", p.display()))
            .unwrap_or_default(),
        s.exclude,
    )
}

/// `cleanup`: purge expired sessions once (for cron) and report how many.
pub fn cleanup(config: &Config) -> Result<u64, String> {
    let store = StoreHandle::new(&config.store.backend).map_err(|e| e.to_string())?;
    let key = store.primary_key();
    one_shot_runtime()?.block_on(async {
        let store = store.get().await.map_err(|e| format!("{key}: {e}"))?;
        store
            .purge_expired()
            .await
            .map_err(|e| format!("{key}: {e}"))
    })
}
