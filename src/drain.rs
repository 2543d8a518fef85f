//! Graceful shutdown. SIGTERM and SIGINT both stop the listeners and let
//! in-flight requests finish. Pingora's graceful terminate then sleeps a
//! fixed grace period; we exit as soon as no request is in flight instead,
//! with `server.grace_period` as the upper bound.

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

static INFLIGHT: AtomicUsize = AtomicUsize::new(0);
static DRAINING: AtomicBool = AtomicBool::new(false);

/// A shutdown signal arrived: `/readyz` answers 503 from now on.
pub fn draining() -> bool {
    DRAINING.load(Ordering::Acquire)
}

/// Counts a request as in flight for as long as it lives (held in the
/// per-request context).
pub struct InflightGuard(());

impl InflightGuard {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        INFLIGHT.fetch_add(1, Ordering::AcqRel);
        InflightGuard(())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        INFLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

pub fn inflight() -> usize {
    INFLIGHT.load(Ordering::Acquire)
}

pub struct DrainOnSignal {
    pub grace_period: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnSignal {
    async fn recv(&self) -> ShutdownSignal {
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        DRAINING.store(true, Ordering::Release);
        tracing::info!(
            "{which} received: no new connections; waiting for {} in-flight request(s)",
            inflight()
        );
        let grace = self.grace_period;
        std::thread::spawn(move || {
            let start = Instant::now();
            // Give the listeners a moment to close before counting.
            std::thread::sleep(Duration::from_millis(100));
            while start.elapsed() < grace {
                if inflight() == 0 {
                    tracing::info!("all requests finished; exiting");
                    crate::telemetry::flush();
                    std::process::exit(0);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            tracing::warn!(
                "grace period over with {} request(s) still in flight; exiting",
                inflight()
            );
        });
        ShutdownSignal::GracefulTerminate
    }
}
