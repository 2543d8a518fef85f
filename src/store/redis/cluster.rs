//! The store's Redis Cluster connection, replaced with a fresh one when it
//! stalls.
//!
//! Why: under load, the `redis` crate's cluster connection (0.27) can stall
//! every command, on every node, while it recovers from a lost node: its
//! slot refreshes and reconnects run one at a time in the connection's own
//! task, and new failures keep restarting them. Measured here with 64
//! concurrent clients and one primary stopped for 1.5 s: all commands, also
//! those for the healthy nodes, timed out until about two seconds after the
//! node served again, while a connection opened after the node was back
//! worked at once. So the store keeps its own watch over the connection
//! new commands use:
//!
//! - a command still unanswered after [`STALL`] (or abandoned unanswered at
//!   `store.timeout`) means the connection stalls: it is replaced at most
//!   every [`REPLACE_INTERVAL`];
//! - a command failing fast as unavailable (refused, dropped, CLUSTERDOWN)
//!   replaces a connection at least [`ERROR_AGE`] old: a node that is down
//!   makes the gateway reconnect about twice a second, not at every
//!   failure, yet a connection that keeps failing after the node is back
//!   (one opened just before it came back does) is replaced within
//!   [`ERROR_AGE`] plus one [`REPLACE_INTERVAL`] tick, well inside a
//!   second.
//!
//! Only trouble seen on the current connection counts (by generation), so
//! commands still finishing on an old connection do not replace a fresh
//! one. Commands already running finish on the connection they started on.

use arc_swap::ArcSwap;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, RedisResult};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A command unanswered for this long marks its connection as stalled
/// (a healthy cluster answers within a millisecond or two).
const STALL: Duration = Duration::from_millis(100);
/// How often at most the connection is replaced.
const REPLACE_INTERVAL: Duration = Duration::from_millis(200);
/// A connection that only reports fast failures is replaced once it is
/// this old. (At 1 s, a connection opened just before the node came back
/// failed on for up to 1.2 s after: CI saw the last 503 1.19 s after.)
const ERROR_AGE: Duration = Duration::from_millis(400);
/// The watch ends after this long without trouble on the current
/// connection.
const QUIET: Duration = Duration::from_secs(1);

struct Current {
    conn: ClusterConnection,
    generation: u64,
    opened: Instant,
}

#[derive(Default)]
struct Trouble {
    /// The last stall on the current generation.
    stalled: Option<Instant>,
    /// The last fast failure on the current generation.
    failed: Option<Instant>,
}

pub struct ClusterPool {
    client: ClusterClient,
    current: ArcSwap<Current>,
    generations: AtomicU64,
    trouble: Mutex<Trouble>,
    /// A watch task is running.
    watching: AtomicBool,
    /// Bound on opening one fresh connection.
    connect_timeout: Duration,
}

impl ClusterPool {
    /// Open the first connection; fails when no seed node answers.
    pub async fn open(client: ClusterClient, connect_timeout: Duration) -> RedisResult<Arc<Self>> {
        let conn = client.get_async_connection().await?;
        Ok(Arc::new(ClusterPool {
            client,
            current: ArcSwap::from_pointee(Current {
                conn,
                generation: 0,
                opened: Instant::now(),
            }),
            generations: AtomicU64::new(0),
            trouble: Mutex::new(Trouble::default()),
            watching: AtomicBool::new(false),
            connect_timeout,
        }))
    }

    /// Run `cmd` on the current connection, watching for trouble.
    pub async fn query<T: FromRedisValue>(self: &Arc<Self>, cmd: &Cmd) -> RedisResult<T> {
        let (mut conn, generation) = {
            let current = self.current.load();
            (current.conn.clone(), current.generation)
        };
        let mut watch = Watch {
            pool: self,
            generation,
            done: false,
        };
        let reply = cmd.query_async(&mut conn);
        tokio::pin!(reply);
        let result = tokio::select! {
            biased;
            result = &mut reply => result,
            () = tokio::time::sleep(STALL) => {
                self.note(generation, true);
                reply.await
            }
        };
        watch.done = true;
        if let Err(e) = &result {
            if super::connection_trouble(e) {
                self.note(generation, e.is_timeout());
            }
        }
        result
    }

    /// Note trouble on connection `generation` (ignored unless that is
    /// still the current one) and start the watch.
    fn note(self: &Arc<Self>, generation: u64, stalled: bool) {
        if self.current.load().generation != generation {
            return;
        }
        {
            let mut t = self.trouble.lock().unwrap_or_else(|p| p.into_inner());
            let now = Some(Instant::now());
            if stalled {
                t.stalled = now;
            } else {
                t.failed = now;
            }
        }
        self.watch();
    }

    /// Every [`REPLACE_INTERVAL`], replace the connection if it is in
    /// trouble, until it was quiet for [`QUIET`] (unless a watch runs).
    fn watch(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.clone();
        runtime.spawn(async move {
            loop {
                let opened = pool.current.load().opened;
                let (replace, quiet) = {
                    let t = pool.trouble.lock().unwrap_or_else(|p| p.into_inner());
                    let last = t.stalled.max(t.failed);
                    (
                        t.stalled.is_some()
                            || (t.failed.is_some() && opened.elapsed() >= ERROR_AGE),
                        last.is_none_or(|at| at.elapsed() > QUIET),
                    )
                };
                if replace {
                    pool.replace().await;
                } else if quiet {
                    break;
                }
                tokio::time::sleep(REPLACE_INTERVAL).await;
            }
            pool.watching.store(false, Ordering::Release);
            // Trouble noted while the loop was ending is not lost.
            let pending = {
                let t = pool.trouble.lock().unwrap_or_else(|p| p.into_inner());
                t.stalled
                    .max(t.failed)
                    .is_some_and(|at| at.elapsed() <= QUIET)
            };
            if pending {
                pool.watch();
            }
        });
    }

    /// Open a fresh connection and make it current; trouble noted so far
    /// was about the old one.
    async fn replace(&self) {
        match tokio::time::timeout(self.connect_timeout, self.client.get_async_connection()).await {
            Ok(Ok(conn)) => {
                let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
                self.current.store(Arc::new(Current {
                    conn,
                    generation,
                    opened: Instant::now(),
                }));
                *self.trouble.lock().unwrap_or_else(|p| p.into_inner()) = Trouble::default();
            }
            Ok(Err(e)) => tracing::debug!("redis cluster: reconnecting: {e}"),
            Err(_) => tracing::debug!("redis cluster: reconnecting timed out"),
        }
    }
}

/// Marks the connection stalled when a command is dropped before its reply
/// arrived (the engine gave up on it at `store.timeout`).
struct Watch<'a> {
    pool: &'a Arc<ClusterPool>,
    generation: u64,
    done: bool,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.pool.note(self.generation, true);
        }
    }
}
