//! The SQL stores' connection pool: at most `store.max_connections`
//! connections, handed out one per store call, kept open between calls.
//!
//! Why not sqlx's own `Pool`: sqlx 0.8 pings a connection (a round trip to
//! the database) every time one goes back to its pool, in a task spawned
//! for it, and with `test_before_acquire` once more before handing it out.
//! A session read, one `SELECT`, cost three round trips; the database and
//! the gateway did three times the work (profiled with the load bench:
//! about 35 µs of gateway CPU per PostgreSQL read on top of the proxy's own
//! 30 µs). Here a connection in steady use is never pinged:
//!
//! - A connection idle for [`PING_AFTER_IDLE`] or more, or idle since a
//!   connection of this pool last failed, is pinged before it is handed out,
//!   and replaced if the ping fails. So after a database restart the first
//!   request finds live connections, as with sqlx's ping on acquire.
//! - A connection goes back to the pool only when its call ended cleanly:
//!   success, or an error the database answered (the protocol is then at a
//!   clean point; a transaction left open by the error is rolled back by
//!   sqlx before the connection's next statement). A call that failed on
//!   the connection itself (I/O, protocol), or was cancelled midway (a
//!   `store.timeout` dropped it), drops the connection, which closes the
//!   socket: nothing half-read is ever reused. A session lock the call held
//!   (MySQL `GET_LOCK`, a transaction) goes with the socket.
//! - Connections live at most [`MAX_LIFETIME`] and are closed after
//!   [`IDLE_TIMEOUT`] unused (checked whenever the pool is used), as
//!   before with sqlx's pool options.

use sqlx::{ConnectOptions, Connection};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Idle time after which a connection is pinged before use. Under load
/// every connection is in use far more often, so this costs nothing there;
/// after a quiet second the ping costs one round trip, as every call did
/// with sqlx's pool.
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// A connection older than this is closed instead of reused (server-side
/// memory, rebalanced replicas behind a proxy).
pub const MAX_LIFETIME: Duration = Duration::from_secs(1800);

/// A connection unused this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

struct Idle<C> {
    conn: C,
    born: Instant,
    used: Instant,
}

pub(super) struct Pool<C: Connection> {
    options: C::Options,
    /// Most recently used last, so busy connections stay busy and the
    /// ones at the front age out.
    idle: Mutex<Vec<Idle<C>>>,
    /// One permit per connection in use; together with "connect only when
    /// no idle one is left" this bounds all connections by the permits.
    permits: Semaphore,
    acquire_timeout: Duration,
    /// [`PING_AFTER_IDLE`], shorter in tests.
    ping_after: Duration,
    /// Nanoseconds after `epoch` of the last failure on a connection
    /// (0: none); idle connections last used before it are pinged.
    trouble: AtomicU64,
    epoch: Instant,
}

impl<C: Connection + 'static> Pool<C> {
    /// A pool that opens connections on demand; `acquire_timeout` bounds
    /// waiting for a free connection and opening one.
    pub fn new(options: C::Options, max_connections: u32, acquire_timeout: Duration) -> Self {
        Pool {
            options,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max_connections.max(1) as usize),
            acquire_timeout,
            ping_after: PING_AFTER_IDLE,
            trouble: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle<C>>> {
        // Every operation on the list is a single push/pop/remove: a
        // panic elsewhere cannot leave it half-changed.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn mark_trouble(&self) {
        let now = self.since_epoch(Instant::now()).max(1);
        self.trouble.fetch_max(now, Ordering::Relaxed);
    }

    /// A connection for one store call: an idle one (pinged first if it
    /// may be dead) or a new one. Fails with `PoolTimedOut` after the
    /// acquire timeout, or with the error of connecting.
    pub async fn acquire(&self) -> Result<Conn<'_, C>, sqlx::Error> {
        tokio::time::timeout(self.acquire_timeout, self.acquire_within())
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    }

    /// Open a connection now (or find an idle one) and keep it: a bad URL
    /// or a dead server fails here.
    pub async fn open_one(&self) -> Result<(), sqlx::Error> {
        self.acquire().await?.done(Ok(()))
    }

    async fn acquire_within(&self) -> Result<Conn<'_, C>, sqlx::Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        loop {
            let Some(mut idle) = self.idle().pop() else {
                break;
            };
            let now = Instant::now();
            if now.duration_since(idle.born) >= MAX_LIFETIME {
                close_gracefully(idle.conn);
                continue;
            }
            let suspect = self.since_epoch(idle.used) < self.trouble.load(Ordering::Relaxed);
            if (suspect || now.duration_since(idle.used) >= self.ping_after)
                && idle.conn.ping().await.is_err()
            {
                // Dropped: the socket closes. The others may be dead too.
                self.mark_trouble();
                continue;
            }
            return Ok(Conn {
                pool: self,
                conn: Some(idle.conn),
                born: idle.born,
                close_on_drop: false,
                _permit: permit,
            });
        }
        let conn = self.options.connect().await?;
        Ok(Conn {
            pool: self,
            conn: Some(conn),
            born: Instant::now(),
            close_on_drop: false,
            _permit: permit,
        })
    }

    fn put_back(&self, conn: C, born: Instant) {
        let now = Instant::now();
        if now.duration_since(born) >= MAX_LIFETIME {
            close_gracefully(conn);
            return;
        }
        let stale = {
            let mut idle = self.idle();
            idle.push(Idle {
                conn,
                born,
                used: now,
            });
            // The front is the least recently used.
            (now.duration_since(idle[0].used) >= IDLE_TIMEOUT).then(|| idle.remove(0))
        };
        if let Some(stale) = stale {
            close_gracefully(stale.conn);
        }
    }
}

/// Close with the protocol's goodbye (the server logs no broken
/// connection), in the background; dropped if there is no runtime.
fn close_gracefully<C: Connection + 'static>(conn: C) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = conn.close().await;
        });
    }
}

/// A connection taken from the [`Pool`] for one call. Give it back with
/// [`Conn::done`]; dropped without that (an early return, a cancelled
/// call) it is closed, not reused.
pub(super) struct Conn<'a, C: Connection + 'static> {
    pool: &'a Pool<C>,
    conn: Option<C>,
    born: Instant,
    /// Closed when dropped, even after success (see [`Conn::close_on_drop`]).
    close_on_drop: bool,
    _permit: SemaphorePermit<'a>,
}

impl<C: Connection + 'static> Conn<'_, C> {
    /// End the call with its result: the connection goes back to the pool
    /// if the call succeeded or the database answered with an error;
    /// after any other error (I/O, protocol) it is closed. Returns the
    /// result unchanged.
    pub fn done<T>(mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if !self.close_on_drop && matches!(result, Ok(_) | Err(sqlx::Error::Database(_))) {
            if let Some(conn) = self.conn.take() {
                self.pool.put_back(conn, self.born);
            }
        }
        result
    }
}

impl<C: Connection + 'static> Conn<'_, C> {
    /// Never give this connection back: it holds something that must not
    /// outlive the call (a named lock). It is closed when dropped.
    pub fn close_on_drop(&mut self) {
        self.close_on_drop = true;
    }
}

impl<C: Connection + 'static> Drop for Conn<'_, C> {
    fn drop(&mut self) {
        if self.close_on_drop {
            if let Some(conn) = self.conn.take() {
                close_gracefully(conn);
            }
        } else if self.conn.is_some() {
            // Not given back: failed or cancelled. The socket closes with
            // the connection; idle ones get checked before their next use.
            self.pool.mark_trouble();
        }
    }
}

impl<C: Connection + 'static> Deref for Conn<'_, C> {
    type Target = C;
    fn deref(&self) -> &C {
        self.conn
            .as_ref()
            .expect("a Conn holds its connection until done")
    }
}

impl<C: Connection + 'static> DerefMut for Conn<'_, C> {
    fn deref_mut(&mut self) -> &mut C {
        self.conn
            .as_mut()
            .expect("a Conn holds its connection until done")
    }
}

/// `pooled!(pool, |c| future)`: run the future built with `c`, a
/// `&mut` connection from `pool`, give the connection back (or close it)
/// by the result with [`Conn::done`], and evaluate to that result. An error
/// acquiring the connection comes out the same way.
macro_rules! pooled {
    ($pool:expr, |$c:ident| $body:expr) => {
        match $pool.acquire().await {
            Ok(mut conn) => {
                let result = {
                    let $c = &mut *conn;
                    $body.await
                };
                conn.done(result)
            }
            Err(e) => Err(e),
        }
    };
}
pub(super) use pooled;

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

    fn pool(dir: &tempfile::TempDir, max: u32) -> Pool<SqliteConnection> {
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("db.sqlite"))
            .create_if_missing(true);
        Pool::new(options, max, Duration::from_millis(200))
    }

    /// Marks the connection: a TEMP table lives and dies with it.
    async fn mark(c: &mut SqliteConnection) {
        sqlx::query("CREATE TEMP TABLE mark (x)")
            .execute(c)
            .await
            .unwrap();
    }

    async fn marked(c: &mut SqliteConnection) -> bool {
        sqlx::query("SELECT 1 FROM temp.mark")
            .fetch_optional(c)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_connection_given_back_is_reused_one_dropped_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir, 4);
        let mut c = pool.acquire().await.unwrap();
        mark(&mut c).await;
        c.done(Ok(())).unwrap();
        let mut c = pool.acquire().await.unwrap();
        assert!(
            marked(&mut c).await,
            "the idle connection is handed out again"
        );
        // An answer from the database leaves the connection usable.
        let r = sqlx::query("SELECT * FROM no_such_table")
            .execute(&mut *c)
            .await;
        assert!(matches!(r, Err(sqlx::Error::Database(_))));
        assert!(c.done(r).is_err());
        let c = pool.acquire().await.unwrap();
        assert_eq!(pool.trouble.load(Ordering::Relaxed), 0);
        // Dropped without `done` (failed or cancelled): closed, never reused,
        // and the pool now checks idle connections before use.
        drop(c);
        assert_ne!(pool.trouble.load(Ordering::Relaxed), 0);
        let mut c = pool.acquire().await.unwrap();
        assert!(!marked(&mut c).await, "a new connection");
        c.done(Ok(())).unwrap();
    }

    #[tokio::test]
    async fn connections_are_bounded_and_a_waiter_gets_one_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir, 2);
        let a = pool.acquire().await.unwrap();
        let b = pool.acquire().await.unwrap();
        let started = Instant::now();
        assert!(matches!(
            pool.acquire().await.map(drop),
            Err(sqlx::Error::PoolTimedOut)
        ));
        assert!(started.elapsed() >= Duration::from_millis(200));
        let (c, ()) = tokio::join!(pool.acquire(), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            a.done(Ok(())).unwrap();
        });
        c.unwrap().done(Ok(())).unwrap();
        b.done(Ok(())).unwrap();
        assert_eq!(pool.idle().len(), 2, "never more connections than permits");
    }

    #[tokio::test]
    async fn idle_connections_are_pinged_and_old_ones_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = pool(&dir, 2);
        pool.ping_after = Duration::ZERO;
        let mut c = pool.acquire().await.unwrap();
        mark(&mut c).await;
        c.done(Ok(())).unwrap();
        // Pinged (the ping succeeds): the same connection.
        let mut c = pool.acquire().await.unwrap();
        assert!(marked(&mut c).await);
        // Past its lifetime: closed when given back.
        c.born = Instant::now() - MAX_LIFETIME;
        c.done(Ok(())).unwrap();
        assert!(pool.idle().is_empty());
        // Unused too long: closed when the pool is next used.
        let c = pool.acquire().await.unwrap();
        let d = pool.acquire().await.unwrap();
        c.done(Ok(())).unwrap();
        d.done(Ok(())).unwrap();
        assert_eq!(pool.idle().len(), 2);
        pool.idle()[0].used = Instant::now() - IDLE_TIMEOUT;
        // The most recently used one is handed out; giving it back closes
        // the stale one.
        let d = pool.acquire().await.unwrap();
        d.done(Ok(())).unwrap();
        assert_eq!(pool.idle().len(), 1);
    }
}
