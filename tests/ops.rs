//! Operating the gateway, through the real binary: the admin listener
//! (`/healthz`, `/readyz` following a real Redis, `/metrics` as parsed
//! Prometheus text whose counters move by exactly the requests sent), the
//! access log, and SIGHUP reload (key rotation under load, a broken file
//! that changes nothing, restart-only keys).
#![cfg(feature = "redis")]

mod common;

use common::gateway::{Gateway, GatewayBuilder, KEY_A, KEY_B};
use common::protocol::Browser;
use common::redis_server::RedisServer;
use common::Upstream;
use serde_json::json;
use session_gateway::session::{CookieVerifier, SessionId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MEMORY: &str = "{type: memory}";

/// A gateway with its admin listener on a free port.
fn with_admin(builder: GatewayBuilder) -> (Gateway, String) {
    let port = common::free_port();
    let gw = builder
        .set("admin", &format!("{{listen: 127.0.0.1:{port}}}"))
        .start();
    // The admin service starts with the proxy; wait until it answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "admin listener did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (gw, format!("http://127.0.0.1:{port}"))
}

async fn admin_get(base: &str, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("{base}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The samples of `/metrics`, by name and sorted labels.
async fn scrape(base: &str) -> HashMap<String, f64> {
    let (status, text) = admin_get(base, "/metrics").await;
    assert_eq!(status, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let mut out = HashMap::new();
    for s in parsed.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => h.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(format!("{}{{{}}}", s.metric, labels.join(",")), value);
    }
    out
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_follow_the_store() {
    let mut redis = RedisServer::start();
    let up = Upstream::start().await;
    let (gw, admin) = with_admin(GatewayBuilder::new(
        up.port,
        &format!("{{type: redis, url: \"{}\", timeout: 300ms}}", redis.url()),
    ));
    assert_eq!(admin_get(&admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(admin_get(&admin, "/readyz").await.0, 200);

    redis.stop();
    // The verdict is cached for up to a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let (status, body) = admin_get(&admin, "/readyz").await;
        if status == 503 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: store.url: "), "{body}");
    assert_eq!(body.lines().count(), 1, "{body}");
    assert_eq!(admin_get(&admin, "/healthz").await.0, 200, "still alive");

    redis.start_again();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if admin_get(&admin, "/readyz").await.0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "readyz did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Never on the proxy port.
    assert_eq!(Browser::new(&gw).get("/healthz", &[]).await.status, 200);
    assert_eq!(
        Browser::new(&gw).get("/healthz", &[]).await.echo()["path"],
        "/healthz",
        "the proxy forwards /healthz to the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_requests_sent() {
    let up = Upstream::start().await;
    let (gw, admin) = with_admin(GatewayBuilder::new(up.port, MEMORY));
    let b = Browser::new(&gw);
    let before = scrape(&admin).await;
    b.patch("/", json!({"a": 1})).await; // created
    for _ in 0..5 {
        assert_eq!(b.get("/", &[]).await.status, 200);
    }
    b.get("/", &[("x-reply-status", "404")]).await;
    b.get("/", &[("x-reply-x-session", "[1]")]).await; // 502: bad update
    b.get("/", &[("x-reply-x-session-action", "destroy")]).await;
    let bogus = Browser::new(&gw);
    bogus.set_cookie("not.valid");
    bogus.get("/", &[]).await;
    let after = scrape(&admin).await;

    let d = |k: &str| delta(&before, &after, k);
    assert_eq!(d("session_gateway_requests_total{status=2xx}"), 8.0);
    assert_eq!(d("session_gateway_requests_total{status=4xx}"), 1.0);
    assert_eq!(d("session_gateway_requests_total{status=5xx}"), 1.0);
    assert_eq!(d("session_gateway_request_duration_seconds_count{}"), 10.0);
    assert_eq!(d("session_gateway_sessions_total{event=created}"), 1.0);
    assert_eq!(d("session_gateway_sessions_total{event=destroyed}"), 1.0);
    assert_eq!(
        d("session_gateway_sessions_total{event=invalid_cookie}"),
        1.0
    );
    // Every request with the cookie loaded once: 8 of them.
    assert_eq!(
        d("session_gateway_store_operations_total{op=load,outcome=ok}"),
        8.0
    );
    assert_eq!(
        d("session_gateway_store_operations_total{op=create,outcome=ok}"),
        1.0
    );
    assert_eq!(
        d("session_gateway_store_operations_total{op=delete,outcome=ok}"),
        1.0
    );
    assert_eq!(
        d("session_gateway_store_operation_duration_seconds_count{op=load}"),
        8.0
    );
    assert_eq!(d("session_gateway_upstream_errors_total{}"), 0.0);
    for name in [
        "session_gateway_config_reloads_total{result=ok}",
        "session_gateway_near_cache_hits_total{}",
    ] {
        assert!(after.contains_key(name), "{name} is not exposed");
    }
}

/// Sealed reads of a session this gateway wrote come from the open cache
/// (`session.seal_cache: 10000`; off by default): no decryption, counted as hits;
/// a patch's update step is a hit too. `seal_cache: 0`: no cache at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_reads_are_open_cache_hits() {
    let up = Upstream::start().await;
    for (seal_cache, hits) in [("10000", 8.0), ("0", 0.0)] {
        let (gw, admin) = with_admin(
            GatewayBuilder::new(up.port, MEMORY)
                .session("seal", "true")
                .session("seal_cache", seal_cache),
        );
        let b = Browser::new(&gw);
        let before = scrape(&admin).await;
        // Created: cached, nothing looked up. Then 5 reads: 5 hits.
        b.patch("/", json!({"a": 1})).await;
        for _ in 0..5 {
            assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));
        }
        // A patch: its load and its update step, 2 hits; the value it
        // wrote was cached, so the read after it is a hit too.
        b.patch("/", json!({"b": 2})).await;
        assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1, "b": 2}));
        let after = scrape(&admin).await;
        let d = |k: &str| delta(&before, &after, k);
        assert_eq!(
            d("session_gateway_seal_cache_hits_total{}"),
            hits,
            "seal_cache {seal_cache}"
        );
        assert_eq!(
            d("session_gateway_seal_cache_misses_total{}"),
            0.0,
            "seal_cache {seal_cache}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_counted() {
    let (gw, admin) = with_admin(GatewayBuilder::new(common::free_port(), MEMORY));
    let before = scrape(&admin).await;
    for _ in 0..3 {
        assert_eq!(Browser::new(&gw).get("/", &[]).await.status, 502);
    }
    let after = scrape(&admin).await;
    assert_eq!(
        delta(&before, &after, "session_gateway_upstream_errors_total{}"),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_request() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, MEMORY)
        .set("log_level", "info")
        .start();
    let b = Browser::new(&gw);
    let r = b.patch("/cart?token=secret", json!({"a": 1})).await;
    let id = r.header("x-request-id").unwrap();
    let r2 = b.get("/missing", &[("x-reply-status", "404")]).await;
    let id2 = r2.header("x-request-id").unwrap();
    let lines = wait_for_log(&gw, &id2);
    let first: Vec<&str> = lines.lines().filter(|l| l.contains(&id)).collect();
    assert_eq!(first.len(), 1, "{lines}");
    let line = first[0];
    for part in [
        "access",
        "method=GET",
        "path=\"/cart\"",
        "status=200",
        "session=\"new\"",
        "duration_us=",
        "store_us=",
        "bytes=",
    ] {
        assert!(line.contains(part), "`{part}` missing in: {line}");
    }
    assert!(
        !line.contains("secret"),
        "the query string was logged: {line}"
    );
    let second = lines.lines().find(|l| l.contains(&id2)).unwrap();
    assert!(
        second.contains("status=404") && second.contains("session=\"existing\""),
        "{second}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_as_json_lines_and_switched_off() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, MEMORY)
        .set("log_level", "info")
        .set("log_format", "json")
        .start();
    let r = Browser::new(&gw).get("/x", &[]).await;
    let id = r.header("x-request-id").unwrap();
    let log = wait_for_log(&gw, &id);
    let line = log.lines().find(|l| l.contains(&id)).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    assert_eq!(v["request_id"], id.as_str());
    assert_eq!(v["status"], 200);
    assert_eq!(v["path"], "/x");
    assert_eq!(v["session"], "none");

    let quiet = GatewayBuilder::new(up.port, MEMORY)
        .set("log_level", "info")
        .set("access_log", "false")
        .start();
    let r = Browser::new(&quiet).get("/x", &[]).await;
    let id = r.header("x-request-id").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!quiet.log().contains(&id), "{}", quiet.log());
}

/// The gateway's log once it mentions `needle` (lines go through a writer
/// thread).
fn wait_for_log(gw: &Gateway, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = gw.log();
        if log.contains(needle) {
            return log;
        }
        assert!(Instant::now() < deadline, "`{needle}` never logged:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sighup(gw: &Gateway) {
    unsafe {
        libc::kill(gw.pid(), libc::SIGHUP);
    }
}

fn rewrite_config(gw: &Gateway, edit: impl FnOnce(&mut serde_yaml::Mapping)) {
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let mut map: serde_yaml::Mapping = serde_yaml::from_str(&text).unwrap();
    edit(&mut map);
    std::fs::write(&gw.config_path, serde_yaml::to_string(&map).unwrap()).unwrap();
}

fn keys(list: &[&str]) -> serde_yaml::Value {
    serde_yaml::Value::Sequence(list.iter().map(|k| (*k).into()).collect())
}

/// Wait until the gateway logged `reloads` reloads (ok or failed).
fn wait_reloaded(gw: &Gateway, marker: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.log().matches(marker).count() < count {
        assert!(Instant::now() < deadline, "no `{marker}`:\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_keys_without_dropping_anything() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, MEMORY).start();
    let old = Browser::new(&gw);
    old.patch("/", json!({"who": "old"})).await;
    let old_cookie = old.cookie().unwrap();

    // A request loop runs across the reload; nothing may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let looper = {
        let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
        let url = gw.url("/");
        let cookie = format!("session={old_cookie}");
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(20) {
                let ok = match client.get(&url).header("cookie", &cookie).send().await {
                    Ok(r) => {
                        r.status() == 200
                            && r.text().await.is_ok_and(|t| t.contains("\"who\":\"old\""))
                    }
                    Err(_) => false,
                };
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    rewrite_config(&gw, |m| {
        m.insert("secret_keys".into(), keys(&[KEY_B, KEY_A]));
    });
    sighup(&gw);
    wait_reloaded(&gw, "configuration reloaded", 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    looper.await.unwrap();
    assert!(done.load(Ordering::Relaxed) > 20, "the loop barely ran");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed across the reload"
    );

    // New cookies are signed with the new first key.
    let new = Browser::new(&gw);
    new.patch("/", json!({"who": "new"})).await;
    let only_b = CookieVerifier::new(&[KEY_B.as_bytes().to_vec()], 32);
    let only_a = CookieVerifier::new(&[KEY_A.as_bytes().to_vec()], 32);
    assert!(only_b.verify(&new.cookie().unwrap()).is_some());
    assert!(only_a.verify(&new.cookie().unwrap()).is_none());
    // Old cookies still work, and are re-signed with the new key on refresh.
    let r = old.get("/", &[]).await;
    assert_eq!(r.session(), json!({"who": "old"}));
    assert!(only_b.verify(&old.cookie().unwrap()).is_some());

    // Dropping the old key: cookies signed only with it stop working.
    rewrite_config(&gw, |m| {
        m.insert("secret_keys".into(), keys(&[KEY_B]));
    });
    sighup(&gw);
    wait_reloaded(&gw, "configuration reloaded", 2);
    let stale =
        common::protocol::get_with_cookie(&gw, "/", &format!("session={old_cookie}"), &[]).await;
    assert_eq!(stale.session(), json!({}));
    let _ = SessionId::generate(16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_file_changes_nothing() {
    let up = Upstream::start().await;
    let (gw, admin) = with_admin(GatewayBuilder::new(up.port, MEMORY));
    let b = Browser::new(&gw);
    b.patch("/", json!({"a": 1})).await;
    let before = scrape(&admin).await;
    rewrite_config(&gw, |m| {
        m.insert(
            "cookie".into(),
            serde_yaml::from_str("{same_site: sideways}").unwrap(),
        );
    });
    sighup(&gw);
    wait_reloaded(&gw, "still running on the previous configuration", 1);
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("still running on the previous configuration"))
        .unwrap();
    assert!(line.contains("cookie.same_site"), "{line}");
    assert!(line.contains("ERROR"), "{line}");
    // Still serving, sessions intact, same cookie settings.
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session(), json!({"a": 1}));
    assert!(r.session_cookie().unwrap().contains("SameSite=Lax"));
    let after = scrape(&admin).await;
    assert_eq!(
        delta(
            &before,
            &after,
            "session_gateway_config_reloads_total{result=error}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_session_settings_and_reports_restart_only_keys() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, MEMORY).start();
    let b = Browser::new(&gw);
    b.patch("/", json!({"a": 1})).await;
    rewrite_config(&gw, |m| {
        m.insert(
            "session".into(),
            serde_yaml::from_str("{exclude: [/static/]}").unwrap(),
        );
        m.insert(
            "cookie".into(),
            serde_yaml::from_str("{same_site: strict}").unwrap(),
        );
        m.insert(
            "store".into(),
            serde_yaml::from_str("{type: memory, max_entries: 5}").unwrap(),
        );
    });
    sighup(&gw);
    wait_reloaded(&gw, "configuration reloaded", 1);
    assert!(
        gw.log().contains("`store` changed"),
        "a store change must be reported as needing a restart:\n{}",
        gw.log()
    );
    // The session survived (same store), excluded paths now skip it.
    let r = b.get("/", &[]).await;
    assert_eq!(r.session(), json!({"a": 1}));
    assert!(r.session_cookie().unwrap().contains("SameSite=Strict"));
    assert_eq!(
        b.get("/static/x", &[]).await.session(),
        serde_json::Value::Null
    );
}
