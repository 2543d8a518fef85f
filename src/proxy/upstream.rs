//! The upstreams (the app's servers) of one [`Runtime`](super::Runtime):
//! a prebuilt pingora peer per upstream (TLS with SNI and CA for
//! `https://`, the timeouts), picked round robin. With two or more
//! upstreams and `server.upstream_health_check` on, the pick goes through
//! pingora's load balancer, whose active health checks (TCP connect, or
//! `GET path` expecting a 2xx) take a failing upstream out of rotation and
//! put it back once it passes again.
//!
//! A request never goes to an upstream marked down while another is up.
//! When every upstream is marked down, a request still goes to the next
//! one in turn: the checks may be behind the app's recovery, and an attempt
//! that fails costs the same 502 as not trying.
//!
//! The checks themselves run in [`HealthChecker`], a background service
//! that always checks the upstreams of the current runtime, so a reload
//! that changes `upstream` is followed without a restart.

use crate::config::{Config, HealthCheckSettings, UpstreamServer};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, LoadBalancer};
use pingora::prelude::HttpPeer;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::utils::tls::{parse_x509, WrappedX509};
use pingora::{Error, ErrorType};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How far `select` looks for a healthy upstream (each step is one upstream).
const MAX_SELECT_STEPS: usize = 256;

pub struct Upstreams {
    /// One per `upstream` entry, in config order.
    peers: Vec<HttpPeer>,
    /// Two or more upstreams with health checks on.
    balancer: Option<LoadBalancer<RoundRobin>>,
    health_interval: Option<Duration>,
    next: AtomicUsize,
}

impl Upstreams {
    pub fn new(config: &Config) -> Upstreams {
        let server = &config.server;
        let ca: Option<Arc<[WrappedX509]>> = server.upstream_ca.as_ref().map(|ca| {
            ca.certs
                .iter()
                // Checked to parse when the config was loaded.
                .map(|der| WrappedX509::new(der.clone(), parse_x509))
                .collect::<Vec<_>>()
                .into()
        });
        let peers = config
            .upstreams
            .iter()
            .map(|u| {
                let mut peer = template(u, ca.as_ref());
                peer.options.connection_timeout = Some(server.upstream_connect_timeout);
                peer.options.read_timeout = server.upstream_read_timeout;
                peer
            })
            .collect();
        let health = server
            .upstream_health_check
            .as_ref()
            .filter(|_| config.upstreams.len() > 1);
        let balancer = health.map(|settings| {
            let mut lb =
                LoadBalancer::<RoundRobin>::try_from_iter(config.upstreams.iter().map(|u| u.addr))
                    .expect("socket addresses need no lookup");
            lb.set_health_check(Box::new(PerUpstream::new(
                &config.upstreams,
                settings,
                ca.as_ref(),
            )));
            lb
        });
        Upstreams {
            peers,
            balancer,
            health_interval: health.map(|h| h.interval),
            next: AtomicUsize::new(0),
        }
    }

    /// The peer for the next request.
    pub fn pick(&self) -> Box<HttpPeer> {
        let i = match &self.balancer {
            Some(lb) => lb
                .select(b"", MAX_SELECT_STEPS)
                // All marked down: try them in turn anyway.
                .or_else(|| lb.select_with(b"", MAX_SELECT_STEPS, |_, _| true))
                .and_then(|b| self.index_of(&b))
                .unwrap_or(0),
            None => self.next.fetch_add(1, Ordering::Relaxed) % self.peers.len(),
        };
        Box::new(self.peers[i].clone())
    }

    fn index_of(&self, backend: &Backend) -> Option<usize> {
        // Addresses are unique (checked in the config); lists are short.
        self.peers.iter().position(|p| p._address == backend.addr)
    }

    /// One round of health checks (all upstreams in parallel; each bounded
    /// by the check's timeout). Nothing to do without checks.
    pub async fn check(&self) {
        if let Some(lb) = &self.balancer {
            lb.backends().run_health_check(true).await;
        }
    }

    /// How often [`Self::check`] should run; `None`: never.
    pub fn health_interval(&self) -> Option<Duration> {
        self.health_interval
    }
}

/// The peer of an upstream before the timeouts: TLS, with the host as SNI
/// and the name verified (an IP host is verified against the
/// certificate's IP addresses); never an empty SNI, which would make
/// pingora skip verification.
fn template(u: &UpstreamServer, ca: Option<&Arc<[WrappedX509]>>) -> HttpPeer {
    let sni = if u.tls { u.host.clone() } else { String::new() };
    let mut peer = HttpPeer::new(u.addr, u.tls, sni);
    if u.tls {
        peer.options.ca = ca.cloned();
    }
    peer
}

/// pingora's load balancer runs one health check for all its backends;
/// ours differ (scheme, SNI, Host), so this one hands each backend to the
/// check built for its upstream.
struct PerUpstream {
    checks: Vec<(UpstreamServer, String, Box<dyn HealthCheck + Send + Sync>)>,
}

impl PerUpstream {
    fn new(
        upstreams: &[UpstreamServer],
        settings: &HealthCheckSettings,
        ca: Option<&Arc<[WrappedX509]>>,
    ) -> Self {
        let checks = upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let check: Box<dyn HealthCheck + Send + Sync> = match &settings.path {
                    None => {
                        let mut tcp = TcpHealthCheck::new();
                        tcp.peer_template.options.connection_timeout = Some(settings.timeout);
                        tcp
                    }
                    Some(path) => Box::new(http_check(u, path, settings.timeout, ca)),
                };
                (u.clone(), format!("upstream[{i}] {u}"), check)
            })
            .collect();
        PerUpstream { checks }
    }

    fn find(
        &self,
        target: &Backend,
    ) -> Option<&(UpstreamServer, String, Box<dyn HealthCheck + Send + Sync>)> {
        self.checks
            .iter()
            .find(|(u, _, _)| target.addr.as_inet() == Some(&u.addr))
    }
}

/// `GET path` with the upstream's own `Host`; any 2xx passes.
fn http_check(
    u: &UpstreamServer,
    path: &str,
    timeout: Duration,
    ca: Option<&Arc<[WrappedX509]>>,
) -> HttpHealthCheck {
    // `new` takes the host for both SNI and Host; Host gets the port below.
    let mut check = HttpHealthCheck::new(&u.host, u.tls);
    let authority = u.to_string();
    let authority = authority.split_once("://").map_or("", |(_, a)| a);
    let mut req = RequestHeader::build("GET", path.as_bytes(), None)
        .expect("the path was checked when the config was loaded");
    let _ = req.insert_header("Host", authority);
    let _ = req.insert_header("User-Agent", "session-gateway health check");
    check.req = req;
    check.validator = Some(Box::new(|resp: &ResponseHeader| {
        if resp.status.is_success() {
            Ok(())
        } else {
            Error::e_explain(
                ErrorType::CustomCode("health check status", resp.status.as_u16()),
                format!("GET answered {}, expected 2xx", resp.status.as_u16()),
            )
        }
    }));
    check.peer_template.options.connection_timeout = Some(timeout);
    check.peer_template.options.read_timeout = Some(timeout);
    if u.tls {
        check.peer_template.options.ca = ca.cloned();
    }
    check
}

#[async_trait]
impl HealthCheck for PerUpstream {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        match self.find(target) {
            Some((_, _, check)) => check.check(target).await,
            None => Ok(()),
        }
    }

    /// One failed check takes an upstream out, one passed check puts it
    /// back: the interval is the knob.
    fn health_threshold(&self, _success: bool) -> usize {
        1
    }

    /// How pingora names the upstream when it logs a change of health
    /// ("upstream[1] http://10.0.0.2:8000 becomes unhealthy, ...").
    fn backend_summary(&self, target: &Backend) -> String {
        self.find(target)
            .map_or_else(|| format!("{target:?}"), |(_, label, _)| label.clone())
    }
}

/// Runs the health checks of whatever runtime is current, every
/// `interval` of that runtime's config.
pub struct HealthChecker {
    pub current: Arc<ArcSwap<super::Runtime>>,
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let rt = self.current.load_full();
            let wait = match rt.upstreams.health_interval() {
                Some(interval) => {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = rt.upstreams.check() => {}
                    }
                    interval
                }
                // Checks off (or one upstream): look again later, a reload
                // may turn them on.
                None => Duration::from_secs(1),
            };
            drop(rt);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
