//! The PostgreSQL store's near cache: change notifications by
//! `LISTEN`/`NOTIFY` (see [`crate::store::near`] for the cache itself).
//!
//! A trigger on the session table (installed by the gateway when
//! `store.near_cache.enabled` is true, see [`Trigger::ddl`]) calls
//! `pg_notify(<channel>, id)` for every row updated or deleted, by anyone:
//! this gateway, another one, a script, the purge; a `TRUNCATE` notifies an
//! empty payload, which empties the cache. PostgreSQL delivers a
//! notification when the writing transaction commits, so a gateway hears
//! of a change right after it is visible to readers.
//!
//! A round: open a dedicated connection (`application_name`
//! [`APPLICATION_NAME`]), `LISTEN`, check that the triggers are in place
//! and enabled, then let the cache serve. The round ends, emptying the
//! cache and bypassing it until the next round is live, when the
//! connection fails or closes, or the heartbeat (the trigger check again,
//! every [`HEARTBEAT`]) fails, takes longer than [`HEARTBEAT_TIMEOUT`] or
//! finds a trigger dropped or disabled. Inserts need no notification: a
//! key is cached only after a read found it, and a row that exists is only
//! replaced by an update or a delete.

use super::TableName;
use crate::session::StoreError;
use crate::store::near::{NearCache, Notifier, Status, HEARTBEAT, HEARTBEAT_TIMEOUT};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use std::sync::Arc;
use std::time::Duration;

/// `application_name` of the listening connection, so operators (and
/// tests) can find it in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "session-gateway-listen";

/// The names a table's notifications use.
#[derive(Clone, Debug)]
pub struct Trigger {
    /// The table, quoted (`"schema"."name"`).
    table: String,
    /// The trigger function, quoted and schema-qualified like the table.
    function: String,
    /// The row trigger (UPDATE, DELETE) and the statement trigger
    /// (TRUNCATE), unqualified as PostgreSQL names triggers.
    row_trigger: String,
    truncate_trigger: String,
    /// `session_gateway_` + 16 hex digits of SHA-256 of the table name: a
    /// channel name within PostgreSQL's 63 bytes for any valid table.
    pub channel: String,
}

impl Trigger {
    pub fn new(table: &TableName) -> Trigger {
        // The table's name cut so that `<name>_<suffix>` fits in 63 bytes
        // (identifiers are ASCII), keeping the suffixes apart.
        let name = |suffix: &str| {
            let keep = table.name.len().min(62 - suffix.len());
            format!("{}_{suffix}", &table.name[..keep])
        };
        let function = match &table.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", name("sgw_notify")),
            None => format!("\"{}\"", name("sgw_notify")),
        };
        let digest = Sha256::digest(table.to_string().as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Trigger {
            table: table.quoted('"'),
            function,
            row_trigger: name("sgw_change"),
            truncate_trigger: name("sgw_truncate"),
            channel: format!("session_gateway_{hex}"),
        }
    }

    /// What installs the notifications; idempotent. Run by the gateway
    /// (under the table's advisory lock), or by hand by the table's owner
    /// when the gateway's user may not create triggers.
    pub fn ddl(&self) -> [String; 3] {
        let Trigger {
            table,
            function,
            row_trigger,
            truncate_trigger,
            channel,
        } = self;
        [
            format!(
                "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $sgw$\n\
                 BEGIN\n  \
                   IF TG_OP = 'TRUNCATE' THEN\n    \
                     PERFORM pg_notify('{channel}', '');\n  \
                   ELSE\n    \
                     PERFORM pg_notify('{channel}', OLD.id);\n    \
                     IF TG_OP = 'UPDATE' AND NEW.id IS DISTINCT FROM OLD.id THEN\n      \
                       PERFORM pg_notify('{channel}', NEW.id);\n    \
                     END IF;\n  \
                   END IF;\n  \
                   RETURN NULL;\n\
                 END\n\
                 $sgw$"
            ),
            format!(
                "DO $sgw$ BEGIN\n  \
                   IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND tgname = '{row_trigger}') THEN\n    \
                     CREATE TRIGGER \"{row_trigger}\" AFTER UPDATE OR DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION {function}();\n  \
                   END IF;\n\
                 END $sgw$"
            ),
            format!(
                "DO $sgw$ BEGIN\n  \
                   IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND tgname = '{truncate_trigger}') THEN\n    \
                     CREATE TRIGGER \"{truncate_trigger}\" AFTER TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n  \
                   END IF;\n\
                 END $sgw$"
            ),
        ]
    }

    /// Counts this table's two triggers that are enabled (`tgenabled`
    /// `O` or `A`: fire in ordinary sessions); 2 means notifications flow.
    pub fn enabled_query(&self) -> String {
        format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{}'::regclass \
             AND tgname IN ('{}', '{}') AND tgenabled IN ('O', 'A')",
            self.table, self.row_trigger, self.truncate_trigger
        )
    }
}

/// Listens for one table's notifications.
pub struct Listener {
    pub cache: Arc<NearCache>,
    pub status: Arc<Status>,
    pub options: PgConnectOptions,
    pub trigger: Trigger,
    pub connect_timeout: Duration,
}

fn pg_err(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("postgres near cache: {e}"))
}

impl Listener {
    /// A listening connection of its own.
    async fn listen(&self) -> Result<PgListener, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .test_before_acquire(false)
            .acquire_timeout(self.connect_timeout)
            .connect_lazy_with(self.options.clone().application_name(APPLICATION_NAME));
        let mut listener = PgListener::connect_with(&pool).await.map_err(pg_err)?;
        // A lost connection ends the round (the cache must be emptied
        // first); never let the listener reconnect behind our back.
        listener.eager_reconnect(false);
        listener.ignore_pool_close_event(true);
        listener
            .listen(&self.trigger.channel)
            .await
            .map_err(pg_err)?;
        Ok(listener)
    }

    /// The triggers are there and enabled (also the heartbeat).
    async fn check_triggers(&self, listener: &mut PgListener) -> Result<(), StoreError> {
        let n: i64 = sqlx::query_scalar(&self.trigger.enabled_query())
            .fetch_one(&mut *listener)
            .await
            .map_err(pg_err)?;
        if n != 2 {
            return Err(StoreError::Backend(format!(
                "postgres near cache: the change triggers on {} are missing or disabled \
                 (found {n} of 2 enabled); without them other gateways' changes would go \
                 unnoticed, so the cache is bypassed until they are back",
                self.trigger.table
            )));
        }
        Ok(())
    }
}

/// Apply one notification: a key changed, or (empty payload) everything.
fn apply(cache: &NearCache, payload: &str) {
    if payload.is_empty() {
        cache.invalidate_all();
    } else {
        cache.invalidate(payload);
    }
}

#[async_trait]
impl Notifier for Listener {
    fn label(&self) -> &'static str {
        "postgres near cache"
    }

    async fn round(&self, generation: u64) -> StoreError {
        let listening = tokio::time::timeout(self.connect_timeout, async {
            let mut listener = self.listen().await?;
            self.check_triggers(&mut listener).await?;
            Ok::<_, StoreError>(listener)
        });
        let mut listener = match listening.await {
            Ok(Ok(listener)) => listener,
            Ok(Err(e)) => return e,
            Err(_) => {
                return StoreError::Unavailable(
                    "postgres near cache: LISTEN not established in time".into(),
                )
            }
        };
        if !self.cache.go_live(generation) {
            return StoreError::Unavailable("postgres near cache: round superseded".into());
        }
        self.status.clear();
        tracing::info!(
            channel = %self.trigger.channel,
            "postgres near cache: live (changes notified by trigger)"
        );
        let mut next_beat = tokio::time::Instant::now() + HEARTBEAT;
        loop {
            // `try_recv` is cancel-safe (sqlx reads whole messages into its
            // buffer), so the heartbeat may interrupt it.
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(n)) => apply(&self.cache, n.payload()),
                    Ok(None) => {
                        return StoreError::Unavailable(
                            "postgres near cache: listening connection closed".into(),
                        )
                    }
                    Err(e) => return pg_err(e),
                },
                _ = tokio::time::sleep_until(next_beat) => {
                    let beat = self.check_triggers(&mut listener);
                    match tokio::time::timeout(HEARTBEAT_TIMEOUT, beat).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return e,
                        Err(_) => {
                            return StoreError::Unavailable(
                                "postgres near cache: heartbeat unanswered".into(),
                            )
                        }
                    }
                    next_beat = tokio::time::Instant::now() + HEARTBEAT;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_postgres_limits() {
        let t = Trigger::new(&TableName::parse("sessions").unwrap());
        assert_eq!(t.function, "\"sessions_sgw_notify\"");
        assert_eq!(t.row_trigger, "sessions_sgw_change");
        assert!(t.channel.starts_with("session_gateway_") && t.channel.len() == 32);
        let long = "s".repeat(63);
        let t = Trigger::new(&TableName::parse(&format!("{long}.{long}")).unwrap());
        for name in [&t.row_trigger, &t.truncate_trigger] {
            assert!(name.len() <= 63, "{name}");
        }
        assert!(t.function.len() <= 63 * 2 + 5);
        assert_ne!(
            Trigger::new(&TableName::parse("a.sessions").unwrap()).channel,
            Trigger::new(&TableName::parse("b.sessions").unwrap()).channel,
            "tables of the same name in two schemas get their own channel"
        );
    }

    #[test]
    fn an_empty_payload_empties_the_cache() {
        let cache = NearCache::new(std::num::NonZeroUsize::new(4).unwrap());
        let g = cache.begin_round();
        assert!(cache.go_live(g));
        apply(&cache, "k");
        apply(&cache, "");
        assert_eq!(cache.stats().flushes, 1);
        assert!(cache.is_live());
    }
}
