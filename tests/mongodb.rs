//! The MongoDB store against a private SecantusDB server per test (a
//! MongoDB wire-compatible server, see tests/common/mongodb_server.rs):
//! the store contract, the protocol suite, restart and rotation, plus what
//! is specific to MongoDB: the document layout and TTL index, refreshes
//! that only set `expires`, expiry checked at read time (before any TTL
//! monitor runs), the compare-and-set between gateways, outages and a
//! frozen server (503 within `store.timeout`, then recovery without
//! restarting the gateway), `--test` and the shipped `conf/mongodb.yaml`.
#![cfg(feature = "mongodb")]

mod common;

use common::gateway::{binary, run_cli, KEY_A};
use common::mongodb_server::MongoServer;
use common::protocol::{get_with_cookie, setup, Browser, Setup};
use common::StoreFixture;
use mongodb::bson::{doc, spec::BinarySubtype, Bson, DateTime, Document};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use serde_json::json;
use session_gateway::session::{SessionRecord, SessionStore, Update, UpdateOutcome};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Store timeout of the outage tests, and how much later than it a 503
/// may arrive (process scheduling on a busy CI machine).
const TIMEOUT: Duration = Duration::from_millis(500);
const MARGIN: Duration = Duration::from_millis(400);

/// The defaults of `store.database` and `store.collection`.
const DB: &str = "session_gateway";
const COLL: &str = "sessions";

/// `store.timeout` of the suites: SecantusDB is a Python server sharing
/// two cores with the gateway and the tests, and the suites run 50
/// concurrent patches of one session (sealed: each compare-and-set
/// re-encrypts), so give it room; the outage tests keep [`TIMEOUT`].
const SUITE_TIMEOUT: Duration = Duration::from_secs(2);

fn store_yaml(url: &str) -> String {
    store_yaml_with(url, TIMEOUT)
}

fn store_yaml_with(url: &str, timeout: Duration) -> String {
    format!(
        "{{type: mongodb, url: \"{url}\", timeout: {}ms}}",
        timeout.as_millis()
    )
}

/// A private server (that the test may stop or freeze) and `timeout`.
fn fixture_with(timeout: Duration) -> StoreFixture {
    let server = MongoServer::start();
    StoreFixture::new(store_yaml_with(&server.url(), timeout), server)
}

/// The suites' fixture: [`SUITE_TIMEOUT`].
async fn fixture() -> StoreFixture {
    fixture_with(SUITE_TIMEOUT)
}

/// The outage tests' fixture: [`TIMEOUT`].
async fn outage_fixture() -> StoreFixture {
    fixture_with(TIMEOUT)
}

store_suites!(fixture);
sealed_suite!(fixture);
persistence_suite!(fixture);

fn server(s: &Setup) -> &MongoServer {
    s.fx.guard.downcast_ref().unwrap()
}

fn server_mut(s: &mut Setup) -> &mut MongoServer {
    s.fx.guard.downcast_mut().unwrap()
}

/// The `_id` of a browser's session (default `key_prefix`).
fn key_of(b: &Browser) -> String {
    let cookie = b.cookie().expect("browser has a session cookie");
    format!("session:{}", cookie.split('.').next().unwrap())
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

/// Milliseconds from now until a BSON date.
fn millis_until(date: &DateTime) -> i64 {
    date.timestamp_millis() - DateTime::now().timestamp_millis()
}

async fn documents(s: &Setup) -> Vec<Document> {
    server(s).documents(DB, COLL).await
}

/// The TTL index, as `listIndexes` reports it.
async fn ttl_index(server: &MongoServer, db: &str, coll: &str) -> Option<Document> {
    let coll = server
        .client()
        .await
        .database(db)
        .collection::<Document>(coll);
    let mut cursor = coll.list_indexes().await.ok()?.with_type::<Document>();
    while cursor.advance().await.unwrap() {
        let index: Document = cursor.deserialize_current().unwrap();
        if index.get_str("name").ok() == Some("expires_ttl") {
            return Some(index);
        }
    }
    None
}

/// `expires_ttl` on `{expires: 1}`, made by hand as an operator would.
async fn create_expires_index(server: &MongoServer, expire_after: Duration) {
    let index = IndexModel::builder()
        .keys(doc! {"expires": 1})
        .options(
            IndexOptions::builder()
                .name("expires_ttl".to_string())
                .expire_after(expire_after)
                .build(),
        )
        .build();
    let coll = server
        .client()
        .await
        .database(DB)
        .collection::<Document>(COLL);
    coll.create_index(index).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_holds_the_record_and_expires_is_the_lifetime() {
    let s = setup(fixture().await, |b| b.session("lifetime", "1h")).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"user": "ada"})).await;
    let docs = documents(&s).await;
    assert_eq!(docs.len(), 1, "one document per session: {docs:?}");
    let d = &docs[0];
    assert_eq!(d.get_str("_id").unwrap(), key_of(&b));
    let Some(Bson::Binary(data)) = d.get("data") else {
        panic!("data is not binary: {d:?}")
    };
    assert_eq!(data.subtype, BinarySubtype::Generic);
    // The stored form: a flag byte, then the X-Session value.
    assert_eq!(data.bytes, b"P{\"user\":\"ada\"}");
    let left = millis_until(d.get_datetime("expires").unwrap());
    assert!(
        (3_590_000..=3_600_000).contains(&left),
        "expires in {left} ms, not the 1h lifetime"
    );
    assert_eq!(d.get("v"), Some(&Bson::Int64(1)));
    let mut keys: Vec<&str> = d.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["_id", "data", "expires", "v"]);

    // A patch rewrites data and bumps the version.
    b.patch("/", json!({"n": 2})).await;
    let d = &documents(&s).await[0];
    assert_eq!(d.get("v"), Some(&Bson::Int64(2)));
    assert_eq!(
        d.get_binary_generic("data").unwrap(),
        b"P{\"n\":2,\"user\":\"ada\"}"
    );
}

/// The gateway made the TTL index when it first connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_index_is_present_after_start() {
    let s = setup(fixture().await, |b| b).await;
    assert_eq!(
        Browser::new(&s.gw).patch("/", json!({"a": 1})).await.status,
        200
    );
    let index = ttl_index(server(&s), DB, COLL)
        .await
        .expect("no expires_ttl index");
    assert_eq!(index.get_document("key").unwrap(), &doc! {"expires": 1});
    let ttl = index.get("expireAfterSeconds").unwrap();
    assert!(
        matches!(ttl, Bson::Int32(0) | Bson::Int64(0)) || *ttl == Bson::Double(0.0),
        "{index:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_sets_expires_without_rewriting_the_data() {
    let s = setup(fixture().await, |b| {
        b.session("lifetime", "100")
            .session("expiry_update_interval", "1s")
    })
    .await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1, "z": "Zoë"})).await;
    let before = documents(&s).await.remove(0);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session(), json!({"a": 1, "z": "Zoë"}));
    let after = documents(&s).await.remove(0);
    let (old, new) = (
        millis_until(before.get_datetime("expires").unwrap()),
        millis_until(after.get_datetime("expires").unwrap()),
    );
    assert!(
        new >= 99_000 && new > old + 1000,
        "expires not extended: {old} -> {new} ms"
    );
    assert_eq!(before.get("data"), after.get("data"), "the data changed");
    assert_eq!(before.get("v"), after.get("v"), "a touch is not a write");
}

/// A 2 s lifetime: the session is gone at once when it expires, although
/// its document is still in the collection (the TTL monitor runs once a
/// minute): the store checks expiry on every read. A TTL sweep then
/// removes the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_checked_at_read_time() {
    let s = setup(fixture().await, |b| {
        b.session("lifetime", "2s")
            .session("refresh_each_request", "false")
    })
    .await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let cookie = b.cookie().unwrap();
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        documents(&s).await.len(),
        1,
        "the document should outlive its expiry until a TTL sweep"
    );
    let r = get_with_cookie(&s.gw, "/", &format!("session={cookie}"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session(), json!({}), "an expired session was served");
    // A patch on the expired session starts a new one; the old id stays dead.
    let r = get_with_cookie(
        &s.gw,
        "/",
        &format!("session={cookie}"),
        &[("x-reply-x-session-patch", r#"{"late":1}"#)],
    )
    .await;
    assert_eq!(r.status, 200);
    let old_id = format!("session:{}", cookie.split('.').next().unwrap());
    let docs = documents(&s).await;
    let old = docs
        .iter()
        .find(|d| d.get_str("_id").ok() == Some(old_id.as_str()))
        .expect("old document");
    assert_eq!(
        old.get("v"),
        Some(&Bson::Int64(1)),
        "expired session revived"
    );

    // SecantusDB's on-demand sweep (real MongoDB's monitor runs every 60 s):
    // the TTL index really deletes the expired document.
    let pruned = server(&s)
        .client()
        .await
        .database("admin")
        .run_command(doc! {"secantusAdmin.pruneTtl": 1})
        .await
        .unwrap();
    assert!(pruned.get("pruned").is_some(), "{pruned:?}");
    let ids: Vec<String> = documents(&s)
        .await
        .iter()
        .map(|d| d.get_str("_id").unwrap().to_string())
        .collect();
    assert!(!ids.contains(&old_id), "{ids:?}");
    assert_eq!(ids.len(), 1, "the new session stays: {ids:?}");
}

/// Run `op` on the sessions collection from another thread, with a
/// runtime and client of its own, and wait for it: update functions are
/// synchronous, and this is how a test acts between an update's read and
/// its write, as another gateway would.
fn meanwhile<F, Fut>(url: &str, op: F)
where
    F: FnOnce(Collection<Document>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let url = url.to_string();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let client = mongodb::Client::with_uri_str(url).await.unwrap();
                op(client.database(DB).collection(COLL)).await
            })
    })
    .join()
    .unwrap();
}

/// The session is destroyed between a patch's read and its write: the
/// write matches no document and nothing comes back (a late refresh
/// neither).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_between_read_and_write_is_not_undone() {
    let server = MongoServer::start();
    let store = common::open_store(&store_yaml(&server.url())).await;
    let ttl = Duration::from_secs(600);
    let value = record(json!({"a": 1})).encode();
    assert!(store.create("gone", &value, ttl).await.unwrap());
    let url = server.url();
    let calls = AtomicUsize::new(0);
    let out = store
        .update("gone", ttl, &|current| {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                meanwhile(&url, |coll| async move {
                    coll.delete_one(doc! {"_id": "gone"}).await.unwrap();
                });
            }
            Ok(Update::Write(bytes::Bytes::copy_from_slice(current)))
        })
        .await
        .unwrap();
    assert_eq!(out, UpdateOutcome::Missing);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(!store.touch("gone", ttl).await.unwrap());
    assert!(
        server.documents(DB, COLL).await.is_empty(),
        "the late write revived the session"
    );
}

/// Another writer (another gateway) changes the session between `update`'s
/// read and its write: the version check notices, and the update is
/// re-applied on top of the other write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_conflict_is_detected_and_retried() {
    let server = MongoServer::start();
    let store = common::open_store(&store_yaml(&server.url())).await;
    assert!(store
        .create(
            "race",
            &record(json!({"a": 1})).encode(),
            Duration::from_secs(600)
        )
        .await
        .unwrap());
    let url = server.url();
    let calls = AtomicUsize::new(0);
    let theirs = record(json!({"a": 1, "theirs": true})).encode().to_vec();
    let out = store
        .update("race", Duration::from_secs(600), &|current| {
            let mut r = SessionRecord::from_stored(current).unwrap();
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                let data = mongodb::bson::Binary {
                    subtype: BinarySubtype::Generic,
                    bytes: theirs.clone(),
                };
                meanwhile(&url, |coll| async move {
                    let bump = doc! {"$set": {"data": data}, "$inc": {"v": 1_i64}};
                    coll.update_one(doc! {"_id": "race"}, bump).await.unwrap();
                });
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

/// 50 concurrent read-modify-writes of one session from five stores (five
/// gateways): the local queue does not help across processes, the
/// version check must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_from_several_gateways_lose_nothing() {
    let server = MongoServer::start();
    let mut stores: Vec<Arc<dyn SessionStore>> = Vec::new();
    for _ in 0..5 {
        stores.push(common::open_store(&store_yaml(&server.url())).await);
    }
    common::contract::concurrent_updates_through(&stores, "shared").await;
}

/// `n` reads in a row are answered 503 `session store unavailable`, each
/// within the store timeout but not before `at_least`.
async fn answers_503_within_timeout(b: &Browser, n: usize, at_least: Duration) {
    for _ in 0..n {
        let started = Instant::now();
        let r = b.get("/", &[]).await;
        let took = started.elapsed();
        assert_eq!(r.status, 503, "{}", r.text);
        assert!(r.text.contains("session store unavailable"), "{}", r.text);
        assert!(took < TIMEOUT + MARGIN, "503 took {took:?}");
        assert!(took >= at_least, "503 after {took:?}, before {at_least:?}");
    }
}

/// Kill the server mid-test: requests fail within the timeout (fail_closed:
/// 503 without contacting the upstream); once it is back on the same port
/// the gateway carries on without a restart, and the sessions survived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_within_timeout_then_recovers() {
    let mut s = setup(outage_fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));

    server_mut(&mut s).stop();
    let hits = s.up.hits();
    answers_503_within_timeout(&b, 3, Duration::ZERO).await;
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
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.session(), json!({"a": 1}), "the data survived the outage");
    let r = b.patch("/", json!({"back": true})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        b.get("/", &[]).await.session(),
        json!({"a": 1, "back": true})
    );
    let fresh = Browser::new(&s.gw);
    assert_eq!(fresh.patch("/", json!({"f": 1})).await.status, 200);
    assert_eq!(fresh.get("/", &[]).await.session(), json!({"f": 1}));
}

/// A frozen server (SIGSTOP: connections open, no answers) must not hold
/// requests beyond `store.timeout`; after SIGCONT the gateway carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_server_answers_503_within_timeout_then_recovers() {
    let s = setup(outage_fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;

    server(&s).pause();
    // Nothing fails fast here: each request waits for store.timeout.
    answers_503_within_timeout(&b, 2, TIMEOUT - Duration::from_millis(50)).await;
    server(&s).resume();
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.session(), json!({"a": 1}), "the data survived the freeze");
    assert_eq!(b.patch("/", json!({"b": 2})).await.status, 200);
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1, "b": 2}));
}

/// The server down when the gateway starts: the first connection is
/// retried on later requests, not cached as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_started_before_the_server_connects_later() {
    // The gateway connects lazily, on the first request that needs the
    // store, so stopping the server right after start-up is the same as
    // starting the gateway while it is down.
    let mut s = setup(outage_fixture().await, |b| b).await;
    server_mut(&mut s).stop();
    let b = Browser::new(&s.gw);
    let started = Instant::now();
    let r = b.patch("/", json!({"a": 1})).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(started.elapsed() < TIMEOUT + MARGIN);
    server_mut(&mut s).start_again();
    let r = b.patch("/", json!({"a": 1})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));
}

/// Credentials in the URL are used, and `--test` never prints the
/// password; a wrong one is a store error naming `store.url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_in_url_is_used_and_never_printed() {
    const PW: &str = "s3cret-mongo-pw";
    let server = MongoServer::start_with_user("app", PW).await;
    let url = format!(
        "mongodb://app:{PW}@127.0.0.1:{}/?authSource=admin",
        server.port
    );
    let s = setup(StoreFixture::new(store_yaml(&url), server), |b| b).await;
    let b = Browser::new(&s.gw);
    let r = b.patch("/", json!({"a": 1})).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text, s.gw.log());
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));

    let (code, out, err) = run_cli(
        &["-c", s.gw.config_path.to_str().unwrap(), "--test"],
        s.gw.dir(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("mongodb (mongodb://app:***@127.0.0.1:"),
        "{out}"
    );
    assert!(!out.contains(PW) && !err.contains(PW), "{out}{err}");

    let config = std::fs::read_to_string(&s.gw.config_path)
        .unwrap()
        .replace(PW, "wrong-pw");
    let path = s.gw.dir().join("wrong.yaml");
    std::fs::write(&path, config).unwrap();
    let (code, out, err) = run_cli(&["-c", path.to_str().unwrap(), "--test"], s.gw.dir());
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: store.url: store error:"), "{err}");
    assert!(
        !out.contains("wrong-pw") && !err.contains("wrong-pw"),
        "{out}{err}"
    );
}

/// Run `--test` on a config file.
fn check(config: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(["-c", config.to_str().unwrap(), "--test"])
        .current_dir(config.parent().unwrap())
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

/// `conf/mongodb.yaml` with its URL pointed at `url`, written to `dir`,
/// with `edit` applied to its text.
fn shipped_config(dir: &std::path::Path, url: &str, edit: &[(&str, &str)]) -> std::path::PathBuf {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/mongodb.yaml");
    let mut text = std::fs::read_to_string(shipped).unwrap();
    let default_url = "url: mongodb://127.0.0.1:27017\n";
    assert!(
        text.contains(default_url),
        "conf/mongodb.yaml changed its url"
    );
    text = text.replace(default_url, &format!("url: \"{url}\"\n"));
    for (from, to) in edit {
        assert!(text.contains(from), "conf/mongodb.yaml lacks {from}");
        text = text.replace(from, to);
    }
    let path = dir.join("mongodb.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_config_is_valid_and_creates_the_index() {
    let server = MongoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = check(&shipped_config(dir.path(), &server.url(), &[]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(
        out.contains(&format!(
            "mongodb (mongodb://127.0.0.1:{}/, database session_gateway, collection sessions, create_index true)",
            server.port
        )),
        "{out}"
    );
    assert!(ttl_index(&server, DB, COLL).await.is_some());
}

/// `create_index: false`: `--test` fails, naming the key, until the index
/// exists; then it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_index_fails_the_config_test_naming_create_index() {
    let server = MongoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let no_create = [("create_index: true", "create_index: false")];
    let config = shipped_config(dir.path(), &server.url(), &no_create);
    let (code, out, err) = check(&config);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: store.url:"), "{err}");
    assert!(err.contains("store.create_index:"), "{err}");
    assert!(err.contains("createIndex"), "{err}");
    assert!(
        ttl_index(&server, DB, COLL).await.is_none(),
        "created anyway"
    );

    // The index as the README says to create it by hand.
    create_expires_index(&server, Duration::ZERO).await;
    let (code, out, err) = check(&config);
    assert_eq!(code, 0, "{out}{err}");
}

/// An index on `expires` that is not the TTL index the store needs: a
/// clear error naming `store.collection`, not a silent half-working store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_index_is_reported_naming_the_collection() {
    let server = MongoServer::start();
    create_expires_index(&server, Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = check(&shipped_config(dir.path(), &server.url(), &[]));
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("store.collection:"), "{err}");
    assert!(err.contains("expireAfterSeconds: 3600"), "{err}");
}

#[test]
fn unreachable_server_fails_the_config_test_in_one_line() {
    // A free port: nothing listens there.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("mongodb://127.0.0.1:{}/", common::free_port());
    let started = Instant::now();
    let (code, out, err) = check(&shipped_config(dir.path(), &url, &[]));
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: store.url: store unavailable"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// `--test` names the key of a bad value (exit 2: the config is invalid)
/// and never prints a password.
#[test]
fn config_errors_name_the_key_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    for (edit, key) in [
        (
            ("collection: sessions", "collection: \"a$b\""),
            "store.collection",
        ),
        (
            ("database: session_gateway", "database: a.b"),
            "store.database",
        ),
        (
            ("create_index: true", "create_index: maybe"),
            "store.create_index",
        ),
        (("create_index: true", "indexes: true"), "store.indexes"),
    ] {
        let url = "mongodb://app:hunter2@127.0.0.1:1/?w=majority";
        let (code, out, err) = check(&shipped_config(dir.path(), url, &[edit]));
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.starts_with(&format!("error: {key}:")), "{err}");
        assert!(!out.contains("hunter2") && !err.contains("hunter2"));
    }
    let url = "mongodb://app:hunter2@127.0.0.1:1/?w=1";
    let (code, out, err) = check(&shipped_config(dir.path(), url, &[]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.starts_with("error: store.url: `w` option"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
