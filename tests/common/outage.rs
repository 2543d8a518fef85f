//! Outage cases any store with a server can share, through the real
//! gateway: the server stopped (fail_closed: 503 within `store.timeout`
//! without contacting the app; once it is back the next request succeeds,
//! without restarting the gateway), frozen with SIGSTOP (503 after the
//! timeout, then the data is served again), and fail_open. A test file
//! passes its [`Setup`] and how to reach its [`ServerProcess`] in it.

use super::protocol::{Browser, Setup};
use super::server::ServerProcess;
use serde_json::json;
use std::time::{Duration, Instant};

/// How much later than `store.timeout` a 503 may arrive (process
/// scheduling on a busy CI machine).
pub const MARGIN: Duration = Duration::from_millis(400);

/// Where a test's server lives in its [`Setup`].
pub type ServerOf = fn(&mut Setup) -> &mut ServerProcess;

/// GET `/` and expect a fail_closed 503 within `timeout` (+ [`MARGIN`]),
/// not sooner than `at_least`; the time it took.
pub async fn expect_503(b: &Browser, timeout: Duration, at_least: Duration) -> Duration {
    let started = Instant::now();
    let r = b.get("/", &[]).await;
    let took = started.elapsed();
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(r.text.contains("session store unavailable"), "{}", r.text);
    assert!(took < timeout + MARGIN, "503 took {took:?}");
    assert!(
        took >= at_least,
        "503 after {took:?}, expected at least {at_least:?}"
    );
    took
}

/// Stop the server mid-test: 503s within the timeout and the app not
/// contacted (a new visitor's write fails too); started again on the same
/// port, requests succeed and sessions work again.
pub async fn stopped_server_then_recovery(s: &mut Setup, timeout: Duration, server: ServerOf) {
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));

    server(s).stop();
    let hits = s.up.hits();
    for _ in 0..3 {
        expect_503(&b, timeout, Duration::ZERO).await;
    }
    let r = Browser::new(&s.gw).patch("/", json!({"n": 1})).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.session_cookie(), None);
    assert_eq!(
        s.up.hits(),
        hits + 1,
        "only the new visitor reached the app"
    );

    server(s).start_again();
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(b.patch("/", json!({"back": true})).await.status, 200);
    assert_eq!(b.get("/", &[]).await.session()["back"], json!(true));
    let fresh = Browser::new(&s.gw);
    assert_eq!(fresh.patch("/", json!({"f": 1})).await.status, 200);
    assert_eq!(fresh.get("/", &[]).await.session(), json!({"f": 1}));
}

/// Freeze the server (connections open, no answers): requests are not
/// held beyond the timeout; thawed, the same data is served and written.
pub async fn frozen_server_then_recovery(s: &mut Setup, timeout: Duration, server: ServerOf) {
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;

    server(s).pause();
    for _ in 0..2 {
        expect_503(&b, timeout, timeout - Duration::from_millis(50)).await;
    }
    server(s).resume();
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.session(), json!({"a": 1}), "the data survived the freeze");
    assert_eq!(b.patch("/", json!({"b": 2})).await.status, 200);
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1, "b": 2}));
}

/// With `session.on_store_error: fail_open` (the caller's gateway): a
/// request during the outage reaches the app without a session, flagged,
/// and nothing is written back.
pub async fn stopped_server_fail_open(s: &mut Setup, timeout: Duration, server: ServerOf) {
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    server(s).stop();
    let started = Instant::now();
    let r = b.patch("/", json!({"b": 2})).await;
    assert!(started.elapsed() < timeout + MARGIN);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.session(), json!({}));
    assert_eq!(
        r.upstream_header("x-session-error").as_deref(),
        Some("store-unavailable")
    );
    assert_eq!(r.session_cookie(), None, "fail_open writes nothing back");
}
