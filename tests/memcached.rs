//! The Memcached store against a private `memcached` per test: the store
//! contract, the protocol suite and restarts, plus what is specific to
//! memcached: the item layout (expiry inside the value, item expiration
//! set, absolute above 30 days: the default 31-day lifetime must
//! survive), the read-time expiry check, refreshes that never recreate,
//! compare-and-set races, values past the item size limit, outages and a
//! frozen server (503 within `store.timeout`, then recovery without
//! restarting the gateway), fail_open, `--test` and the shipped config.
//! Several servers: tests/memcached_cluster.rs.
#![cfg(feature = "memcached")]

mod common;

use bytes::Bytes;
use common::gateway::{run_cli, KEY_A};
use common::memcached_server::{store_yaml, MemcachedServer};
use common::outage;
use common::protocol::{setup, Browser, Setup};
use common::server::ServerProcess;
use common::StoreFixture;
use serde_json::json;
use session_gateway::session::{SessionRecord, StoreError, Update, UpdateOutcome};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Store timeout of the outage tests.
const TIMEOUT: Duration = Duration::from_millis(500);
/// Lifetime of sessions in store-level tests.
const TTL: Duration = Duration::from_secs(600);

async fn fixture() -> StoreFixture {
    let server = MemcachedServer::start();
    StoreFixture::new(store_yaml(&[&server], 500), server)
}

store_suites!(fixture);
sealed_suite!(fixture);
persistence_suite!(fixture);

fn memcached(fx: &StoreFixture) -> &MemcachedServer {
    fx.guard.downcast_ref().unwrap()
}

fn server(s: &Setup) -> &MemcachedServer {
    memcached(&s.fx)
}

fn process(s: &mut Setup) -> &mut ServerProcess {
    &mut s
        .fx
        .guard
        .downcast_mut::<MemcachedServer>()
        .unwrap()
        .process
}

/// The memcached key of a browser's session (default `key_prefix`).
fn key_of(b: &Browser) -> String {
    let cookie = b.cookie().expect("browser has a session cookie");
    format!("session:{}", cookie.split('.').next().unwrap())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An item as the store writes it: `SGW1`, the expiry (ms, big-endian),
/// the stored form.
fn our_item(expires_ms: u64, stored: &[u8]) -> Vec<u8> {
    let mut v = b"SGW1".to_vec();
    v.extend_from_slice(&expires_ms.to_be_bytes());
    v.extend_from_slice(stored);
    v
}

/// Split a raw item into (stored expiry in ms, stored form).
fn split_item(raw: &[u8]) -> (u64, &[u8]) {
    assert_eq!(&raw[..4], b"SGW1", "{raw:?}");
    (
        u64::from_be_bytes(raw[4..12].try_into().unwrap()),
        &raw[12..],
    )
}

fn assert_near(actual: i64, expected: i64, slack: i64, what: &str) {
    assert!(
        (actual - expected).abs() <= slack,
        "{what}: {actual}, expected {expected} ± {slack}"
    );
}

fn record(v: serde_json::Value) -> Bytes {
    let serde_json::Value::Object(data) = v else {
        panic!("object")
    };
    SessionRecord {
        permanent: true,
        data,
    }
    .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_holds_expiry_and_record_and_its_ttl_is_the_lifetime() {
    let s = setup(fixture().await, |b| b.session("lifetime", "1h")).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"user": "ada"})).await;
    let (raw, ttl) = server(&s).item(&key_of(&b)).expect("the session's item");
    let (expires, stored) = split_item(&raw);
    assert_eq!(stored, b"P{\"user\":\"ada\"}");
    assert_near(
        expires as i64,
        (now_ms() + 3_600_000) as i64,
        3_000,
        "expiry",
    );
    // Rounded up, plus a second for memcached's clock.
    assert_near(ttl, 3_601, 3, "item TTL");
    assert_eq!(server(&s).items(), 1, "one item per session, nothing else");
}

/// The default lifetime is 31 days, beyond memcached's 30-day limit for
/// relative expirations: sent as relative seconds the item would be dated
/// February 1970 and vanish at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_31_day_lifetime_survives() {
    let s = setup(fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    let r = b.patch("/", json!({"a": 1})).await;
    assert!(
        r.session_cookie().unwrap().contains("Max-Age=2678400"),
        "the default lifetime is 31 days"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));
    let (raw, ttl) = server(&s).item(&key_of(&b)).expect("the item survived");
    assert_near(ttl, 31 * 86_400, 5, "item TTL");
    let (expires, _) = split_item(&raw);
    assert_near(
        expires as i64,
        (now_ms() + 31 * 86_400_000) as i64,
        5_000,
        "stored expiry",
    );
}

/// A 2-second lifetime: alive at 1s, gone after 2s, even in the second
/// or two before memcached drops the item itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_with_a_2s_lifetime() {
    let s = setup(fixture().await, |b| {
        b.session("lifetime", "2")
            .session("refresh_each_request", "false")
    })
    .await;
    let b = Browser::new(&s.gw);
    let started = Instant::now();
    b.patch("/", json!({"a": 1})).await;
    let cookie = b.cookie().unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));
    tokio::time::sleep(Duration::from_millis(2200).saturating_sub(started.elapsed())).await;
    let r = common::protocol::get_with_cookie(&s.gw, "/", &format!("session={cookie}"), &[]).await;
    assert_eq!(r.session(), json!({}), "expired session still served");
}

/// The read-time check: an item memcached still holds but whose stored
/// expiry passed is no session; nothing touches, updates or revives it,
/// and a new session may take its key. An item some other client wrote
/// under the prefix counts as no session too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_past_their_stored_expiry_are_no_session() {
    let fx = fixture().await;
    let mc = memcached(&fx);
    let store = fx.store().await;
    let old = our_item(now_ms() - 1_000, &record(json!({"a": 1})));
    for (key, raw) in [
        ("expired", old.as_slice()),
        ("foreign", b"not ours".as_slice()),
    ] {
        mc.set_raw(key, raw, 60);
        assert_eq!(store.load(key).await.unwrap(), None, "{key}");
        assert!(!store.touch(key, TTL).await.unwrap(), "{key}: touched");
        let same = |v: &[u8]| Ok(Update::Write(Bytes::copy_from_slice(v)));
        assert_eq!(
            store.update(key, TTL, &same).await.unwrap(),
            UpdateOutcome::Missing,
            "{key}"
        );
        assert_eq!(mc.item(key).unwrap().0, raw, "{key}: rewritten");
        let fresh = record(json!({"new": true}));
        assert!(store.create(key, &fresh, TTL).await.unwrap(), "{key}");
        assert_eq!(store.load(key).await.unwrap().unwrap().value, fresh);
    }
}

/// A refresh rewrites the same data with a new stored expiry and item
/// TTL; on an item deleted meanwhile it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touch_moves_both_expiries_and_never_recreates() {
    let fx = fixture().await;
    let mc = memcached(&fx);
    let store = fx.store().await;
    let value = record(json!({"a": 1}));
    assert!(store
        .create("t", &value, Duration::from_secs(60))
        .await
        .unwrap());
    let (raw, ttl) = mc.item("t").unwrap();
    assert_near(ttl, 61, 2, "item TTL after create");
    assert_near(
        split_item(&raw).0 as i64,
        now_ms() as i64 + 60_000,
        2_000,
        "expiry",
    );

    assert!(store.touch("t", Duration::from_secs(600)).await.unwrap());
    let (raw, ttl) = mc.item("t").unwrap();
    assert_near(ttl, 601, 2, "item TTL after touch");
    let (expires, stored) = split_item(&raw);
    assert_near(expires as i64, now_ms() as i64 + 600_000, 2_000, "expiry");
    assert_eq!(stored, &value[..], "touch changed the data");
    let loaded = store.load("t").await.unwrap().unwrap();
    assert_eq!(
        loaded.expires_at,
        UNIX_EPOCH + Duration::from_millis(expires)
    );

    assert!(mc.delete_raw("t"));
    assert!(!store.touch("t", Duration::from_secs(600)).await.unwrap());
    assert_eq!(mc.item("t"), None, "touch recreated a deleted item");
}

/// Create `key` holding `{"a": 1}` and update it, adding `"mine"`, with
/// `interfere` run on the server in the middle of the first attempt (as
/// another gateway would). Returns the outcome and how often the update
/// step ran.
async fn racing_update(
    fx: &StoreFixture,
    key: &str,
    interfere: impl Fn(&MemcachedServer) + Send + Sync,
) -> (UpdateOutcome, usize) {
    let store = fx.store().await;
    assert!(store
        .create(key, &record(json!({"a": 1})), TTL)
        .await
        .unwrap());
    let calls = AtomicUsize::new(0);
    let out = store
        .update(key, TTL, &|current| {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                interfere(memcached(fx));
            }
            let mut r = SessionRecord::from_stored(current).unwrap();
            r.data.insert("mine".into(), json!(true));
            Ok(Update::Write(r.encode()))
        })
        .await
        .unwrap();
    (out, calls.load(Ordering::SeqCst))
}

/// Another gateway writes between `update`'s read and its write: the CAS
/// write fails and the update runs again on their value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_write_is_retried_on_the_new_value() {
    let fx = fixture().await;
    let theirs = record(json!({"a": 1, "theirs": true}));
    let (out, calls) = racing_update(&fx, "race", |mc| {
        mc.set_raw("race", &our_item(now_ms() + 600_000, &theirs), 600)
    })
    .await;
    assert_eq!(calls, 2, "the conflict went unnoticed");
    let expected = record(json!({"a": 1, "theirs": true, "mine": true}));
    assert_eq!(out, UpdateOutcome::Written(expected.clone()));
    let store = fx.store().await;
    assert_eq!(store.load("race").await.unwrap().unwrap().value, expected);
}

/// Destroy, then a late patch of the same session: the CAS write finds
/// no item, the update reports it missing and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_then_a_late_patch_does_not_revive_the_id() {
    let fx = fixture().await;
    let (out, _) = racing_update(&fx, "late", |mc| assert!(mc.delete_raw("late"))).await;
    assert_eq!(out, UpdateOutcome::Missing);
    assert_eq!(
        memcached(&fx).item("late"),
        None,
        "the destroyed session was revived"
    );
    assert_eq!(fx.store().await.load("late").await.unwrap(), None);
}

/// 50 concurrent read-modify-writes of one session from five stores (five
/// gateways): the local queue does not help across processes, CAS must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_from_several_gateways_lose_nothing() {
    let fx = fixture().await;
    let mut stores = Vec::new();
    for _ in 0..5 {
        stores.push(fx.store().await);
    }
    common::contract::concurrent_updates_through(&stores, "shared").await;
}

/// Memcached refuses an item over its size limit (1 MiB by default) and
/// then deletes what the key held: the store checks the size first, so an
/// oversized update fails (502 through the gateway) and the session
/// stays. The largest value the check lets through does fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_past_the_item_size_limit_are_refused_before_sending() {
    let fx = fixture().await;
    let mc = memcached(&fx);
    let store = fx.store().await;
    let key = "session:size";
    // 1 MiB, less the store's allowance per item (128 bytes), the key and
    // the 12-byte header.
    let largest = (1 << 20) - 128 - key.len() - 12;
    let big = Bytes::from(vec![b'x'; largest]);
    assert!(store.create(key, &big, TTL).await.unwrap());
    assert_eq!(store.load(key).await.unwrap().unwrap().value, big);
    store.delete(key).await.unwrap();

    let small = record(json!({"a": 1}));
    assert!(store.create(key, &small, TTL).await.unwrap());
    let too_big = Bytes::from(vec![b'x'; largest + 1]);
    let err = store
        .update(key, TTL, &|_| Ok(Update::Write(too_big.clone())))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Rejected(ref m) if m.contains("session.max_bytes")),
        "{err:?}"
    );
    assert_eq!(store.load(key).await.unwrap().unwrap().value, small);
    assert!(mc.item(key).is_some());
    let err = store
        .create("session:other", &too_big, TTL)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Rejected(_)), "{err:?}");
}

/// Kill memcached mid-test: 503 within the timeout (fail_closed), then
/// recovery on the same port without restarting the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_within_timeout_then_recovers() {
    let mut s = setup(fixture().await, |b| b).await;
    outage::stopped_server_then_recovery(&mut s, TIMEOUT, process).await;
}

/// A frozen memcached (SIGSTOP: connections open, no answers) must not
/// hold requests beyond `store.timeout`; after SIGCONT it carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_memcached_answers_503_within_timeout_then_recovers() {
    let mut s = setup(fixture().await, |b| b).await;
    outage::frozen_server_then_recovery(&mut s, TIMEOUT, process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_during_outage_forwards_with_error_header() {
    let mut s = setup(fixture().await, |b| {
        b.session("on_store_error", "fail_open")
    })
    .await;
    outage::stopped_server_fail_open(&mut s, TIMEOUT, process).await;
}

/// Run `--test` on `conf/memcached.yaml` with its server list replaced
/// (and its `session.key_prefix`, if given).
fn check_shipped_config(servers: &str, key_prefix: Option<&str>) -> (i32, String, String) {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/memcached.yaml");
    let text = std::fs::read_to_string(shipped).unwrap();
    let default = "servers: [127.0.0.1:11211]";
    let default_prefix = "key_prefix: \"session:\"";
    assert!(
        text.contains(default) && text.contains(default_prefix),
        "conf/memcached.yaml changed its servers or key_prefix"
    );
    let mut text = text.replace(default, &format!("servers: [{servers}]"));
    if let Some(prefix) = key_prefix {
        text = text.replace(default_prefix, &format!("key_prefix: {prefix:?}"));
    }
    // What the shipped file reads from the environment.
    let text = text.replace("${SESSION_SECRET}", KEY_A);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memcached.yaml");
    std::fs::write(&path, text).unwrap();
    run_cli(&["-c", path.to_str().unwrap(), "--test"], dir.path())
}

#[test]
fn shipped_config_is_valid() {
    let server = MemcachedServer::start();
    let (code, out, err) = check_shipped_config(&server.addr(), None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(
        out.contains(&format!("memcached ({})", server.addr())),
        "{out}"
    );
}

#[test]
fn unreachable_memcached_fails_the_config_test_in_one_line() {
    let server = MemcachedServer::start();
    // A free port: nothing listens there. Named by its list key.
    let dead = format!("127.0.0.1:{}", common::free_port());
    let (code, out, err) = check_shipped_config(&format!("{}, {dead}", server.addr()), None);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: store.servers:"), "{err}");
    assert!(
        err.contains("store.servers[1]") && err.contains(&dead),
        "{err}"
    );
}

/// Too long (the generic 128-byte limit of `session.key_prefix` is met
/// before memcached's 250-byte key limit; the store checks that too), or
/// with bytes memcached keys cannot hold.
#[test]
fn key_prefixes_memcached_cannot_take_are_refused_by_the_config_test() {
    let server = MemcachedServer::start();
    let long = "p".repeat(220);
    for prefix in [long.as_str(), "my app:", "tab\t"] {
        let (code, out, err) = check_shipped_config(&server.addr(), Some(prefix));
        assert_ne!(code, 0, "{prefix:?}: {out}{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: session.key_prefix:"),
            "{prefix:?}: {err}"
        );
    }
}

#[test]
fn config_errors_name_the_server_key() {
    let dir = tempfile::tempdir().unwrap();
    for (servers, key) in [
        ("[]", "store.servers"),
        ("[127.0.0.1:11211, \"127.0.0.1\"]", "store.servers[1]"),
        ("nonsense", "store.servers"),
    ] {
        let path = dir.path().join("g.yaml");
        std::fs::write(
            &path,
            format!(
                "listen: 127.0.0.1:1\nupstream: 127.0.0.1:2\nsecret_keys: [\"{KEY_A}\"]\n\
                 store: {{type: memcached, servers: {servers}}}\n"
            ),
        )
        .unwrap();
        let (code, out, err) = run_cli(&["-c", path.to_str().unwrap(), "--test"], dir.path());
        assert_ne!(code, 0, "{servers}: {out}{err}");
        assert!(
            err.starts_with(&format!("error: {key}:")),
            "{servers}: {err}"
        );
    }
}
