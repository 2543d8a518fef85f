//! The store contract: one behaviour suite every [`SessionStore`] must
//! pass. `store_suites!(fixture)` instantiates it, together with the HTTP
//! protocol suite, from one `async fn fixture() -> StoreFixture`.

use bytes::Bytes;
use serde_json::{json, Map, Value};
use session_gateway::session::{SessionRecord, SessionStore, StoreError, Update, UpdateOutcome};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub type Store = Arc<dyn SessionStore>;

const TTL: Duration = Duration::from_secs(600);

fn key(tag: &str) -> String {
    format!("contract:{}", super::unique(tag))
}

fn record(v: Value) -> SessionRecord {
    let Value::Object(data) = v else {
        panic!("object")
    };
    SessionRecord {
        permanent: true,
        data,
    }
}

/// Stores keep opaque bytes; the contract stores encoded records.
fn enc(v: Value) -> Bytes {
    record(v).encode()
}

fn dec(value: &[u8]) -> SessionRecord {
    SessionRecord::from_stored(value).expect("the store returned what was stored")
}

/// An update step that edits the decoded record.
fn edit(
    f: impl Fn(&mut SessionRecord) + Send + Sync,
) -> impl Fn(&[u8]) -> Result<Update, String> + Send + Sync {
    move |current: &[u8]| {
        let mut r = dec(current);
        f(&mut r);
        Ok(Update::Write(r.encode()))
    }
}

fn patch(v: Value) -> Map<String, Value> {
    let Value::Object(m) = v else {
        panic!("object")
    };
    m
}

fn assert_expiry_near(expires_at: SystemTime, ttl: Duration) {
    let expected = SystemTime::now() + ttl;
    let diff = match expires_at.duration_since(expected) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(diff < Duration::from_secs(3), "expiry off by {diff:?}");
}

pub async fn load_missing_is_none(store: Store) {
    assert_eq!(store.load(&key("missing")).await.unwrap(), None);
}

pub async fn create_then_load(store: Store) {
    let k = key("create");
    let rec = enc(json!({"user": "ada", "n": 1, "nested": {"a": [1, 2]}, "uni": "Zoë"}));
    assert!(store.create(&k, &rec, TTL).await.unwrap());
    let loaded = store.load(&k).await.unwrap().expect("created entry loads");
    assert_eq!(loaded.value, rec, "a store returns the bytes it was given");
    assert_expiry_near(loaded.expires_at, TTL);
}

pub async fn create_does_not_overwrite(store: Store) {
    let k = key("twice");
    assert!(store.create(&k, &enc(json!({"v": 1})), TTL).await.unwrap());
    assert!(!store.create(&k, &enc(json!({"v": 2})), TTL).await.unwrap());
    assert_eq!(
        dec(&store.load(&k).await.unwrap().unwrap().value).data["v"],
        1
    );
}

pub async fn transient_flag_round_trips(store: Store) {
    let k = key("transient");
    let mut rec = record(json!({"v": 1}));
    rec.permanent = false;
    assert!(store.create(&k, &rec.encode(), TTL).await.unwrap());
    assert!(!dec(&store.load(&k).await.unwrap().unwrap().value).permanent);
}

pub async fn update_missing_writes_nothing(store: Store) {
    let k = key("upd-missing");
    let out = store
        .update(&k, TTL, &|r: &[u8]| {
            Ok(Update::Write(Bytes::copy_from_slice(r)))
        })
        .await
        .unwrap();
    assert_eq!(out, UpdateOutcome::Missing);
    assert_eq!(
        store.load(&k).await.unwrap(),
        None,
        "update must never create"
    );
}

pub async fn update_writes_and_resets_expiry(store: Store) {
    let k = key("upd");
    assert!(store
        .create(&k, &enc(json!({"a": 1})), Duration::from_secs(60))
        .await
        .unwrap());
    let out = store
        .update(
            &k,
            TTL,
            &edit(|r| {
                session_gateway::session::merge_patch(
                    &mut r.data,
                    &patch(json!({"b": 2, "a": null})),
                )
            }),
        )
        .await
        .unwrap();
    assert_eq!(out, UpdateOutcome::Written(enc(json!({"b": 2}))));
    let loaded = store.load(&k).await.unwrap().unwrap();
    assert_eq!(loaded.value, enc(json!({"b": 2})));
    assert_expiry_near(loaded.expires_at, TTL);
}

pub async fn update_can_delete(store: Store) {
    let k = key("upd-del");
    assert!(store.create(&k, &enc(json!({"a": 1})), TTL).await.unwrap());
    let out = store
        .update(&k, TTL, &|_| Ok(Update::Delete))
        .await
        .unwrap();
    assert_eq!(out, UpdateOutcome::Deleted);
    assert_eq!(store.load(&k).await.unwrap(), None);
}

pub async fn rejected_update_changes_nothing(store: Store) {
    let k = key("upd-rej");
    let rec = enc(json!({"a": 1}));
    assert!(store.create(&k, &rec, TTL).await.unwrap());
    let err = store
        .update(&k, TTL, &|_| Err("too big".to_string()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Rejected(ref m) if m == "too big"),
        "{err:?}"
    );
    assert_eq!(store.load(&k).await.unwrap().unwrap().value, rec);
    // An unreadable current value is treated as a missing session.
    let out = store
        .update(&k, TTL, &|_| Ok(Update::Unreadable))
        .await
        .unwrap();
    assert_eq!(out, UpdateOutcome::Missing);
    assert_eq!(store.load(&k).await.unwrap().unwrap().value, rec);
}

pub async fn delete_is_idempotent(store: Store) {
    let k = key("del");
    assert!(store.create(&k, &enc(json!({"a": 1})), TTL).await.unwrap());
    store.delete(&k).await.unwrap();
    store.delete(&k).await.unwrap();
    assert_eq!(store.load(&k).await.unwrap(), None);
}

pub async fn touch_extends_without_changing_data(store: Store) {
    let k = key("touch");
    let rec = enc(json!({"a": 1}));
    assert!(store
        .create(&k, &rec, Duration::from_secs(60))
        .await
        .unwrap());
    assert!(store.touch(&k, TTL).await.unwrap());
    let loaded = store.load(&k).await.unwrap().unwrap();
    assert_eq!(loaded.value, rec);
    assert_expiry_near(loaded.expires_at, TTL);
    let missing = key("touch-missing");
    assert!(!store.touch(&missing, TTL).await.unwrap());
    assert_eq!(
        store.load(&missing).await.unwrap(),
        None,
        "touch must never create"
    );
}

pub async fn expired_entries_are_gone(store: Store) {
    let k = key("expire");
    assert!(store
        .create(&k, &enc(json!({"a": 1})), Duration::from_secs(1))
        .await
        .unwrap());
    assert!(store.load(&k).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        store.load(&k).await.unwrap(),
        None,
        "expired entry still loads"
    );
    assert!(
        !store.touch(&k, TTL).await.unwrap(),
        "touch revived an expired entry"
    );
    let out = store
        .update(&k, TTL, &|r| Ok(Update::Write(Bytes::copy_from_slice(r))))
        .await
        .unwrap();
    assert_eq!(
        out,
        UpdateOutcome::Missing,
        "update revived an expired entry"
    );
    assert!(
        store.create(&k, &enc(json!({"b": 2})), TTL).await.unwrap(),
        "create over an expired entry"
    );
    assert_eq!(
        dec(&store.load(&k).await.unwrap().unwrap().value).data["b"],
        2
    );
}

pub async fn purge_removes_only_expired(store: Store) {
    let old = key("purge-old");
    let live = key("purge-live");
    assert!(store
        .create(&old, &enc(json!({"a": 1})), Duration::from_secs(1))
        .await
        .unwrap());
    assert!(store
        .create(&live, &enc(json!({"a": 2})), TTL)
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    store.purge_expired().await.unwrap();
    assert_eq!(store.load(&old).await.unwrap(), None);
    assert!(
        store.load(&live).await.unwrap().is_some(),
        "purge removed a live entry"
    );
}

/// 50 concurrent read-modify-writes of one entry, each adding its own key:
/// none may be lost.
pub async fn concurrent_updates_lose_nothing(store: Store) {
    concurrent_updates_through(&[store], &key("concurrent")).await;
}

/// 50 concurrent read-modify-writes of `key`, spread round-robin over
/// `stores` (several handles stand for several gateways), each adding its
/// own field: none may be lost.
pub async fn concurrent_updates_through(stores: &[Store], key: &str) {
    assert!(stores[0]
        .create(key, &enc(json!({"start": true})), TTL)
        .await
        .unwrap());
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let k = key.to_string();
            tokio::spawn(async move {
                let add_field = edit(move |r| {
                    r.data.insert(format!("k{i}"), json!(i));
                });
                store.update(&k, TTL, &add_field).await
            })
        })
        .collect();
    for t in tasks {
        assert!(matches!(
            t.await.unwrap().unwrap(),
            UpdateOutcome::Written(_)
        ));
    }
    let data = dec(&stores[0].load(key).await.unwrap().unwrap().value).data;
    for i in 0..50 {
        assert_eq!(data.get(&format!("k{i}")), Some(&json!(i)), "lost k{i}");
    }
}

/// `update_seen` with the value the store holds behaves as `update`; with
/// a value replaced since it was seen, the update applies to the current
/// value (the other write is kept, never overwritten with a stale base);
/// with an expired or deleted entry, nothing is written; a refusal or an
/// "unreadable" decided on the seen value is decided again on the current
/// one.
pub async fn update_seen_applies_to_the_current_value(store: Store) {
    let add_mine = edit(|r| {
        r.data.insert("mine".into(), json!(true));
    });
    let k = key("seen");
    let seen = enc(json!({"a": 1}));
    assert!(store.create(&k, &seen, TTL).await.unwrap());
    let out = store.update_seen(&k, TTL, &seen, &add_mine).await.unwrap();
    let mine = enc(json!({"a": 1, "mine": true}));
    assert_eq!(out, UpdateOutcome::Written(mine.clone()));
    assert_eq!(store.load(&k).await.unwrap().unwrap().value, mine);

    // Stale: `seen` is no longer what the store holds.
    let out = store.update_seen(&k, TTL, &seen, &add_mine).await.unwrap();
    assert_eq!(out, UpdateOutcome::Written(mine.clone()));
    let theirs = enc(json!({"theirs": 1}));
    store
        .update(&k, TTL, &|_| Ok(Update::Write(theirs.clone())))
        .await
        .unwrap();
    let out = store.update_seen(&k, TTL, &mine, &add_mine).await.unwrap();
    let both = enc(json!({"theirs": 1, "mine": true}));
    assert_eq!(out, UpdateOutcome::Written(both.clone()));
    assert_eq!(store.load(&k).await.unwrap().unwrap().value, both);

    // Refused or unreadable on the seen value, fine on the current one.
    let picky = |v: &[u8]| {
        if v == &seen[..] {
            return Err("too big".to_string());
        }
        if v == &mine[..] {
            return Ok(Update::Unreadable);
        }
        Ok(Update::Delete)
    };
    let out = store.update_seen(&k, TTL, &seen, &picky).await.unwrap();
    assert_eq!(out, UpdateOutcome::Deleted);
    assert_eq!(store.load(&k).await.unwrap(), None);
    assert!(store.create(&k, &both, TTL).await.unwrap());
    let out = store.update_seen(&k, TTL, &mine, &picky).await.unwrap();
    assert_eq!(out, UpdateOutcome::Deleted);

    // Gone: deleted, or expired, since it was seen.
    let out = store.update_seen(&k, TTL, &both, &add_mine).await.unwrap();
    assert_eq!(out, UpdateOutcome::Missing);
    assert_eq!(
        store.load(&k).await.unwrap(),
        None,
        "revived a deleted entry"
    );
    assert!(store
        .create(&k, &seen, Duration::from_secs(1))
        .await
        .unwrap());
    // As in `expired_entries_are_gone`: some stores count whole seconds.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let out = store.update_seen(&k, TTL, &seen, &add_mine).await.unwrap();
    assert_eq!(out, UpdateOutcome::Missing);
    assert_eq!(
        store.load(&k).await.unwrap(),
        None,
        "revived an expired entry"
    );
}

/// Load `key` through `store` until the near cache answers.
pub async fn load_until_cached(store: &Store, key: &str) {
    for _ in 0..200 {
        let before = store.near_cache_stats().unwrap().hits;
        store.load(key).await.unwrap().unwrap();
        if store.near_cache_stats().unwrap().hits > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{key} never came from the near cache");
}

pub async fn check_succeeds(store: Store) {
    store.check().await.unwrap();
}

/// Instantiate the whole contract for one backend's fixture:
/// `store_contract!(fixture)` with `async fn fixture() -> StoreFixture`.
#[macro_export]
macro_rules! store_contract {
    ($fixture:ident; $($name:ident),* $(,)?) => {
        mod store_contract {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fixture = super::$fixture().await;
                    $crate::common::contract::$name(fixture.store().await).await;
                }
            )*
        }
    };
    ($fixture:ident) => {
        $crate::store_contract!($fixture;
            load_missing_is_none,
            create_then_load,
            create_does_not_overwrite,
            transient_flag_round_trips,
            update_missing_writes_nothing,
            update_writes_and_resets_expiry,
            update_can_delete,
            rejected_update_changes_nothing,
            delete_is_idempotent,
            touch_extends_without_changing_data,
            expired_entries_are_gone,
            purge_removes_only_expired,
            concurrent_updates_lose_nothing,
            update_seen_applies_to_the_current_value,
            check_succeeds,
        );
    };
}

/// The store contract and the HTTP protocol suite, both from one fixture.
#[macro_export]
macro_rules! store_suites {
    ($fixture:ident) => {
        $crate::store_contract!($fixture);
        $crate::protocol_suite!($fixture);
    };
}
