//! Faults under load: 64 concurrent clients, each with a session of its
//! own, keep patching a counter in it and check what they read back, while
//! the store is stopped and restarted, frozen (SIGSTOP) for longer than
//! `store.timeout`, or (Redis Cluster) loses a primary. Invariants:
//! - every response is a 2xx, or the documented 503 without Set-Cookie
//!   (never a 500, never another status);
//! - after a 2xx the write is visible to the client's next request, and a
//!   counter never goes backwards;
//! - once the store is back, every client succeeds within one second;
//! - the gateway's memory after the run is within 10% of before (failed
//!   requests leak nothing).
//!
//! Every loop is bounded in time; servers run with an append-only file
//! synced on every write, so a restart keeps every acknowledged write.
#![cfg(feature = "redis")]

mod common;

use common::gateway::{Gateway, GatewayBuilder};
use common::redis_server::{RedisCluster, RedisServer};
use common::Upstream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 64;
const PERSISTENT: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];

/// What the clients saw; shared by the client tasks.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    unavailable: AtomicU64,
    /// Invariant violations, with what happened.
    violations: Mutex<Vec<String>>,
    /// The last time any request got a 503.
    last_failure: Mutex<Option<Instant>>,
}

impl Tally {
    fn violation(&self, what: String) {
        let mut v = self.violations.lock().unwrap();
        if v.len() < 20 {
            v.push(what);
        }
    }
}

/// One client: create a session, then patch `n` to one more than the last
/// acknowledged value until `stop`.
async fn client(url: String, stop: Arc<AtomicBool>, tally: Arc<Tally>, deadline: Instant) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut cookie: Option<String> = None;
    // The last value a 2xx confirmed as written.
    let mut acked: u64 = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let next = acked + 1;
        let mut req = http
            .get(&url)
            .header("x-reply-x-session-patch", format!("{{\"n\":{next}}}"));
        if let Some(c) = &cookie {
            req = req.header("cookie", c.as_str());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                tally.violation(format!("transport error: {e}"));
                continue;
            }
        };
        let status = resp.status().as_u16();
        let set_cookie = resp
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        let body = resp.text().await.unwrap_or_default();
        match status {
            200 => {
                let seen: serde_json::Value = serde_json::from_str(&body)
                    .map(|v: serde_json::Value| v["session"]["n"].clone())
                    .unwrap_or(serde_json::Value::Null);
                let seen = seen.as_u64().unwrap_or(0);
                // What the app saw: the last acknowledged value, or the next
                // one if an earlier 503'd attempt of it did land.
                if cookie.is_some() && seen != acked && seen != next {
                    tally.violation(format!("counter: acked {acked}, app saw {seen}"));
                }
                if let Some(c) = set_cookie {
                    if c.contains("Max-Age=0") {
                        tally.violation(format!("session expired at {acked}: {c}"));
                    }
                    cookie = Some(c.split(';').next().unwrap().to_string());
                }
                acked = next;
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            503 => {
                if set_cookie.is_some() {
                    tally.violation(format!("503 with Set-Cookie: {set_cookie:?}"));
                }
                tally.unavailable.fetch_add(1, Ordering::Relaxed);
                *tally.last_failure.lock().unwrap() = Some(Instant::now());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => tally.violation(format!("status {other}: {body}")),
        }
    }
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Run the clients for `load` while `fault` runs on the test's thread;
/// `fault` returns when the store is back.
async fn under_load(gw: &Gateway, load: Duration, fault: impl FnOnce()) -> Arc<Tally> {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + load + Duration::from_secs(10);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client(gw.url("/"), stop.clone(), tally.clone(), deadline)))
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    fault();
    let restored = Instant::now();
    tokio::time::sleep(load).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    if let Some(last) = *tally.last_failure.lock().unwrap() {
        eprintln!(
            "last 503 {:?} after the store was back; {} ok, {} unavailable",
            last.saturating_duration_since(restored),
            tally.ok.load(Ordering::Relaxed),
            tally.unavailable.load(Ordering::Relaxed)
        );
    }
    let violations = tally.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "invariants broken: {violations:#?}");
    if let Some(last) = *tally.last_failure.lock().unwrap() {
        let after = last.saturating_duration_since(restored);
        assert!(
            after < Duration::from_secs(1),
            "requests still failed {after:?} after the store was back"
        );
    }
    assert!(
        tally.ok.load(Ordering::Relaxed) > CLIENTS as u64 * 5,
        "too little load"
    );
    tally
}

/// Warm-up rounds (so the allocator has grown to its working size), then
/// the fault twice, each followed by a normal round, and a check that the
/// second fault did not grow memory by more than 10%. A leak grows memory
/// with every fault; the first fault may grow it once (the reconnect's
/// buffers, threads and their allocator arenas reach their working size:
/// measured against the warm-up alone, debug builds grew 1.5-10% on it,
/// run to run, which made a threshold there flaky).
async fn with_memory_check(gw: &Gateway, mut fault: impl FnMut()) -> Arc<Tally> {
    // Two rounds: the allocator's arenas reach their working size (RSS
    // creeps during the first rounds even with sessions off entirely).
    under_load(gw, Duration::from_millis(800), || {}).await;
    under_load(gw, Duration::from_millis(800), || {}).await;
    let warm = rss_kib(gw.pid());
    let tally = under_load(gw, Duration::from_millis(1500), &mut fault).await;
    under_load(gw, Duration::from_millis(800), || {}).await;
    let before = rss_kib(gw.pid());
    let second = under_load(gw, Duration::from_millis(1500), &mut fault).await;
    assert!(
        second.unavailable.load(Ordering::Relaxed) > 0,
        "the second fault went unnoticed"
    );
    under_load(gw, Duration::from_millis(800), || {}).await;
    let after = rss_kib(gw.pid());
    eprintln!(
        "gateway RSS {warm} KiB after warm-up, {before} KiB after the first fault, {after} KiB after the second"
    );
    assert!(
        after * 10 <= before * 11,
        "gateway RSS grew from {before} KiB to {after} KiB over the second fault"
    );
    tally
}

/// One fault test at a time: each runs 64 clients, a gateway and its own
/// servers, and asserts recovery within a second; two at once on a
/// 2-CPU machine starve each other (CI saw a recovery take 1.3 s while
/// the cluster test ran beside the freeze test).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn gateway(up: &Upstream, store_yaml: &str) -> Gateway {
    GatewayBuilder::new(up.port, store_yaml)
        .section("server", "threads", "2")
        .set("log_level", "warn")
        .set("access_log", "false")
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_restarted_under_load() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(&PERSISTENT);
    let up = Upstream::start().await;
    let gw = gateway(
        &up,
        &format!("{{type: redis, url: \"{}\", timeout: 500ms}}", redis.url()),
    );
    let tally = with_memory_check(&gw, || {
        redis.stop();
        std::thread::sleep(Duration::from_millis(1500));
        redis.start_again();
    })
    .await;
    assert!(
        tally.unavailable.load(Ordering::Relaxed) > 0,
        "the outage went unnoticed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_longer_than_the_timeout_under_load() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start_with(&PERSISTENT);
    let up = Upstream::start().await;
    let gw = gateway(
        &up,
        &format!("{{type: redis, url: \"{}\", timeout: 500ms}}", redis.url()),
    );
    let tally = with_memory_check(&gw, || {
        redis.pause();
        std::thread::sleep(Duration::from_millis(1500));
        redis.resume();
    })
    .await;
    assert!(
        tally.unavailable.load(Ordering::Relaxed) > 0,
        "the freeze went unnoticed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_primary_killed_under_load() {
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start_with(&PERSISTENT);
    let up = Upstream::start().await;
    let gw = gateway(
        &up,
        &format!(
            "{{type: redis, cluster: [{}], timeout: 500ms}}",
            cluster.urls().join(", ")
        ),
    );
    let tally = with_memory_check(&gw, || {
        cluster.nodes[0].stop();
        std::thread::sleep(Duration::from_millis(1500));
        cluster.nodes[0].start_again();
        // Back = serving its slots again, as far as Redis is concerned.
        cluster.wait_node_serving(0, Duration::from_secs(20));
    })
    .await;
    assert!(
        tally.unavailable.load(Ordering::Relaxed) > 0,
        "the kill went unnoticed"
    );
}
