//! The DynamoDB store against moto's server (`moto_server`, a DynamoDB
//! stand-in): the store contract, the protocol and persistence suites on
//! one shared server (a table per test), and what is specific to DynamoDB
//! on its own: the item layout, expiry at read time while the item still
//! exists, refreshes that only touch the expiry, table creation with TTL,
//! `--test` (missing table, wrong key, TTL off, shipped config, region
//! from the environment), a retried write whose first answer was lost,
//! and outages and a frozen server (503 within `store.timeout`, then
//! recovery without restarting the gateway).
//!
//! moto's conditional writes are not atomic under heavy concurrency (it
//! reads, checks and writes without a lock), so no test races several
//! stores on one item: within one gateway the local queue of `Cas`
//! serializes writers, which is what the 50-way patch tests exercise.
#![cfg(feature = "dynamodb")]

mod common;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TimeToLiveStatus,
};
use aws_sdk_dynamodb::Client;
use bytes::Bytes;
use common::gateway::{check_shipped, run_cli_env, KEY_A};
use common::moto_server::{self, endpoint, shared_port, MotoServer, REGION};
use common::outage;
use common::protocol::{get_with_cookie, setup, Browser, Setup};
use common::server::ServerProcess;
use common::{unique, StoreFixture};
use serde_json::json;
use session_gateway::session::{Update, UpdateOutcome};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `store.timeout` of the suites: moto is a Python server sharing two
/// cores with the gateway and the tests, so give it room.
const SUITE_TIMEOUT: Duration = Duration::from_secs(3);
/// `store.timeout` of the outage tests.
const TIMEOUT: Duration = Duration::from_millis(1000);

/// The server and table of a test.
struct Moto {
    port: u16,
    table: String,
    /// A private server (the shared one is `None`).
    server: Option<MotoServer>,
}

fn store_yaml(port: u16, table: &str, timeout: Duration) -> String {
    format!(
        "{{type: dynamodb, table: {table}, region: {REGION}, endpoint_url: \"{}\", timeout: {}ms}}",
        endpoint(port),
        timeout.as_millis()
    )
}

fn table_name() -> String {
    unique("sgw")
}

/// The suites' fixture: the shared server, a table of its own.
async fn fixture() -> StoreFixture {
    let port = shared_port();
    let table = table_name();
    StoreFixture::new(
        store_yaml(port, &table, SUITE_TIMEOUT),
        Moto {
            port,
            table,
            server: None,
        },
    )
}

/// A private server that the test may stop or freeze.
fn private_fixture(timeout: Duration) -> StoreFixture {
    let server = MotoServer::start();
    let table = table_name();
    StoreFixture::new(
        store_yaml(server.port, &table, timeout),
        Moto {
            port: server.port,
            table,
            server: Some(server),
        },
    )
}

store_suites!(fixture);
sealed_suite!(fixture);
persistence_suite!(fixture);

fn moto(s: &Setup) -> &Moto {
    s.fx.guard.downcast_ref().unwrap()
}

/// The private server's process (for the outage cases).
fn process(s: &mut Setup) -> &mut ServerProcess {
    let moto: &mut Moto = s.fx.guard.downcast_mut().unwrap();
    &mut moto.server.as_mut().expect("a private server").process
}

fn client(s: &Setup) -> Client {
    moto_server::client(moto(s).port, REGION)
}

/// The store key of a browser's session (default `key_prefix`).
fn key_of(b: &Browser) -> String {
    let cookie = b.cookie().expect("browser has a session cookie");
    format!("session:{}", cookie.split('.').next().unwrap())
}

type Item = HashMap<String, AttributeValue>;

/// The raw item under `key`, expired or not (what moto holds).
async fn raw_item(client: &Client, table: &str, key: &str) -> Option<Item> {
    client
        .get_item()
        .table_name(table)
        .key("id", AttributeValue::S(key.into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item()
        .cloned()
}

async fn item_count(client: &Client, table: &str) -> i32 {
    client
        .scan()
        .table_name(table)
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .count()
}

fn n(item: &Item, name: &str) -> i64 {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().unwrap(),
        other => panic!("{name} is not a number: {other:?}"),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_holds_the_record_expiry_and_version() {
    let s = setup(fixture().await, |b| b.session("lifetime", "1h")).await;
    let b = Browser::new(&s.gw);
    let before = now_ms();
    b.patch("/", json!({"user": "ada"})).await;
    let key = key_of(&b);
    let c = client(&s);
    let item = raw_item(&c, &moto(&s).table, &key).await.expect("item");
    let mut names: Vec<&str> = item.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["data", "expires", "expires_ms", "id", "v"]);
    assert_eq!(item["id"], AttributeValue::S(key.clone()));
    // The header-ready form: a flag byte, then the X-Session value.
    let AttributeValue::B(data) = &item["data"] else {
        panic!("data is not binary: {:?}", item["data"])
    };
    assert_eq!(data.as_ref(), b"P{\"user\":\"ada\"}");
    let expires_ms = n(&item, "expires_ms");
    assert!(
        (before + 3_600_000..=now_ms() + 3_600_000).contains(&expires_ms),
        "expires_ms {expires_ms} is not now + 1h"
    );
    // The TTL attribute: epoch seconds, rounded up.
    assert_eq!(n(&item, "expires"), (expires_ms + 999) / 1000);
    assert!(n(&item, "v") >= 0);
    assert_eq!(
        item_count(&c, &moto(&s).table).await,
        1,
        "one item per session"
    );

    // A change writes a new version.
    let v = n(&item, "v");
    b.patch("/", json!({"n": 2})).await;
    let item = raw_item(&c, &moto(&s).table, &key).await.unwrap();
    assert_ne!(n(&item, "v"), v);
}

/// DynamoDB's TTL may keep an expired item for days (moto never deletes
/// it): the gateway must treat it as gone anyway, and never revive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_item_is_served_as_missing_while_it_still_exists() {
    let s = setup(fixture().await, |b| {
        b.session("lifetime", "2")
            .session("refresh_each_request", "false")
    })
    .await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let key = key_of(&b);
    let cookie = b.cookie().unwrap();
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));
    tokio::time::sleep(Duration::from_millis(2300)).await;

    let c = client(&s);
    let item = raw_item(&c, &moto(&s).table, &key)
        .await
        .expect("moto keeps the expired item");
    assert!(n(&item, "expires_ms") <= now_ms());
    let r = get_with_cookie(&s.gw, "/", &format!("session={cookie}"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.session(), json!({}), "an expired session was served");
    // A write on the old cookie starts a new session; the old item is
    // neither refreshed nor rewritten.
    let r = get_with_cookie(
        &s.gw,
        "/",
        &format!("session={cookie}"),
        &[("x-reply-x-session-patch", r#"{"b":2}"#)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let new_cookie = r.session_cookie().expect("a new session");
    assert!(!new_cookie.contains(cookie.split('.').next().unwrap()));
    let old = raw_item(&c, &moto(&s).table, &key).await.unwrap();
    assert_eq!(old, item, "the expired item changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_extends_the_expiry_without_rewriting_the_record() {
    let s = setup(fixture().await, |b| {
        b.session("lifetime", "100")
            .session("expiry_update_interval", "1s")
    })
    .await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1, "z": "Zoë"})).await;
    let key = key_of(&b);
    let c = client(&s);
    let before = raw_item(&c, &moto(&s).table, &key).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = b.get("/", &[]).await;
    assert_eq!(r.session(), json!({"a": 1, "z": "Zoë"}));
    let after = raw_item(&c, &moto(&s).table, &key).await.unwrap();
    assert_eq!(after["data"], before["data"], "the record was rewritten");
    assert_eq!(after["v"], before["v"], "a touch is not a new version");
    assert!(
        n(&after, "expires_ms") >= n(&before, "expires_ms") + 1000,
        "expiry not extended"
    );
    assert_eq!(n(&after, "expires"), (n(&after, "expires_ms") + 999) / 1000);
}

/// Destroy deletes the item; an update or refresh that arrives later (a
/// slow request of the same session, or another gateway) finds nothing and
/// writes nothing. (Through the gateway, with a real slow request, the
/// protocol suite's `destroyed_session_is_not_revived` covers the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_then_late_patch_leaves_no_item() {
    let s = setup(fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let key = key_of(&b);
    let cookie = b.cookie().unwrap();
    let c = client(&s);
    assert!(raw_item(&c, &moto(&s).table, &key).await.is_some());
    let r = b.get("/", &[("x-reply-x-session-action", "destroy")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(raw_item(&c, &moto(&s).table, &key).await, None);

    let late = s.fx.store().await;
    let ttl = Duration::from_secs(600);
    let patch = |_: &[u8]| Ok(Update::Write(Bytes::from_static(b"P{\"late\":1}")));
    assert_eq!(
        late.update(&key, ttl, &patch).await.unwrap(),
        UpdateOutcome::Missing
    );
    assert!(!late.touch(&key, ttl).await.unwrap());
    assert_eq!(
        raw_item(&c, &moto(&s).table, &key).await,
        None,
        "a late write revived the item"
    );
    assert_eq!(item_count(&c, &moto(&s).table).await, 0);
    let r = get_with_cookie(&s.gw, "/", &format!("session={cookie}"), &[]).await;
    assert_eq!(r.session(), json!({}));
}

// ------------------------------------------------------------ --test

/// A `store:` section on the shared server, with extra keys.
fn shared_yaml(table: &str, extra: &str) -> String {
    format!(
        "{{type: dynamodb, table: {table}, region: {REGION}, endpoint_url: \"{}\"{extra}}}",
        endpoint(shared_port())
    )
}

/// `session-gateway -c <config> --test` for a `store:` section, with the
/// log at `info` (what users run).
fn check(store_yaml: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "listen: 127.0.0.1:1\nupstream: 127.0.0.1:2\nsecret_keys: [\"{KEY_A}\"]\nlog_level: info\nstore: {store_yaml}\n"
    );
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, config).unwrap();
    run_cli_env(&["-c", path.to_str().unwrap(), "--test"], dir.path(), env)
}

async fn create_table(c: &Client, table: &str, key: &str) {
    c.create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name(key)
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(key)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
}

/// The table's TTL status and attribute, as moto reports them.
async fn ttl(c: &Client, table: &str) -> (TimeToLiveStatus, Option<String>) {
    let out = c
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .unwrap();
    let desc = out.time_to_live_description().unwrap();
    (
        desc.time_to_live_status().unwrap().clone(),
        desc.attribute_name().map(str::to_string),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_creates_the_table_and_enables_ttl() {
    let port = shared_port();
    let table = table_name();
    let c = moto_server::client(port, REGION);
    assert!(c.describe_table().table_name(&table).send().await.is_err());
    let yaml = shared_yaml(&table, "");
    let (code, out, err) = check(&yaml, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(
        out.contains(&format!("dynamodb (table {table}, region {REGION}, endpoint http://127.0.0.1:{port}, create_table true) (reachable)")),
        "{out}"
    );
    assert!(!err.contains("WARN"), "{err}");

    let desc = c.describe_table().table_name(&table).send().await.unwrap();
    let t = desc.table().unwrap();
    let keys: Vec<(&str, &KeyType)> = t
        .key_schema()
        .iter()
        .map(|k| (k.attribute_name(), k.key_type()))
        .collect();
    assert_eq!(keys, [("id", &KeyType::Hash)]);
    assert_eq!(
        t.attribute_definitions()[0].attribute_type(),
        &ScalarAttributeType::S
    );
    assert_eq!(
        t.billing_mode_summary().and_then(|b| b.billing_mode()),
        Some(&BillingMode::PayPerRequest)
    );
    assert_eq!(
        ttl(&c, &table).await,
        (TimeToLiveStatus::Enabled, Some("expires".into()))
    );

    // Again, with everything in place: nothing to create, no warning.
    let (code, out, err) = check(&yaml, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("WARN") && !err.contains("created"), "{err}");
}

#[test]
fn missing_table_without_create_table_fails_the_config_test() {
    let table = table_name();
    let yaml = shared_yaml(&table, ", create_table: false");
    let (code, out, err) = check(&yaml, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: store.table:"), "{err}");
    assert!(
        err.contains(&format!("table `{table}` (store.table) does not exist")),
        "{err}"
    );
    assert!(err.contains("store.create_table: true"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_table_without_ttl_passes_with_a_warning() {
    let port = shared_port();
    let table = table_name();
    let c = moto_server::client(port, REGION);
    create_table(&c, &table, "id").await;
    let yaml = shared_yaml(&table, ", create_table: false");
    let (code, out, err) = check(&yaml, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let warning: Vec<&str> = err.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warning.len(), 1, "{err}");
    assert!(
        warning[0].contains("TTL is not enabled on `expires`"),
        "{err}"
    );
    // create_table: false never changes the table.
    assert_eq!(ttl(&c, &table).await.0, TimeToLiveStatus::Disabled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_with_another_key_fails_the_config_test() {
    let port = shared_port();
    let table = table_name();
    let c = moto_server::client(port, REGION);
    create_table(&c, &table, "pk").await;
    let yaml = shared_yaml(&table, "");
    let (code, out, err) = check(&yaml, &[]);
    assert_eq!(code, 1, "{out}{err}");
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error: store.table:"), "{err}");
    assert!(last.contains("[pk HASH]") && last.contains("`id`"), "{err}");
}

#[test]
fn unreachable_endpoint_fails_the_config_test_in_one_line() {
    let port = common::free_port();
    let yaml = format!(
        "{{type: dynamodb, region: {REGION}, endpoint_url: \"{}\"}}",
        endpoint(port)
    );
    let started = Instant::now();
    let (code, out, err) = check(&yaml, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: store.table:"), "{err}");
    assert!(err.contains("store unavailable"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Without `region:` the SDK's chain decides (here AWS_REGION); without
/// any region the error says what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_comes_from_the_environment_when_not_configured() {
    let port = shared_port();
    let table = table_name();
    let yaml = format!(
        "{{type: dynamodb, table: {table}, endpoint_url: \"{}\", timeout: {}ms}}",
        endpoint(port),
        SUITE_TIMEOUT.as_millis()
    );
    let fx = StoreFixture::new(yaml.clone(), ());
    let s = setup(fx, |b| b.env("AWS_REGION", "eu-west-1")).await;
    let b = Browser::new(&s.gw);
    assert_eq!(b.patch("/", json!({"a": 1})).await.status, 200);
    let eu = moto_server::client(port, "eu-west-1");
    assert!(raw_item(&eu, &table, &key_of(&b)).await.is_some());
    let us = moto_server::client(port, REGION);
    assert!(us.describe_table().table_name(&table).send().await.is_err());

    let (code, out, err) = check(&yaml, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("no AWS region: set store.region or AWS_REGION"),
        "{err}"
    );
}

#[test]
fn shipped_config_is_valid() {
    // A private server: the shipped table name is the plain default.
    let server = MotoServer::start();
    let endpoint = format!("endpoint_url: \"{}\"", server.endpoint());
    let (code, out, err) = check_shipped("dynamodb.yaml", &[("endpoint_url: null", &endpoint)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(
        out.contains(&format!(
            "dynamodb (table sessions, region us-east-1, endpoint http://127.0.0.1:{}, create_table true)",
            server.port
        )),
        "{out}"
    );
}

// ------------------------------------------------- a lost answer

/// A TCP proxy in front of moto that, once armed, lets the next request
/// naming `target` (its `X-Amz-Target`) reach moto but cuts the
/// connection instead of passing the answer back: the write happened, the
/// client never heard, and the SDK retries it.
struct AnswerCutter {
    port: u16,
    armed: Arc<std::sync::Mutex<Option<&'static str>>>,
    cut: Arc<AtomicBool>,
}

impl AnswerCutter {
    async fn start(upstream: u16) -> AnswerCutter {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed: Arc<std::sync::Mutex<Option<&'static str>>> = Arc::default();
        let cut = Arc::new(AtomicBool::new(false));
        let (armed2, cut2) = (armed.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let drop_answer = Arc::new(AtomicBool::new(false));
                let (armed, cut, drop2) = (armed2.clone(), cut2.clone(), drop_answer.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        let chunk = &buf[..n];
                        {
                            let mut armed = armed.lock().unwrap();
                            if let Some(target) = *armed {
                                let header = format!("DynamoDB_20120810.{target}");
                                if chunk.windows(header.len()).any(|w| w == header.as_bytes()) {
                                    *armed = None;
                                    drop2.store(true, Ordering::SeqCst);
                                    cut.store(true, Ordering::SeqCst);
                                }
                            }
                        }
                        if sw.write_all(chunk).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = sr.read(&mut buf).await {
                        if drop_answer.load(Ordering::SeqCst) {
                            // Close our side to the client: it reads EOF
                            // where the answer should be.
                            return;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        AnswerCutter { port, armed, cut }
    }

    /// Cut the answer to the next request of this operation (`PutItem`).
    fn arm(&self, target: &'static str) {
        self.cut.store(false, Ordering::SeqCst);
        *self.armed.lock().unwrap() = Some(target);
    }

    fn did_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

/// The SDK retries a conditional write whose answer was lost; the retry
/// finds the condition failed because the first attempt landed. The store
/// must recognize its own write (the version it wrote) instead of
/// reporting a collision, or, for an update, applying the change twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_answer_was_lost_is_not_mistaken_for_a_conflict() {
    let port = shared_port();
    let cutter = AnswerCutter::start(port).await;
    let table = table_name();
    let store = common::open_store(&store_yaml(cutter.port, &table, SUITE_TIMEOUT)).await;
    let ttl = Duration::from_secs(600);

    cutter.arm("PutItem");
    assert!(
        store
            .create("k", &Bytes::from_static(b"a"), ttl)
            .await
            .unwrap(),
        "create reported a collision with its own write"
    );
    assert!(cutter.did_cut(), "the answer was not cut");
    assert_eq!(&store.load("k").await.unwrap().unwrap().value[..], b"a");

    cutter.arm("PutItem");
    let append = |v: &[u8]| {
        let mut v = v.to_vec();
        v.push(b'x');
        Ok(Update::Write(Bytes::from(v)))
    };
    let out = store.update("k", ttl, &append).await.unwrap();
    assert!(cutter.did_cut(), "the answer was not cut");
    assert_eq!(out, UpdateOutcome::Written(Bytes::from_static(b"ax")));
    assert_eq!(
        &store.load("k").await.unwrap().unwrap().value[..],
        b"ax",
        "the update was applied twice"
    );

    cutter.arm("DeleteItem");
    let out = store
        .update("k", ttl, &|_| Ok(Update::Delete))
        .await
        .unwrap();
    assert!(cutter.did_cut(), "the answer was not cut");
    assert_eq!(out, UpdateOutcome::Deleted);
    assert_eq!(store.load("k").await.unwrap(), None);
}

// ------------------------------------------------------------ outages
//
// A stopped moto comes back empty, so after a restart the store creates
// the table again (`create_table: true`); real DynamoDB keeps its tables
// and data.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_within_timeout_then_recovers() {
    let mut s = setup(private_fixture(TIMEOUT), |b| b).await;
    outage::stopped_server_then_recovery(&mut s, TIMEOUT, process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_server_answers_503_within_timeout_then_recovers() {
    let mut s = setup(private_fixture(TIMEOUT), |b| b).await;
    outage::frozen_server_then_recovery(&mut s, TIMEOUT, process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_during_outage_forwards_with_error_header() {
    let mut s = setup(private_fixture(TIMEOUT), |b| {
        b.session("on_store_error", "fail_open")
    })
    .await;
    outage::stopped_server_fail_open(&mut s, TIMEOUT, process).await;
}

/// The server down when the gateway starts: the client is built on the
/// first request that needs it, and a failure is not cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_started_before_the_server_connects_later() {
    let mut s = setup(private_fixture(TIMEOUT), |b| b).await;
    process(&mut s).stop();
    let b = Browser::new(&s.gw);
    let r = b.patch("/", json!({"a": 1})).await;
    assert_eq!(r.status, 503, "{}", r.text);
    process(&mut s).start_again();
    let r = b.patch("/", json!({"a": 1})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));
}
