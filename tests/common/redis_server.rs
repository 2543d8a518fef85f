//! Real Redis servers for tests: a private `redis-server` on a free
//! loopback port in a temp dir (no persistence), killed on drop, that a
//! test can stop and start again on the same port or freeze (SIGSTOP); and
//! a three-node Redis Cluster built from such servers with `redis-cli
//! --cluster create`; and TLS material for `rediss://` tests
//! ([`make_certs`]). The machine's own Redis (6379) is never touched.
//!
//! Binaries come from `REDIS_SERVER_BIN` / `REDIS_CLI_BIN` (default
//! `redis-server` / `redis-cli` on PATH); processes are
//! [`ServerProcess`]es.

use super::server::{program, ServerKind, ServerProcess};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn server_bin() -> String {
    program("REDIS_SERVER_BIN", "redis-server")
}

pub fn cli_bin() -> String {
    program("REDIS_CLI_BIN", "redis-cli")
}

/// One private `redis-server` (no persistence).
pub struct RedisServer {
    pub port: u16,
    process: ServerProcess,
}

impl RedisServer {
    /// Start a standalone server on a free port.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Start a server with extra `redis-server` arguments
    /// (e.g. `["--requirepass", "pw"]`).
    pub fn start_with(args: &[&str]) -> RedisServer {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let process = ServerProcess::start(ServerKind {
            name: "redis-server",
            command: Box::new(move |port, dir| {
                let mut cmd = Command::new(server_bin());
                cmd.args(["--port", &port.to_string()])
                    .args(["--bind", "127.0.0.1"])
                    .args(["--save", ""])
                    .args(["--appendonly", "no"])
                    .arg("--dir")
                    .arg(dir)
                    .args(&args);
                cmd
            }),
            ready: Box::new(|port, _| ping(port)),
            install_hint:
                "Install it with `apt-get install redis-server` (or set REDIS_SERVER_BIN)",
            start_timeout: Duration::from_secs(10),
            stop_signal: libc::SIGKILL,
        });
        RedisServer {
            port: process.port,
            process,
        }
    }

    pub fn dir(&self) -> &Path {
        self.process.dir()
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// Kill the server (an outage; its data is gone, nothing persists).
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Start again on the same port after [`stop`](Self::stop).
    pub fn start_again(&mut self) {
        self.process.start_again();
    }

    /// A server that also listens for TLS on a second port (returned),
    /// with the certificates [`make_certs`] made in `certs`, and requires
    /// client certificates there (mutual TLS).
    pub fn start_tls(certs: &Path) -> (RedisServer, u16) {
        let p = |f: &str| certs.join(f).to_str().unwrap().to_string();
        let tls_port = super::free_port();
        let server = RedisServer::start_with(&[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &p("server.crt"),
            "--tls-key-file",
            &p("server.key"),
            "--tls-ca-cert-file",
            &p("ca.crt"),
            "--tls-auth-clients",
            "yes",
        ]);
        (server, tls_port)
    }

    /// Freeze the process (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.process.pause();
    }

    /// Thaw a [`pause`](Self::pause)d server (SIGCONT).
    pub fn resume(&self) {
        self.process.resume();
    }

    /// A synchronous client for inspecting the server from a test.
    pub fn client(&self) -> redis::Connection {
        connect(self.port)
    }
}

/// A blocking connection with timeouts, so a frozen server cannot hang a
/// test.
pub fn connect(port: u16) -> redis::Connection {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let con = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect to redis on port {port}: {e}"));
    con.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    con.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    con
}

/// Does something answer RESP on the port? (`-NOAUTH` counts as alive.)
fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 64];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| n > 0 && matches!(buf[0], b'+' | b'-'))
        && !buf.starts_with(b"-LOADING")
}

/// A private CA, a server certificate for 127.0.0.1 and a client
/// certificate, made with the `openssl` command in `dir`.
pub fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the TLS test needs the `openssl` command (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=sgw-test-ca",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    // Extensions make the client certificate X.509 v3 too: rustls refuses
    // v1 certificates.
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for name in ["server", "client"] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN=sgw-test-{name}"),
        ]);
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &*format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &*format!("{name}.crt"),
            "-days",
            "2",
        ]
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
        args.extend(["-extfile".to_string(), format!("{name}.ext")]);
        run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

// ----------------------------------------------------------------- cluster

/// A Redis Cluster of three primaries (no replicas) on free ports, with a
/// short node timeout so failures are noticed within about a second, and
/// `cluster-require-full-coverage no` so the slots of live nodes keep
/// working while one node is down.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::start_with(&[])
    }

    /// A cluster whose nodes get extra `redis-server` arguments (e.g.
    /// `--appendonly yes` so a restarted node keeps its data).
    pub fn start_with(extra: &[&str]) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let mut args = vec![
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-require-full-coverage",
                    "no",
                ];
                args.extend_from_slice(extra);
                RedisServer::start_with(&args)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(cli_bin())
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    panic!(
                        "`{}` not found: the Redis Cluster tests need it. Install it with \
                         `apt-get install redis-server` (redis-cli comes with it, or \
                         `apt-get install redis-tools`; or set REDIS_CLI_BIN)",
                        cli_bin()
                    )
                }
                panic!("cannot run {}: {e}", cli_bin())
            });
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(20));
        cluster
    }

    /// Wait until every running node reports `cluster_state:ok` and sees
    /// all its peers.
    pub fn wait_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let states: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| n.is_running())
                .map(|n| {
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query(&mut n.client())
                        .unwrap_or_default();
                    info
                })
                .collect();
            let ok = states.iter().all(|i| {
                i.contains("cluster_state:ok")
                    && i.contains("cluster_slots_assigned:16384")
                    && i.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
            });
            if ok {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "cluster not ok within {limit:?}:\n{}",
                    states.join("\n---\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until node `i` (restarted) serves its own slots again: no node
    /// flags any peer as failing, and a write of a key it owns, sent to it
    /// directly, succeeds (no MOVED, no CLUSTERDOWN, no LOADING).
    pub fn wait_node_serving(&self, i: usize, limit: Duration) {
        let ports = self.ports();
        let key = (0..10_000)
            .map(|n| format!("probe:{n}"))
            .find(|k| node_of(&ports, k) == i)
            .expect("some key maps to every node");
        let deadline = Instant::now() + limit;
        loop {
            let flagged = self.nodes.iter().filter(|n| n.is_running()).any(|n| {
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query(&mut n.client())
                    .unwrap_or_default();
                nodes.contains("fail")
            });
            let served = !flagged
                && redis::cmd("SET")
                    .arg(&key)
                    .arg("1")
                    .query::<()>(&mut self.nodes[i].client())
                    .is_ok();
            if served {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not serve its slots within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The `store:` YAML for this cluster.
    pub fn yaml(&self) -> String {
        cluster_yaml(&self.urls())
    }

    /// The node serving `key` (by `CLUSTER KEYSLOT` and `CLUSTER SLOTS`).
    pub fn node_of(&self, key: &str) -> usize {
        node_of(&self.ports(), key)
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }
}

pub fn cluster_yaml(urls: &[String]) -> String {
    format!("{{type: redis, cluster: [{}]}}", urls.join(", "))
}

/// Index into `ports` of the node that serves `key`, asked of any live node.
pub fn node_of(ports: &[u16], key: &str) -> usize {
    for &port in ports {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}/")) else {
            continue;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
            continue;
        };
        let _ = con.set_read_timeout(Some(Duration::from_secs(2)));
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut con)
            .unwrap();
        // [[start, end, [host, port, id], ...], ...]
        let ranges: Vec<(u16, u16, (String, u16))> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query::<Vec<redis::Value>>(&mut con)
            .unwrap()
            .into_iter()
            .map(|range| {
                let redis::Value::Array(items) = range else {
                    panic!("CLUSTER SLOTS: {range:?}")
                };
                let start: u16 = redis::from_redis_value(&items[0]).unwrap();
                let end: u16 = redis::from_redis_value(&items[1]).unwrap();
                let redis::Value::Array(master) = &items[2] else {
                    panic!("CLUSTER SLOTS master: {:?}", items[2])
                };
                let host: String = redis::from_redis_value(&master[0]).unwrap();
                let port: u16 = redis::from_redis_value(&master[1]).unwrap();
                (start, end, (host, port))
            })
            .collect();
        let (_, _, (_, owner)) = ranges
            .iter()
            .find(|(s, e, _)| (*s..=*e).contains(&slot))
            .unwrap_or_else(|| panic!("slot {slot} not assigned"));
        return ports.iter().position(|p| p == owner).unwrap();
    }
    panic!("no cluster node answered");
}

/// A cluster shared by every test of one test binary (each test uses its
/// own keys): building a cluster takes a few seconds, too long to pay per
/// test. It is built on a thread that lives as long as the process, so
/// its servers die with the binary (PDEATHSIG); an `atexit` hook kills
/// them and removes their directories on a normal exit.
pub fn shared_cluster() -> &'static [String] {
    static URLS: OnceLock<Vec<String>> = OnceLock::new();
    URLS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("shared-redis-cluster".into())
            .spawn(move || {
                let mut cluster = RedisCluster::start();
                let mut leftovers = LEFTOVERS.lock().unwrap();
                for node in &mut cluster.nodes {
                    leftovers.push((node.pid(), node.dir().to_path_buf()));
                }
                drop(leftovers);
                unsafe {
                    libc::atexit(clean_up_shared);
                }
                let _ = tx.send(cluster.urls());
                // The nodes live until the process ends.
                let _keep = cluster;
                loop {
                    std::thread::park();
                }
            })
            .unwrap();
        rx.recv()
            .expect("the shared Redis Cluster failed to start (see the panic above)")
    })
}

static LEFTOVERS: Mutex<Vec<(i32, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn clean_up_shared() {
    if let Ok(list) = LEFTOVERS.lock() {
        for (pid, dir) in list.iter() {
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
