//! Prometheus metrics, served by the admin listener at `/metrics`. One
//! registry per process; every labelled series the hot path touches is
//! resolved once here, so counting a request is a few atomic adds (no label
//! lookup, no allocation).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};
use std::sync::LazyLock;
use std::time::Duration;

/// A store operation, as counted in `session_gateway_store_operations_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Load,
    Create,
    Update,
    Touch,
    Delete,
}

impl Op {
    const ALL: [Op; 5] = [Op::Load, Op::Create, Op::Update, Op::Touch, Op::Delete];

    pub fn name(self) -> &'static str {
        match self {
            Op::Load => "load",
            Op::Create => "create",
            Op::Update => "update",
            Op::Touch => "touch",
            Op::Delete => "delete",
        }
    }
}

/// How a store operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// No live entry (load, update, touch).
    Missing,
    /// Not written because an entry exists (create: an id collision).
    Conflict,
    /// The store failed or refused (unavailable, backend error).
    Error,
    /// No answer within `store.timeout`.
    Timeout,
    /// The update step refused the new value (`session.max_bytes`, ...).
    Rejected,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::Missing,
        Outcome::Conflict,
        Outcome::Error,
        Outcome::Timeout,
        Outcome::Rejected,
    ];

    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Missing => "missing",
            Outcome::Conflict => "conflict",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Rejected => "rejected",
        }
    }
}

/// Session lifecycle events, `session_gateway_sessions_total{event}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    Created,
    Regenerated,
    Destroyed,
    /// A session cookie that did not verify (bad signature, garbage,
    /// duplicated).
    InvalidCookie,
    /// A verified cookie whose session the store no longer has (expired,
    /// destroyed, or unreadable).
    Expired,
}

impl SessionEvent {
    const ALL: [SessionEvent; 5] = [
        SessionEvent::Created,
        SessionEvent::Regenerated,
        SessionEvent::Destroyed,
        SessionEvent::InvalidCookie,
        SessionEvent::Expired,
    ];

    fn name(self) -> &'static str {
        match self {
            SessionEvent::Created => "created",
            SessionEvent::Regenerated => "regenerated",
            SessionEvent::Destroyed => "destroyed",
            SessionEvent::InvalidCookie => "invalid_cookie",
            SessionEvent::Expired => "expired",
        }
    }
}

/// Seconds buckets for requests and store operations: 100 µs to 10 s.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    /// Indexed by status class: 1xx..5xx, then "other" (0: nothing sent).
    requests: [IntCounter; 6],
    request_duration: Histogram,
    store_ops: Vec<IntCounter>,
    store_duration: [Histogram; 5],
    sessions: [IntCounter; 5],
    pub upstream_errors: IntCounter,
    reloads_ok: IntCounter,
    reloads_error: IntCounter,
    pub near_cache_hits: IntCounter,
    pub near_cache_misses: IntCounter,
    pub seal_cache_hits: IntCounter,
    pub seal_cache_misses: IntCounter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "session_gateway_requests_total",
                    "Requests answered, by status class",
                ),
                &["status"],
            )
            .unwrap(),
        );
        let request_duration = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "session_gateway_request_duration_seconds",
                    "Time from the request's arrival to the end of its response",
                )
                .buckets(BUCKETS.to_vec()),
            )
            .unwrap(),
        );
        let store_ops_vec = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "session_gateway_store_operations_total",
                    "Store operations, by operation and outcome",
                ),
                &["op", "outcome"],
            )
            .unwrap(),
        );
        let store_duration_vec = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "session_gateway_store_operation_duration_seconds",
                    "Time of one store operation, retries included",
                )
                .buckets(BUCKETS.to_vec()),
                &["op"],
            )
            .unwrap(),
        );
        let sessions_vec = register(
            &registry,
            IntCounterVec::new(
                Opts::new("session_gateway_sessions_total", "Session lifecycle events"),
                &["event"],
            )
            .unwrap(),
        );
        let reloads = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "session_gateway_config_reloads_total",
                    "Configuration reloads (SIGHUP), by result",
                ),
                &["result"],
            )
            .unwrap(),
        );
        let counter =
            |name: &str, help: &str| register(&registry, IntCounter::new(name, help).unwrap());
        let upstream_errors = counter(
            "session_gateway_upstream_errors_total",
            "Requests the upstream failed (unreachable, reset, cut off, timed out)",
        );
        let near_cache_hits = counter(
            "session_gateway_near_cache_hits_total",
            "Session reads answered from the near cache",
        );
        let near_cache_misses = counter(
            "session_gateway_near_cache_misses_total",
            "Session reads the near cache could not answer",
        );
        let seal_cache_hits = counter(
            "session_gateway_seal_cache_hits_total",
            "Sealed session values found opened in the open cache (no decryption)",
        );
        let seal_cache_misses = counter(
            "session_gateway_seal_cache_misses_total",
            "Sealed session values the open cache did not hold (decrypted)",
        );
        let classes = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];
        let mut store_ops = Vec::new();
        for op in Op::ALL {
            for outcome in Outcome::ALL {
                store_ops.push(store_ops_vec.with_label_values(&[op.name(), outcome.name()]));
            }
        }
        Metrics {
            requests: classes.map(|c| requests.with_label_values(&[c])),
            request_duration,
            store_ops,
            store_duration: Op::ALL.map(|op| store_duration_vec.with_label_values(&[op.name()])),
            sessions: SessionEvent::ALL.map(|e| sessions_vec.with_label_values(&[e.name()])),
            upstream_errors,
            reloads_ok: reloads.with_label_values(&["ok"]),
            reloads_error: reloads.with_label_values(&["error"]),
            near_cache_hits,
            near_cache_misses,
            seal_cache_hits,
            seal_cache_misses,
            registry,
        }
    }

    /// A finished request (status 0: no response was sent).
    pub fn request(&self, status: u16, took: Duration) {
        let class = match status {
            100..=599 => usize::from(status / 100) - 1,
            _ => 5,
        };
        self.requests[class].inc();
        self.request_duration.observe(took.as_secs_f64());
    }

    pub fn store_op(&self, op: Op, outcome: Outcome, took: Duration) {
        let o = Outcome::ALL.iter().position(|x| *x == outcome).unwrap_or(0);
        self.store_ops[op as usize * Outcome::ALL.len() + o].inc();
        self.store_duration[op as usize].observe(took.as_secs_f64());
    }

    pub fn session(&self, event: SessionEvent) {
        self.sessions[event as usize].inc();
    }

    pub fn reload(&self, ok: bool) {
        if ok {
            self.reloads_ok.inc()
        } else {
            self.reloads_error.inc()
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exposed_from_the_start() {
        let m = Metrics::new();
        m.request(204, Duration::from_millis(3));
        m.store_op(Op::Touch, Outcome::Missing, Duration::from_micros(80));
        m.session(SessionEvent::Expired);
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            "session_gateway_requests_total{status=\"2xx\"} 1",
            "session_gateway_requests_total{status=\"5xx\"} 0",
            "session_gateway_store_operations_total{op=\"touch\",outcome=\"missing\"} 1",
            "session_gateway_store_operations_total{op=\"load\",outcome=\"timeout\"} 0",
            "session_gateway_sessions_total{event=\"expired\"} 1",
            "session_gateway_upstream_errors_total 0",
            "session_gateway_seal_cache_hits_total 0",
            "session_gateway_config_reloads_total{result=\"error\"} 0",
            "session_gateway_store_operation_duration_seconds_count{op=\"touch\"} 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
    }
}
