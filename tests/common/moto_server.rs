//! DynamoDB for tests: moto's server (`moto_server`, PyPI `moto[server]`)
//! on a free loopback port, from the Python virtual environment
//! `./scripts/test` creates (`SGW_TEST_VENV`, default `target/test-venv`).
//! A private server per test that stops, restarts or freezes it; one
//! shared server for the rest, each test with its own table.
//!
//! moto keeps everything in memory (a restart loses every table), checks
//! no credentials and never deletes expired items (no TTL sweeper), which
//! is exactly what the read-time expiry tests need.

use super::server::{ServerKind, ServerProcess};
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::Client;
use aws_smithy_http_client::{tls, Builder as HttpClientBuilder};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Once, OnceLock};
use std::time::Duration;

/// The region every test uses (moto keeps tables per region).
pub const REGION: &str = "us-east-1";

/// `$SGW_TEST_VENV/bin/moto_server`, read at run time.
pub fn moto_bin() -> PathBuf {
    let venv = std::env::var_os("SGW_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv"));
    venv.join("bin/moto_server")
}

/// Credentials for moto (it accepts any) in this process's environment,
/// inherited by every gateway a test starts, so neither the tests nor the
/// gateways depend on the runner's AWS settings, and nothing ever asks
/// instance metadata (169.254.169.254) for credentials or a region.
/// Every test calls this before it starts anything (the fixtures do), so
/// no other thread of this binary reads the environment meanwhile.
pub fn aws_test_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for var in [
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_DYNAMODB",
            "AWS_DEFAULT_REGION",
            "AWS_REGION",
        ] {
            std::env::remove_var(var);
        }
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    });
}

pub struct MotoServer {
    pub port: u16,
    /// Stop, restart (empty: moto keeps nothing), freeze, thaw.
    pub process: ServerProcess,
}

impl MotoServer {
    /// A private server on a free port.
    pub fn start() -> MotoServer {
        aws_test_env();
        let process = ServerProcess::start(ServerKind {
            name: "moto_server",
            command: Box::new(|port, _| {
                let mut cmd = std::process::Command::new(moto_bin());
                cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
                cmd
            }),
            ready: Box::new(|port, _| answers(port)),
            install_hint: "Create the test environment with ./scripts/test (python3 -m venv \
                 target/test-venv && target/test-venv/bin/pip install -r scripts/test-requirements.txt), \
                 or point SGW_TEST_VENV at a venv with moto[server]",
            start_timeout: Duration::from_secs(30),
            stop_signal: libc::SIGTERM,
        });
        MotoServer {
            port: process.port,
            process,
        }
    }

    /// `http://127.0.0.1:<port>`, for `store.endpoint_url`.
    pub fn endpoint(&self) -> String {
        endpoint(self.port)
    }
}

pub fn endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The port of one moto server shared by every test of this binary that
/// does not stop or freeze it. It is started from a thread of its own that
/// lives as long as the binary: a server's parent-death signal follows the
/// thread that spawned it, and test threads end with their test.
pub fn shared_port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("shared-moto".into())
            .spawn(move || {
                match std::panic::catch_unwind(MotoServer::start) {
                    Ok(server) => {
                        let _ = tx.send(Ok(server.port));
                        // Keep the server (and this thread) for good.
                        loop {
                            std::thread::park();
                        }
                    }
                    Err(panic) => {
                        let msg = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "moto_server did not start".into());
                        let _ = tx.send(Err(msg));
                    }
                }
            })
            .expect("spawn the shared moto thread");
        match rx.recv() {
            Ok(Ok(port)) => port,
            Ok(Err(msg)) => panic!("{msg}"),
            Err(_) => panic!("the shared moto_server thread died"),
        }
    })
}

/// Does moto answer `GET /moto-api/` with 200?
fn answers(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
    else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    if conn
        .write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

/// An SDK client for inspecting moto from a test (static dummy
/// credentials, bounded timeouts, no retries).
pub fn client(port: u16, region: &str) -> Client {
    aws_test_env();
    let http = HttpClientBuilder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let conf = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .endpoint_url(endpoint(port))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .http_client(http)
        .timeout_config(
            aws_sdk_dynamodb::config::timeout::TimeoutConfig::builder()
                .operation_timeout(Duration::from_secs(10))
                .build(),
        )
        .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
        .build();
    Client::from_conf(conf)
}
