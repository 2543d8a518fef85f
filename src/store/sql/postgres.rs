//! PostgreSQL dialect of the SQL store.
//!
//! Schema (what `create_table: true` runs; `sessions` stands for
//! `store.table`, quoted verbatim, so the name is case-sensitive):
//! ```sql
//! CREATE TABLE IF NOT EXISTS "sessions" (
//!     id      VARCHAR(255) PRIMARY KEY,
//!     data    BYTEA        NOT NULL,
//!     expires TIMESTAMPTZ  NOT NULL
//! );
//! CREATE INDEX IF NOT EXISTS "sessions_expires_idx" ON "sessions" (expires);
//! ```
//! - `update`: `SELECT ... FOR UPDATE` in a transaction; the row lock holds
//!   off every other update of the same session until commit, and a row
//!   deleted or expired meanwhile is re-checked after the wait. When the
//!   request already loaded the row (`update_seen`, every update the
//!   engine makes), one conditional statement comes first:
//!   `UPDATE`/`DELETE ... WHERE id = $1 AND expires > now AND data = <the
//!   loaded bytes>`; only if it finds the row changed (or gone) does the
//!   transaction run.
//! - `create`: one `INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE the old
//!   row expired`, so a live row is never overwritten.
//! - purge: `DELETE ... WHERE id IN (SELECT ... LIMIT n FOR UPDATE SKIP
//!   LOCKED)`, so concurrent purgers (several gateways) take disjoint rows
//!   and never wait on a row a request holds.
//! - Times are bound as microseconds since the epoch and converted in SQL,
//!   exactly (no float rounding), without a date-time crate.
//! - With `near_cache` enabled, loads go through an in-process copy kept
//!   coherent by a trigger and `LISTEN` ([`super::listen`]); every write
//!   through this store also drops its key from the copy before returning,
//!   so this process reads its own writes.

use super::batch::Batcher;
use super::listen::{Listener, Trigger};
use super::pool::{pooled, Pool};
use super::{
    classify, decide, loaded, missing_table, now_and_expiry, now_micros, write_if_unchanged,
    Attempt, Dialect, Locked, SqlConfig, TableName, CONFLICT_RETRIES, PURGE_BATCH,
    PURGE_MAX_BATCHES,
};
use crate::session::{Loaded, NearCacheStats, SessionStore, StoreError, UpdateFn, UpdateOutcome};
use crate::store::near::Near;
use async_trait::async_trait;
use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, Row};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub(super) fn options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    PgConnectOptions::from_str(url)
}

/// Error codes meaning "not available now": connection exceptions (08),
/// too many connections, shutting down / starting up, cancelled by
/// `statement_timeout`, lock or deadlock timeouts.
fn transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("57P")
        || matches!(code, "53300" | "57014" | "55P03" | "40P01" | "40001")
}

/// Worth re-running the whole update transaction.
fn conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

fn err(e: sqlx::Error) -> StoreError {
    classify(Dialect::Postgres, e, transient)
}

/// `$n` (µs since the epoch) as a `timestamptz`.
fn ts(n: u8) -> String {
    format!("(TIMESTAMPTZ 'epoch' + ${n}::int8 * INTERVAL '1 microsecond')")
}

const EXPIRES_MICROS: &str = "(EXTRACT(EPOCH FROM expires) * 1000000)::int8";

/// The statements, built once from the validated table name.
struct Sql {
    load: String,
    load_many: String,
    create: String,
    lock: String,
    write: String,
    delete: String,
    write_if: String,
    delete_if: String,
    touch: String,
    purge: String,
    probe: String,
    ddl: [String; 2],
}

impl Sql {
    fn new(table: &TableName) -> Sql {
        let t = table.quoted('"');
        Sql {
            load: format!(
                "SELECT data, {EXPIRES_MICROS} AS expires_us FROM {t} WHERE id = $1 AND expires > {}",
                ts(2)
            ),
            load_many: format!(
                "SELECT id, data, {EXPIRES_MICROS} AS expires_us FROM {t} \
                 WHERE id = ANY($1) AND expires > {}",
                ts(2)
            ),
            create: format!(
                "INSERT INTO {t} AS t (id, data, expires) VALUES ($1, $2, {}) \
                 ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data, expires = EXCLUDED.expires \
                 WHERE t.expires <= {}",
                ts(3),
                ts(4)
            ),
            lock: format!(
                "SELECT data FROM {t} WHERE id = $1 AND expires > {} FOR UPDATE",
                ts(2)
            ),
            write: format!("UPDATE {t} SET data = $2, expires = {} WHERE id = $1", ts(3)),
            delete: format!("DELETE FROM {t} WHERE id = $1"),
            write_if: format!(
                "UPDATE {t} SET data = $2, expires = {} WHERE id = $1 AND expires > {} AND data = $5",
                ts(3),
                ts(4)
            ),
            delete_if: format!(
                "DELETE FROM {t} WHERE id = $1 AND expires > {} AND data = $3",
                ts(2)
            ),
            touch: format!(
                "UPDATE {t} SET expires = {} WHERE id = $1 AND expires > {}",
                ts(2),
                ts(3)
            ),
            purge: format!(
                "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE expires <= {} \
                 ORDER BY expires LIMIT {PURGE_BATCH} FOR UPDATE SKIP LOCKED)",
                ts(1)
            ),
            probe: format!("SELECT id, data, expires FROM {t} WHERE 1 = 0"),
            ddl: [
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (\n    \
                         id      VARCHAR(255) PRIMARY KEY,\n    \
                         data    BYTEA        NOT NULL,\n    \
                         expires TIMESTAMPTZ  NOT NULL\n\
                     )"
                ),
                format!(
                    "CREATE INDEX IF NOT EXISTS \"{}\" ON {t} (expires)",
                    table.index_name()
                ),
            ],
        }
    }
}

pub(super) struct PgStore {
    pool: Arc<Pool<PgConnection>>,
    table: TableName,
    sql: Arc<Sql>,
    near: Option<Near<Listener>>,
    /// Every read of the database goes through here ([`super::batch`]).
    reads: Batcher,
}

/// The live rows of `keys` (one key: the single-row statement).
async fn fetch(
    pool: Arc<Pool<PgConnection>>,
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
    let rows = pooled!(pool, |c| sqlx::query(&sql.load_many)
        .bind(&keys)
        .bind(now)
        .fetch_all(c))
    .map_err(err)?;
    rows.into_iter()
        .map(|row| {
            let id: String = row.try_get(0)?;
            Ok((id, loaded(&row, 1)?))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(err)
}

impl PgStore {
    pub(super) async fn connect(cfg: &SqlConfig) -> Result<PgStore, StoreError> {
        let options = options(&cfg.url)
            .map_err(StoreError::backend)?
            .log_statements(tracing_log::log::LevelFilter::Trace)
            .log_slow_statements(tracing_log::log::LevelFilter::Warn, Duration::from_secs(1));
        let trigger = Trigger::new(&cfg.table);
        let connect_timeout = cfg.acquire_timeout.max(Duration::from_secs(1));
        let near = cfg.near_cache.map(|max_entries| {
            let listener = |cache, status| Listener {
                cache,
                status,
                options: options.clone(),
                trigger: trigger.clone(),
                connect_timeout,
            };
            let check_wait = connect_timeout * 2;
            Near::new(max_entries, listener, cfg.first_round_wait, check_wait)
        });
        let pool = Arc::new(Pool::new(options, cfg.max_connections, cfg.acquire_timeout));
        let sql = Arc::new(Sql::new(&cfg.table));
        let reads = {
            let (pool, sql) = (pool.clone(), sql.clone());
            Batcher::start(move |keys| fetch(pool.clone(), sql.clone(), keys))
        };
        let store = PgStore {
            pool,
            table: cfg.table.clone(),
            sql,
            near,
            reads,
        };
        // Establish a connection now: a bad URL or a dead server fails this
        // call, which the store handle does not cache.
        store.pool.open_one().await.map_err(err)?;
        if cfg.create_table {
            store.ensure_table().await?;
        }
        if store.near.is_some() {
            store.ensure_trigger(&trigger).await?;
        }
        Ok(store)
    }

    /// Install the near cache's change notifications (idempotent), under
    /// the same advisory lock as the table's creation.
    async fn ensure_trigger(&self, trigger: &Trigger) -> Result<(), StoreError> {
        // Usually in place already (every gateway connection after the
        // first, each runtime of a gateway): one query, no DDL, no lock.
        let enabled = pooled!(self.pool, |c| sqlx::query_scalar::<_, i64>(
            &trigger.enabled_query()
        )
        .fetch_one(c));
        if matches!(enabled, Ok(2)) {
            return Ok(());
        }
        self.run_ddl(&trigger.ddl(), |e| {
            format!(
                "store.near_cache: cannot install the change trigger on table `{}` \
                 (the table's owner can run the SQL in the README's PostgreSQL near \
                 cache section): postgres: {e}",
                self.table
            )
        })
        .await
    }

    /// The live row of `key` from the database, read in the next batch.
    async fn fetch(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        self.reads.load(key).await
    }

    /// Drop `key` from the near cache after this process changed it.
    fn forget(&self, key: &str) {
        if let Some(near) = &self.near {
            near.forget(key);
        }
    }

    /// Create the table and index unless the table exists. Gateways that
    /// start together would race in `CREATE TABLE IF NOT EXISTS` (it is
    /// not atomic in PostgreSQL), so creation runs under an advisory lock.
    async fn ensure_table(&self) -> Result<(), StoreError> {
        if self.probe().await.is_ok() {
            return Ok(());
        }
        self.run_ddl(&self.sql.ddl, |e| {
            format!(
                "store.table: cannot create table `{}`: postgres: {e}",
                self.table
            )
        })
        .await?;
        tracing::info!(table = %self.table, "created the session table (if it was missing)");
        Ok(())
    }

    /// Run `statements` in one transaction under this table's advisory
    /// lock, so gateways starting together never race in DDL; a failing
    /// statement is reported with `message`.
    async fn run_ddl(
        &self,
        statements: &[String],
        message: impl Fn(sqlx::Error) -> String,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(err)?;
        let mut tx = conn.begin().await.map_err(err)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("session-gateway:{}", self.table))
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        for statement in statements {
            // `query` rather than `raw_sql`: the latter's executor bounds
            // make this future fail the `Send` check callers need.
            sqlx::query(statement)
                .persistent(false)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::Backend(message(e)))?;
        }
        tx.commit().await.map_err(err)?;
        conn.done(Ok(())).map_err(err)
    }

    async fn probe(&self) -> Result<(), sqlx::Error> {
        pooled!(self.pool, |c| sqlx::query(&self.sql.probe)
            .fetch_optional(c))
        .map(drop)
    }

    /// [`write_if_unchanged`] with this dialect's statements.
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
                .bind(key)
                .bind(&value[..])
                .bind(expires)
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

    /// The update transaction, re-run on a serialization conflict.
    async fn update_attempts(
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
                    tracing::debug!(attempt, error = %e, "session update conflicted; retrying");
                }
                Err(e) => return Err(err(e)),
            }
        }
    }

    /// One update attempt on `conn`, in a transaction (run through
    /// `pooled!`, which gives the connection back or closes it).
    async fn try_update(
        &self,
        conn: &mut PgConnection,
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
                    .bind(key)
                    .bind(&value[..])
                    .bind(expires)
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
impl SessionStore for PgStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        let Some(near) = &self.near else {
            return self.fetch(key).await;
        };
        near.load(key, || async {
            let found = self.fetch(key).await?;
            // Measured after the reply: the cache's expiry (taken from
            // before the query was sent) is never later than the row's.
            let now = SystemTime::now();
            Ok(found.map(|l| {
                let ttl = l.expires_at.duration_since(now).unwrap_or_default();
                (l.value, ttl)
            }))
        })
        .await
    }

    async fn create(&self, key: &str, value: &Bytes, ttl: Duration) -> Result<bool, StoreError> {
        let (now, expires) = now_and_expiry(ttl);
        let done = pooled!(self.pool, |c| sqlx::query(&self.sql.create)
            .bind(key)
            .bind(&value[..])
            .bind(expires)
            .bind(now)
            .execute(c));
        self.forget(key);
        Ok(done.map_err(err)?.rows_affected() == 1)
    }

    async fn update(
        &self,
        key: &str,
        ttl: Duration,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        let outcome = self.update_attempts(key, ttl, f).await;
        self.forget(key);
        outcome
    }

    async fn update_seen(
        &self,
        key: &str,
        ttl: Duration,
        seen: &Bytes,
        f: &UpdateFn<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        let outcome = match self.update_if_unchanged(key, ttl, seen, f).await {
            Ok(Some(outcome)) => Ok(outcome),
            Ok(None) => self.update_attempts(key, ttl, f).await,
            Err(e) => Err(e),
        };
        self.forget(key);
        outcome
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let done = pooled!(self.pool, |c| sqlx::query(&self.sql.delete)
            .bind(key)
            .execute(c));
        self.forget(key);
        done.map_err(err)?;
        Ok(())
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let (now, expires) = now_and_expiry(ttl);
        let done = pooled!(self.pool, |c| sqlx::query(&self.sql.touch)
            .bind(key)
            .bind(expires)
            .bind(now)
            .execute(c));
        self.forget(key);
        Ok(done.map_err(err)?.rows_affected() == 1)
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = now_micros();
        let mut removed = 0;
        for _ in 0..PURGE_MAX_BATCHES {
            let n = pooled!(self.pool, |c| sqlx::query(&self.sql.purge)
                .bind(now)
                .execute(c))
            .map_err(err)?
            .rows_affected();
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
            sqlx::Error::Database(_) => missing_table(Dialect::Postgres, &self.table, e),
            other => err(other),
        })?;
        if let Some(near) = &self.near {
            near.check().await?;
        }
        Ok(())
    }

    fn near_cache_stats(&self) -> Option<NearCacheStats> {
        self.near.as_ref().map(Near::stats)
    }
}
