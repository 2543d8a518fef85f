//! MySQL / MariaDB dialect of the SQL store (InnoDB).
//!
//! Schema (what `create_table: true` runs; `sessions` stands for
//! `store.table`):
//! ```sql
//! CREATE TABLE IF NOT EXISTS `sessions` (
//!     id      VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
//!     data    MEDIUMBLOB   NOT NULL,
//!     expires DATETIME(6)  NOT NULL,
//!     PRIMARY KEY (id),
//!     INDEX `sessions_expires_idx` (expires)
//! ) ENGINE=InnoDB;
//! ```
//! - `id` compares bytewise (`utf8mb4_bin`): session ids are base64, and a
//!   case-insensitive collation would let two ids name one row.
//! - `expires` is a UTC `DATETIME(6)`, written and read as microseconds
//!   from `1970-01-01` with `TIMESTAMPADD`/`TIMESTAMPDIFF`, which involve
//!   no session time zone (unlike `FROM_UNIXTIME` or `TIMESTAMP` columns).
//! - `update`: `SELECT ... FOR UPDATE` in a transaction (the locking read
//!   sees the latest committed row and holds it until commit). When the
//!   request already loaded the row (`update_seen`), one conditional
//!   `UPDATE`/`DELETE ... WHERE id = ? AND expires > now AND data = <the
//!   loaded bytes>` comes first; the transaction runs only if it matched
//!   nothing.
//! - `create`: `DELETE` the row if it expired, then a plain `INSERT`; a
//!   duplicate key means a live row exists. (`INSERT ... ON DUPLICATE KEY
//!   UPDATE` cannot report "kept the live row": sqlx connects with
//!   `CLIENT_FOUND_ROWS`, so that case and a fresh insert both count 1.)
//! - purge: `DELETE ... WHERE expires <= ? ORDER BY expires LIMIT n`,
//!   repeated; each batch is its own short transaction. Concurrent range
//!   deletes deadlock in InnoDB, so purgers (several gateways, a cron
//!   `cleanup`) take a named lock (`GET_LOCK`) without waiting: one
//!   purges, the others skip that round.

use super::batch::{Batcher, MAX_BATCH};
use super::pool::{pooled, Pool};
use super::{
    classify, decide, loaded, missing_table, now_and_expiry, now_micros, write_if_unchanged,
    Attempt, Dialect, Locked, SqlConfig, TableName, CONFLICT_RETRIES, PURGE_BATCH,
    PURGE_MAX_BATCHES,
};
use crate::session::{Loaded, SessionStore, StoreError, UpdateFn, UpdateOutcome};
use async_trait::async_trait;
use bytes::Bytes;
use sqlx::error::ErrorKind;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::{ConnectOptions, Connection, Row};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub(super) fn options(url: &str) -> Result<MySqlConnectOptions, sqlx::Error> {
    MySqlConnectOptions::from_str(url)
}

/// The server's error number, when the error came from the server.
fn number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|m| m.number()),
        _ => None,
    }
}

/// Error numbers meaning "not available now": too many connections (1040),
/// shutdown in progress (1053), lock wait timeout (1205), deadlock (1213,
/// once retries are spent), query interrupted or timed out (1317, 1969,
/// 3024), connection killed (1927).
fn transient_number(n: u16) -> bool {
    matches!(n, 1040 | 1053 | 1205 | 1213 | 1317 | 1927 | 1969 | 3024)
}

/// Deadlock (InnoDB picked this transaction as the victim): worth
/// re-running the whole transaction.
fn conflict(e: &sqlx::Error) -> bool {
    number(e) == Some(1213)
}

fn err(e: sqlx::Error) -> StoreError {
    let n = number(&e);
    // `code()` is the SQLSTATE; class 08 is "connection exception".
    classify(Dialect::MySql, e, |sqlstate| {
        sqlstate.starts_with("08") || n.is_some_and(transient_number)
    })
}

const EPOCH: &str = "TIMESTAMP'1970-01-01 00:00:00'";

/// A `?` parameter (µs since the epoch) as a UTC `DATETIME(6)`.
fn ts() -> String {
    format!("TIMESTAMPADD(MICROSECOND, ?, {EPOCH})")
}

/// The statements, built once from the validated table name.
struct Sql {
    load: String,
    /// `load_many[i]`: the batch read of `2 << i` keys (a batch is padded
    /// to the next power of two, so a handful of statements are prepared).
    load_many: Vec<String>,
    delete_expired: String,
    insert: String,
    lock: String,
    write: String,
    delete: String,
    write_if: String,
    delete_if: String,
    touch: String,
    purge: String,
    probe: String,
    ddl: String,
}

impl Sql {
    fn new(table: &TableName) -> Sql {
        let t = table.quoted('`');
        let ts = ts();
        Sql {
            load: format!(
                "SELECT data, TIMESTAMPDIFF(MICROSECOND, {EPOCH}, expires) AS expires_us \
                 FROM {t} WHERE id = ? AND expires > {ts}"
            ),
            load_many: (1..=MAX_BATCH.trailing_zeros())
                .map(|bits| {
                    let marks = vec!["?"; 1 << bits].join(", ");
                    format!(
                        "SELECT id, data, TIMESTAMPDIFF(MICROSECOND, {EPOCH}, expires) AS expires_us \
                         FROM {t} WHERE id IN ({marks}) AND expires > {ts}"
                    )
                })
                .collect(),
            delete_expired: format!("DELETE FROM {t} WHERE id = ? AND expires <= {ts}"),
            insert: format!("INSERT INTO {t} (id, data, expires) VALUES (?, ?, {ts})"),
            lock: format!("SELECT data FROM {t} WHERE id = ? AND expires > {ts} FOR UPDATE"),
            write: format!("UPDATE {t} SET data = ?, expires = {ts} WHERE id = ?"),
            delete: format!("DELETE FROM {t} WHERE id = ?"),
            // `data = ?` compares the BLOB bytewise; a single-statement
            // UPDATE/DELETE reads the latest committed row under its lock.
            write_if: format!(
                "UPDATE {t} SET data = ?, expires = {ts} WHERE id = ? AND expires > {ts} AND data = ?"
            ),
            delete_if: format!("DELETE FROM {t} WHERE id = ? AND expires > {ts} AND data = ?"),
            // Rows "affected" count matched rows (CLIENT_FOUND_ROWS), so a
            // touch that happens to write the same value still reports 1.
            touch: format!("UPDATE {t} SET expires = {ts} WHERE id = ? AND expires > {ts}"),
            purge: format!(
                "DELETE FROM {t} WHERE expires <= {ts} ORDER BY expires LIMIT {PURGE_BATCH}"
            ),
            probe: format!("SELECT id, data, expires FROM {t} WHERE 1 = 0"),
            ddl: format!(
                "CREATE TABLE IF NOT EXISTS {t} (\n    \
                     id      VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,\n    \
                     data    MEDIUMBLOB   NOT NULL,\n    \
                     expires DATETIME(6)  NOT NULL,\n    \
                     PRIMARY KEY (id),\n    \
                     INDEX `{}` (expires)\n\
                 ) ENGINE=InnoDB",
                table.index_name()
            ),
        }
    }
}

pub(super) struct MySqlStore {
    pool: Arc<Pool<MySqlConnection>>,
    table: TableName,
    sql: Arc<Sql>,
    /// Every read goes through here ([`super::batch`]).
    reads: Batcher,
    /// Name of the server-wide lock purgers of this table take.
    purge_lock: String,
}

/// `GET_LOCK` names are server-wide and at most 64 characters: hash the
/// database and table into a fixed-length name.
fn purge_lock_name(database: Option<&str>, table: &TableName) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    for b in format!("{}/{table}", database.unwrap_or("")).bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("session-gateway-purge-{hash:016x}")
}

/// The live rows of `keys` (one key: the single-row statement; more: the
/// batch statement for the next power of two, the first key repeated in
/// the places left over).
async fn fetch(
    pool: Arc<Pool<MySqlConnection>>,
    sql: Arc<Sql>,
    keys: Vec<String>,
) -> Result<Vec<(String, Loaded)>, StoreError> {
    let now = now_micros();
    if let [key] = &keys[..] {
        let row = pooled!(pool, |c| sqlx::query(&sql.load)
            .bind(key)
            .bind(now)
            .fetch_optional(c))
        .map_err(err)?;
        let Some(row) = row else {
            return Ok(Vec::new());
        };
        return Ok(vec![(key.clone(), loaded(&row, 0).map_err(err)?)]);
    }
    let places = keys.len().next_power_of_two();
    let statement = &sql.load_many[places.trailing_zeros() as usize - 1];
    let rows = pooled!(pool, |c| {
        let mut q = sqlx::query(statement);
        for i in 0..places {
            q = q.bind(keys.get(i).unwrap_or(&keys[0]));
        }
        q.bind(now).fetch_all(c)
    })
    .map_err(err)?;
    rows.into_iter()
        .map(|row| {
            // `utf8mb4_bin` reads as binary.
            let id: Vec<u8> = row.try_get(0)?;
            let id = String::from_utf8_lossy(&id).into_owned();
            Ok((id, loaded(&row, 1)?))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(err)
}

impl MySqlStore {
    pub(super) async fn connect(cfg: &SqlConfig) -> Result<MySqlStore, StoreError> {
        let options = options(&cfg.url)
            .map_err(StoreError::backend)?
            .log_statements(tracing_log::log::LevelFilter::Trace)
            .log_slow_statements(tracing_log::log::LevelFilter::Warn, Duration::from_secs(1));
        let purge_lock = purge_lock_name(options.get_database(), &cfg.table);
        let pool = Arc::new(Pool::new(options, cfg.max_connections, cfg.acquire_timeout));
        let sql = Arc::new(Sql::new(&cfg.table));
        let reads = {
            let (pool, sql) = (pool.clone(), sql.clone());
            Batcher::start(move |keys| fetch(pool.clone(), sql.clone(), keys))
        };
        let store = MySqlStore {
            pool,
            table: cfg.table.clone(),
            sql,
            reads,
            purge_lock,
        };
        store.pool.open_one().await.map_err(err)?;
        if cfg.create_table {
            store.ensure_table().await?;
        }
        Ok(store)
    }

    /// `CREATE TABLE IF NOT EXISTS` with the index inline is one atomic
    /// statement in MySQL (serialized by the metadata lock), so gateways
    /// starting together need no extra coordination.
    async fn ensure_table(&self) -> Result<(), StoreError> {
        if self.probe().await.is_ok() {
            return Ok(());
        }
        // `query` rather than `raw_sql`: the latter's executor bounds make
        // this future fail the `Send` check callers need.
        pooled!(self.pool, |c| sqlx::query(&self.sql.ddl)
            .persistent(false)
            .execute(c))
        .map_err(|e| {
            StoreError::Backend(format!(
                "store.table: cannot create table `{}`: mysql: {e}",
                self.table
            ))
        })?;
        tracing::info!(table = %self.table, "created the session table (if it was missing)");
        Ok(())
    }

    async fn probe(&self) -> Result<(), sqlx::Error> {
        pooled!(self.pool, |c| sqlx::query(&self.sql.probe)
            .fetch_optional(c))
        .map(drop)
    }

    /// One update attempt on `conn`, in a transaction (run through
    /// `pooled!`, which gives the connection back or closes it).
    async fn try_update(
        &self,
        conn: &mut MySqlConnection,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Attempt {
        let mut tx = conn.begin().await?;
        let (now, expires) = now_and_expiry(ttl);
        let row = sqlx::query(&self.sql.lock)
            .bind(key)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let data: Option<Vec<u8>> = row.map(|r| r.try_get(0)).transpose()?;
        let outcome = match decide(data.as_deref(), f) {
            Locked::Done(result) => {
                tx.rollback().await?;
                return Ok(result);
            }
            Locked::Write(value) => {
                sqlx::query(&self.sql.write)
                    .bind(&value[..])
                    .bind(expires)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                UpdateOutcome::Written(value)
            }
            Locked::Delete => {
                sqlx::query(&self.sql.delete)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                UpdateOutcome::Deleted
            }
        };
        tx.commit().await?;
        Ok(Ok(outcome))
    }

    /// [`write_if_unchanged`] with this dialect's statements (rows
    /// "affected" count matched rows: `CLIENT_FOUND_ROWS`).
    async fn update_if_unchanged(
        &self,
        key: &str,
        ttl: Duration,
        seen: &Bytes,
        f: &UpdateFn<'_>,
    ) -> Result<Option<UpdateOutcome>, StoreError> {
        let (now, expires) = now_and_expiry(ttl);
        let write = async |value: &Bytes| {
            let done = pooled!(self.pool, |c| sqlx::query(&self.sql.write_if)
                .bind(&value[..])
                .bind(expires)
                .bind(key)
                .bind(now)
                .bind(&seen[..])
                .execute(c))
            .map_err(err)?;
            Ok(done.rows_affected() == 1)
        };
        let delete = async || {
            let done = pooled!(self.pool, |c| sqlx::query(&self.sql.delete_if)
                .bind(key)
                .bind(now)
                .bind(&seen[..])
                .execute(c))
            .map_err(err)?;
            Ok(done.rows_affected() == 1)
        };
        write_if_unchanged(seen, f, write, delete).await
    }
}

#[async_trait]
impl SessionStore for MySqlStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        self.reads.load(key).await
    }

    async fn create(&self, key: &str, value: &Bytes, ttl: Duration) -> Result<bool, StoreError> {
        let (now, expires) = now_and_expiry(ttl);
        // Only an expired row goes; a live one makes the insert fail below.
        pooled!(self.pool, |c| sqlx::query(&self.sql.delete_expired)
            .bind(key)
            .bind(now)
            .execute(c))
        .map_err(err)?;
        let inserted = pooled!(self.pool, |c| sqlx::query(&self.sql.insert)
            .bind(key)
            .bind(&value[..])
            .bind(expires)
            .execute(c));
        match inserted {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(db)) if db.kind() == ErrorKind::UniqueViolation => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    async fn update(
        &self,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        let mut attempt = 0;
        loop {
            match pooled!(self.pool, |c| self.try_update(c, key, ttl, f)) {
                Ok(Ok(outcome)) => return Ok(outcome),
                Ok(Err(msg)) => return Err(StoreError::Rejected(msg)),
                Err(e) if conflict(&e) && attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %e, "session update deadlocked; retrying");
                }
                Err(e) => return Err(err(e)),
            }
        }
    }

    async fn update_seen(
        &self,
        key: &str,
        ttl: Duration,
        seen: &Bytes,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        match self.update_if_unchanged(key, ttl, seen, f).await? {
            Some(outcome) => Ok(outcome),
            None => self.update(key, ttl, f).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        pooled!(self.pool, |c| sqlx::query(&self.sql.delete)
            .bind(key)
            .execute(c))
        .map_err(err)?;
        Ok(())
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let (now, expires) = now_and_expiry(ttl);
        let done = pooled!(self.pool, |c| sqlx::query(&self.sql.touch)
            .bind(expires)
            .bind(key)
            .bind(now)
            .execute(c))
        .map_err(err)?;
        Ok(done.rows_affected() >= 1)
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        // Range deletes of two purgers deadlock in InnoDB, so one purger
        // at a time: whoever holds the named lock purges, the others skip
        // this round instead of waiting. The lock belongs to the
        // connection, which is therefore closed afterwards rather than
        // pooled: if this future is dropped midway the lock goes with the
        // socket instead of staying with an idle pooled connection.
        let mut conn = self.pool.acquire().await.map_err(err)?;
        conn.close_on_drop();
        let locked: i64 = sqlx::query_scalar("SELECT COALESCE(GET_LOCK(?, 0), 0)")
            .bind(&self.purge_lock)
            .fetch_one(&mut *conn)
            .await
            .map_err(err)?;
        if locked != 1 {
            tracing::debug!(table = %self.table, "another process is purging; skipped");
            return Ok(0);
        }
        let now = now_micros();
        let mut removed = 0;
        let mut deadlocks = 0;
        let mut batches = 0;
        while batches < PURGE_MAX_BATCHES {
            let n = match sqlx::query(&self.sql.purge)
                .bind(now)
                .execute(&mut *conn)
                .await
            {
                Ok(done) => done.rows_affected(),
                // A request touching an expired row can still collide
                // with a batch; the victim batch is simply run again.
                Err(e) if conflict(&e) && deadlocks < CONFLICT_RETRIES => {
                    deadlocks += 1;
                    continue;
                }
                Err(e) => return Err(err(e)),
            };
            batches += 1;
            removed += n;
            if n < PURGE_BATCH {
                break;
            }
        }
        if batches == PURGE_MAX_BATCHES {
            tracing::info!(
                removed,
                "purge stopped after {PURGE_MAX_BATCHES} batches; the next run continues"
            );
        }
        let _ = sqlx::query("DO RELEASE_LOCK(?)")
            .bind(&self.purge_lock)
            .execute(&mut *conn)
            .await;
        Ok(removed)
    }

    async fn check(&self) -> Result<(), StoreError> {
        pooled!(self.pool, |c| sqlx::query("SELECT 1").execute(c)).map_err(err)?;
        self.probe().await.map_err(|e| match e {
            sqlx::Error::Database(_) => missing_table(Dialect::MySql, &self.table, e),
            other => err(other),
        })
    }
}
