//! The Memcached store over three private `memcached` servers: the store
//! contract and the protocol suite, sessions spread over the servers, a
//! stopped or frozen server failing only the sessions it holds (503,
//! fail_closed) while the others work, recovery when it is back, and
//! adding a server keeping most sessions where they are.
#![cfg(feature = "memcached")]

mod common;

use common::memcached_server::{holder, store_yaml, MemcachedServer};
use common::outage;
use common::protocol::{get_with_cookie, setup, Browser, Setup};
use common::{GatewayBuilder, StoreFixture};
use serde_json::json;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_millis(500);
const SESSIONS: usize = 30;

fn start(n: usize) -> Vec<MemcachedServer> {
    (0..n).map(|_| MemcachedServer::start()).collect()
}

fn yaml(servers: &[MemcachedServer]) -> String {
    let refs: Vec<&MemcachedServer> = servers.iter().collect();
    store_yaml(&refs, TIMEOUT.as_millis() as u64)
}

async fn fixture() -> StoreFixture {
    let servers = start(3);
    StoreFixture::new(yaml(&servers), servers)
}

store_suites!(fixture);
persistence_suite!(fixture);

fn servers(s: &Setup) -> &[MemcachedServer] {
    s.fx.guard.downcast_ref::<Vec<MemcachedServer>>().unwrap()
}

fn servers_mut(s: &mut Setup) -> &mut Vec<MemcachedServer> {
    s.fx.guard.downcast_mut().unwrap()
}

fn key_of(b: &Browser) -> String {
    let cookie = b.cookie().expect("browser has a session cookie");
    format!("session:{}", cookie.split('.').next().unwrap())
}

/// `SESSIONS` browsers with a session `{"n": i}` each, and the index of
/// the server holding each one.
async fn sessions(s: &Setup) -> (Vec<Browser>, Vec<usize>) {
    let mut browsers = Vec::new();
    let mut owners = Vec::new();
    let refs: Vec<&MemcachedServer> = servers(s).iter().collect();
    for i in 0..SESSIONS {
        let b = Browser::new(&s.gw);
        let r = b.patch("/", json!({ "n": i })).await;
        assert_eq!(r.status, 200, "{}", r.text);
        owners.push(holder(&refs, &key_of(&b)).expect("the session is on a server"));
        browsers.push(b);
    }
    (browsers, owners)
}

/// The server holding the most sessions.
fn busiest(owners: &[usize], n: usize) -> usize {
    let counts: Vec<usize> = (0..n)
        .map(|i| owners.iter().filter(|&&o| o == i).count())
        .collect();
    assert!(
        counts.iter().filter(|&&c| c > 0).count() >= 2,
        "all sessions on one server: {counts:?}"
    );
    (0..n).max_by_key(|&i| counts[i]).unwrap()
}

/// Every session of `victim` gets 503 within the timeout (the app is not
/// contacted); every other one its data, without waiting for it.
async fn only_victims_fail(s: &Setup, browsers: &[Browser], owners: &[usize], victim: usize) {
    let hits = s.up.hits();
    let mut served = 0;
    for (i, b) in browsers.iter().enumerate() {
        if owners[i] == victim {
            outage::expect_503(b, TIMEOUT, Duration::ZERO).await;
            continue;
        }
        let started = Instant::now();
        let r = b.get("/", &[]).await;
        let took = started.elapsed();
        assert_eq!(r.status, 200, "session {i}: {}", r.text);
        assert_eq!(r.session(), json!({ "n": i }));
        assert!(
            took < TIMEOUT,
            "session {i} waited for the failed server: {took:?}"
        );
        served += 1;
    }
    assert_eq!(
        s.up.hits(),
        hits + served,
        "a failed session reached the app"
    );
}

/// One of three servers stopped: only its sessions get 503 (fail_closed),
/// within the timeout, the rest work. Started again (empty: memcached
/// keeps nothing across a restart): every request succeeds, its sessions
/// start fresh, the others are untouched, and new sessions land on it
/// again, all without restarting the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_fails_only_its_sessions_then_recovers() {
    let mut s = setup(fixture().await, |b| b).await;
    let (browsers, owners) = sessions(&s).await;
    let victim = busiest(&owners, 3);

    servers_mut(&mut s)[victim].process.stop();
    only_victims_fail(&s, &browsers, &owners, victim).await;

    servers_mut(&mut s)[victim].process.start_again();
    for (i, b) in browsers.iter().enumerate() {
        let cookie = format!("session={}", b.cookie().unwrap());
        let r = get_with_cookie(&s.gw, "/", &cookie, &[]).await;
        assert_eq!(r.status, 200, "session {i} after the restart: {}", r.text);
        let expected = if owners[i] == victim {
            json!({})
        } else {
            json!({ "n": i })
        };
        assert_eq!(r.session(), expected, "session {i}");
    }
    let refs: Vec<&MemcachedServer> = servers(&s).iter().collect();
    let mut on_victim = 0;
    for _ in 0..SESSIONS {
        let b = Browser::new(&s.gw);
        assert_eq!(b.patch("/", json!({"again": 1})).await.status, 200);
        on_victim += usize::from(holder(&refs, &key_of(&b)) == Some(victim));
    }
    assert!(
        on_victim > 0,
        "no new session landed on the restarted server"
    );
}

/// One of three servers frozen (SIGSTOP): its sessions get 503 after
/// `store.timeout`, the others are served at once; thawed, it serves its
/// sessions again, data intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_holds_up_only_its_sessions() {
    let s = setup(fixture().await, |b| b).await;
    let (browsers, owners) = sessions(&s).await;
    let victim = busiest(&owners, 3);

    servers(&s)[victim].process.pause();
    only_victims_fail(&s, &browsers, &owners, victim).await;
    servers(&s)[victim].process.resume();
    for (i, b) in browsers.iter().enumerate() {
        let r = b.get("/", &[]).await;
        assert_eq!(r.status, 200, "session {i}: {}", r.text);
        assert_eq!(r.session(), json!({ "n": i }), "session {i}");
    }
}

/// A fourth server added to the list (a second gateway configured with
/// it): rendezvous hashing moves only the sessions the new server wins,
/// about a quarter; the others are found where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_server_keeps_most_sessions_in_place() {
    let s = setup(fixture().await, |b| b).await;
    let (browsers, _) = sessions(&s).await;
    let fourth = MemcachedServer::start();
    let mut addrs: Vec<&MemcachedServer> = servers(&s).iter().collect();
    addrs.push(&fourth);
    let wider = GatewayBuilder::new(s.up.port, &store_yaml(&addrs, 500)).start();
    let mut found = 0;
    for (i, b) in browsers.iter().enumerate() {
        let cookie = format!("session={}", b.cookie().unwrap());
        let r = get_with_cookie(&wider, "/", &cookie, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if r.session() == json!({ "n": i }) {
            found += 1;
        } else {
            assert_eq!(r.session(), json!({}), "session {i}");
        }
    }
    // Expected 3/4 of 30; 12 is more than four standard deviations below.
    assert!(
        (12..=SESSIONS).contains(&found),
        "{found} of {SESSIONS} sessions found"
    );
}
