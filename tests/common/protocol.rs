//! The HTTP protocol suite: the core issue's contract exercised through
//! the real gateway binary between a real upstream and a real client. It
//! runs unchanged for every store: `protocol_suite!(fixture_fn)` with
//! `async fn fixture_fn() -> StoreFixture`; `persistence_suite!` adds the
//! cases that need a store surviving a gateway restart.

use super::gateway::{GatewayBuilder, KEY_A, KEY_B};
use super::{Gateway, StoreFixture, Upstream};
use reqwest::cookie::{CookieStore, Jar};
use serde_json::{json, Value};
use session_gateway::session::{CookieVerifier, SessionId};
use std::sync::Arc;
use std::time::Duration;

/// A browser: a reqwest client with a cookie jar, pointed at a gateway.
pub struct Browser {
    pub client: reqwest::Client,
    pub jar: Arc<Jar>,
    base: String,
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub version: reqwest::Version,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    /// Status, version, headers and the whole body of a response.
    pub async fn read(resp: reqwest::Response) -> Reply {
        Reply {
            status: resp.status().as_u16(),
            version: resp.version(),
            headers: resp.headers().clone(),
            text: resp.text().await.unwrap(),
        }
    }

    /// The upstream's echo (panics if the body is not the echo JSON).
    pub fn echo(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|_| panic!("not an echo: {} {}", self.status, self.text))
    }
    /// The session data the upstream received.
    pub fn session(&self) -> Value {
        self.echo()["session"].clone()
    }
    /// A request header as the upstream received it.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.echo()["headers"][name].as_str().map(str::to_string)
    }
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }
    /// The one Set-Cookie for the session cookie, if any.
    pub fn session_cookie(&self) -> Option<String> {
        let all: Vec<String> = self
            .set_cookies()
            .into_iter()
            .filter(|c| c.starts_with("session="))
            .collect();
        assert!(all.len() <= 1, "more than one session Set-Cookie: {all:?}");
        all.into_iter().next()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        let all: Vec<String> = self
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        (!all.is_empty()).then(|| all.join(", "))
    }
}

impl Browser {
    pub fn new(gw: &Gateway) -> Self {
        Self::with(gw, reqwest::Client::builder())
    }

    /// A browser with its own client settings (TLS roots, HTTP version);
    /// the cookie jar and the timeout are added.
    pub fn with(gw: &Gateway, builder: reqwest::ClientBuilder) -> Self {
        let jar = Arc::new(Jar::default());
        let client = builder
            .cookie_provider(jar.clone())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Browser {
            client,
            jar,
            base: gw.url(""),
        }
    }

    /// GET `path` with extra request headers (`x-reply-*` drive the upstream).
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.client.get(format!("{}{path}", self.base));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        Reply::read(req.send().await.expect("request reaches the gateway")).await
    }

    /// GET where the upstream answers with `X-Session-Patch: patch`.
    pub async fn patch(&self, path: &str, patch: Value) -> Reply {
        self.get(path, &[("x-reply-x-session-patch", &patch.to_string())])
            .await
    }

    /// The session cookie value in the jar.
    pub fn cookie(&self) -> Option<String> {
        let url = self.base.parse().unwrap();
        let header = self.jar.cookies(&url)?;
        header
            .to_str()
            .unwrap()
            .split("; ")
            .find_map(|c| c.strip_prefix("session=").map(str::to_string))
    }

    /// Put a raw session cookie in the jar.
    pub fn set_cookie(&self, value: &str) {
        let url = self.base.parse().unwrap();
        self.jar
            .add_cookie_str(&format!("session={value}; Path=/"), &url);
    }
}

/// Which upstream (its `x-upstream-port`) answered each of `n` requests
/// from a new browser; every one must be a 200.
pub async fn served_by(gw: &Gateway, n: usize) -> Vec<u16> {
    let b = Browser::new(gw);
    let mut ports = Vec::new();
    for _ in 0..n {
        let r = b.get("/", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        ports.push(r.header("x-upstream-port").unwrap().parse().unwrap());
    }
    ports
}

/// A raw request with a hand-written Cookie header (no jar).
pub async fn get_with_cookie(
    gw: &Gateway,
    path: &str,
    cookie: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let client = reqwest::Client::new();
    let mut req = client.get(gw.url(path)).header("cookie", cookie);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    Reply::read(req.send().await.unwrap()).await
}

fn id_of(cookie_value: &str) -> String {
    cookie_value.split('.').next().unwrap().to_string()
}

pub struct Setup {
    pub up: Upstream,
    pub gw: Gateway,
    pub fx: StoreFixture,
}

pub async fn setup(
    fx: StoreFixture,
    tweak: impl FnOnce(GatewayBuilder) -> GatewayBuilder,
) -> Setup {
    let up = Upstream::start().await;
    let mut builder = GatewayBuilder::new(up.port, &fx.yaml);
    if fx.sealed {
        builder = builder.session("seal", "true");
    }
    let gw = tweak(builder).start();
    Setup { up, gw, fx }
}

// ---------------------------------------------------------------- cases

pub async fn new_visitor_is_lazy(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session(), json!({}));
    assert_eq!(
        r.session_cookie(),
        None,
        "no Set-Cookie while the session stays empty"
    );
    assert_eq!(r.header("vary"), None);
    assert!(b.cookie().is_none());
}

pub async fn patch_creates_session_and_cookie(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    let r = b.patch("/", json!({"user": "ada", "n": 1})).await;
    assert_eq!(r.status, 200);
    let cookie = r.session_cookie().expect("Set-Cookie for a new session");
    for attr in [
        "HttpOnly",
        "SameSite=Lax",
        "Path=/",
        "Max-Age=2678400",
        "Expires=",
    ] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert!(r.header("cache-control").unwrap().contains("private"));
    assert!(r.header("vary").unwrap().to_lowercase().contains("cookie"));
    let value = b.cookie().unwrap();
    let (id, sig) = value.split_once('.').unwrap();
    assert_eq!(id.len(), 43);
    assert_eq!(sig.len(), 43);
    let r2 = b.get("/", &[]).await;
    assert_eq!(r2.session(), json!({"user": "ada", "n": 1}));
    assert!(r2.header("vary").unwrap().to_lowercase().contains("cookie"));
}

pub async fn upstream_never_sees_the_session_cookie(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let url = s.gw.url("/").parse().unwrap();
    b.jar.add_cookie_str("other=keep; Path=/", &url);
    let r = b.get("/", &[]).await;
    let cookie = r.upstream_header("cookie").unwrap_or_default();
    assert!(!cookie.contains("session="), "upstream saw {cookie}");
    assert!(cookie.contains("other=keep"));
    assert_eq!(r.session(), json!({"a": 1}));
    let only = get_with_cookie(&s.gw, "/", &format!("session={}", b.cookie().unwrap()), &[]).await;
    assert_eq!(
        only.upstream_header("cookie"),
        None,
        "an emptied Cookie header is dropped"
    );
}

pub async fn replace_header_replaces_data(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1, "b": 2})).await;
    let r = b.get("/", &[("x-reply-x-session", r#"{"c":3}"#)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(b.get("/", &[]).await.session(), json!({"c": 3}));
}

pub async fn patch_merges_and_null_deletes(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1, "b": {"x": 1, "y": 2}})).await;
    b.patch(
        "/",
        json!({"a": null, "b": {"y": null, "z": 3}, "c": "new"}),
    )
    .await;
    assert_eq!(
        b.get("/", &[]).await.session(),
        json!({"b": {"x": 1, "z": 3}, "c": "new"})
    );
}

pub async fn empty_object_destroys(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let old = b.cookie().unwrap();
    let r = b.get("/", &[("x-reply-x-session", "{}")]).await;
    let cookie = r.session_cookie().expect("cookie expired");
    assert!(cookie.contains("Max-Age=0"), "{cookie}");
    assert!(b.cookie().is_none());
    // The old cookie no longer finds a session.
    let again = get_with_cookie(&s.gw, "/", &format!("session={old}"), &[]).await;
    assert_eq!(again.session(), json!({}));
}

pub async fn patch_to_empty_destroys(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let r = b.patch("/", json!({"a": null})).await;
    assert!(r.session_cookie().unwrap().contains("Max-Age=0"));
    assert_eq!(b.get("/", &[]).await.session(), json!({}));
}

pub async fn destroy_action(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let old = b.cookie().unwrap();
    let r = b.get("/", &[("x-reply-x-session-action", "destroy")]).await;
    assert_eq!(r.status, 200);
    assert!(r.session_cookie().unwrap().contains("Max-Age=0"));
    assert!(b.cookie().is_none());
    let again = get_with_cookie(&s.gw, "/", &format!("session={old}"), &[]).await;
    assert_eq!(again.session(), json!({}));
    assert_eq!(again.session_cookie(), None);
}

pub async fn regenerate_action(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let old = b.cookie().unwrap();
    let r = b
        .get(
            "/login",
            &[
                ("x-reply-x-session-action", "regenerate"),
                ("x-reply-x-session-patch", r#"{"user":"ada"}"#),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let new = b.cookie().unwrap();
    assert_ne!(id_of(&new), id_of(&old), "regenerate must issue a new id");
    assert_eq!(
        b.get("/", &[]).await.session(),
        json!({"a": 1, "user": "ada"})
    );
    let stale = get_with_cookie(&s.gw, "/", &format!("session={old}"), &[]).await;
    assert_eq!(stale.session(), json!({}), "the old id must be gone");
}

pub async fn permanence_actions(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let r = b
        .get("/", &[("x-reply-x-session-action", "transient")])
        .await;
    let c = r.session_cookie().unwrap();
    assert!(
        !c.contains("Max-Age") && !c.contains("Expires"),
        "transient cookie: {c}"
    );
    // Unmodified transient session: no cookie refresh.
    let r = b.get("/", &[]).await;
    assert_eq!(r.session_cookie(), None);
    assert_eq!(r.session(), json!({"a": 1}));
    let r = b
        .get("/", &[("x-reply-x-session-action", "permanent")])
        .await;
    assert!(r.session_cookie().unwrap().contains("Max-Age="));
}

pub async fn transient_by_default_when_configured(fx: StoreFixture) {
    let s = setup(fx, |b| b.session("permanent", "false")).await;
    let b = Browser::new(&s.gw);
    let c = b
        .patch("/", json!({"a": 1}))
        .await
        .session_cookie()
        .unwrap();
    assert!(!c.contains("Max-Age") && !c.contains("Expires"), "{c}");
}

pub async fn refresh_each_request_on(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let r = b.get("/", &[]).await;
    let c = r
        .session_cookie()
        .expect("cookie re-sent on an unmodified request");
    assert!(c.contains("Max-Age=2678400"));
    assert!(r.header("cache-control").unwrap().contains("private"));
}

pub async fn refresh_each_request_off(fx: StoreFixture) {
    let s = setup(fx, |b| b.session("refresh_each_request", "false")).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let r = b.get("/", &[]).await;
    assert_eq!(r.session_cookie(), None);
    assert!(r.header("vary").unwrap().to_lowercase().contains("cookie"));
    assert!(
        b.patch("/", json!({"a": 2}))
            .await
            .session_cookie()
            .is_some(),
        "modified: cookie sent"
    );
}

/// A read refreshes the stored expiry once `expiry_update_interval` has
/// passed since the last extension, and not before.
pub async fn stored_expiry_refresh_is_throttled(fx: StoreFixture) {
    let s = setup(fx, |b| {
        b.session("lifetime", "4")
            .session("expiry_update_interval", "2")
    })
    .await;
    // Touched: read after the interval extends the session.
    let touched = Browser::new(&s.gw);
    touched.patch("/", json!({"a": 1})).await;
    // Not touched: read before the interval does not.
    let untouched = Browser::new(&s.gw);
    untouched.patch("/", json!({"b": 1})).await;
    let untouched_cookie = untouched.cookie().unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(untouched.get("/", &[]).await.session(), json!({"b": 1}));
    tokio::time::sleep(Duration::from_millis(1600)).await; // t = 2.6s
    assert_eq!(touched.get("/", &[]).await.session(), json!({"a": 1}));
    tokio::time::sleep(Duration::from_millis(2200)).await; // t = 4.8s
    assert_eq!(
        touched.get("/", &[]).await.session(),
        json!({"a": 1}),
        "touch at 2.6s should keep it alive"
    );
    let r = get_with_cookie(&s.gw, "/", &format!("session={untouched_cookie}"), &[]).await;
    assert_eq!(
        r.session(),
        json!({}),
        "a read within the interval must not extend the stored expiry"
    );
}

pub async fn session_expires_after_lifetime(fx: StoreFixture) {
    let s = setup(fx, |b| {
        b.session("lifetime", "2")
            .session("refresh_each_request", "false")
    })
    .await;
    let b = Browser::new(&s.gw);
    let c = b
        .patch("/", json!({"a": 1}))
        .await
        .session_cookie()
        .unwrap();
    assert!(c.contains("Max-Age=2"), "{c}");
    let cookie = b.cookie().unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let r = get_with_cookie(&s.gw, "/", &format!("session={cookie}"), &[]).await;
    assert_eq!(r.session(), json!({}));
}

pub async fn tampered_cookie_gets_fresh_session(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"secret": 1})).await;
    let good = b.cookie().unwrap();
    let (id, sig) = good.split_once('.').unwrap();
    let mut flipped: Vec<u8> = sig.as_bytes().to_vec();
    flipped[5] = if flipped[5] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{id}.{}", String::from_utf8(flipped).unwrap());
    let r = get_with_cookie(&s.gw, "/", &format!("session={tampered}"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session(), json!({}));
    // A write lands in a brand-new id, never the presented one.
    let r = get_with_cookie(
        &s.gw,
        "/",
        &format!("session={tampered}"),
        &[("x-reply-x-session-patch", r#"{"x":1}"#)],
    )
    .await;
    let c = r.session_cookie().unwrap();
    assert!(!c.contains(id), "tampered id adopted");
}

pub async fn unknown_id_is_never_adopted(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    // A correctly signed cookie for an id the store never issued.
    let verifier = CookieVerifier::new(&[KEY_A.as_bytes().to_vec()], 32);
    let chosen = SessionId::generate(32);
    let cookie = verifier.sign(&chosen);
    let r = get_with_cookie(
        &s.gw,
        "/",
        &format!("session={cookie}"),
        &[("x-reply-x-session-patch", r#"{"x":1}"#)],
    )
    .await;
    assert_eq!(r.session(), json!({}));
    let set = r.session_cookie().unwrap();
    assert!(
        !set.contains(chosen.as_str()),
        "client-chosen id adopted (fixation)"
    );
}

pub async fn garbage_cookies_never_fail(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let good = b.cookie().unwrap();
    let huge = "A".repeat(6000);
    let cases = [
        format!("session={huge}"),
        "session=".to_string(),
        "session=...".to_string(),
        "session=%%%%; ;;=; =x".to_string(),
        format!("session={good}; session={good}"),
        "session=\"quoted\"".to_string(),
    ];
    for cookie in cases {
        let r = get_with_cookie(&s.gw, "/", &cookie, &[]).await;
        assert_eq!(r.status, 200, "cookie {:.60} gave {}", cookie, r.status);
        assert_eq!(
            r.session(),
            json!({}),
            "cookie {:.60} gave a session",
            cookie
        );
    }
    // Duplicated session cookies are ambiguous: no valid session.
    // Non-UTF-8 bytes in Cookie via a raw socket.
    let raw = raw_request(s.gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nCookie: session=\xff\xfe\x80.\xc3\x28\r\nConnection: close\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
}

/// Send raw bytes, return the raw response text.
pub async fn raw_request(port: u16, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn forged_request_headers_are_stripped(fx: StoreFixture) {
    let s = setup(fx, |b| b.session("exclude", "[\"/static/\"]")).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"real": true})).await;
    let forged = [
        ("X-Session", r#"{"admin":true}"#),
        ("X-Session-Patch", r#"{"admin":true}"#),
        ("X-Session-Action", "destroy"),
        ("x-session-error", "none"),
        ("X_Session", r#"{"admin":true}"#),
        ("x_session_patch", r#"{"admin":true}"#),
        ("X-SESSION-Whatever", "1"),
    ];
    let r = b.get("/", &forged).await;
    assert_eq!(r.session(), json!({"real": true}));
    let headers = r.echo()["headers"].clone();
    for (name, _) in headers.as_object().unwrap() {
        let norm = name.replace('_', "-");
        assert!(
            !norm.starts_with("x-session") || norm == "x-session",
            "forged {name} reached upstream"
        );
    }
    // Excluded paths: no session header at all, forged ones still stripped.
    let r = b.get("/static/app.js", &forged).await;
    let headers = r.echo()["headers"].clone();
    for (name, _) in headers.as_object().unwrap() {
        assert!(
            !name.replace('_', "-").starts_with("x-session"),
            "{name} reached an excluded path"
        );
    }
}

pub async fn response_protocol_headers_never_leak(fx: StoreFixture) {
    let s = setup(fx, |b| b.session("exclude", "[\"/static/\"]")).await;
    let b = Browser::new(&s.gw);
    for path in ["/", "/static/x"] {
        let r = b
            .get(
                path,
                &[
                    ("x-reply-x-session-patch", r#"{"a":1}"#),
                    ("x-reply-x-session-action", "permanent"),
                    ("x-reply-x-session-debug", "leak"),
                    ("x-reply-x_session", r#"{"b":1}"#),
                    ("x-reply-set-cookie", "session=forged-by-app; Path=/"),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert!(
            r.set_cookies().iter().all(|c| !c.contains("forged-by-app")),
            "{path}: the app's Set-Cookie for the session cookie reached the client"
        );
        for (name, _) in r.headers.iter() {
            assert!(
                !name.as_str().replace('_', "-").starts_with("x-session"),
                "{path}: {name} leaked"
            );
        }
    }
}

pub async fn excluded_paths_skip_session_work(fx: StoreFixture) {
    let s = setup(fx, |b| b.session("exclude", "[\"/static/\", \"/health\"]")).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    for path in [
        "/static/app.js",
        "/health",
        "/health?x=1",
        "/x/../static/y",
        "/%73tatic/z",
    ] {
        let r = b
            .get(path, &[("x-reply-x-session-patch", r#"{"ignored":1}"#)])
            .await;
        assert_eq!(r.status, 200);
        assert!(
            r.upstream_header("x-session").is_none(),
            "{path} got X-Session"
        );
        assert!(r.session_cookie().is_none(), "{path} set a cookie");
        assert!(r.header("vary").is_none(), "{path} got Vary");
        let cookie = r.upstream_header("cookie").unwrap_or_default();
        assert!(
            !cookie.contains("session="),
            "{path}: upstream saw the session id"
        );
    }
    for path in ["/staticky", "/healthz", "/static/../api"] {
        assert_eq!(
            b.get(path, &[]).await.session(),
            json!({"a": 1}),
            "{path} should have a session"
        );
    }
    assert_eq!(
        b.get("/", &[]).await.session(),
        json!({"a": 1}),
        "excluded updates were ignored"
    );
}

async fn assert_bad_update(s: &Setup, b: &Browser, headers: &[(&str, &str)], expect: &str) {
    let r = b.get("/", headers).await;
    assert_eq!(r.status, 502, "{headers:?}: {}", r.text);
    assert!(
        r.text.contains(expect),
        "body {:?} should mention {expect}",
        r.text
    );
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert_eq!(r.session_cookie(), None);
    let id = r
        .header("x-request-id")
        .expect("error responses carry the request id");
    assert!(r.text.contains(&id));
    s.gw.error_line_for(&id);
    assert_eq!(
        b.get("/", &[]).await.session(),
        json!({"keep": 1}),
        "stored session changed"
    );
}

pub async fn bad_updates_get_502_and_lose_nothing(fx: StoreFixture) {
    let s = setup(fx, |b| b.session("max_bytes", "64")).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"keep": 1})).await;
    let big = format!(r#"{{"big":"{}"}}"#, "x".repeat(100));
    assert_bad_update(
        &s,
        &b,
        &[("x-reply-x-session", "[1,2]")],
        "not a JSON object",
    )
    .await;
    assert_bad_update(&s, &b, &[("x-reply-x-session", "{nope")], "not valid JSON").await;
    assert_bad_update(
        &s,
        &b,
        &[("x-reply-x-session-patch", "{nope")],
        "not valid JSON",
    )
    .await;
    assert_bad_update(
        &s,
        &b,
        &[("x-reply-x-session-action", "explode")],
        "unknown action",
    )
    .await;
    assert_bad_update(&s, &b, &[("x-reply-x-session", &big)], "max_bytes").await;
    assert_bad_update(&s, &b, &[("x-reply-x-session-patch", &big)], "max_bytes").await;
    // The upstream's body never reaches the client on these errors.
    let r = b.get("/", &[("x-reply-x-session", "[]")]).await;
    assert!(!r.text.contains("\"headers\""));
}

pub async fn bad_update_on_new_session_creates_nothing(fx: StoreFixture) {
    let s = setup(fx, |b| b.session("max_bytes", "64")).await;
    let b = Browser::new(&s.gw);
    let big = format!(r#"{{"big":"{}"}}"#, "x".repeat(100));
    let r = b.get("/", &[("x-reply-x-session-patch", &big)]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.session_cookie(), None);
    assert!(b.cookie().is_none());
}

pub async fn updates_apply_on_error_statuses(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    let r = b
        .get(
            "/",
            &[
                ("x-reply-status", "500"),
                ("x-reply-x-session-patch", r#"{"e":500}"#),
            ],
        )
        .await;
    assert_eq!(r.status, 500);
    let r = b
        .get(
            "/",
            &[
                ("x-reply-status", "404"),
                ("x-reply-x-session-patch", r#"{"f":404}"#),
            ],
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(b.get("/", &[]).await.session(), json!({"e": 500, "f": 404}));
}

pub async fn non_ascii_data_is_escaped(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"name": "Zoë 😀"})).await;
    let r = b.get("/", &[]).await;
    let raw = r.upstream_header("x-session").unwrap();
    assert!(raw.is_ascii(), "{raw}");
    assert!(raw.contains("\\u00eb"), "{raw}");
    assert_eq!(r.session(), json!({"name": "Zoë 😀"}));
}

pub async fn concurrent_patches_lose_nothing(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Arc::new(Browser::new(&s.gw));
    b.patch("/", json!({"start": 0})).await;
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move { b.patch("/", json!({ format!("k{i}"): i })).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let data = b.get("/", &[]).await.session();
    for i in 0..50 {
        assert_eq!(data[format!("k{i}")], json!(i), "lost k{i}: {data}");
    }
}

/// A write for a session destroyed meanwhile is dropped: logout wins and
/// the old id is never revived.
pub async fn destroyed_session_is_not_revived(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Arc::new(Browser::new(&s.gw));
    b.patch("/", json!({"a": 1})).await;
    let cookie = b.cookie().unwrap();
    let slow = {
        let cookie = cookie.clone();
        let gw_url = s.gw.url("/");
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            client
                .get(gw_url)
                .header("cookie", format!("session={cookie}"))
                .header("x-delay-ms", "800")
                .header("x-reply-x-session-patch", r#"{"late":1}"#)
                .send()
                .await
                .unwrap()
                .headers()
                .get_all("set-cookie")
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = get_with_cookie(
        &s.gw,
        "/",
        &format!("session={cookie}"),
        &[("x-reply-x-session-action", "destroy")],
    )
    .await;
    assert!(r.session_cookie().unwrap().contains("Max-Age=0"));
    let late = slow.await.unwrap();
    assert!(
        late.iter()
            .all(|c| !c.contains(&id_of(&cookie)) || c.contains("Max-Age=0")),
        "{late:?}"
    );
    let after = get_with_cookie(&s.gw, "/", &format!("session={cookie}"), &[]).await;
    assert_eq!(after.session(), json!({}), "destroyed session revived");
}

pub async fn app_cookies_pass_through(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    let r = b
        .get(
            "/",
            &[
                ("x-reply-x-session-patch", r#"{"a":1}"#),
                ("x-reply-set-cookie", "theme=dark; Path=/"),
            ],
        )
        .await;
    let cookies = r.set_cookies();
    assert!(
        cookies.iter().any(|c| c.starts_with("theme=dark")),
        "{cookies:?}"
    );
    assert!(r.session_cookie().is_some(), "{cookies:?}");
}

pub async fn cache_headers(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    let r = b
        .get(
            "/",
            &[
                ("x-reply-x-session-patch", r#"{"a":1}"#),
                ("x-reply-cache-control", "public, max-age=60, s-maxage=600"),
            ],
        )
        .await;
    let cc = r.header("cache-control").unwrap();
    assert!(
        cc.contains("private") && !cc.contains("public") && !cc.contains("s-maxage"),
        "{cc}"
    );
    assert!(cc.contains("max-age=60"), "{cc}");
    let r = b.get("/", &[("x-reply-cache-control", "no-store")]).await;
    assert_eq!(r.header("cache-control").unwrap(), "no-store");
    let r = b.get("/", &[("x-reply-vary", "Accept-Encoding")]).await;
    let vary = r.header("vary").unwrap().to_lowercase();
    assert!(
        vary.contains("accept-encoding") && vary.contains("cookie"),
        "{vary}"
    );
}

pub async fn request_id_forwarded(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    let r = b.get("/", &[]).await;
    let id = r.upstream_header("x-request-id").unwrap();
    assert_eq!(id.len(), 16);
    assert_eq!(r.header("x-request-id").as_deref(), Some(id.as_str()));
    let r = b.get("/", &[("x-request-id", "abc-123")]).await;
    assert_eq!(r.upstream_header("x-request-id").unwrap(), "abc-123");
    assert_eq!(r.header("x-request-id").as_deref(), Some("abc-123"));
    // A client id that is not reused is not forwarded either: the app,
    // the logs and the client all see the gateway's.
    let long = "x".repeat(200);
    for forged in [long.as_str(), "has space", "semi;colon"] {
        let r = b.get("/", &[("x-request-id", forged)]).await;
        let id = r.upstream_header("x-request-id").unwrap();
        assert_ne!(id, forged);
        assert_eq!(id.len(), 16, "{id}");
        assert_eq!(r.header("x-request-id"), Some(id));
    }
}

/// `session.max_bytes` limits the `X-Session` value exactly as the app
/// receives it (`\u`-escaped): raw UTF-8 that fits the limit but escapes to
/// more is refused, so a user can never be locked out by a header their app
/// server refuses.
pub async fn max_bytes_limits_what_the_app_receives(fx: StoreFixture) {
    use base64::Engine;
    let s = setup(fx, |b| b.session("max_bytes", "8192")).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"keep": 1})).await;
    let raw_patch = |emoji: usize| {
        let patch = format!(r#"{{"e":"{}"}}"#, "😀".repeat(emoji));
        base64::engine::general_purpose::STANDARD.encode(patch)
    };
    // 2000 emoji: 8000 bytes of UTF-8 (fits), 24000 once escaped.
    let r = b
        .get("/", &[("x-reply-raw-x-session-patch", &raw_patch(2000))])
        .await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert!(r.text.contains("max_bytes"), "{}", r.text);
    assert_eq!(b.get("/", &[]).await.session(), json!({"keep": 1}));
    // 600 emoji: 7200 bytes escaped, within the limit, delivered exactly.
    let r = b
        .get("/", &[("x-reply-raw-x-session-patch", &raw_patch(600))])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = b.get("/", &[]).await;
    assert_eq!(r.session()["e"].as_str().unwrap().chars().count(), 600);
    let sent = r.upstream_header("x-session").unwrap();
    assert!(
        sent.is_ascii() && sent.len() <= 8192,
        "{} bytes",
        sent.len()
    );
}

/// Session data as deep as the limit allows round-trips through the
/// store; one level more, integers beyond 64 bits and lone surrogates are
/// refused (502) and change nothing.
pub async fn deepest_accepted_session_round_trips(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    let depth = session_gateway::proxy::protocol::MAX_DEPTH;
    // {"d": {"d": ... {"leaf": [1]} }}: `depth` levels with the array.
    let mut deepest = json!({"leaf": [1]});
    for _ in 0..depth - 2 {
        deepest = json!({ "d": deepest });
    }
    let r = b.patch("/", deepest.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(b.get("/", &[]).await.session(), deepest);
    let r = b.patch("/", json!({ "more": deepest.clone() })).await;
    assert_eq!(r.status, 502, "{}", r.text);
    for bad in [
        r#"{"n":123456789012345678901234567890}"#,
        r#"{"s":"\ud800"}"#,
    ] {
        let r = b.get("/", &[("x-reply-x-session-patch", bad)]).await;
        assert_eq!(r.status, 502, "{bad}: {}", r.text);
    }
    assert_eq!(b.get("/", &[]).await.session(), deepest);
    // The largest integers that fit are kept exactly.
    let exact = r#"{"max":18446744073709551615,"min":-9223372036854775808}"#;
    let r = b.get("/", &[("x-reply-x-session", exact)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        b.get("/", &[])
            .await
            .upstream_header("x-session")
            .as_deref(),
        Some(exact)
    );
}

pub async fn graceful_shutdown_finishes_in_flight(fx: StoreFixture) {
    let mut s = setup(fx, |b| b).await;
    let url = s.gw.url("/");
    let slow = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .get(url)
            .header("x-delay-ms", "1000")
            .header("x-reply-x-session-patch", r#"{"a":1}"#)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.headers().get("set-cookie").is_some())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let st = s.gw.terminate();
        (st, s)
    })
    .await
    .unwrap();
    let (exit, _s) = status;
    assert!(exit.success(), "exit status {exit}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!(
        slow.await.unwrap(),
        (200, true),
        "in-flight request must finish"
    );
}

// ------------------------------------------------- persistence (restart)

/// The store key of a browser's session (default `key_prefix`).
fn store_key(b: &Browser) -> String {
    format!("session:{}", id_of(&b.cookie().expect("a session cookie")))
}

/// Replace a session's stored value behind the gateway's back.
async fn overwrite(fx: &StoreFixture, key: &str, value: &[u8]) {
    let store = fx.store().await;
    store.delete(key).await.unwrap();
    assert!(store
        .create(
            key,
            &bytes::Bytes::copy_from_slice(value),
            Duration::from_secs(600)
        )
        .await
        .unwrap());
}

/// A session stored by a version before the header-ready form
/// (`{"p":..,"d":..}`) still loads, and is rewritten in the current form on
/// its next change.
pub async fn legacy_stored_session_still_loads(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let key = store_key(&b);
    overwrite(
        &s.fx,
        &key,
        br#"{"p":true,"d":{"user":"ada","z":"Zo\u00eb"}}"#,
    )
    .await;
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.session(), json!({"user": "ada", "z": "Zoë"}));
    b.patch("/", json!({"n": 2})).await;
    let stored = s.fx.store().await.load(&key).await.unwrap().unwrap().value;
    assert_eq!(&stored[..], br#"P{"n":2,"user":"ada","z":"Zo\u00eb"}"#);
}

/// A session stored larger than `session.max_bytes` now allows (written
/// before the limit was lowered) is not forwarded as an oversized header:
/// the app gets `{}` and `X-Session-Error: too-large`, and can replace it.
pub async fn oversized_stored_session_is_not_forwarded(fx: StoreFixture) {
    let s = setup(fx, |b| b.session("max_bytes", "100")).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let big = format!(r#"P{{"big":"{}"}}"#, "x".repeat(200));
    overwrite(&s.fx, &store_key(&b), big.as_bytes()).await;
    let r = b.get("/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.session(), json!({}));
    assert_eq!(
        r.upstream_header("x-session-error").as_deref(),
        Some("too-large")
    );
    let r = b.get("/", &[("x-reply-x-session", r#"{"small":1}"#)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = b.get("/", &[]).await;
    assert_eq!(r.session(), json!({"small": 1}));
    assert_eq!(r.upstream_header("x-session-error"), None);
}

/// Stored bytes that do not decode (corruption, a foreign writer) are no
/// session: the app gets `{}` (never an error page), and a write starts a
/// new session under a new id.
pub async fn unreadable_stored_session_starts_fresh(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let old = b.cookie().unwrap();
    for garbage in [&b"not a session"[..], b"P{\"a\":\"\xff\"}", b"P[1]", b""] {
        overwrite(&s.fx, &store_key(&b), garbage).await;
        let r = b.get("/", &[]).await;
        assert_eq!(r.status, 200, "{garbage:?}: {}", r.text);
        assert_eq!(r.session(), json!({}), "{garbage:?}");
    }
    let r = b.patch("/", json!({"b": 2})).await;
    assert_eq!(r.status, 200);
    assert_ne!(id_of(&b.cookie().unwrap()), id_of(&old), "a new id");
    assert_eq!(b.get("/", &[]).await.session(), json!({"b": 2}));
}

pub async fn sessions_survive_restart(fx: StoreFixture) {
    let mut s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"kept": true})).await;
    s.gw.restart();
    assert_eq!(b.get("/", &[]).await.session(), json!({"kept": true}));
}

pub async fn key_rotation(fx: StoreFixture) {
    let s = setup(fx, |b| b).await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"kept": true})).await;
    let old_cookie = b.cookie().unwrap();
    // A second gateway on the same store with a new signing key first.
    let rotated = GatewayBuilder::new(s.up.port, &s.fx.yaml)
        .keys(&[KEY_B, KEY_A])
        .start();
    let r = get_with_cookie(&rotated, "/", &format!("session={old_cookie}"), &[]).await;
    assert_eq!(
        r.session(),
        json!({"kept": true}),
        "old key must still verify"
    );
    let new_cookie = r.session_cookie().expect("refreshed cookie");
    let value = new_cookie
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("session=")
        .unwrap();
    assert_eq!(id_of(value), id_of(&old_cookie));
    assert_ne!(value, old_cookie, "new cookies are signed with the new key");
    let verifier_b = CookieVerifier::new(&[KEY_B.as_bytes().to_vec()], 32);
    assert!(verifier_b.verify(value).is_some());
    // A gateway that dropped the old key no longer accepts old cookies.
    let dropped = GatewayBuilder::new(s.up.port, &s.fx.yaml)
        .keys(&[KEY_B])
        .start();
    let r = get_with_cookie(&dropped, "/", &format!("session={old_cookie}"), &[]).await;
    assert_eq!(r.session(), json!({}));
    let r = get_with_cookie(&dropped, "/", &format!("session={value}"), &[]).await;
    assert_eq!(r.session(), json!({"kept": true}));
}

/// `protocol_suite!(fixture)`: every protocol case against one store.
#[macro_export]
macro_rules! protocol_suite {
    ($make:ident; $($name:ident),* $(,)?) => {
        mod protocol_suite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::protocol::$name(super::$make().await).await;
                }
            )*
        }
    };
    ($make:ident) => {
        $crate::protocol_suite!($make;
            new_visitor_is_lazy,
            patch_creates_session_and_cookie,
            upstream_never_sees_the_session_cookie,
            replace_header_replaces_data,
            patch_merges_and_null_deletes,
            empty_object_destroys,
            patch_to_empty_destroys,
            destroy_action,
            regenerate_action,
            permanence_actions,
            transient_by_default_when_configured,
            refresh_each_request_on,
            refresh_each_request_off,
            stored_expiry_refresh_is_throttled,
            session_expires_after_lifetime,
            tampered_cookie_gets_fresh_session,
            unknown_id_is_never_adopted,
            garbage_cookies_never_fail,
            forged_request_headers_are_stripped,
            response_protocol_headers_never_leak,
            excluded_paths_skip_session_work,
            bad_updates_get_502_and_lose_nothing,
            bad_update_on_new_session_creates_nothing,
            updates_apply_on_error_statuses,
            non_ascii_data_is_escaped,
            concurrent_patches_lose_nothing,
            destroyed_session_is_not_revived,
            app_cookies_pass_through,
            cache_headers,
            request_id_forwarded,
            max_bytes_limits_what_the_app_receives,
            deepest_accepted_session_round_trips,
            graceful_shutdown_finishes_in_flight,
        );
    };
}

/// `persistence_suite!(fixture)`: cases needing a store that outlives one
/// gateway process and that a test can reach from outside it (every store
/// but `memory`).
#[macro_export]
macro_rules! persistence_suite {
    ($make:ident) => {
        mod persistence_suite {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sessions_survive_restart() {
                $crate::common::protocol::sessions_survive_restart(super::$make().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn key_rotation() {
                $crate::common::protocol::key_rotation(super::$make().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn legacy_stored_session_still_loads() {
                $crate::common::protocol::legacy_stored_session_still_loads(super::$make().await)
                    .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn oversized_stored_session_is_not_forwarded() {
                $crate::common::protocol::oversized_stored_session_is_not_forwarded(
                    super::$make().await,
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unreadable_stored_session_starts_fresh() {
                $crate::common::protocol::unreadable_stored_session_starts_fresh(
                    super::$make().await,
                )
                .await;
            }
        }
    };
}

/// The whole protocol suite again with `session.seal: true`, from the
/// store's fixture: `sealed_suite!(fixture)`.
#[macro_export]
macro_rules! sealed_suite {
    ($fixture:ident) => {
        mod sealed {
            async fn $fixture() -> $crate::common::StoreFixture {
                super::$fixture().await.sealed()
            }
            $crate::protocol_suite!($fixture);
        }
    };
}
