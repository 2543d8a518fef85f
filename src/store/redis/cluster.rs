//! The store's Redis Cluster connection, replaced with a fresh one while
//! the cluster is in trouble.
//!
//! Why: under load, the `redis` crate's cluster connection (0.27) can stall
//! every command, on every node, while it recovers from a lost node: its
//! slot refreshes and reconnects run one at a time in the connection's own
//! task, and new failures keep restarting them. Measured here with 64
//! concurrent clients and one primary stopped for 1.5 s: all commands, also
//! those for the healthy nodes, timed out until about two seconds after the
//! node served again, while a connection opened after the node was back
//! worked at once. So the store keeps its own watch: a command that fails
//! as unavailable, or is abandoned unanswered (the engine's
//! `store.timeout`), marks the connection suspect; while anything was
//! suspect within [`TROUBLE_WINDOW`], a background task opens a fresh
//! connection every [`REPLACE_INTERVAL`] and new commands use it. Commands
//! already running finish on the connection they started on.

use arc_swap::ArcSwap;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, RedisResult};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a fresh connection is opened while the cluster is in trouble.
const REPLACE_INTERVAL: Duration = Duration::from_millis(200);
/// How long after the last failure the replacing goes on: long enough to
/// replace a connection that is still stalled after the cluster is back.
const TROUBLE_WINDOW: Duration = Duration::from_secs(1);

pub struct ClusterPool {
    client: ClusterClient,
    current: ArcSwap<ClusterConnection>,
    /// When a command last failed or was abandoned.
    last_trouble: Mutex<Instant>,
    /// A replacing task is running.
    replacing: AtomicBool,
    /// Bound on opening one fresh connection.
    connect_timeout: Duration,
}

impl ClusterPool {
    /// Open the first connection; fails when no seed node answers.
    pub async fn open(client: ClusterClient, connect_timeout: Duration) -> RedisResult<Arc<Self>> {
        let conn = client.get_async_connection().await?;
        Ok(Arc::new(ClusterPool {
            client,
            current: ArcSwap::from_pointee(conn),
            last_trouble: Mutex::new(Instant::now()),
            replacing: AtomicBool::new(false),
            connect_timeout,
        }))
    }

    /// The connection new commands use (a cheap handle).
    pub fn get(&self) -> ClusterConnection {
        (**self.current.load()).clone()
    }

    /// Run `cmd`, watching for trouble.
    pub async fn query<T: FromRedisValue>(self: &Arc<Self>, cmd: &Cmd) -> RedisResult<T> {
        let mut watch = Watch {
            pool: self,
            done: false,
        };
        let result = cmd.query_async(&mut self.get()).await;
        watch.done = true;
        if let Err(e) = &result {
            if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_refusal()
                || e.is_connection_dropped()
                || matches!(
                    e.kind(),
                    redis::ErrorKind::ClusterDown | redis::ErrorKind::ClusterConnectionNotFound
                )
            {
                self.suspect();
            }
        }
        result
    }

    /// Note trouble; start replacing the connection unless that runs.
    fn suspect(self: &Arc<Self>) {
        *self.last_trouble.lock().unwrap() = Instant::now();
        self.replace();
    }

    /// Replace the connection every [`REPLACE_INTERVAL`] until no trouble
    /// was noted for [`TROUBLE_WINDOW`] (unless a task does that already).
    fn replace(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.clone();
        runtime.spawn(async move {
            loop {
                match tokio::time::timeout(pool.connect_timeout, pool.client.get_async_connection())
                    .await
                {
                    Ok(Ok(conn)) => pool.current.store(Arc::new(conn)),
                    Ok(Err(e)) => tracing::debug!("redis cluster: reconnecting: {e}"),
                    Err(_) => tracing::debug!("redis cluster: reconnecting timed out"),
                }
                tokio::time::sleep(REPLACE_INTERVAL).await;
                if pool.last_trouble.lock().unwrap().elapsed() > TROUBLE_WINDOW {
                    break;
                }
            }
            pool.replacing.store(false, Ordering::Release);
            // Trouble noted between the check and the flag: not lost.
            if pool.last_trouble.lock().unwrap().elapsed() <= TROUBLE_WINDOW {
                pool.replace();
            }
        });
    }
}

/// Marks the pool suspect when a command is dropped before its reply
/// arrived (the engine gave up on it at `store.timeout`).
struct Watch<'a> {
    pool: &'a Arc<ClusterPool>,
    done: bool,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.pool.suspect();
        }
    }
}
