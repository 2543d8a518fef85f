//! The gateway as an edge proxy, independent of the store (memory):
//! responses the upstream cuts off mid-body reach the client as transport
//! errors, never as complete responses; forwarding headers cannot be
//! forged by clients, and are extended for trusted proxies; with several
//! upstreams, health checks take a stopped one out of rotation and put it
//! back when it returns, also across a reload. (TLS: tests/tls.rs.)

mod common;

use common::gateway::GatewayBuilder;
use common::protocol::{served_by, Browser};
use common::Upstream;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const STORE: &str = "{type: memory}";

/// An upstream that answers every request with `head` + `body` and then
/// closes the connection (or, with `stall`, stops sending and keeps it
/// open), whatever the head promised.
async fn cutting_upstream(head: &'static str, body: &'static str, stall: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                // Read the request head.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.flush().await;
                if stall {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            });
        }
    });
    port
}

/// The client must see an error reading the body, never a complete one.
async fn assert_cut(port: u16, extra: impl FnOnce(GatewayBuilder) -> GatewayBuilder) {
    let gw = extra(GatewayBuilder::new(port, STORE)).start();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = client.get(gw.url("/items")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the head had gone out already");
    let id = resp
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.text().await;
    assert!(
        body.is_err(),
        "a cut-off response reached the client as complete: {body:?}"
    );
    // Logged with the request id (a moment later: after the abort).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = gw.log();
        if log
            .lines()
            .any(|l| l.contains(&id) && l.contains("connection aborted"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no abort logged for {id}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_cut_off_is_a_transport_error() {
    let port = cutting_upstream(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        "10\r\n{\"items\":[1,2,3,\r\n",
        false,
    )
    .await;
    assert_cut(port, |b| b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_response_cut_off_is_a_transport_error() {
    let port = cutting_upstream(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
        "{\"items\":[1,2,3,",
        false,
    )
    .await;
    assert_cut(port, |b| b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_read_timeout_mid_body_is_a_transport_error() {
    let port = cutting_upstream(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        "10\r\n{\"items\":[1,2,3,\r\n",
        true,
    )
    .await;
    assert_cut(port, |b| {
        b.section("server", "upstream_read_timeout", "300ms")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_before_the_head_is_still_a_plain_502() {
    // Nothing listens there: the request fails before any response byte.
    let port = common::free_port();
    let gw = GatewayBuilder::new(port, STORE).start();
    let r = Browser::new(&gw).get("/", &[]).await;
    assert_eq!(r.status, 502);
    assert!(r.text.contains("upstream unavailable"), "{}", r.text);
    let id = r.header("x-request-id").unwrap();
    assert!(r.text.contains(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_forge_forwarding_headers() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, STORE).start();
    let r = Browser::new(&gw)
        .get(
            "/",
            &[
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-port", "1"),
                ("forwarded", "for=6.6.6.6"),
                ("x-real-ip", "6.6.6.6"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.upstream_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        r.upstream_header("x-forwarded-proto").as_deref(),
        Some("http")
    );
    assert_eq!(
        r.upstream_header("x-forwarded-host"),
        Some(format!("127.0.0.1:{}", gw.port))
    );
    for gone in ["forwarded", "x-real-ip", "x-forwarded-port"] {
        assert_eq!(r.upstream_header(gone), None, "{gone} reached the app");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_extend_the_forwarded_chain() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(up.port, STORE)
        .section("server", "trusted_proxies", "[127.0.0.0/8]")
        .start();
    let r = Browser::new(&gw)
        .get(
            "/",
            &[
                ("x-forwarded-for", "198.51.100.9"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "www.example"),
            ],
        )
        .await;
    assert_eq!(
        r.upstream_header("x-forwarded-for").as_deref(),
        Some("198.51.100.9, 127.0.0.1")
    );
    assert_eq!(
        r.upstream_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
    assert_eq!(
        r.upstream_header("x-forwarded-host").as_deref(),
        Some("www.example")
    );
}

fn upstream_list(ups: &[&Upstream]) -> String {
    let list: Vec<String> = ups
        .iter()
        .map(|u| format!("\"127.0.0.1:{}\"", u.port))
        .collect();
    format!("[{}]", list.join(", "))
}

/// Longer than a few check intervals (200 ms), for a busy machine.
const SETTLE: Duration = Duration::from_millis(800);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_upstream_leaves_rotation_and_rejoins() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let gw = GatewayBuilder::new(a.port, STORE)
        .set("upstream", &upstream_list(&[&a, &b]))
        .section("server", "upstream_health_check", "{interval: 200ms}")
        .start();
    let ports = served_by(&gw, 6).await;
    assert!(
        ports.contains(&a.port) && ports.contains(&b.port),
        "{ports:?}"
    );

    // A stops: after the check, every request goes to B and succeeds.
    a.stop();
    tokio::time::sleep(SETTLE).await;
    let ports = served_by(&gw, 30).await;
    assert!(ports.iter().all(|&p| p == b.port), "{ports:?}");
    gw.wait_log_line(|l| {
        l.contains(&format!(
            "upstream[0] http://127.0.0.1:{} becomes unhealthy",
            a.port
        ))
    });

    // A is back: it gets requests again.
    a.start_again().await;
    tokio::time::sleep(SETTLE).await;
    let ports = served_by(&gw, 10).await;
    assert!(ports.contains(&a.port), "{ports:?}");

    // Both down: a request still tries one (a plain 502, not a hang), and
    // the first upstream to return is used at once.
    a.stop();
    b.stop();
    tokio::time::sleep(SETTLE).await;
    let r = Browser::new(&gw).get("/", &[]).await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert!(r.text.contains("upstream unavailable"), "{}", r.text);
    b.start_again().await;
    tokio::time::sleep(SETTLE).await;
    let ports = served_by(&gw, 4).await;
    assert!(ports.iter().all(|&p| p == b.port), "{ports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_follow_a_reloaded_upstream_list() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let c = Upstream::start().await;
    let gw = GatewayBuilder::new(a.port, STORE)
        .set("upstream", &upstream_list(&[&a, &b]))
        .section(
            "server",
            "upstream_health_check",
            "{interval: 200ms, path: /healthz}",
        )
        .start();
    let ports = served_by(&gw, 4).await;
    assert!(
        ports.contains(&a.port) && ports.contains(&b.port),
        "{ports:?}"
    );

    // Reload onto B and C while B is sick: C takes everything at once,
    // since the new list is checked before it serves.
    b.set_failing(true);
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let mut map: serde_yaml::Mapping = serde_yaml::from_str(&text).unwrap();
    map.insert(
        "upstream".into(),
        serde_yaml::from_str(&upstream_list(&[&b, &c])).unwrap(),
    );
    std::fs::write(&gw.config_path, serde_yaml::to_string(&map).unwrap()).unwrap();
    unsafe {
        libc::kill(gw.pid(), libc::SIGHUP);
    }
    gw.wait_log_line(|l| l.contains("configuration reloaded"));
    let ports = served_by(&gw, 10).await;
    assert!(ports.iter().all(|&p| p == c.port), "{ports:?}");

    b.set_failing(false);
    tokio::time::sleep(SETTLE).await;
    let ports = served_by(&gw, 10).await;
    assert!(
        ports.contains(&b.port) && !ports.contains(&a.port),
        "{ports:?}"
    );
}
