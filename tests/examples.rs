//! The example apps (`examples/python`, `examples/node`, `examples/go`)
//! behind the real gateway: each runs on its own language's runtime, as its
//! README says, and one client with a cookie jar drives the same flow
//! through all three: visits, login (regenerate), a cart (merge patches),
//! a non-ASCII user name, logout (destroy).
//!
//! A missing runtime fails the test with what to install: a skipped
//! example would read as a working one.

mod common;

use common::gateway::GatewayBuilder;
use common::protocol::{get_with_cookie, Browser, Reply};
use common::server::{accepts, ServerKind, ServerProcess};
use common::Gateway;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn example_dir(lang: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(lang)
}

/// An example app as a server: `program args...` with `PORT` set, ready
/// when it accepts connections.
fn app(
    name: &'static str,
    program: PathBuf,
    args: Vec<PathBuf>,
    install_hint: &'static str,
) -> ServerProcess {
    ServerProcess::start(ServerKind {
        name,
        command: Box::new(move |port, _dir| {
            let mut cmd = Command::new(&program);
            cmd.args(&args)
                .env("PORT", port.to_string())
                .env("HOST", "127.0.0.1");
            cmd
        }),
        ready: Box::new(|port, _| accepts(port)),
        install_hint,
        start_timeout: Duration::from_secs(10),
        stop_signal: libc::SIGTERM,
    })
}

/// The app's JSON body, with the status it came with.
fn body(r: &Reply) -> (u16, Value) {
    let value = serde_json::from_str(&r.text).unwrap_or_else(|e| {
        panic!(
            "got {} with a body that is not JSON ({e}): {}",
            r.status, r.text
        )
    });
    (r.status, value)
}

/// The id part of a session cookie value (`id.signature`).
fn id_of(cookie: &str) -> &str {
    cookie.split('.').next().unwrap()
}

/// Prints what the app and the gateway logged when the test fails: the
/// reason behind a 502 is in there.
struct LogsOnFailure<'a>(&'a ServerProcess, &'a Gateway);

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- app output:\n{}", self.0.log());
            eprintln!("--- gateway log:\n{}", self.1.log());
        }
    }
}

/// POST (no body; the parameters are in the query, as with GET).
async fn post(b: &Browser, gw: &Gateway, path: &str) -> Reply {
    Reply::read(b.client.post(gw.url(path)).send().await.unwrap()).await
}

/// The whole flow of the examples' READMEs, through a gateway in front of
/// the app.
async fn drive(app: &ServerProcess) {
    let gw = GatewayBuilder::new(app.port, "{type: memory}").start();
    let _logs = LogsOnFailure(app, &gw);
    let b = Browser::new(&gw);

    // Visits: the app patches `visits`, the gateway keeps it.
    for n in 1..=3 {
        let r = b.get("/", &[]).await;
        assert_eq!(body(&r), (200, json!({"visits": n, "user": null})));
    }
    let before = b.cookie().expect("a session cookie after the first visit");

    // Login: a new id, the data kept, the user shown.
    let r = b.get("/login", &[]).await;
    assert_eq!(body(&r).0, 400, "login without a user: {}", r.text);
    let r = b.get("/login?user=ada", &[]).await;
    assert_eq!(body(&r), (200, json!({"user": "ada"})));
    let after = b.cookie().unwrap();
    assert_ne!(
        id_of(&after),
        id_of(&before),
        "login must regenerate the id"
    );
    let r = b.get("/", &[]).await;
    assert_eq!(body(&r), (200, json!({"visits": 4, "user": "ada"})));
    let stale = get_with_cookie(&gw, "/", &format!("session={before}"), &[]).await;
    assert_eq!(
        body(&stale),
        (200, json!({"visits": 1, "user": null})),
        "the id from before the login must be gone"
    );

    // The cart: each add patches one item; the gateway merges them.
    let r = b.get("/cart/add?item=apple", &[]).await;
    assert_eq!(body(&r), (200, json!({"apple": 1})));
    let r = post(&b, &gw, "/cart/add?item=apple").await;
    assert_eq!(body(&r), (200, json!({"apple": 2})));
    let r = b.get("/cart/add?item=%C3%A9clair", &[]).await;
    assert_eq!(body(&r), (200, json!({"apple": 2, "éclair": 1})));
    let r = b.get("/cart", &[]).await;
    assert_eq!(body(&r), (200, json!({"apple": 2, "éclair": 1})));

    // A non-ASCII user name survives the round trip through the headers.
    let r = post(&b, &gw, "/login?user=Zo%C3%AB%20%F0%9F%98%80").await;
    assert_eq!(body(&r), (200, json!({"user": "Zoë 😀"})));
    let r = b.get("/", &[]).await;
    assert_eq!(body(&r), (200, json!({"visits": 5, "user": "Zoë 😀"})));
    let r = b.get("/cart", &[]).await;
    assert_eq!(body(&r), (200, json!({"apple": 2, "éclair": 1})));

    // Logout destroys the session: the cookie is expired, the next visit
    // starts over.
    let r = post(&b, &gw, "/logout").await;
    assert_eq!(body(&r), (200, json!({"logged_out": true})));
    let expired = r.session_cookie().expect("logout expires the cookie");
    assert!(expired.contains("Max-Age=0"), "{expired}");
    assert_eq!(b.cookie(), None);
    let r = b.get("/", &[]).await;
    assert_eq!(body(&r), (200, json!({"visits": 1, "user": null})));
    let r = b.get("/cart", &[]).await;
    assert_eq!(body(&r), (200, json!({})));
    assert!(
        !gw.log().contains("ERROR"),
        "the gateway logged an error:\n{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_flask_example() {
    // The test venv (scripts/test creates it from scripts/test-requirements.txt).
    let venv = std::env::var("SGW_TEST_VENV")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-venv").into());
    let python = Path::new(&venv).join("bin/python");
    let flask = Command::new(&python).args(["-c", "import flask"]).output();
    assert!(
        flask.as_ref().is_ok_and(|o| o.status.success()),
        "{} cannot import Flask ({flask:?}): run ./scripts/test once (it creates \
         target/test-venv from scripts/test-requirements.txt), or point SGW_TEST_VENV \
         at a virtualenv with Flask installed",
        python.display()
    );
    let app = app(
        "Python with Flask",
        python,
        vec![example_dir("python").join("app.py")],
        "Create the test venv: ./scripts/test (or SGW_TEST_VENV=<venv with Flask>).",
    );
    drive(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_http_example() {
    let app = app(
        "Node.js",
        "node".into(),
        vec![example_dir("node").join("app.js")],
        "Install Node.js: apt-get install nodejs.",
    );
    drive(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_net_http_example() {
    // Build it with the Go caches under target/ (HOME may not be
    // writable) and never the network (no toolchain download,
    // no module proxy: the example has no dependencies).
    let out = tempfile::tempdir().unwrap();
    let bin = out.path().join("app");
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go");
    let build = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(example_dir("go"))
        .env("GOCACHE", cache.join("cache"))
        .env("GOPATH", cache.join("path"))
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `go` ({e}): install Go with apt-get install golang-go (./scripts/test does)")
        });
    assert!(
        build.status.success(),
        "go build failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let app = app("the Go example", bin, vec![], "go build produced no binary");
    drive(&app).await;
}

#[test]
fn examples_gateway_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway.yaml");
    let (code, out, err) = common::gateway::run_cli(&["-c", config, "--test"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("127.0.0.1:8000"), "{out}");
}
