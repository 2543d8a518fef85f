//! SQLite dialect of the SQL store: one database file, created if missing.
//!
//! Schema (what `create_table: true` runs; `sessions` stands for
//! `store.table`):
//! ```sql
//! CREATE TABLE IF NOT EXISTS "sessions" (
//!     id      VARCHAR(255) PRIMARY KEY NOT NULL,
//!     data    BLOB         NOT NULL,
//!     expires INTEGER      NOT NULL  -- UTC, microseconds since 1970-01-01
//! );
//! CREATE INDEX IF NOT EXISTS "sessions_expires_idx" ON "sessions" (expires);
//! ```
//! SQLite has no date-time type; an integer keeps comparisons exact and
//! indexable (`datetime(expires / 1000000, 'unixepoch')` shows it).
//!
//! SQLite allows one writer per file. The database runs in WAL mode so
//! readers never wait for it, and writes of this process queue on an
//! async mutex instead of spinning in SQLite's busy handler. `update` is a
//! `BEGIN IMMEDIATE` transaction, which takes the file's write lock before
//! reading, so another process on the same file (a `cleanup` cron run, a
//! second gateway) can neither interleave nor turn it into a deadlock;
//! such writers wait up to the busy timeout.

use super::pool::{pooled, Pool};
use super::{
    classify, decide, loaded, missing_table, now_and_expiry, now_micros, Attempt, Dialect, Locked,
    SqlConfig, TableName, PURGE_BATCH, PURGE_MAX_BATCHES,
};
use crate::session::{Loaded, SessionStore, StoreError, UpdateFn, UpdateOutcome};
use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::Mutex;

/// How long a write waits for another process holding the file's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn options(url: &str) -> Result<SqliteConnectOptions, sqlx::Error> {
    SqliteConnectOptions::from_str(url)
}

/// SQLITE_BUSY / SQLITE_LOCKED (any extended code): the file is locked by
/// another writer beyond the busy timeout, a condition that passes.
fn transient(code: &str) -> bool {
    code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
}

fn err(e: sqlx::Error) -> StoreError {
    classify(Dialect::Sqlite, e, transient)
}

/// The statements, built once from the validated table name.
struct Sql {
    load: String,
    create: String,
    lock: String,
    write: String,
    delete: String,
    touch: String,
    purge: String,
    probe: String,
    ddl: [String; 2],
}

impl Sql {
    fn new(table: &TableName) -> Sql {
        let t = table.quoted('"');
        // SQLite wants the schema on the index name and the bare table
        // name after ON (the index lives in the table's database).
        let index = match &table.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", table.index_name()),
            None => format!("\"{}\"", table.index_name()),
        };
        Sql {
            load: format!("SELECT data, expires FROM {t} WHERE id = ? AND expires > ?"),
            // In DO UPDATE, bare column names are the existing row.
            create: format!(
                "INSERT INTO {t} (id, data, expires) VALUES (?, ?, ?) \
                 ON CONFLICT (id) DO UPDATE SET data = excluded.data, expires = excluded.expires \
                 WHERE expires <= ?"
            ),
            lock: format!("SELECT data FROM {t} WHERE id = ? AND expires > ?"),
            write: format!("UPDATE {t} SET data = ?, expires = ? WHERE id = ?"),
            delete: format!("DELETE FROM {t} WHERE id = ?"),
            touch: format!("UPDATE {t} SET expires = ? WHERE id = ? AND expires > ?"),
            purge: format!(
                "DELETE FROM {t} WHERE id IN \
                 (SELECT id FROM {t} WHERE expires <= ? ORDER BY expires LIMIT {PURGE_BATCH})"
            ),
            probe: format!("SELECT id, data, expires FROM {t} WHERE 1 = 0"),
            ddl: [
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (\n    \
                         id      VARCHAR(255) PRIMARY KEY NOT NULL,\n    \
                         data    BLOB         NOT NULL,\n    \
                         expires INTEGER      NOT NULL\n\
                     )"
                ),
                format!(
                    "CREATE INDEX IF NOT EXISTS {index} ON \"{}\" (expires)",
                    table.name
                ),
            ],
        }
    }
}

pub(super) struct SqliteStore {
    pool: Pool<SqliteConnection>,
    table: TableName,
    sql: Sql,
    /// Serializes this process's writes (see the module comment).
    write: Mutex<()>,
}

impl SqliteStore {
    pub(super) async fn connect(cfg: &SqlConfig) -> Result<SqliteStore, StoreError> {
        let options = options(&cfg.url)
            .map_err(StoreError::backend)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode NORMAL never corrupts the file; a power loss can
            // drop the last commits, an acceptable trade for sessions
            // against an fsync per request.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .log_statements(tracing_log::log::LevelFilter::Trace)
            .log_slow_statements(tracing_log::log::LevelFilter::Warn, Duration::from_secs(1));
        let file = options.get_filename().display().to_string();
        let pool = Pool::new(options, cfg.max_connections, cfg.acquire_timeout);
        let store = SqliteStore {
            pool,
            table: cfg.table.clone(),
            sql: Sql::new(&cfg.table),
            write: Mutex::new(()),
        };
        store
            .pool
            .open_one()
            .await
            .map_err(|e| StoreError::Backend(format!("sqlite: cannot open {file}: {e}")))?;
        if cfg.create_table {
            store.ensure_table().await?;
        }
        Ok(store)
    }

    async fn ensure_table(&self) -> Result<(), StoreError> {
        if self.probe().await.is_ok() {
            return Ok(());
        }
        let _write = self.write.lock().await;
        for statement in &self.sql.ddl {
            // `query` rather than `raw_sql`: the latter's executor bounds
            // make this future fail the `Send` check callers need.
            pooled!(self.pool, |c| sqlx::query(statement)
                .persistent(false)
                .execute(c))
            .map_err(|e| {
                StoreError::Backend(format!(
                    "store.table: cannot create table `{}`: sqlite: {e}",
                    self.table
                ))
            })?;
        }
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
        conn: &mut SqliteConnection,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Attempt {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
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
}

#[async_trait]
impl SessionStore for SqliteStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        let row = pooled!(self.pool, |c| sqlx::query(&self.sql.load)
            .bind(key)
            .bind(now_micros())
            .fetch_optional(c))
        .map_err(err)?;
        row.map(|row| loaded(&row, 0)).transpose().map_err(err)
    }

    async fn create(&self, key: &str, value: &Bytes, ttl: Duration) -> Result<bool, StoreError> {
        let (now, expires) = now_and_expiry(ttl);
        let _write = self.write.lock().await;
        let done = pooled!(self.pool, |c| sqlx::query(&self.sql.create)
            .bind(key)
            .bind(&value[..])
            .bind(expires)
            .bind(now)
            .execute(c))
        .map_err(err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn update(
        &self,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        // BEGIN IMMEDIATE plus the mutex leave no conflict to retry: a
        // writer in another process is waited for (busy timeout) up front.
        let _write = self.write.lock().await;
        match pooled!(self.pool, |c| self.try_update(c, key, ttl, f)) {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(msg)) => Err(StoreError::Rejected(msg)),
            Err(e) => Err(err(e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let _write = self.write.lock().await;
        pooled!(self.pool, |c| sqlx::query(&self.sql.delete)
            .bind(key)
            .execute(c))
        .map_err(err)?;
        Ok(())
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let (now, expires) = now_and_expiry(ttl);
        let _write = self.write.lock().await;
        let done = pooled!(self.pool, |c| sqlx::query(&self.sql.touch)
            .bind(expires)
            .bind(key)
            .bind(now)
            .execute(c))
        .map_err(err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = now_micros();
        let mut removed = 0;
        for _ in 0..PURGE_MAX_BATCHES {
            // The lock is taken per batch so requests' writes slot in
            // between batches.
            let n = {
                let _write = self.write.lock().await;
                pooled!(self.pool, |c| sqlx::query(&self.sql.purge)
                    .bind(now)
                    .execute(c))
                .map_err(err)?
                .rows_affected()
            };
            removed += n;
            if n < PURGE_BATCH {
                return Ok(removed);
            }
        }
        tracing::info!(
            removed,
            "purge stopped after {PURGE_MAX_BATCHES} batches; the next run continues"
        );
        Ok(removed)
    }

    async fn check(&self) -> Result<(), StoreError> {
        pooled!(self.pool, |c| sqlx::query("SELECT 1").execute(c)).map_err(err)?;
        self.probe().await.map_err(|e| match e {
            sqlx::Error::Database(_) => missing_table(Dialect::Sqlite, &self.table, e),
            other => err(other),
        })
    }
}
