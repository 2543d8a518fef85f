//! Sealed sessions (`session.seal: true`) against a real Redis, whose
//! contents a test can read like an attacker with a dump would: no key
//! holds an issued id, no value holds the app's data; ciphertexts moved to
//! another key or tampered with give a fresh session, also when the
//! gateway holds the session opened in its open cache (`session.seal_cache: 10000`),
//! and a change through another gateway is read; switching `seal` on or off
//! moves each session to the new form on its first request. (The whole
//! protocol suite also runs sealed for every store: `sealed_suite!`.)
#![cfg(feature = "redis")]

mod common;

use common::gateway::{GatewayBuilder, KEY_A};
use common::protocol::{get_with_cookie, Browser};
use common::redis_server::RedisServer;
use common::Upstream;
use serde_json::json;
use session_gateway::session::seal;
use session_gateway::session::{CookieVerifier, SessionId};

const MARKER: &str = "marker-7f3a9c-in-the-app-data";

fn store_yaml(server: &RedisServer) -> String {
    format!("{{type: redis, url: \"{}\"}}", server.url())
}

fn keys(server: &RedisServer) -> Vec<String> {
    redis::cmd("KEYS")
        .arg("*")
        .query(&mut server.client())
        .unwrap()
}

fn get(server: &RedisServer, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut server.client())
        .unwrap()
}

fn set(server: &RedisServer, key: &str, value: &[u8]) {
    let () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("EX")
        .arg(600)
        .query(&mut server.client())
        .unwrap();
}

fn id_of(b: &Browser) -> String {
    b.cookie().unwrap().split('.').next().unwrap().to_string()
}

/// The sealed store key of the session a cookie value names.
fn sealed_key(cookie: &str) -> String {
    let verifier = CookieVerifier::new(&[KEY_A.as_bytes().to_vec()], 32);
    let id: SessionId = verifier.verify(cookie).expect("the cookie verifies");
    seal::store_key("session:", &id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_dump_reveals_no_id_and_no_data() {
    let server = RedisServer::start();
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, &store_yaml(&server))
        .session("seal", "true")
        .start();
    let mut ids = Vec::new();
    for i in 0..5 {
        let b = Browser::new(&gw);
        b.patch("/", json!({"secret": MARKER, "n": i})).await;
        // Patches, regenerate and refresh all keep the store sealed.
        b.patch("/", json!({"more": MARKER})).await;
        b.get("/", &[("x-reply-x-session-action", "regenerate")])
            .await;
        assert_eq!(
            b.get("/", &[]).await.session(),
            json!({"secret": MARKER, "n": i, "more": MARKER})
        );
        ids.push(b.cookie().unwrap());
    }
    let all = keys(&server);
    assert_eq!(all.len(), 5, "one key per live session: {all:?}");
    for key in &all {
        for cookie in &ids {
            let id = cookie.split('.').next().unwrap();
            assert!(!key.contains(id), "key {key} holds an issued id");
        }
        let value = get(&server, key).unwrap();
        assert!(value.starts_with(b"S2"), "not sealed: {value:?}");
        let text = String::from_utf8_lossy(&value);
        assert!(!text.contains(MARKER) && !text.contains("secret"), "{text}");
    }
    for cookie in &ids {
        assert!(all.contains(&sealed_key(cookie)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_or_tampered_ciphertexts_give_a_fresh_session() {
    let server = RedisServer::start();
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, &store_yaml(&server))
        .session("seal", "true")
        .start();
    let alice = Browser::new(&gw);
    alice.patch("/", json!({"user": "alice"})).await;
    let mallory = Browser::new(&gw);
    mallory.patch("/", json!({"user": "mallory"})).await;

    // Mallory copies Alice's ciphertext over her own key: it does not
    // decrypt there (the key is bound as associated data, and the value
    // key is derived from Alice's id).
    let alice_value = get(&server, &sealed_key(&alice.cookie().unwrap())).unwrap();
    set(
        &server,
        &sealed_key(&mallory.cookie().unwrap()),
        &alice_value,
    );
    let r = mallory.get("/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session(), json!({}));

    // One flipped byte anywhere in Alice's value: a fresh session.
    for at in [0, 2, 10, alice_value.len() / 2, alice_value.len() - 1] {
        let mut bad = alice_value.clone();
        bad[at] ^= 0x40;
        set(&server, &sealed_key(&alice.cookie().unwrap()), &bad);
        let r = alice.get("/", &[]).await;
        assert_eq!(r.status, 200, "byte {at}");
        assert_eq!(r.session(), json!({}), "byte {at}");
    }
    // Restored, it reads again: the failures above changed nothing.
    set(&server, &sealed_key(&alice.cookie().unwrap()), &alice_value);
    assert_eq!(
        alice.get("/", &[]).await.session(),
        json!({"user": "alice"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_seal_on_and_off_moves_sessions_on_first_use() {
    let server = RedisServer::start();
    let up = Upstream::start().await;
    let plain = GatewayBuilder::new(up.port, &store_yaml(&server)).start();
    let b = Browser::new(&plain);
    b.patch("/", json!({"user": "ada"})).await;
    let id = id_of(&b);
    assert!(get(&server, &format!("session:{id}")).is_some());
    let value = b.cookie().unwrap();
    let cookie = format!("session={value}");
    drop(plain);

    // Seal on: the plain session is found, moved, and keeps working.
    let sealed = GatewayBuilder::new(up.port, &store_yaml(&server))
        .session("seal", "true")
        .start();
    let r = get_with_cookie(&sealed, "/", &cookie, &[]).await;
    assert_eq!(r.session(), json!({"user": "ada"}));
    assert!(
        get(&server, &format!("session:{id}")).is_none(),
        "plain copy left"
    );
    let moved = get(&server, &sealed_key(&value)).expect("sealed copy");
    assert!(moved.starts_with(b"S2"));
    let r = get_with_cookie(
        &sealed,
        "/",
        &cookie,
        &[("x-reply-x-session-patch", r#"{"n":1}"#)],
    )
    .await;
    assert_eq!(r.status, 200);
    drop(sealed);

    // Seal off again: moved back to the plain form, data intact.
    let plain = GatewayBuilder::new(up.port, &store_yaml(&server)).start();
    let r = get_with_cookie(&plain, "/", &cookie, &[]).await;
    assert_eq!(r.session(), json!({"user": "ada", "n": 1}));
    assert!(
        get(&server, &sealed_key(&value)).is_none(),
        "sealed copy left"
    );
    assert_eq!(
        get(&server, &format!("session:{id}")).unwrap(),
        br#"P{"n":1,"user":"ada"}"#
    );
}

/// The session id a cookie value names.
fn id_in(cookie: &str) -> SessionId {
    let verifier = CookieVerifier::new(&[KEY_A.as_bytes().to_vec()], 32);
    verifier.verify(cookie).expect("the cookie verifies")
}

/// A sealed gateway on `server`; `seal_cache: None` keeps the default.
fn sealed_gateway(
    up: &Upstream,
    server: &RedisServer,
    seal_cache: Option<&str>,
) -> common::gateway::Gateway {
    let mut b = GatewayBuilder::new(up.port, &store_yaml(server)).session("seal", "true");
    if let Some(n) = seal_cache {
        b = b.session("seal_cache", n);
    }
    b.start()
}

/// The open cache (`session.seal_cache`, off by default) answers a read
/// only while Redis holds exactly the value it opened: a session read (so
/// cached), then tampered with, is no session; a value sealed anew for it
/// is read; the original, restored, reads again. The same without the
/// cache (the default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_session_tampered_with_gives_a_fresh_session() {
    let server = RedisServer::start();
    let up = Upstream::start().await;
    for seal_cache in [Some("10000"), None] {
        let gw = sealed_gateway(&up, &server, seal_cache);
        let alice = Browser::new(&gw);
        alice.patch("/", json!({"user": "alice"})).await;
        assert_eq!(
            alice.get("/", &[]).await.session(),
            json!({"user": "alice"})
        );
        let cookie = alice.cookie().unwrap();
        let key = sealed_key(&cookie);
        let value = get(&server, &key).unwrap();
        for at in [0, 2, 10, value.len() / 2, value.len() - 1] {
            let mut bad = value.clone();
            bad[at] ^= 0x01;
            set(&server, &key, &bad);
            let r = alice.get("/", &[]).await;
            assert_eq!(r.status, 200, "{seal_cache:?}: byte {at}");
            assert_eq!(r.session(), json!({}), "{seal_cache:?}: byte {at}");
        }
        // A valid value written by someone else (another gateway) is what
        // the next read gets, not the plaintext cached for the old one.
        let id = id_in(&cookie);
        set(&server, &key, &seal::seal(br#"P{"user":"eve"}"#, &id, &key));
        assert_eq!(alice.get("/", &[]).await.session(), json!({"user": "eve"}));
        set(&server, &key, &value);
        assert_eq!(
            alice.get("/", &[]).await.session(),
            json!({"user": "alice"}),
            "{seal_cache:?}"
        );
    }
}

/// Alice's ciphertext copied over Bob's key after both sessions were read
/// (both cached): Bob gets a fresh session, never Alice's data, and
/// Alice's own session is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ciphertext_moved_between_cached_sessions_does_not_load() {
    let server = RedisServer::start();
    let up = Upstream::start().await;
    let gw = sealed_gateway(&up, &server, Some("10000"));
    let alice = Browser::new(&gw);
    alice.patch("/", json!({"user": "alice"})).await;
    let bob = Browser::new(&gw);
    bob.patch("/", json!({"user": "bob"})).await;
    assert_eq!(
        alice.get("/", &[]).await.session(),
        json!({"user": "alice"})
    );
    assert_eq!(bob.get("/", &[]).await.session(), json!({"user": "bob"}));

    let alice_key = sealed_key(&alice.cookie().unwrap());
    let bob_key = sealed_key(&bob.cookie().unwrap());
    let alice_value = get(&server, &alice_key).unwrap();
    let bob_value = get(&server, &bob_key).unwrap();
    set(&server, &bob_key, &alice_value);
    let r = bob.get("/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session(), json!({}));
    assert_eq!(
        alice.get("/", &[]).await.session(),
        json!({"user": "alice"})
    );
    set(&server, &bob_key, &bob_value);
    assert_eq!(bob.get("/", &[]).await.session(), json!({"user": "bob"}));
}

/// Two sealed gateways on one Redis: a change made through one is what
/// the other reads next, although it had the session cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_another_gateway_is_read_despite_the_cache() {
    let server = RedisServer::start();
    let up = Upstream::start().await;
    let a = sealed_gateway(&up, &server, Some("10000"));
    let b = sealed_gateway(&up, &server, Some("10000"));
    let browser = Browser::new(&a);
    browser.patch("/", json!({"n": 1})).await;
    assert_eq!(browser.get("/", &[]).await.session(), json!({"n": 1}));
    let cookie = format!("session={}", browser.cookie().unwrap());
    for n in 2..5 {
        let patch = format!(r#"{{"n":{n}}}"#);
        let r = get_with_cookie(&b, "/", &cookie, &[("x-reply-x-session-patch", &patch)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(browser.get("/", &[]).await.session(), json!({ "n": n }));
    }
    // Destroyed through b: gone on a too.
    get_with_cookie(&b, "/", &cookie, &[("x-reply-x-session-action", "destroy")]).await;
    assert_eq!(browser.get("/", &[]).await.session(), json!({}));
}
