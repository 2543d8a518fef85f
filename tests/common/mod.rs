//! Test fixtures shared by every integration test binary: a real HTTP
//! upstream, the real gateway binary on free ports, a client with a cookie
//! jar, and real store servers (one module per backend). Everything is
//! started per test and stopped on drop.
#![allow(dead_code, unused_macros, unused_imports)]

pub mod contract;
pub mod gateway;
#[cfg(feature = "memcached")]
pub mod memcached_server;
#[cfg(feature = "mongodb")]
pub mod mongodb_server;
#[cfg(feature = "dynamodb")]
pub mod moto_server;
pub mod outage;
pub mod protocol;
#[cfg(feature = "redis")]
pub mod redis_server;
pub mod server;
#[cfg(feature = "sql")]
pub mod sql_server;
pub mod tls;
pub mod upstream;

pub use gateway::{Gateway, GatewayBuilder};
pub use upstream::Upstream;

use std::net::TcpListener;

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .unwrap()
        .port()
}

/// A unique token for key prefixes and table names, so runs never collide.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{tag}_{}_{n}_{nanos:x}", std::process::id())
}

/// How a test binary describes its store to the shared suites: the YAML
/// of the `store:` section plus whatever must stay alive (servers, dirs).
/// The gateway of the protocol suite and the store of the contract suite
/// are both built from this one YAML, so they can never differ.
pub struct StoreFixture {
    pub yaml: String,
    pub guard: Box<dyn std::any::Any + Send + Sync>,
    /// Gateways of the protocol suite run with `session.seal: true`.
    pub sealed: bool,
}

impl StoreFixture {
    pub fn new(yaml: impl Into<String>, guard: impl std::any::Any + Send + Sync) -> Self {
        StoreFixture {
            yaml: yaml.into(),
            guard: Box::new(guard),
            sealed: false,
        }
    }

    /// The same store, with sealed sessions.
    pub fn sealed(mut self) -> Self {
        self.sealed = true;
        self
    }

    /// The store this fixture describes, opened as the gateway opens it
    /// (each call opens a new client, like another gateway process).
    pub async fn store(&self) -> std::sync::Arc<dyn session_gateway::session::SessionStore> {
        open_store(&self.yaml).await
    }
}

/// Open the store of a `store:` YAML section through the registry, as the
/// gateway does: any store, no backend named here.
pub async fn open_store(
    store_yaml: &str,
) -> std::sync::Arc<dyn session_gateway::session::SessionStore> {
    let yaml = format!(
        "listen: 127.0.0.1:1\nupstream: 127.0.0.1:2\nsecret_keys: [\"{}\"]\nstore: {store_yaml}\n",
        gateway::KEY_A
    );
    let config = session_gateway::config::Config::from_yaml(&yaml)
        .unwrap_or_else(|e| panic!("fixture store YAML {store_yaml}: {e}"));
    let handle = session_gateway::store::StoreHandle::new(&config.store.backend)
        .unwrap_or_else(|e| panic!("open {store_yaml}: {e}"));
    handle
        .get()
        .await
        .unwrap_or_else(|e| panic!("connect {store_yaml}: {e}"))
        .clone()
}
