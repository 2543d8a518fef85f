//! TLS at both ends, through the real binary with real clients and a
//! private CA made by `openssl`: HTTPS listeners with HTTP/2 negotiated by
//! ALPN (and HTTP/1.1), sessions over both, `X-Forwarded-Proto: https`,
//! certificates re-read on SIGHUP; `https://` upstreams verified against
//! `server.upstream_ca_file` (by name, and by IP), and health checks over
//! TLS.

mod common;

use bytes::Bytes;
use common::gateway::{Gateway, GatewayBuilder};
use common::protocol::{served_by, Browser};
use common::tls::{Leaf, TestCa};
use common::Upstream;
use http_body_util::StreamBody;
use hyper::body::Frame;
use reqwest::Version;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STORE: &str = "{type: memory}";

fn tls_client(ca: &TestCa) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.reqwest_root())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_negotiates_http2_and_keeps_sessions() {
    let ca = TestCa::new();
    let leaf = ca.issue(&["DNS:localhost", "IP:127.0.0.1"]);
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, STORE)
        .tls(&leaf.cert, &leaf.key)
        .start();

    let h2 = Browser::with(&gw, tls_client(&ca));
    let r = h2.patch("/", json!({"n": 1})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.version, Version::HTTP_2, "ALPN should pick h2");
    assert!(r.session_cookie().is_some());
    assert_eq!(
        r.upstream_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
    let r = h2.get("/", &[]).await;
    assert_eq!(r.version, Version::HTTP_2);
    assert_eq!(r.session(), json!({"n": 1}));

    // HTTP/1.1 over TLS: the same listener, the same session.
    let h1 = Browser::with(&gw, tls_client(&ca).http1_only());
    h1.set_cookie(&h2.cookie().unwrap());
    let r = h1.get("/", &[]).await;
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(r.session(), json!({"n": 1}));
    assert_eq!(
        r.upstream_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
}

/// An upstream that records every byte it receives and answers each read
/// with a small 200 (enough for one request per read here).
async fn recording_upstream() -> (u16, Arc<Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut buf = [0u8; 8192];
        while let Ok(Ok(n @ 1..)) =
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
        {
            record.lock().unwrap().extend_from_slice(&buf[..n]);
            let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            if stream.write_all(reply).await.is_err() {
                return;
            }
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_request_body_ends_the_upstream_chunked_body_once() {
    // A streamed HTTP/2 body ends with an empty DATA frame. pingora 0.9.1
    // forwards that to an HTTP/1.1 upstream as a second `0\r\n\r\n`, which
    // the upstream reads as the start of its next request on the pooled
    // connection.
    let ca = TestCa::new();
    let leaf = ca.issue(&["IP:127.0.0.1"]);
    let (port, seen) = recording_upstream().await;
    let gw = GatewayBuilder::new(port, STORE)
        .tls(&leaf.cert, &leaf.key)
        .start();
    let client = tls_client(&ca)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
        Ok(Frame::data(Bytes::from_static(b"part one, "))),
        Ok(Frame::data(Bytes::from_static(b"two"))),
    ];
    let body = reqwest::Body::wrap(StreamBody::new(futures::stream::iter(chunks)));
    let r = client
        .post(gw.url("/upload"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&seen.lock().unwrap()).contains("two\r\n")
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // anything trailing
    let text = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(
        text.ends_with("\r\n\r\nA\r\npart one, \r\n3\r\ntwo\r\n0\r\n\r\n"),
        "the upstream got: {text:?}"
    );
}

async fn presented_certificate(ca: &TestCa, gw: &Gateway) -> Vec<u8> {
    // A new client: a new connection, so a new handshake.
    let client = tls_client(ca).tls_info(true).build().unwrap();
    let resp = client.get(gw.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("TLS info")
        .to_vec()
}

fn install(from: &Leaf, to: &Leaf) {
    std::fs::copy(&from.cert, &to.cert).unwrap();
    std::fs::copy(&from.key, &to.key).unwrap();
}

fn sighup_and_wait(gw: &Gateway, needle: &str) {
    let before = gw.log().matches(needle).count();
    unsafe {
        libc::kill(gw.pid(), libc::SIGHUP);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.log().matches(needle).count() <= before {
        assert!(Instant::now() < deadline, "no `{needle}`:\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_certificate() {
    let ca = TestCa::new();
    let first = ca.issue(&["IP:127.0.0.1"]);
    let second = ca.issue(&["IP:127.0.0.1"]);
    let served = Leaf {
        cert: ca.dir().join("served.pem"),
        key: ca.dir().join("served.key"),
    };
    install(&first, &served);
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, STORE)
        .tls(&served.cert, &served.key)
        .start();
    assert_eq!(presented_certificate(&ca, &gw).await, first.der());

    // New files at the same paths: new handshakes get them.
    install(&second, &served);
    sighup_and_wait(&gw, "configuration reloaded");
    let line = gw.wait_log_line(|l| l.contains("certificate of https://127.0.0.1"));
    assert!(line.contains("reloaded"), "{line}");
    assert_eq!(presented_certificate(&ca, &gw).await, second.der());

    // An unreadable certificate changes nothing and names its key.
    std::fs::write(&served.cert, "not a certificate\n").unwrap();
    sighup_and_wait(&gw, "still running on the previous configuration");
    let line = gw.wait_log_line(|l| l.contains("still running on the previous configuration"));
    assert!(line.contains("listen[0].tls.cert_file"), "{line}");
    assert_eq!(presented_certificate(&ca, &gw).await, second.der());
}

fn https_gateway(ca: &TestCa, upstreams: &[String], extra: &str) -> Gateway {
    let list = upstreams
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    GatewayBuilder::new(0, STORE)
        .set("upstream", &format!("[{list}]"))
        .set(
            "server",
            &format!(
                "{{threads: 2, upstream_ca_file: \"{}\"{extra}}}",
                ca.cert().display()
            ),
        )
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_verified_against_the_private_ca() {
    let ca = TestCa::new();
    let by_name = ca.issue(&["DNS:localhost"]);
    let up = Upstream::start_tls(&by_name.cert, &by_name.key).await;

    let gw = https_gateway(&ca, &[format!("https://localhost:{}", up.port)], "");
    let b = Browser::new(&gw);
    let r = b.patch("/", json!({"via": "tls"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(b.get("/", &[]).await.session(), json!({"via": "tls"}));
    assert_eq!(up.hits(), 2);

    // The certificate is for `localhost`, not for the IP.
    let by_ip = https_gateway(&ca, &[format!("https://127.0.0.1:{}", up.port)], "");
    let r = Browser::new(&by_ip).get("/", &[]).await;
    assert_eq!(r.status, 502, "a certificate for another name was accepted");

    // Without the private CA, the system roots do not know it.
    let no_ca = GatewayBuilder::new(0, STORE)
        .set("upstream", &format!("\"https://localhost:{}\"", up.port))
        .start();
    let r = Browser::new(&no_ca).get("/", &[]).await;
    assert_eq!(r.status, 502, "an unknown CA was accepted");
    assert_eq!(up.hits(), 2, "no request may reach an unverified upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_health_checked_over_tls() {
    let ca = TestCa::new();
    // One verified by name, one by IP address.
    let a_leaf = ca.issue(&["DNS:localhost"]);
    let b_leaf = ca.issue(&["IP:127.0.0.1"]);
    let a = Upstream::start_tls(&a_leaf.cert, &a_leaf.key).await;
    let b = Upstream::start_tls(&b_leaf.cert, &b_leaf.key).await;
    let gw = https_gateway(
        &ca,
        &[
            format!("https://localhost:{}", a.port),
            format!("https://127.0.0.1:{}", b.port),
        ],
        ", upstream_health_check: {interval: 200ms, path: /healthz}",
    );
    let ports = served_by(&gw, 6).await;
    assert!(
        ports.contains(&a.port) && ports.contains(&b.port),
        "{ports:?}"
    );

    // A answers 503 to its health check: out of rotation.
    a.set_failing(true);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ports = served_by(&gw, 20).await;
    assert!(ports.iter().all(|&p| p == b.port), "{ports:?}");
    gw.wait_log_line(|l| l.contains(&format!("https://localhost:{} becomes unhealthy", a.port)));

    // Healthy again: back in rotation.
    a.set_failing(false);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ports = served_by(&gw, 10).await;
    assert!(ports.contains(&a.port), "{ports:?}");
}
