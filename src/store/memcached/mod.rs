//! `store.type: memcached`: sessions in one or several memcached servers,
//! shared by any number of gateways.
//!
//! - One item per session under `key_prefix + id`, holding `SGW1`, the
//!   expiry in milliseconds and the stored form ([`item`]); the item's own
//!   expiration is set too (absolute above 30 days), so memcached evicts
//!   sessions nobody reads again and nothing needs purging.
//! - Each key lives on one server, chosen by our own rendezvous hashing
//!   ([`route`]); a server that is down fails only its own sessions.
//! - `create` is `add` (over an item whose stored expiry already passed,
//!   a CAS-checked set); `update` is the shared compare-and-set loop over
//!   `mg … c` + `ms … C<cas>` / `md … C<cas>`; a refresh (`touch`) is that
//!   loop too, rewriting the same data with a new expiry, because
//!   memcached's own touch cannot change the expiry stored in the value. A
//!   CAS write on a deleted item answers "not found", so neither ever
//!   recreates a destroyed session.
//! - The client is the `memcache` crate's tokio meta-protocol client
//!   (`memcache::exp::AsyncMetaClient`), one per server, each with its own
//!   connection pool, connect and I/O timeouts of `store.timeout`. It never
//!   sends `noreply`/quiet commands, so every write's outcome is read back.

mod config;
mod item;
mod route;

pub use config::MemcachedConfig;

use super::cas::{Cas, CasOps};
use super::{StoreContext, StoreSpec};
use crate::session::{Loaded, SessionStore, StoreError, Update, UpdateFn, UpdateOutcome};
use crate::yaml::ConfigError;
use async_trait::async_trait;
use bytes::Bytes;
use item::Decoded;
use memcache::exp::{AsyncMetaClient, Error as McError, Meta, MutationResult, MutationStatus};
use route::Rendezvous;
use serde_yaml::Value as Yaml;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::OnceCell;

/// Idle connections kept per server and gateway runtime: enough for the
/// requests in flight at once on a busy gateway, so they are not redialed.
const MAX_IDLE: usize = 64;

/// Rounds of `create` against an expired leftover that keeps changing
/// (it cannot, short of another client writing the same random id).
const CREATE_ATTEMPTS: u32 = 3;

/// The registry's entry point: `store.type: memcached`.
pub fn parse(keys: Yaml, ctx: &StoreContext) -> Result<Arc<dyn StoreSpec>, ConfigError> {
    Ok(Arc::new(MemcachedConfig::parse(keys, ctx)?))
}

#[async_trait]
impl StoreSpec for MemcachedConfig {
    fn describe(&self) -> String {
        format!("memcached ({})", self.servers.join(", "))
    }

    fn primary_key(&self) -> &'static str {
        "store.servers"
    }

    async fn connect(&self) -> Result<Arc<dyn SessionStore>, StoreError> {
        Ok(Arc::new(MemcachedStore::new(self)))
    }
}

/// One configured server; its client is made on first use (resolving the
/// name), and made again on the next use if that failed.
struct Server {
    addr: String,
    /// `store.servers[i]`, for messages.
    key: String,
    client: OnceCell<AsyncMetaClient>,
}

pub struct MemcachedStore {
    servers: Vec<Server>,
    router: Rendezvous,
    timeout: Duration,
    cas: Cas,
}

/// An item as read, with its CAS unique.
enum Found {
    Missing,
    /// Present but no live session: expired (memcached has not dropped it
    /// yet) or not ours. Replaceable by `create`.
    Dead {
        cas: u64,
    },
    Live {
        cas: u64,
        expires_ms: u64,
        /// The stored form.
        data: Bytes,
    },
}

impl MemcachedStore {
    /// Nothing is dialed here: each server is connected on first use, so a
    /// server that is down fails only the sessions it holds.
    pub fn new(config: &MemcachedConfig) -> MemcachedStore {
        MemcachedStore {
            servers: config
                .servers
                .iter()
                .zip(&config.keys)
                .map(|(addr, key)| Server {
                    addr: addr.clone(),
                    key: key.clone(),
                    client: OnceCell::new(),
                })
                .collect(),
            router: Rendezvous::new(&config.servers),
            timeout: config.timeout,
            cas: Cas::default(),
        }
    }

    /// The server holding `key` and its client.
    async fn server(&self, key: &str) -> Result<(&Server, &AsyncMetaClient), StoreError> {
        let server = &self.servers[self.router.route(key.as_bytes())];
        Ok((server, self.client(server).await?))
    }

    async fn client<'a>(&self, server: &'a Server) -> Result<&'a AsyncMetaClient, StoreError> {
        server
            .client
            .get_or_try_init(|| async {
                let connect = AsyncMetaClient::builder()
                    .connect_timeout(Some(self.timeout))
                    .io_timeout(Some(self.timeout))
                    .max_idle(MAX_IDLE)
                    .connect_async(server.addr.as_str());
                // Only resolves the name (connections are dialed per
                // operation); bounded all the same.
                match tokio::time::timeout(self.timeout, connect).await {
                    Ok(client) => client.map_err(|e| map_err(server, e)),
                    Err(_) => Err(StoreError::Unavailable(format!(
                        "memcached {} ({}): name not resolved within {:?}",
                        server.addr, server.key, self.timeout
                    ))),
                }
            })
            .await
    }

    /// Read an item and classify it against the clock.
    async fn fetch(&self, key: &str) -> Result<Found, StoreError> {
        let (server, client) = self.server(key).await?;
        let got = client
            .get(key)
            .meta(Meta::NONE.cas())
            .send()
            .await
            .map_err(|e| map_err(server, e))?;
        if !got.hit() {
            return Ok(Found::Missing);
        }
        let cas = got.item.cas.ok_or_else(|| {
            StoreError::Backend(format!("memcached {}: no CAS in the reply", server.addr))
        })?;
        let value = got.value.unwrap_or_default();
        Ok(match item::decode(&value, now_ms()) {
            Decoded::Live { expires_ms } => Found::Live {
                cas,
                expires_ms,
                data: Bytes::from(value).slice(item::HEADER..),
            },
            Decoded::Expired => Found::Dead { cas },
            Decoded::Foreign => {
                tracing::warn!(
                    key,
                    "memcached item is not a session written by this gateway; ignoring it"
                );
                Found::Dead { cas }
            }
        })
    }

    /// The item for `data` expiring `ttl` from now, and its expiration;
    /// refused (nothing sent) if memcached could not hold it. A too-large
    /// store makes memcached delete the item already under the key, so
    /// sending it would destroy the session instead of failing.
    fn item(&self, key: &str, data: &[u8], ttl: Duration) -> Result<(Vec<u8>, u32), StoreError> {
        let len = item::HEADER + data.len();
        let max = item::max_value_len(key.len());
        if len > max {
            return Err(StoreError::Rejected(format!(
                "the session would take {len} bytes in memcached, more than its item size \
                 limit leaves for it ({max}, with the default -I 1m); lower session.max_bytes"
            )));
        }
        let now = now_ms();
        let expires = item::expiry(now, ttl);
        Ok((item::encode(expires, data), item::exptime(expires, now)))
    }

    /// `ms key … T<exptime> C<cas>`: `true` if written; `false` if the
    /// item changed or is gone (a CAS write never creates one).
    async fn set_if(
        &self,
        key: &str,
        cas: u64,
        value: &[u8],
        exptime: u32,
    ) -> Result<bool, StoreError> {
        let (server, client) = self.server(key).await?;
        let done = client
            .set(key, value)
            .ttl_raw(exptime)
            .compare_cas(cas)
            .send()
            .await;
        if_unchanged(server, done)
    }
}

fn now_ms() -> u64 {
    item::ms(SystemTime::now())
}

/// The outcome of a CAS-checked set or delete: `true` if it acted,
/// `false` if the item changed or is gone.
fn if_unchanged(
    server: &Server,
    done: Result<MutationResult, McError>,
) -> Result<bool, StoreError> {
    match done.map_err(|e| map_err(server, e))?.status {
        MutationStatus::Applied => Ok(true),
        MutationStatus::CasMismatch | MutationStatus::NotFound => Ok(false),
        other => Err(unexpected(server, other)),
    }
}

fn unexpected(server: &Server, status: MutationStatus) -> StoreError {
    StoreError::Backend(format!(
        "memcached {}: unexpected reply {status:?}",
        server.addr
    ))
}

/// Not reached, timed out, or the reply was lost => `Unavailable` (the
/// engine retries and applies `on_store_error`); anything memcached itself
/// refused (out of memory with `-M`, a malformed command) => `Backend`.
fn map_err(server: &Server, e: McError) -> StoreError {
    let msg = format!("memcached {} ({}): {e}", server.addr, server.key);
    match e {
        McError::Io(_) | McError::Timeout { .. } | McError::Ambiguous { .. } => {
            StoreError::Unavailable(msg)
        }
        _ => StoreError::Backend(msg),
    }
}

/// The compare-and-set primitives over memcached's CAS uniques.
#[async_trait]
impl CasOps for MemcachedStore {
    type Version = u64;

    async fn read(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
        Ok(match self.fetch(key).await? {
            Found::Live { cas, data, .. } => Some((data, cas)),
            Found::Missing | Found::Dead { .. } => None,
        })
    }

    async fn write_if(
        &self,
        key: &str,
        cas: &u64,
        value: &Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (item, exptime) = self.item(key, value, ttl)?;
        self.set_if(key, *cas, &item, exptime).await
    }

    async fn delete_if(&self, key: &str, cas: &u64) -> Result<bool, StoreError> {
        let (server, client) = self.server(key).await?;
        let done = client.delete(key).compare_cas(*cas).send().await;
        if_unchanged(server, done)
    }
}

#[async_trait]
impl SessionStore for MemcachedStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        Ok(match self.fetch(key).await? {
            Found::Live {
                expires_ms, data, ..
            } => Some(Loaded {
                value: data,
                expires_at: UNIX_EPOCH + Duration::from_millis(expires_ms),
            }),
            Found::Missing | Found::Dead { .. } => None,
        })
    }

    async fn create(&self, key: &str, value: &Bytes, ttl: Duration) -> Result<bool, StoreError> {
        let (item, exptime) = self.item(key, value, ttl)?;
        for _ in 0..CREATE_ATTEMPTS {
            let (server, client) = self.server(key).await?;
            let added = client
                .set(key, &item)
                .ttl_raw(exptime)
                .add()
                .send()
                .await
                .map_err(|e| map_err(server, e))?;
            match added.status {
                MutationStatus::Applied => return Ok(true),
                MutationStatus::AlreadyExists => {}
                other => return Err(unexpected(server, other)),
            }
            // Something is there: a live session (refuse), or one whose
            // expiry passed within the last second or two, which memcached
            // has not dropped yet (replace it, only if unchanged).
            match self.fetch(key).await? {
                Found::Live { .. } => return Ok(false),
                Found::Missing => continue,
                Found::Dead { cas } => {
                    if self.set_if(key, cas, &item, exptime).await? {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    async fn update(
        &self,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        self.cas.update(self, key, ttl, f).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let (server, client) = self.server(key).await?;
        let done = client
            .delete(key)
            .send()
            .await
            .map_err(|e| map_err(server, e))?;
        match done.status {
            MutationStatus::Applied | MutationStatus::NotFound => Ok(()),
            other => Err(unexpected(server, other)),
        }
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        // Memcached's `touch` moves the item's expiration but cannot
        // change the expiry kept in the value, which reads report; so a
        // refresh rewrites the same data with the new expiry through the
        // compare-and-set loop. The CAS write fails on an item deleted
        // meanwhile: a touch never recreates a session.
        let same = |current: &[u8]| Ok(Update::Write(Bytes::copy_from_slice(current)));
        Ok(match self.cas.update(self, key, ttl, &same).await? {
            UpdateOutcome::Written(_) => true,
            UpdateOutcome::Deleted | UpdateOutcome::Missing => false,
        })
    }

    async fn check(&self) -> Result<(), StoreError> {
        for server in &self.servers {
            self.client(server)
                .await?
                .noop()
                .await
                .map_err(|e| map_err(server, e))?;
        }
        Ok(())
    }
}
