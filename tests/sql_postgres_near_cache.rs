//! The PostgreSQL store with `store.near_cache` on (a trigger plus
//! `LISTEN`/`NOTIFY`), against the shared server, one table per test: the
//! store contract and the protocol suite with the cache on; reads of a
//! known session cost no query; two gateways on one table, where a
//! destroy, a patch or an expiry through one is seen by the other within
//! the documented bound; changes made by any other client (UPDATE, DELETE,
//! TRUNCATE); a killed listening connection and a disabled trigger never
//! let a stale entry be served; `--test`; the config key on other
//! dialects.
#![cfg(feature = "sql")]

mod common;

use common::contract::load_until_cached;
use common::gateway::{run_cli, Gateway, GatewayBuilder};
use common::protocol::{get_with_cookie, Browser};
use common::sql_server::{Db, Kind, TestTable};
use common::{StoreFixture, Upstream};
use serde_json::{json, Value};
use session_gateway::session::{SessionRecord, SessionStore, Update};
use session_gateway::store::sql::LISTEN_APPLICATION_NAME;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The README's bound for another gateway to stop serving a changed
/// session, measured from the writer's response (as for Redis).
const BOUND: Duration = Duration::from_millis(100);

const NEAR: &str = "near_cache: {enabled: true, max_entries: 1000}";

async fn fixture() -> StoreFixture {
    let table = TestTable::new(Kind::Postgres).await;
    // The table and its triggers exist before any gateway starts (see
    // `sql_server::fixture`).
    drop(table.store(NEAR).await);
    StoreFixture::new(table.store_yaml(NEAR), table)
}

store_suites!(fixture);

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

/// Load through `store` until it gives `want` (`None`: no session); fails
/// after [`BOUND`] from `since`.
async fn until_loaded(
    store: &Arc<dyn SessionStore>,
    key: &str,
    want: Option<&bytes::Bytes>,
    since: Instant,
) -> Duration {
    loop {
        let got = store.load(key).await.unwrap().map(|l| l.value);
        if got.as_ref() == want {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < BOUND,
            "{key}: still {got:?} {:?} after the change",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_cached_session_run_no_query() {
    let table = TestTable::new(Kind::Postgres).await;
    let store = table.store(NEAR).await;
    let ttl = Duration::from_secs(600);
    assert!(store
        .create("k", &record(json!({"a": 1})), ttl)
        .await
        .unwrap());
    load_until_cached(&store, "k").await;
    let before = store.near_cache_stats().unwrap();
    for _ in 0..20 {
        let loaded = store.load("k").await.unwrap().unwrap();
        assert_eq!(loaded.value, record(json!({"a": 1})));
    }
    let after = store.near_cache_stats().unwrap();
    assert_eq!(
        (after.hits - before.hits, after.misses - before.misses),
        (20, 0)
    );
}

/// Store A writes (as another gateway would), store B loads until it no
/// longer serves the old value: updates, touches, deletes, and changes by
/// plain SQL from any client, each within the bound. Prints the
/// distribution for updates; the README quotes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_by_anyone_reach_another_store_within_the_bound() {
    const TRIALS: usize = 100;
    let table = TestTable::new(Kind::Postgres).await;
    let (a, b) = (table.store(NEAR).await, table.store(NEAR).await);
    let db = table.db().await;
    let t = table.quoted();
    let ttl = Duration::from_secs(600);
    assert!(a.create("k", &record(json!({"i": 0})), ttl).await.unwrap());
    let mut times = Vec::with_capacity(TRIALS);
    for i in 1..=TRIALS {
        load_until_cached(&b, "k").await;
        let want = record(json!({ "i": i }));
        let new = want.clone();
        a.update("k", ttl, &move |_| Ok(Update::Write(new.clone())))
            .await
            .unwrap();
        times.push(until_loaded(&b, "k", Some(&want), Instant::now()).await);
    }
    times.sort();
    eprintln!(
        "postgres near cache: invalidation, {TRIALS} trials: p50 {:?}, p99 {:?}, max {:?}",
        times[TRIALS / 2],
        times[TRIALS * 99 / 100],
        times[TRIALS - 1]
    );

    // A touch through A: B reports the new expiry.
    load_until_cached(&b, "k").await;
    assert!(a.touch("k", 2 * ttl).await.unwrap());
    let since = Instant::now();
    loop {
        let left = b.load("k").await.unwrap().unwrap().expires_at;
        let left = left.duration_since(std::time::SystemTime::now()).unwrap();
        if left > ttl + Duration::from_secs(60) {
            break;
        }
        assert!(since.elapsed() < BOUND, "touch not seen");
    }

    // Plain SQL from another client: UPDATE, DELETE.
    load_until_cached(&b, "k").await;
    let other = record(json!({"by": "sql"}));
    set_directly(&db, &t, &other).await;
    until_loaded(&b, "k", Some(&other), Instant::now()).await;
    load_until_cached(&b, "k").await;
    db.execute(&format!("DELETE FROM {t} WHERE id = 'k'")).await;
    until_loaded(&b, "k", None, Instant::now()).await;

    // TRUNCATE empties every cache.
    assert!(a.create("k", &record(json!({"j": 1})), ttl).await.unwrap());
    load_until_cached(&b, "k").await;
    db.execute(&format!("TRUNCATE {t}")).await;
    until_loaded(&b, "k", None, Instant::now()).await;
    assert!(b.near_cache_stats().unwrap().flushes >= 1);
    db.close().await;
}

/// Replace row `k`'s data with plain SQL, as any other client could.
async fn set_directly(db: &Db, table: &str, value: &[u8]) {
    let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
    db.execute(&format!(
        "UPDATE {table} SET data = '\\x{hex}' WHERE id = 'k'"
    ))
    .await;
}

/// Whatever a store writes, it reads back at once, with the stored
/// expiry; an expired entry is never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_writes_are_read_back_at_once_and_expiry_is_kept() {
    let table = TestTable::new(Kind::Postgres).await;
    let store = table.store(NEAR).await;
    let (short, long) = (Duration::from_secs(60), Duration::from_secs(600));
    assert!(store
        .create("k", &record(json!({"a": 1})), short)
        .await
        .unwrap());
    load_until_cached(&store, "k").await;
    let b2 = record(json!({"b": 2}));
    let new = b2.clone();
    store
        .update("k", long, &move |_| Ok(Update::Write(new.clone())))
        .await
        .unwrap();
    assert_eq!(store.load("k").await.unwrap().unwrap().value, b2);
    load_until_cached(&store, "k").await;
    store.delete("k").await.unwrap();
    assert_eq!(store.load("k").await.unwrap(), None);

    let one = Duration::from_secs(1);
    assert!(store
        .create("k", &record(json!({"d": 4})), one)
        .await
        .unwrap());
    load_until_cached(&store, "k").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let hits = store.near_cache_stats().unwrap().hits;
    assert_eq!(store.load("k").await.unwrap(), None, "expired entry served");
    assert_eq!(store.near_cache_stats().unwrap().hits, hits);
}

/// A table whose row `k` (`{"v": 1}`) a near-cached store on it serves
/// from its cache, and a connection of another client.
async fn cached_row() -> (TestTable, Arc<dyn SessionStore>, Db) {
    let table = TestTable::new(Kind::Postgres).await;
    let store = table.store(NEAR).await;
    let db = table.db().await;
    let ttl = Duration::from_secs(600);
    assert!(store
        .create("k", &record(json!({"v": 1})), ttl)
        .await
        .unwrap());
    load_until_cached(&store, "k").await;
    (table, store, db)
}

/// The listening connections of `table`'s stores: their last statement
/// (the trigger check, also the heartbeat) names the table. Other tests'
/// listeners, on their own tables, are left alone.
async fn listening_pids(db: &Db, table: &TestTable) -> Vec<String> {
    db.strings(&format!(
        "SELECT pid::text FROM pg_stat_activity \
         WHERE application_name = '{LISTEN_APPLICATION_NAME}' AND query LIKE '%{}%'",
        table.name
    ))
    .await
}

/// The listening connection killed by the server, then a change made at
/// once: its notification can never arrive, and the store must not serve
/// the old value. Listening comes back by itself and the cache works
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listening_connection_never_serves_a_stale_entry() {
    let (table, store, db) = cached_row().await;
    let t = table.quoted();
    let before = listening_pids(&db, &table).await;
    assert!(!before.is_empty(), "no listening connection");
    for pid in &before {
        db.execute(&format!("SELECT pg_terminate_backend({pid})"))
            .await;
    }
    let v2 = record(json!({"v": 2}));
    set_directly(&db, &t, &v2).await;
    until_loaded(&store, "k", Some(&v2), Instant::now()).await;

    // Listening again on a new connection, and the cache is used again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = listening_pids(&db, &table).await;
        if !now.is_empty() && now.iter().all(|p| !before.contains(p)) {
            break;
        }
        assert!(Instant::now() < deadline, "listening did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load_until_cached(&store, "k").await;
    let v3 = record(json!({"v": 3}));
    set_directly(&db, &t, &v3).await;
    until_loaded(&store, "k", Some(&v3), Instant::now()).await;
    assert!(store.near_cache_stats().unwrap().flushes >= 1);
    db.close().await;
}

/// A disabled (or dropped) trigger means changes go unnoticed: the next
/// heartbeat finds it and the cache is bypassed until the trigger is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_trigger_turns_the_cache_off_until_it_is_back() {
    let (table, store, db) = cached_row().await;
    let t = table.quoted();
    db.execute(&format!("ALTER TABLE {t} DISABLE TRIGGER ALL"))
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.near_cache_stats().unwrap().live {
        assert!(
            Instant::now() < deadline,
            "the disabled trigger went unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v2 = record(json!({"v": 2}));
    set_directly(&db, &t, &v2).await;
    assert_eq!(store.load("k").await.unwrap().unwrap().value, v2);
    db.execute(&format!("ALTER TABLE {t} ENABLE TRIGGER ALL"))
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.near_cache_stats().unwrap().live {
        assert!(Instant::now() < deadline, "the cache did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load_until_cached(&store, "k").await;
    db.close().await;
}

// ------------------------------------------------- through two gateways

/// Two gateways (A and B) on one table and one app, near cache on, each
/// with its admin listener (to see B's cache hits).
struct Pair {
    _table: TestTable,
    _up: Upstream,
    a: Gateway,
    b: Gateway,
    b_admin: String,
}

async fn pair() -> Pair {
    let table = TestTable::new(Kind::Postgres).await;
    let up = Upstream::start().await;
    let builder = GatewayBuilder::new(up.port, &table.store_yaml(NEAR));
    let port = common::free_port();
    let b = builder
        .clone()
        .set("admin", &format!("{{listen: 127.0.0.1:{port}}}"))
        .start();
    Pair {
        a: builder.start(),
        b,
        b_admin: format!("http://127.0.0.1:{port}/metrics"),
        _table: table,
        _up: up,
    }
}

/// B's near cache hits so far.
async fn hits(p: &Pair) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        match reqwest::get(&p.b_admin).await {
            Ok(r) => break r.text().await.unwrap(),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("admin listener: {e}"),
        }
    };
    let samples: HashMap<&str, f64> = text
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name, value.parse().ok()?))
        })
        .collect();
    samples
        .get("session_gateway_near_cache_hits_total")
        .copied()
        .unwrap_or(0.0)
}

fn cookie_header(cookie: &str) -> String {
    format!("session={cookie}")
}

/// A session created through A and served from B's cache.
async fn shared_session(p: &Pair, data: Value) -> String {
    let user = Browser::new(&p.a);
    assert_eq!(user.patch("/", data.clone()).await.status, 200);
    let cookie = user.cookie().unwrap();
    for _ in 0..100 {
        let before = hits(p).await;
        let r = get_with_cookie(&p.b, "/", &cookie_header(&cookie), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.session(), data);
        if hits(p).await > before {
            return cookie;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the session never came from B's near cache:\n{}", p.b.log());
}

/// Poll B until it serves `want`, within [`BOUND`] of `since`.
async fn until_seen(p: &Pair, cookie: &str, want: &Value, since: Instant) -> Duration {
    loop {
        let r = get_with_cookie(&p.b, "/", &cookie_header(cookie), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if &r.session() == want {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < BOUND,
            "B still served {} {:?} after the change (want {want})",
            r.session(),
            since.elapsed()
        );
    }
}

async fn through_a(p: &Pair, cookie: &str, header: &str, value: &str) {
    let r = get_with_cookie(&p.a, "/", &cookie_header(cookie), &[(header, value)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_and_patch_through_a_are_seen_by_b() {
    let p = pair().await;
    let cookie = shared_session(&p, json!({"user": "ada"})).await;
    through_a(&p, &cookie, "x-reply-x-session-patch", r#"{"cart":[3]}"#).await;
    let want = json!({"user": "ada", "cart": [3]});
    let took = until_seen(&p, &cookie, &want, Instant::now()).await;
    eprintln!("postgres near cache: patch through A seen by B after {took:?}");

    let cookie = shared_session(&p, json!({"user": "bob"})).await;
    through_a(&p, &cookie, "x-reply-x-session-action", "destroy").await;
    let took = until_seen(&p, &cookie, &json!({}), Instant::now()).await;
    eprintln!("postgres near cache: destroy through A seen by B after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_test_sets_up_and_checks_the_notifications() {
    let table = TestTable::new(Kind::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "listen: 127.0.0.1:6188\nupstream: 127.0.0.1:9\nsecret_keys: [\"{}\"]\nstore: {}\n",
        common::gateway::KEY_A,
        table.store_yaml(NEAR)
    );
    std::fs::write(dir.path().join("gateway.yaml"), config).unwrap();
    let (code, out, err) = run_cli(&["-c", "gateway.yaml", "--test"], dir.path());
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("near_cache 1000 entries"), "{out}");
    let db = table.db().await;
    let triggers = db
        .scalar(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{}'::regclass AND NOT tgisinternal",
            table.quoted()
        ))
        .await;
    assert_eq!(triggers, 2, "the row and the TRUNCATE trigger");
    db.close().await;
}

#[test]
fn other_dialects_refuse_the_near_cache_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["mysql://root@127.0.0.1/test", "sqlite://./s.db"] {
        let config = format!(
            "listen: 127.0.0.1:6188\nupstream: 127.0.0.1:9\nsecret_keys: [\"{}\"]\n\
             store: {{type: sql, url: '{url}', near_cache: {{enabled: true}}}}\n",
            common::gateway::KEY_A
        );
        std::fs::write(dir.path().join("gateway.yaml"), config).unwrap();
        let (code, out, err) = run_cli(&["-c", "gateway.yaml", "--test"], dir.path());
        assert_ne!(code, 0, "{url}: {out}");
        assert!(err.contains("store.near_cache"), "{url}: {err}");
    }
}
