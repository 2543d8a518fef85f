//! The Redis store with `store.near_cache` on, against a private
//! `redis-server` per test: the store contract, the protocol suite and the
//! persistence cases with the cache on (the contract's own keys lie
//! outside `session.key_prefix`, which the cache leaves to Redis, so
//! `writes_through_the_store_are_read_back_at_once` repeats its operations
//! on session keys); reads of a known session cost no
//! round trip; two gateways on one Redis, where a destroy, a patch or an
//! expiry through one is seen by the other within the documented bound;
//! changes made by other Redis clients; a killed tracking connection and
//! a Redis restart never let a stale entry be served; the memory bound;
//! `--test` when Redis refuses `CLIENT TRACKING`.
#![cfg(feature = "redis")]

mod common;

use common::contract::load_until_cached;
use common::gateway::{run_cli, Gateway, GatewayBuilder, KEY_A};
use common::protocol::{get_with_cookie, Browser};
use common::redis_server::{make_certs, RedisServer};
use common::{StoreFixture, Upstream};
use serde_json::{json, Value};
use session_gateway::session::{SessionRecord, SessionStore, Update};
use session_gateway::store::redis::TRACKING_CLIENT_NAME;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The README's bound for another gateway to stop serving a changed
/// session, measured from the writer's response; the tests assert it on
/// this (shared, busy) machine. What they observe is far below it (the
/// first request after the writer's response nearly always sees the
/// change; the store-level test prints the distribution).
const BOUND: Duration = Duration::from_millis(100);

fn store_yaml_with(url: &str, max_entries: usize) -> String {
    format!(
        "{{type: redis, url: \"{url}\", timeout: 500ms, \
         near_cache: {{enabled: true, max_entries: {max_entries}}}}}"
    )
}

fn store_yaml(url: &str) -> String {
    store_yaml_with(url, 1000)
}

async fn fixture() -> StoreFixture {
    let server = RedisServer::start();
    StoreFixture::new(store_yaml(&server.url()), server)
}

store_suites!(fixture);
persistence_suite!(fixture);

fn redis<T: redis::FromRedisValue>(server: &RedisServer, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut server.client())
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// How many session loads (the load script) Redis ran since the last
/// `CONFIG RESETSTAT`.
fn loads_since_reset(server: &RedisServer) -> u64 {
    let stats: String = redis(server, &["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
        .unwrap_or(0)
}

/// Two gateways (A and B) on one Redis and one app, near cache on.
struct Pair {
    server: RedisServer,
    _up: Upstream,
    a: Gateway,
    b: Gateway,
}

async fn pair(tweak: impl Fn(GatewayBuilder) -> GatewayBuilder) -> Pair {
    let server = RedisServer::start();
    let up = Upstream::start().await;
    let builder = tweak(GatewayBuilder::new(up.port, &store_yaml(&server.url())));
    Pair {
        a: builder.start(),
        b: builder.start(),
        server,
        _up: up,
    }
}

fn cookie_header(cookie: &str) -> String {
    format!("session={cookie}")
}

fn key_of(cookie: &str) -> String {
    format!("session:{}", cookie.split('.').next().unwrap())
}

/// Read the session through `gw` until it is served from the near cache
/// (no load reaches Redis), checking what it serves.
async fn warm(server: &RedisServer, gw: &Gateway, cookie: &str, expect: &Value) {
    for _ in 0..100 {
        let () = redis(server, &["CONFIG", "RESETSTAT"]);
        let r = get_with_cookie(gw, "/", &cookie_header(cookie), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(&r.session(), expect);
        if loads_since_reset(server) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the session never came from the near cache:\n{}", gw.log());
}

/// Poll `gw` until it serves `want`; returns how long that took from
/// `since` and how many requests it needed. Fails after [`BOUND`].
async fn until_seen(gw: &Gateway, cookie: &str, want: &Value, since: Instant) -> (Duration, u32) {
    let mut tries = 0;
    loop {
        tries += 1;
        let r = get_with_cookie(gw, "/", &cookie_header(cookie), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let took = since.elapsed();
        if &r.session() == want {
            return (took, tries);
        }
        assert!(
            took < BOUND,
            "still served {} {took:?} after the change (want {want})",
            r.session()
        );
    }
}

fn report(what: &str, took: Duration, tries: u32) {
    eprintln!("near cache: {what}: seen after {took:?} ({tries} request(s) after the change)");
}

/// A session created through A and cached by B.
async fn shared_session(p: &Pair, data: Value) -> String {
    let user = Browser::new(&p.a);
    assert_eq!(user.patch("/", data.clone()).await.status, 200);
    let cookie = user.cookie().unwrap();
    warm(&p.server, &p.b, &cookie, &data).await;
    cookie
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_known_session_cost_no_round_trip() {
    let p = pair(|b| b).await;
    let cookie = shared_session(&p, json!({"user": "ada"})).await;
    let () = redis(&p.server, &["CONFIG", "RESETSTAT"]);
    for _ in 0..20 {
        let r = get_with_cookie(&p.b, "/", &cookie_header(&cookie), &[]).await;
        assert_eq!(r.session(), json!({"user": "ada"}));
    }
    let stats: String = redis(&p.server, &["INFO", "commandstats"]);
    // Nothing but our own RESETSTAT: no load, no GET, no script.
    assert!(
        stats
            .lines()
            .filter(|l| l.starts_with("cmdstat_"))
            .all(|l| l.starts_with("cmdstat_config|resetstat:")),
        "{stats}"
    );
}

/// A request through A whose app answers with `header: value`.
async fn through_a(p: &Pair, cookie: &str, header: &str, value: &str) {
    let r = get_with_cookie(&p.a, "/", &cookie_header(cookie), &[(header, value)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_through_a_is_seen_by_b() {
    let p = pair(|b| b).await;
    let cookie = shared_session(&p, json!({"user": "ada"})).await;
    through_a(&p, &cookie, "x-reply-x-session-action", "destroy").await;
    let (took, tries) = until_seen(&p.b, &cookie, &json!({}), Instant::now()).await;
    report("destroy through A", took, tries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_through_a_is_seen_by_b() {
    let p = pair(|b| b).await;
    let cookie = shared_session(&p, json!({"user": "ada"})).await;
    through_a(&p, &cookie, "x-reply-x-session-patch", r#"{"cart":[3]}"#).await;
    let want = json!({"user": "ada", "cart": [3]});
    let (took, tries) = until_seen(&p.b, &cookie, &want, Instant::now()).await;
    report("patch through A", took, tries);
    // And B serves the new value from its cache again.
    warm(&p.server, &p.b, &cookie, &want).await;
}

/// An entry never outlives the expiry it was loaded with: B, which cached
/// the session, stops serving it when Redis expires the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_seen_by_b() {
    let p = pair(|b| {
        b.session("lifetime", "2")
            .session("refresh_each_request", "false")
    })
    .await;
    let cookie = shared_session(&p, json!({"short": true})).await;
    let pttl: u64 = redis(&p.server, &["PTTL", &key_of(&cookie)]);
    let expires = Instant::now() + Duration::from_millis(pttl);
    // Shortly before the expiry, B still answers from its cache.
    tokio::time::sleep_until((expires - Duration::from_millis(400)).into()).await;
    let () = redis(&p.server, &["CONFIG", "RESETSTAT"]);
    let r = get_with_cookie(&p.b, "/", &cookie_header(&cookie), &[]).await;
    assert_eq!(r.session(), json!({"short": true}));
    assert_eq!(loads_since_reset(&p.server), 0, "not served from the cache");
    tokio::time::sleep_until(expires.into()).await;
    let (took, tries) = until_seen(&p.b, &cookie, &json!({}), expires).await;
    report("expiry", took, tries);
}

/// A change made by any other Redis client (a script, an admin) reaches
/// the gateway's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_changed_directly_in_redis_is_seen() {
    let p = pair(|b| b).await;
    let cookie = shared_session(&p, json!({"user": "ada"})).await;
    let key = key_of(&cookie);
    let () = redis(&p.server, &["SET", &key, r#"P{"user":"bob"}"#, "KEEPTTL"]);
    let (took, tries) = until_seen(&p.b, &cookie, &json!({"user": "bob"}), Instant::now()).await;
    report("direct SET", took, tries);
    let deleted: i64 = redis(&p.server, &["DEL", &key]);
    assert_eq!(deleted, 1);
    until_seen(&p.b, &cookie, &json!({}), Instant::now()).await;
}

fn tracking_ids(server: &RedisServer) -> Vec<String> {
    let list: String = redis(server, &["CLIENT", "LIST"]);
    list.lines()
        .filter(|l| l.contains(&format!(" name={TRACKING_CLIENT_NAME} ")))
        .map(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("id="))
                .unwrap()
                .to_string()
        })
        .collect()
}

/// `CLIENT KILL` of the tracking connections, then a change made at once:
/// the invalidation for it can never arrive, and B must not serve the old
/// value. Tracking comes back by itself and the cache works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_tracking_connection_never_serves_a_stale_entry() {
    let p = pair(|b| b).await;
    let cookie = shared_session(&p, json!({"v": 1})).await;
    let key = key_of(&cookie);
    // B's (A has loaded no session yet, so it tracks nothing yet).
    let ids = tracking_ids(&p.server);
    assert_eq!(
        ids.len(),
        1,
        "one tracking connection per gateway that reads"
    );
    let killed: i64 = redis(&p.server, &["CLIENT", "KILL", "ID", &ids[0]]);
    assert_eq!(killed, 1);
    let () = redis(&p.server, &["SET", &key, r#"P{"v":2}"#, "KEEPTTL"]);
    let (took, tries) = until_seen(&p.b, &cookie, &json!({"v": 2}), Instant::now()).await;
    report("change right after CLIENT KILL", took, tries);

    // Tracking is re-established (new connections) and used again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tracking_ids(&p.server).is_empty() {
        assert!(Instant::now() < deadline, "tracking did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    warm(&p.server, &p.b, &cookie, &json!({"v": 2})).await;
    let () = redis(&p.server, &["SET", &key, r#"P{"v":3}"#, "KEEPTTL"]);
    until_seen(&p.b, &cookie, &json!({"v": 3}), Instant::now()).await;
    assert!(
        p.b.log().contains("change notifications lost"),
        "{}",
        p.b.log()
    );
}

/// Redis restarted (its data gone): B's cached session is not served,
/// neither while Redis is down (503, as without a cache) nor after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_empties_the_cache() {
    let mut p = pair(|b| b).await;
    let cookie = shared_session(&p, json!({"v": 1})).await;
    p.server.stop();
    let r = get_with_cookie(&p.b, "/", &cookie_header(&cookie), &[]).await;
    assert_eq!(r.status, 503, "served from the cache while Redis is down");
    p.server.start_again();
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = get_with_cookie(&p.b, "/", &cookie_header(&cookie), &[]).await;
        if r.status == 200 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.session(), json!({}), "the session died with Redis' data");
    // Sessions work, and are cached, again.
    let user = Browser::new(&p.a);
    user.patch("/", json!({"after": 1})).await;
    warm(
        &p.server,
        &p.b,
        &user.cookie().unwrap(),
        &json!({"after": 1}),
    )
    .await;
}

async fn connect(yaml: &str) -> Arc<dyn SessionStore> {
    common::open_store(yaml).await
}

fn record(v: Value) -> bytes::Bytes {
    let Value::Object(data) = v else {
        panic!("object")
    };
    SessionRecord {
        permanent: true,
        data,
    }
    .encode()
}

/// The invalidation bound at the store level, without HTTP: store A
/// writes, then store B (another client, as another gateway would be)
/// loads until it no longer serves the old value. Prints the
/// distribution; the README quotes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_reaches_another_store_within_the_bound() {
    const TRIALS: usize = 200;
    let server = RedisServer::start();
    let yaml = store_yaml(&server.url());
    let (a, b) = (connect(&yaml).await, connect(&yaml).await);
    let ttl = Duration::from_secs(600);
    const K: &str = "session:bound";
    assert!(a.create(K, &record(json!({"i": 0})), ttl).await.unwrap());
    let mut times = Vec::with_capacity(TRIALS);
    let mut stale_first = 0;
    for i in 1..=TRIALS {
        load_until_cached(&b, K).await;
        let want = record(json!({ "i": i }));
        let new = want.clone();
        a.update(K, ttl, &move |_| Ok(Update::Write(new.clone())))
            .await
            .unwrap();
        let written = Instant::now();
        let mut first = true;
        loop {
            let got = b.load(K).await.unwrap().unwrap().value;
            if got == want {
                break;
            }
            if first {
                stale_first += 1;
                first = false;
            }
            assert!(written.elapsed() < BOUND, "trial {i}: still stale");
            tokio::task::yield_now().await;
        }
        times.push(written.elapsed());
    }
    times.sort();
    eprintln!(
        "near cache: store-level invalidation, {TRIALS} trials: p50 {:?}, p99 {:?}, max {:?}; \
         first load after the write stale in {stale_first}",
        times[TRIALS / 2],
        times[TRIALS * 99 / 100],
        times[TRIALS - 1]
    );
    let stats = b.near_cache_stats().unwrap();
    assert!(stats.live && stats.hits >= TRIALS as u64, "{stats:?}");
    assert!(stats.invalidations >= TRIALS as u64, "{stats:?}");
}

fn expiry_near(loaded: &session_gateway::session::Loaded, ttl: Duration) -> bool {
    let left = loaded
        .expires_at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    left <= ttl && left + Duration::from_secs(3) > ttl
}

/// The contract's operations on keys the cache holds (the shared
/// contract's own `contract:` keys lie outside `session.key_prefix`, and
/// the cache leaves keys it is not told about to Redis): whatever this
/// store writes, it reads back at once, with the stored expiry; an expired
/// entry is never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_the_store_are_read_back_at_once() {
    let server = RedisServer::start();
    let store = connect(&store_yaml(&server.url())).await;
    let k = "session:ops";
    let (short, long) = (Duration::from_secs(60), Duration::from_secs(600));
    assert!(store
        .create(k, &record(json!({"a": 1})), short)
        .await
        .unwrap());
    load_until_cached(&store, k).await;
    let b2 = record(json!({"b": 2}));
    let new = b2.clone();
    store
        .update(k, long, &move |_| Ok(Update::Write(new.clone())))
        .await
        .unwrap();
    let loaded = store.load(k).await.unwrap().unwrap();
    assert_eq!(loaded.value, b2);
    assert!(expiry_near(&loaded, long));

    load_until_cached(&store, k).await;
    assert!(store.touch(k, 2 * long).await.unwrap());
    let loaded = store.load(k).await.unwrap().unwrap();
    assert_eq!(loaded.value, b2);
    assert!(expiry_near(&loaded, 2 * long), "touch not seen");

    load_until_cached(&store, k).await;
    store.delete(k).await.unwrap();
    assert_eq!(store.load(k).await.unwrap(), None);

    assert!(store
        .create(k, &record(json!({"c": 3})), short)
        .await
        .unwrap());
    load_until_cached(&store, k).await;
    store
        .update(k, long, &|_| Ok(Update::Delete))
        .await
        .unwrap();
    assert_eq!(store.load(k).await.unwrap(), None);

    let one = Duration::from_secs(1);
    assert!(store
        .create(k, &record(json!({"d": 4})), one)
        .await
        .unwrap());
    load_until_cached(&store, k).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let hits = store.near_cache_stats().unwrap().hits;
    assert_eq!(store.load(k).await.unwrap(), None, "expired entry served");
    assert_eq!(store.near_cache_stats().unwrap().hits, hits);
}

/// `max_entries` bounds the memory: loading more sessions evicts the least
/// recently used ones, which are then read from Redis again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_bounded_by_max_entries() {
    let server = RedisServer::start();
    let store = connect(&store_yaml_with(&server.url(), 4)).await;
    let ttl = Duration::from_secs(600);
    for i in 0..10 {
        let key = format!("session:lru:{i}");
        assert!(store
            .create(&key, &record(json!({ "i": i })), ttl)
            .await
            .unwrap());
        load_until_cached(&store, &key).await;
        let stats = store.near_cache_stats().unwrap();
        assert!(stats.entries <= 4, "{stats:?}");
    }
    // At most 4 of the 10 are still held (which ones depends on the
    // shards the keys hash to), the most recently loaded among them: one
    // pass over all 10, newest first, finds at most 4 in the cache.
    let before = store.near_cache_stats().unwrap();
    for i in (0..10).rev() {
        store
            .load(&format!("session:lru:{i}"))
            .await
            .unwrap()
            .unwrap();
        if i == 9 {
            let s = store.near_cache_stats().unwrap();
            assert_eq!(s.hits, before.hits + 1, "the newest entry was evicted");
        }
    }
    let after = store.near_cache_stats().unwrap();
    assert!(after.hits - before.hits <= 4, "{before:?} -> {after:?}");
    assert!(after.misses - before.misses >= 6, "{before:?} -> {after:?}");
    assert!(after.entries <= 4, "{after:?}");
}

/// A server that refuses `CLIENT TRACKING` (here by ACL; also Redis < 6
/// or a proxy in front): `--test` fails in one line naming the key and
/// saying how to turn the cache off, while a running gateway keeps
/// serving sessions from Redis (the cache is bypassed, never wrong).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_refused_fails_the_config_test_and_bypasses_the_cache() {
    let server = RedisServer::start_with(&[
        "--user",
        "default",
        "on",
        "nopass",
        "~*",
        "&*",
        "+@all",
        "-client|tracking",
    ]);
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, &store_yaml(&server.url())).start();
    let (code, out, err) = run_cli(
        &["-c", gw.config_path.to_str().unwrap(), "--test"],
        gw.dir(),
    );
    assert_ne!(code, 0, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: store.url:"), "{err}");
    assert!(
        err.contains("NOPERM") && err.contains("store.near_cache.enabled: false"),
        "{err}"
    );

    let b = Browser::new(&gw);
    assert_eq!(b.patch("/", json!({"a": 1})).await.status, 200);
    let cookie = b.cookie().unwrap();
    let () = redis(
        &server,
        &["SET", &key_of(&cookie), r#"P{"a":2}"#, "KEEPTTL"],
    );
    for _ in 0..3 {
        assert_eq!(b.get("/", &[]).await.session(), json!({"a": 2}));
    }

    // With a server that allows tracking, --test reports the cache.
    let ok = RedisServer::start();
    let path = gw.dir().join("ok.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:6188\nupstream: 127.0.0.1:8000\nsecret_keys: [\"{KEY_A}\"]\n\
             store: {}\n",
            store_yaml(&ok.url())
        ),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["-c", path.to_str().unwrap(), "--test"], gw.dir());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("with a near cache of up to 1000 sessions"),
        "{out}"
    );
}

/// `rediss://` with a private CA and a client certificate: the tracking
/// connection uses the same TLS settings as the store's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_works_over_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let p = |f: &str| certs.path().join(f).to_str().unwrap().to_string();
    let (server, tls_port) = RedisServer::start_tls(certs.path());
    let yaml = format!(
        "{{type: redis, url: \"rediss://127.0.0.1:{tls_port}/0\", tls_ca_file: \"{}\", \
         tls_cert_file: \"{}\", tls_key_file: \"{}\", near_cache: {{enabled: true}}}}",
        p("ca.crt"),
        p("client.crt"),
        p("client.key")
    );
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, &yaml).start();
    let user = Browser::new(&gw);
    assert_eq!(user.patch("/", json!({"over": "tls"})).await.status, 200);
    let cookie = user.cookie().unwrap();
    // The plain port shows the server's view: the TLS client is tracked.
    warm(&server, &gw, &cookie, &json!({"over": "tls"})).await;
    assert_eq!(tracking_ids(&server).len(), 1);
    let () = redis(
        &server,
        &["SET", &key_of(&cookie), r#"P{"changed":1}"#, "KEEPTTL"],
    );
    until_seen(&gw, &cookie, &json!({"changed": 1}), Instant::now()).await;
}
