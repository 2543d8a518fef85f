//! `store.type: null`: sessions disabled, like NullSessionInterface.

mod common;

use common::protocol::{setup, Browser};
use common::StoreFixture;
use serde_json::json;

async fn fixture() -> StoreFixture {
    StoreFixture::new("{type: null}", ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_gets_empty_session_and_updates_are_refused() {
    let s = setup(fixture().await, |b| b).await;
    let b = Browser::new(&s.gw);
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session(), json!({}));
    assert_eq!(r.session_cookie(), None);
    for headers in [
        vec![("x-reply-x-session-patch", r#"{"a":1}"#)],
        vec![("x-reply-x-session", r#"{"a":1}"#)],
        vec![("x-reply-x-session-action", "regenerate")],
    ] {
        let r = b.get("/", &headers).await;
        assert_eq!(r.status, 502, "{headers:?}");
        assert!(r.text.contains("sessions are disabled"), "{}", r.text);
        assert_eq!(r.session_cookie(), None);
    }
}
