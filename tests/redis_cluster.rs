//! The Redis store on a Redis Cluster: the store contract and the protocol
//! suite on one three-node cluster shared by this binary (every test has
//! its own keys), and on a private cluster: sessions spread over the
//! nodes, and a node going down fails only the sessions it holds.
#![cfg(feature = "redis")]

mod common;

use common::gateway::{binary, KEY_A};
use common::protocol::{get_with_cookie, setup, Browser};
use common::redis_server::{cluster_yaml, connect, shared_cluster, RedisCluster};
use common::StoreFixture;
use serde_json::json;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

async fn fixture() -> StoreFixture {
    StoreFixture::new(cluster_yaml(shared_cluster()), ())
}

store_suites!(fixture);
persistence_suite!(fixture);

fn dbsize(port: u16) -> i64 {
    redis::cmd("DBSIZE").query(&mut connect(port)).unwrap()
}

/// ~30 sessions land on several nodes; with one node killed, its sessions
/// get 503 (fail_closed) within the timeout while the others keep working,
/// also once the cluster has marked the node as failed; when it is back,
/// every request succeeds again without restarting the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_and_a_down_node_fails_only_its_sessions() {
    let mut cluster = RedisCluster::start();
    let ports = cluster.ports();
    let yaml = format!(
        "{{type: redis, cluster: [{}], timeout: 500ms}}",
        cluster.urls().join(", ")
    );
    let s = setup(StoreFixture::new(yaml, ()), |b| b).await;

    let mut browsers = Vec::new();
    for i in 0..30 {
        let b = Browser::new(&s.gw);
        let r = b.patch("/", json!({ "n": i })).await;
        assert_eq!(r.status, 200, "{}", r.text);
        browsers.push(b);
    }
    let sizes: Vec<i64> = ports.iter().map(|&p| dbsize(p)).collect();
    assert_eq!(sizes.iter().sum::<i64>(), 30, "{sizes:?}");
    assert!(
        sizes.iter().filter(|&&n| n > 0).count() >= 2,
        "all sessions on one node: {sizes:?}"
    );
    let owner: Vec<usize> = browsers
        .iter()
        .map(|b| {
            let id = b.cookie().unwrap();
            cluster.node_of(&format!("session:{}", id.split('.').next().unwrap()))
        })
        .collect();
    // The victim: the node holding the most sessions.
    let victim = (0..ports.len()).max_by_key(|&i| sizes[i]).unwrap();

    cluster.nodes[victim].stop();
    let check = |phase: &'static str| {
        let browsers = &browsers;
        let owner = &owner;
        async move {
            for (i, b) in browsers.iter().enumerate() {
                let started = Instant::now();
                let r = b.get("/", &[]).await;
                let took = started.elapsed();
                if owner[i] == victim {
                    assert_eq!(r.status, 503, "{phase}: session {i}: {}", r.text);
                    assert!(
                        took < Duration::from_millis(1500),
                        "{phase}: 503 took {took:?}"
                    );
                } else {
                    assert_eq!(r.status, 200, "{phase}: session {i}: {}", r.text);
                    assert_eq!(r.session(), json!({ "n": i }), "{phase}");
                }
            }
        }
    };
    check("node just killed").await;
    // Let the other nodes flag the node as failed (node timeout 1s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let live = ports[(victim + 1) % ports.len()];
    loop {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut connect(live))
            .unwrap();
        if nodes.lines().any(|l| l.contains(" master,fail ")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node never flagged as failed:\n{nodes}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    check("node flagged as failed").await;

    // Back on the same port (its data is gone: no persistence): its
    // sessions start fresh, the others are untouched.
    cluster.nodes[victim].start_again();
    cluster.wait_ok(Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, b) in browsers.iter().enumerate() {
        let cookie = format!("session={}", b.cookie().unwrap());
        let r = loop {
            let r = get_with_cookie(&s.gw, "/", &cookie, &[]).await;
            if r.status == 200 || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(r.status, 200, "after restart: session {i}: {}", r.text);
        let expected = if owner[i] == victim {
            json!({})
        } else {
            json!({ "n": i })
        };
        assert_eq!(r.session(), expected, "after restart: session {i}");
    }
    let b = Browser::new(&s.gw);
    assert_eq!(b.patch("/", json!({"new": 1})).await.status, 200);
    assert_eq!(b.get("/", &[]).await.session(), json!({"new": 1}));
}

/// `conf/redis-cluster.yaml` passes `--test` against a live cluster.
#[test]
fn shipped_cluster_config_is_valid() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/redis-cluster.yaml");
    let text = std::fs::read_to_string(shipped).unwrap();
    let urls = shared_cluster();
    let mut replaced = text.clone();
    for (i, port) in [7000, 7001, 7002].iter().enumerate() {
        let default = format!("redis://127.0.0.1:{port}");
        assert!(
            text.contains(&default),
            "conf/redis-cluster.yaml changed its nodes"
        );
        replaced = replaced.replace(&default, &urls[i]);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redis-cluster.yaml");
    std::fs::write(&path, replaced).unwrap();
    let out = Command::new(binary())
        .args(["-c", path.to_str().unwrap(), "--test"])
        .current_dir(dir.path())
        .env("SESSION_SECRET", KEY_A)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("redis cluster (3 seed node(s)"), "{stdout}");
}

/// `url:` pointed at a cluster node is caught by `--test` with a hint.
#[test]
fn url_of_a_cluster_node_fails_the_config_test_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.yaml");
    let yaml = format!(
        "listen: 127.0.0.1:6188\nupstream: 127.0.0.1:8000\nsecret_keys: [\"{KEY_A}\"]\n\
         store: {{type: redis, url: \"{}\"}}\n",
        shared_cluster()[0]
    );
    std::fs::write(&path, yaml).unwrap();
    let (code, out, err) =
        common::gateway::run_cli(&["-c", path.to_str().unwrap(), "--test"], dir.path());
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.starts_with("error: store.url:"), "{err}");
    assert!(err.contains("store.cluster instead"), "{err}");
}

/// `store:` YAML with the near cache on, for a cluster.
fn near_yaml(urls: &[String]) -> String {
    format!(
        "{{type: redis, cluster: [{}], timeout: 500ms, near_cache: {{enabled: true, max_entries: 1000}}}}",
        urls.join(", ")
    )
}

/// The same suites with the near cache on (one tracking connection per
/// node), on the shared cluster.
mod near_cache {
    use super::*;

    async fn fixture() -> StoreFixture {
        StoreFixture::new(near_yaml(shared_cluster()), ())
    }

    store_suites!(fixture);
    persistence_suite!(fixture);
}

fn redis_at<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut connect(port))
        .unwrap_or_else(|e| panic!("{port} {args:?}: {e}"))
}

/// Session loads (the load script) run by every node since `reset_stats`.
fn loads_since_reset(ports: &[u16]) -> u64 {
    ports
        .iter()
        .map(|&port| {
            let stats: String = redis_at(port, &["INFO", "commandstats"]);
            stats
                .lines()
                .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
                .map(|rest| rest.split(',').next().unwrap().parse::<u64>().unwrap())
                .unwrap_or(0)
        })
        .sum()
}

fn reset_stats(ports: &[u16]) {
    for &port in ports {
        let () = redis_at(port, &["CONFIG", "RESETSTAT"]);
    }
}

/// Poll `gw` until it serves `want` for `cookie`, within 100 ms (the
/// README's bound).
async fn until_seen(gw: &common::Gateway, cookie: &str, want: &serde_json::Value) {
    let since = Instant::now();
    loop {
        let r = get_with_cookie(gw, "/", &format!("session={cookie}"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if &r.session() == want {
            return;
        }
        assert!(
            since.elapsed() < Duration::from_millis(100),
            "still served {} (want {want})",
            r.session()
        );
    }
}

/// Two gateways on a private cluster with the near cache: every node
/// tracks both gateways, a change on any node reaches the cache, and a
/// tracking connection killed on one node never lets B serve a stale
/// session of that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_cache_tracks_every_node() {
    let cluster = RedisCluster::start();
    let ports = cluster.ports();
    let up = common::Upstream::start().await;
    let builder = common::GatewayBuilder::new(up.port, &near_yaml(&cluster.urls()));
    let (a, b) = (builder.start(), builder.start());

    // One session per node at least.
    let mut by_node: Vec<Option<(String, String)>> = vec![None; ports.len()];
    for i in 0..60 {
        if by_node.iter().all(Option::is_some) {
            break;
        }
        let user = Browser::new(&a);
        assert_eq!(user.patch("/", json!({ "n": i })).await.status, 200);
        let cookie = user.cookie().unwrap();
        let key = format!("session:{}", cookie.split('.').next().unwrap());
        by_node[cluster.node_of(&key)].get_or_insert((cookie, key));
    }
    let sessions: Vec<(String, String)> = by_node
        .into_iter()
        .map(|s| s.expect("a session on every node"))
        .collect();
    let data: Vec<serde_json::Value> = {
        let mut v = Vec::new();
        for (cookie, _) in &sessions {
            let r = get_with_cookie(&a, "/", &format!("session={cookie}"), &[]).await;
            v.push(r.session());
        }
        v
    };

    // B caches all of them: a round of reads reaches no node.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        reset_stats(&ports);
        for ((cookie, _), want) in sessions.iter().zip(&data) {
            let r = get_with_cookie(&b, "/", &format!("session={cookie}"), &[]).await;
            assert_eq!(&r.session(), want);
        }
        if loads_since_reset(&ports) == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "B never served from its cache");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for &port in &ports {
        let list: String = redis_at(port, &["CLIENT", "LIST"]);
        let tracking = list
            .lines()
            .filter(|l| l.contains(" name=session-gateway-tracking "))
            .count();
        assert_eq!(tracking, 2, "node {port}: one per gateway\n{list}");
    }

    // A direct change on each node reaches B.
    for (node, (cookie, key)) in sessions.iter().enumerate() {
        let () = redis_at(
            ports[node],
            &["SET", key, &format!(r#"P{{"node":{node}}}"#), "KEEPTTL"],
        );
        until_seen(&b, cookie, &json!({ "node": node })).await;
    }

    // Kill the tracking connections of one node, change its session at
    // once: the push for it is lost, B must still not serve the old value.
    let victim = 1;
    let list: String = redis_at(ports[victim], &["CLIENT", "LIST"]);
    for line in list
        .lines()
        .filter(|l| l.contains(" name=session-gateway-tracking "))
    {
        let id = line.split(' ').find_map(|f| f.strip_prefix("id=")).unwrap();
        let _: i64 = redis_at(ports[victim], &["CLIENT", "KILL", "ID", id]);
    }
    let (cookie, key) = &sessions[victim];
    let () = redis_at(
        ports[victim],
        &["SET", key, r#"P{"after":"kill"}"#, "KEEPTTL"],
    );
    until_seen(&b, cookie, &json!({"after": "kill"})).await;
    drop(a);
}
