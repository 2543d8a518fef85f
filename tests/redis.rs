//! The Redis store against a private `redis-server` per test: the store
//! contract, the protocol suite, restart and rotation, plus what is
//! specific to Redis: the key and TTL layout, refreshes that only touch
//! the TTL, the compare-and-set between gateways, outages and a frozen
//! server (503 within `store.timeout`, then recovery without restarting the
//! gateway), fail_open, passwords, and the shipped `conf/redis.yaml`.
#![cfg(feature = "redis")]

mod common;

use common::gateway::{binary, run_cli, KEY_A};
use common::protocol::{get_with_cookie, setup, Browser, Setup};
use common::redis_server::{make_certs, RedisServer};
use common::StoreFixture;
use serde_json::json;
use session_gateway::session::{SessionRecord, SessionStore, Update, UpdateOutcome};
use session_gateway::store::redis::RedisConfig;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Store timeout of the outage tests, and how much later than it a 503
/// may arrive (process scheduling on a busy CI machine).
const TIMEOUT: Duration = Duration::from_millis(500);
const MARGIN: Duration = Duration::from_millis(400);

fn store_yaml(url: &str) -> String {
    format!(
        "{{type: redis, url: \"{url}\", timeout: {}ms}}",
        TIMEOUT.as_millis()
    )
}

async fn fixture() -> StoreFixture {
    let server = RedisServer::start();
    StoreFixture::new(store_yaml(&server.url()), server)
}

/// A store of its own (as another gateway process would have).
async fn connect_store(server: &RedisServer) -> Arc<dyn SessionStore> {
    common::open_store(&store_yaml(&server.url())).await
}

fn record(v: serde_json::Value) -> SessionRecord {
    let serde_json::Value::Object(data) = v else {
        panic!("object")
    };
    SessionRecord {
        permanent: true,
        data,
    }
}

store_suites!(fixture);
sealed_suite!(fixture);
persistence_suite!(fixture);

fn server(s: &Setup) -> &RedisServer {
    s.fx.guard.downcast_ref().unwrap()
}

fn server_mut(s: &mut Setup) -> &mut RedisServer {
    s.fx.guard.downcast_mut().unwrap()
}

/// The Redis key of a browser's session (default `key_prefix`).
fn key_of(b: &Browser) -> String {
    let cookie = b.cookie().expect("browser has a session cookie");
    format!("session:{}", cookie.split('.').next().unwrap())
}

fn query<T: redis::FromRedisValue>(s: &Setup, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut server(s).client())
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_holds_the_record_and_ttl_is_the_lifetime() {
    let s = setup(fixture().await, |b| b.session("lifetime", "1h")).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"user": "ada"})).await;
    let key = key_of(&b);
    let pttl: i64 = query(&s, &["PTTL", &key]);
    assert!(
        (3_599_000..=3_600_000).contains(&pttl),
        "PTTL {pttl} is not the 1h lifetime"
    );
    let raw: Vec<u8> = query(&s, &["GET", &key]);
    // The header-ready form: a flag byte, then the X-Session value.
    assert_eq!(raw, b"P{\"user\":\"ada\"}");
    let record = SessionRecord::from_stored(&raw).unwrap();
    assert_eq!(
        serde_json::Value::Object(record.data),
        json!({"user": "ada"})
    );
    assert!(record.permanent);
    let keys: Vec<String> = query(&s, &["KEYS", "*"]);
    assert_eq!(keys, vec![key], "one key per session, nothing else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_and_empty_session_remove_the_key() {
    let s = setup(fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let key = key_of(&b);
    assert_eq!(query::<i64>(&s, &["EXISTS", &key]), 1);
    let r = b.get("/", &[("x-reply-x-session-action", "destroy")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        query::<i64>(&s, &["EXISTS", &key]),
        0,
        "destroy left the key"
    );

    let b = Browser::new(&s.gw);
    b.patch("/", json!({"b": 1})).await;
    let key = key_of(&b);
    assert_eq!(query::<i64>(&s, &["EXISTS", &key]), 1);
    let r = b.get("/", &[("x-reply-x-session", "{}")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        query::<i64>(&s, &["EXISTS", &key]),
        0,
        "X-Session: {{}} left the key"
    );
    assert_eq!(query::<i64>(&s, &["DBSIZE"]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_extends_the_ttl_without_rewriting_the_value() {
    let s = setup(fixture().await, |b| {
        b.session("lifetime", "100")
            .session("expiry_update_interval", "1s")
    })
    .await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1, "z": "Zoë"})).await;
    let key = key_of(&b);
    let before: Vec<u8> = query(&s, &["GET", &key]);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let pttl_before: i64 = query(&s, &["PTTL", &key]);
    assert!(pttl_before <= 98_800, "PTTL {pttl_before}");
    let () = query(&s, &["CONFIG", "RESETSTAT"]);
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session(), json!({"a": 1, "z": "Zoë"}));
    let pttl_after: i64 = query(&s, &["PTTL", &key]);
    assert!(
        pttl_after >= 99_000 && pttl_after > pttl_before + 1000,
        "TTL not extended: {pttl_before} -> {pttl_after}"
    );
    let after: Vec<u8> = query(&s, &["GET", &key]);
    assert_eq!(before, after, "the value bytes changed");
    // A TTL touch, not a rewrite: one PEXPIRE and no SET at all
    // (commands run by scripts are counted too).
    let stats: String = query(&s, &["INFO", "commandstats"]);
    assert!(stats.contains("cmdstat_pexpire:calls=1,"), "{stats}");
    assert!(!stats.contains("cmdstat_set:"), "{stats}");

    // Within the interval, a read does not touch the TTL again.
    let () = query(&s, &["CONFIG", "RESETSTAT"]);
    assert_eq!(b.get("/", &[]).await.status, 200);
    let stats: String = query(&s, &["INFO", "commandstats"]);
    assert!(!stats.contains("cmdstat_pexpire:"), "{stats}");
}

/// Kill Redis mid-test: requests fail within the timeout (fail_closed:
/// 503 without contacting the upstream); once Redis is back on the same
/// port the next request succeeds, without restarting the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_within_timeout_then_recovers() {
    let mut s = setup(fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));

    server_mut(&mut s).stop();
    let hits = s.up.hits();
    for _ in 0..3 {
        let started = Instant::now();
        let r = b.get("/", &[]).await;
        let took = started.elapsed();
        assert_eq!(r.status, 503, "{}", r.text);
        assert!(r.text.contains("session store unavailable"), "{}", r.text);
        assert!(took < TIMEOUT + MARGIN, "503 took {took:?}");
    }
    // A new visitor whose app stores something: the write fails too.
    let r = Browser::new(&s.gw).patch("/", json!({"n": 1})).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.session_cookie(), None);
    assert_eq!(
        s.up.hits(),
        hits + 1,
        "only the new visitor reached the app"
    );

    server_mut(&mut s).start_again();
    // The data died with the server (no persistence): the old cookie now
    // finds no session, but the request succeeds.
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.session(), json!({}));
    // And sessions work again, for old and new visitors alike.
    let r = b.patch("/", json!({"back": true})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(b.get("/", &[]).await.session(), json!({"back": true}));
    let fresh = Browser::new(&s.gw);
    assert_eq!(fresh.patch("/", json!({"f": 1})).await.status, 200);
    assert_eq!(fresh.get("/", &[]).await.session(), json!({"f": 1}));
}

/// A frozen Redis (SIGSTOP: connections open, no answers) must not hold
/// requests beyond `store.timeout`; after SIGCONT the same connection
/// carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_answers_503_within_timeout_then_recovers() {
    let s = setup(fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;

    server(&s).pause();
    for _ in 0..2 {
        let started = Instant::now();
        let r = b.get("/", &[]).await;
        let took = started.elapsed();
        assert_eq!(r.status, 503, "{}", r.text);
        assert!(took < TIMEOUT + MARGIN, "503 took {took:?}");
        assert!(
            took >= TIMEOUT - Duration::from_millis(50),
            "503 after {took:?}: should have waited for store.timeout"
        );
    }
    server(&s).resume();
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.session(), json!({"a": 1}), "the data survived the freeze");
    assert_eq!(b.patch("/", json!({"b": 2})).await.status, 200);
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1, "b": 2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_during_outage_forwards_with_error_header() {
    let mut s = setup(fixture().await, |b| {
        b.session("on_store_error", "fail_open")
    })
    .await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    server_mut(&mut s).stop();
    let started = Instant::now();
    let r = b.patch("/", json!({"b": 2})).await;
    assert!(started.elapsed() < TIMEOUT + MARGIN);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.session(), json!({}));
    assert_eq!(
        r.upstream_header("x-session-error").as_deref(),
        Some("store-unavailable")
    );
    assert_eq!(r.session_cookie(), None, "fail_open writes nothing back");
}

/// Redis down when the gateway starts: the first connection is retried
/// on later requests, not cached as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_started_before_redis_connects_later() {
    // The gateway connects lazily, on the first request that needs the
    // store, so stopping Redis right after start-up is the same as
    // starting the gateway while Redis is down.
    let mut s = setup(fixture().await, |b| b).await;
    server_mut(&mut s).stop();
    let b = Browser::new(&s.gw);
    let r = b.patch("/", json!({"a": 1})).await;
    assert_eq!(r.status, 503, "{}", r.text);
    server_mut(&mut s).start_again();
    let r = b.patch("/", json!({"a": 1})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));
}

/// Auth in the URL works, and `--test` never prints the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_in_url_is_used_and_never_printed() {
    const PW: &str = "s3cret-redis-pw";
    let server = RedisServer::start_with(&["--requirepass", PW]);
    let url = format!("redis://:{PW}@127.0.0.1:{}/0", server.port);
    let s = setup(StoreFixture::new(store_yaml(&url), server), |b| b).await;
    let b = Browser::new(&s.gw);
    assert_eq!(b.patch("/", json!({"a": 1})).await.status, 200);
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));

    let (code, out, err) = run_cli(
        &["-c", s.gw.config_path.to_str().unwrap(), "--test"],
        s.gw.dir(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("redis (redis://:***@127.0.0.1:"), "{out}");
    assert!(!out.contains(PW) && !err.contains(PW), "{out}{err}");

    // A wrong password: a store error naming store.url, still no password.
    let config = std::fs::read_to_string(&s.gw.config_path)
        .unwrap()
        .replace(PW, "wrong-pw");
    let path = s.gw.dir().join("wrong.yaml");
    std::fs::write(&path, config).unwrap();
    let (code, out, err) = run_cli(&["-c", path.to_str().unwrap(), "--test"], s.gw.dir());
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.starts_with("error: store.url:"), "{err}");
    assert!(
        !out.contains("wrong-pw") && !err.contains("wrong-pw"),
        "{out}{err}"
    );
}

/// Run `--test` on `conf/redis.yaml` with its URL pointed at `url`.
fn check_shipped_config(url: &str) -> (i32, String, String) {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/redis.yaml");
    let text = std::fs::read_to_string(shipped).unwrap();
    let default_url = "redis://127.0.0.1:6379/0";
    assert!(
        text.contains(default_url),
        "conf/redis.yaml changed its url"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redis.yaml");
    std::fs::write(&path, text.replace(default_url, url)).unwrap();
    let out = Command::new(binary())
        .args(["-c", path.to_str().unwrap(), "--test"])
        .current_dir(dir.path())
        .env("SESSION_SECRET", KEY_A)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_config_is_valid() {
    let server = RedisServer::start();
    let (code, out, err) = check_shipped_config(&server.url());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(
        out.contains(&format!("redis (redis://127.0.0.1:{}/0)", server.port)),
        "{out}"
    );
}

#[test]
fn unreachable_redis_fails_the_config_test_in_one_line() {
    // A free port: nothing listens there.
    let url = format!("redis://127.0.0.1:{}/0", common::free_port());
    let (code, out, err) = check_shipped_config(&url);
    assert_ne!(code, 0, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: store.url:"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_cookie_after_regenerate_finds_no_key() {
    let s = setup(fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let old_key = key_of(&b);
    let old_cookie = b.cookie().unwrap();
    b.get("/", &[("x-reply-x-session-action", "regenerate")])
        .await;
    let new_key = key_of(&b);
    assert_ne!(old_key, new_key);
    assert_eq!(query::<i64>(&s, &["EXISTS", &old_key]), 0);
    let pttl: i64 = query(&s, &["PTTL", &new_key]);
    assert!(
        pttl > 2_678_000_000,
        "new key keeps the full lifetime: {pttl}"
    );
    let r = get_with_cookie(&s.gw, "/", &format!("session={old_cookie}"), &[]).await;
    assert_eq!(r.session(), json!({}));
}

/// Another writer (another gateway) changes the session between `update`'s
/// read and its write: the compare-and-set notices, and the update is
/// applied again on top of the other write instead of overwriting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_applies_again_when_another_writer_got_in_between() {
    let server = RedisServer::start();
    let store = connect_store(&server).await;
    let ttl = Duration::from_secs(600);
    assert!(store
        .create("race", &record(json!({"a": 1})).encode(), ttl)
        .await
        .unwrap());
    let other = Mutex::new(server.client());
    let calls = AtomicUsize::new(0);
    let out = store
        .update("race", ttl, &|current: &[u8]| {
            let mut r = SessionRecord::from_stored(current).unwrap();
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                let theirs = record(json!({"a": 1, "theirs": true})).encode().to_vec();
                let () = redis::cmd("SET")
                    .arg("race")
                    .arg(theirs)
                    .arg("PX")
                    .arg(600_000)
                    .query(&mut *other.lock().unwrap())
                    .unwrap();
            }
            r.data.insert("mine".into(), json!(true));
            Ok(Update::Write(r.encode()))
        })
        .await
        .unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the conflict was not noticed"
    );
    let expected = record(json!({"a": 1, "theirs": true, "mine": true}));
    assert_eq!(out, UpdateOutcome::Written(expected.encode()));
    assert_eq!(
        store.load("race").await.unwrap().unwrap().value,
        expected.encode()
    );
}

/// The calls of each command Redis ran since the last `CONFIG RESETSTAT`,
/// e.g. `[("evalsha", 2)]`, sorted by name.
fn commands_since_reset(s: &Setup) -> Vec<(String, u64)> {
    let stats: String = query(s, &["INFO", "commandstats"]);
    let mut calls: Vec<(String, u64)> = stats
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_string(), rest.split(',').next()?.parse().ok()?))
        })
        .filter(|(name, _)| name != "info" && name != "config|resetstat")
        .collect();
    calls.sort();
    calls
}

/// A patch of a loaded session is one compare-and-set against the value
/// the request loaded: two round trips per request (the load script and
/// the compare-and-set script), no GET in between. (Redis counts the
/// commands the scripts run too: the load script's GET and PTTL, the
/// compare-and-set's GET and SET; a separate read would add a third GET.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_costs_one_round_trip_after_the_load() {
    let s = setup(fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"n": 1})).await;
    // Once more, so both scripts are cached (no NOSCRIPT + EVAL below).
    b.patch("/", json!({"n": 1})).await;
    let () = query(&s, &["CONFIG", "RESETSTAT"]);
    b.patch("/", json!({"m": 2})).await;
    let calls = |list: &[(&str, u64)]| -> Vec<(String, u64)> {
        list.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    };
    assert_eq!(
        commands_since_reset(&s),
        calls(&[("evalsha", 2), ("get", 2), ("pttl", 1), ("set", 1)])
    );
    let raw: Vec<u8> = query(&s, &["GET", &key_of(&b)]);
    assert_eq!(raw, b"P{\"m\":2,\"n\":1}");
}

/// `update_seen` with the value the store holds writes without reading;
/// with a value another writer replaced since, it reads and applies the
/// update to the current value (the other write is kept); with the key
/// gone, nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_seen_writes_against_the_seen_value_only_while_it_is_current() {
    let server = RedisServer::start();
    let store = connect_store(&server).await;
    let ttl = Duration::from_secs(600);
    let mine = |current: &[u8]| {
        let mut r = SessionRecord::from_stored(current).unwrap();
        r.data.insert("mine".into(), json!(true));
        Ok(Update::Write(r.encode()))
    };
    let seen = record(json!({"a": 1})).encode();
    assert!(store.create("k", &seen, ttl).await.unwrap());
    let out = store.update_seen("k", ttl, &seen, &mine).await.unwrap();
    assert_eq!(
        out,
        UpdateOutcome::Written(record(json!({"a": 1, "mine": true})).encode())
    );

    let theirs = record(json!({"theirs": true})).encode();
    let mut other = server.client();
    let () = redis::cmd("SET")
        .arg("k")
        .arg(&theirs[..])
        .query(&mut other)
        .unwrap();
    let out = store.update_seen("k", ttl, &seen, &mine).await.unwrap();
    let expected = record(json!({"theirs": true, "mine": true})).encode();
    assert_eq!(out, UpdateOutcome::Written(expected.clone()));
    assert_eq!(store.load("k").await.unwrap().unwrap().value, expected);

    let () = redis::cmd("DEL").arg("k").query(&mut other).unwrap();
    let out = store.update_seen("k", ttl, &expected, &mine).await.unwrap();
    assert_eq!(out, UpdateOutcome::Missing);
    assert_eq!(store.load("k").await.unwrap(), None, "a gone key revived");
}

/// 50 concurrent read-modify-writes of one session from five stores (five
/// gateways): the local lock does not help across processes, the
/// compare-and-set must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_from_several_gateways_lose_nothing() {
    let server = RedisServer::start();
    let mut stores = Vec::new();
    for _ in 0..5 {
        stores.push(connect_store(&server).await);
    }
    common::contract::concurrent_updates_through(&stores, "shared").await;
}

/// `rediss://` against a server whose certificate comes from a private CA
/// and which requires client certificates (mutual TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_private_ca_and_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let p = |f: &str| certs.path().join(f).to_str().unwrap().to_string();
    let (server, tls_port) = RedisServer::start_tls(certs.path());
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let yaml = format!(
        "{{type: redis, url: \"{url}\", tls_ca_file: \"{}\", tls_cert_file: \"{}\", tls_key_file: \"{}\"}}",
        p("ca.crt"),
        p("client.crt"),
        p("client.key")
    );
    let s = setup(StoreFixture::new(yaml, (server, certs)), |b| b).await;
    let b = Browser::new(&s.gw);
    assert_eq!(b.patch("/", json!({"over": "tls"})).await.status, 200);
    assert_eq!(b.get("/", &[]).await.session(), json!({"over": "tls"}));

    // Without the private CA the server's certificate is not trusted, and
    // without a client certificate the server refuses us: both fail --test
    // in one line naming store.url.
    let config = std::fs::read_to_string(&s.gw.config_path).unwrap();
    for (drop_key, label) in [
        ("tls_ca_file", "no CA"),
        ("tls_cert_file", "no client cert"),
    ] {
        let mut value: serde_yaml::Value = serde_yaml::from_str(&config).unwrap();
        let store = value["store"].as_mapping_mut().unwrap();
        store.remove(drop_key);
        if drop_key == "tls_cert_file" {
            store.remove("tls_key_file");
        }
        let path = s.gw.dir().join(format!("{drop_key}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(&value).unwrap()).unwrap();
        let (code, out, err) = run_cli(&["-c", path.to_str().unwrap(), "--test"], s.gw.dir());
        assert_ne!(code, 0, "{label}: accepted\n{out}");
        assert!(err.starts_with("error: store.url:"), "{label}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{label}: {err}");
    }
}

#[test]
fn tls_files_are_checked_at_config_time() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ca.pem");
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let not_pem = dir.path().join("ca.txt");
    std::fs::write(&not_pem, "hello").unwrap();
    let err = |yaml: String| {
        RedisConfig::parse(serde_yaml::from_str(&yaml).unwrap())
            .unwrap_err()
            .to_string()
    };
    let e = err(format!(
        "{{url: \"redis://127.0.0.1/0\", tls_ca_file: {:?}}}",
        pem
    ));
    assert!(
        e.starts_with("store.tls_ca_file: only used with rediss://"),
        "{e}"
    );
    let e = err(format!(
        "{{url: \"rediss://127.0.0.1/0\", tls_ca_file: {:?}}}",
        not_pem
    ));
    assert!(
        e.starts_with("store.tls_ca_file:") && e.contains("not a PEM file"),
        "{e}"
    );
    let e = err("{url: \"rediss://127.0.0.1/0\", tls_ca_file: /nonexistent/ca.pem}".to_string());
    assert!(e.starts_with("store.tls_ca_file: cannot read"), "{e}");
    let e = err(format!(
        "{{url: \"rediss://127.0.0.1/0\", tls_cert_file: {:?}}}",
        pem
    ));
    assert!(e.starts_with("store.tls_key_file: required"), "{e}");
    let ok = RedisConfig::parse(
        serde_yaml::from_str(&format!(
            "{{url: \"rediss://127.0.0.1/0\", tls_ca_file: {:?}}}",
            pem
        ))
        .unwrap(),
    );
    assert!(ok.is_ok());
}
