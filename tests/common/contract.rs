//! The store contract: one behaviour suite every [`SessionStore`] must
//! pass, instantiated per backend with `store_contract!(make_fn)` where
//! `make_fn` is `async fn() -> (Arc<dyn SessionStore>, impl Drop-guard)`.

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
    let rec = record(json!({"user": "ada", "n": 1, "nested": {"a": [1, 2]}, "uni": "Zoë"}));
    assert!(store.create(&k, &rec, TTL).await.unwrap());
    let loaded = store.load(&k).await.unwrap().expect("created entry loads");
    assert_eq!(loaded.record, rec);
    assert_expiry_near(loaded.expires_at, TTL);
}

pub async fn create_does_not_overwrite(store: Store) {
    let k = key("twice");
    assert!(store
        .create(&k, &record(json!({"v": 1})), TTL)
        .await
        .unwrap());
    assert!(!store
        .create(&k, &record(json!({"v": 2})), TTL)
        .await
        .unwrap());
    assert_eq!(store.load(&k).await.unwrap().unwrap().record.data["v"], 1);
}

pub async fn transient_flag_round_trips(store: Store) {
    let k = key("transient");
    let mut rec = record(json!({"v": 1}));
    rec.permanent = false;
    assert!(store.create(&k, &rec, TTL).await.unwrap());
    assert!(!store.load(&k).await.unwrap().unwrap().record.permanent);
}

pub async fn update_missing_writes_nothing(store: Store) {
    let k = key("upd-missing");
    let out = store
        .update(&k, TTL, &|r: SessionRecord| Ok(Update::Write(r)))
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
        .create(&k, &record(json!({"a": 1})), Duration::from_secs(60))
        .await
        .unwrap());
    let out = store
        .update(&k, TTL, &|mut r: SessionRecord| {
            session_gateway::session::merge_patch(&mut r.data, &patch(json!({"b": 2, "a": null})));
            Ok(Update::Write(r))
        })
        .await
        .unwrap();
    assert_eq!(out, UpdateOutcome::Written(record(json!({"b": 2}))));
    let loaded = store.load(&k).await.unwrap().unwrap();
    assert_eq!(loaded.record, record(json!({"b": 2})));
    assert_expiry_near(loaded.expires_at, TTL);
}

pub async fn update_can_delete(store: Store) {
    let k = key("upd-del");
    assert!(store
        .create(&k, &record(json!({"a": 1})), TTL)
        .await
        .unwrap());
    let out = store
        .update(&k, TTL, &|_| Ok(Update::Delete))
        .await
        .unwrap();
    assert_eq!(out, UpdateOutcome::Deleted);
    assert_eq!(store.load(&k).await.unwrap(), None);
}

pub async fn rejected_update_changes_nothing(store: Store) {
    let k = key("upd-rej");
    let rec = record(json!({"a": 1}));
    assert!(store.create(&k, &rec, TTL).await.unwrap());
    let err = store
        .update(&k, TTL, &|_| Err("too big".to_string()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Rejected(ref m) if m == "too big"),
        "{err:?}"
    );
    assert_eq!(store.load(&k).await.unwrap().unwrap().record, rec);
}

pub async fn delete_is_idempotent(store: Store) {
    let k = key("del");
    assert!(store
        .create(&k, &record(json!({"a": 1})), TTL)
        .await
        .unwrap());
    store.delete(&k).await.unwrap();
    store.delete(&k).await.unwrap();
    assert_eq!(store.load(&k).await.unwrap(), None);
}

pub async fn touch_extends_without_changing_data(store: Store) {
    let k = key("touch");
    let rec = record(json!({"a": 1}));
    assert!(store
        .create(&k, &rec, Duration::from_secs(60))
        .await
        .unwrap());
    assert!(store.touch(&k, TTL).await.unwrap());
    let loaded = store.load(&k).await.unwrap().unwrap();
    assert_eq!(loaded.record, rec);
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
        .create(&k, &record(json!({"a": 1})), Duration::from_secs(1))
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
        .update(&k, TTL, &|r| Ok(Update::Write(r)))
        .await
        .unwrap();
    assert_eq!(
        out,
        UpdateOutcome::Missing,
        "update revived an expired entry"
    );
    assert!(
        store
            .create(&k, &record(json!({"b": 2})), TTL)
            .await
            .unwrap(),
        "create over an expired entry"
    );
    assert_eq!(store.load(&k).await.unwrap().unwrap().record.data["b"], 2);
}

pub async fn purge_removes_only_expired(store: Store) {
    let old = key("purge-old");
    let live = key("purge-live");
    assert!(store
        .create(&old, &record(json!({"a": 1})), Duration::from_secs(1))
        .await
        .unwrap());
    assert!(store
        .create(&live, &record(json!({"a": 2})), TTL)
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
        .create(key, &record(json!({"start": true})), TTL)
        .await
        .unwrap());
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let k = key.to_string();
            tokio::spawn(async move {
                let field = format!("k{i}");
                store
                    .update(&k, TTL, &|mut r: SessionRecord| {
                        r.data.insert(field.clone(), json!(i));
                        Ok(Update::Write(r))
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert!(matches!(
            t.await.unwrap().unwrap(),
            UpdateOutcome::Written(_)
        ));
    }
    let data = stores[0].load(key).await.unwrap().unwrap().record.data;
    for i in 0..50 {
        assert_eq!(data.get(&format!("k{i}")), Some(&json!(i)), "lost k{i}");
    }
}

pub async fn check_succeeds(store: Store) {
    store.check().await.unwrap();
}

/// Instantiate the whole contract for one backend:
/// `store_contract!(make)` with `async fn make() -> (Arc<dyn SessionStore>, G)`.
#[macro_export]
macro_rules! store_contract {
    ($make:ident; $($name:ident),* $(,)?) => {
        mod store_contract {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _guard) = super::$make().await;
                    $crate::common::contract::$name(store).await;
                }
            )*
        }
    };
    ($make:ident) => {
        $crate::store_contract!($make;
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
            check_succeeds,
        );
    };
}
