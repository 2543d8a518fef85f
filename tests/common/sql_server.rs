//! SQL fixtures: a unique table on the machine's PostgreSQL / MariaDB (or
//! a temp-dir SQLite file), dropped on drop; private PostgreSQL and
//! MariaDB instances on free ports that a test may stop and restart; and
//! the SQL-specific cases, instantiated per dialect by `sql_suite!`.
//!
//! Server URLs are read at run time: `SGW_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`) and `SGW_TEST_MYSQL_URL`
//! (default `mysql://root@127.0.0.1:3306/test`). A server that cannot be
//! reached fails the test with a message saying which variable to set:
//! a skipped store test would read as a passing one.

use super::gateway::{binary, KEY_A};
use super::protocol::{get_with_cookie, setup, Browser};
use super::server::{accepts, ServerKind, ServerProcess};
use super::StoreFixture;
use serde_json::json;
use session_gateway::session::{CookieVerifier, SessionId, SessionRecord, SessionStore};
use sqlx::mysql::MySqlPool;
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use sqlx::Row;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    MySql,
    Sqlite,
}

impl Kind {
    fn env_var(self) -> &'static str {
        match self {
            Kind::Postgres => "SGW_TEST_POSTGRES_URL",
            Kind::MySql => "SGW_TEST_MYSQL_URL",
            Kind::Sqlite => "",
        }
    }

    /// The shared server's URL (not for SQLite, which lives in a temp dir).
    pub fn server_url(self) -> String {
        let default = match self {
            Kind::Postgres => "postgres://postgres@127.0.0.1:5432/test",
            Kind::MySql => "mysql://root@127.0.0.1:3306/test",
            Kind::Sqlite => unreachable!("sqlite has no server"),
        };
        std::env::var(self.env_var()).unwrap_or_else(|_| default.to_string())
    }

    pub fn quote(self, table: &str) -> String {
        match self {
            Kind::MySql => format!("`{table}`"),
            _ => format!("\"{table}\""),
        }
    }

    fn conf_file(self) -> &'static str {
        match self {
            Kind::Postgres => "conf/sql-postgres.yaml",
            Kind::MySql => "conf/sql-mysql.yaml",
            Kind::Sqlite => "conf/sql-sqlite.yaml",
        }
    }

    /// The schema as documented in the README, for `create_table: false`.
    pub fn documented_ddl(self, t: &str) -> Vec<String> {
        match self {
            Kind::Postgres => vec![
                format!(
                    "CREATE TABLE \"{t}\" (id VARCHAR(255) PRIMARY KEY, data BYTEA NOT NULL, expires TIMESTAMPTZ NOT NULL)"
                ),
                format!("CREATE INDEX \"{t}_expires_idx\" ON \"{t}\" (expires)"),
            ],
            Kind::MySql => vec![format!(
                "CREATE TABLE `{t}` (id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, \
                 data MEDIUMBLOB NOT NULL, expires DATETIME(6) NOT NULL, PRIMARY KEY (id), \
                 INDEX `{t}_expires_idx` (expires)) ENGINE=InnoDB"
            )],
            Kind::Sqlite => vec![
                format!(
                    "CREATE TABLE \"{t}\" (id VARCHAR(255) PRIMARY KEY NOT NULL, data BLOB NOT NULL, expires INTEGER NOT NULL)"
                ),
                format!("CREATE INDEX \"{t}_expires_idx\" ON \"{t}\" (expires)"),
            ],
        }
    }

    /// SQL for "now + offset hours" in the column's encoding, computed by
    /// the database's own clock (to prove the encoding is UTC).
    fn expiry_in_hours(self, hours: i32) -> String {
        match self {
            Kind::Postgres => format!("now() + interval '{hours} hours'"),
            Kind::MySql => format!("UTC_TIMESTAMP(6) + INTERVAL {hours} HOUR"),
            Kind::Sqlite => format!("(unixepoch() + {hours} * 3600) * 1000000"),
        }
    }

    fn blob(self, text: &str) -> String {
        match self {
            Kind::Postgres => format!("convert_to('{text}', 'UTF8')"),
            Kind::MySql => format!("'{text}'"),
            Kind::Sqlite => format!("CAST('{text}' AS BLOB)"),
        }
    }
}

/// A direct connection for assertions and set-up, bypassing the store.
pub enum Db {
    Postgres(PgPool),
    MySql(MySqlPool),
    Sqlite(SqlitePool),
}

impl Db {
    pub async fn connect(kind: Kind, url: &str) -> Result<Db, sqlx::Error> {
        fn pool<DB: sqlx::Database>() -> sqlx::pool::PoolOptions<DB> {
            sqlx::pool::PoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(5))
        }
        Ok(match kind {
            Kind::Postgres => Db::Postgres(pool().connect(url).await?),
            Kind::MySql => Db::MySql(pool().connect(url).await?),
            Kind::Sqlite => Db::Sqlite(
                pool()
                    .connect_with(
                        SqliteConnectOptions::from_str(url)?
                            .create_if_missing(true)
                            .busy_timeout(Duration::from_secs(5)),
                    )
                    .await?,
            ),
        })
    }

    pub async fn execute(&self, sql: &str) {
        let r = match self {
            Db::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
            Db::MySql(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
            Db::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
        };
        r.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The first column of the first row, as an integer.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let r = match self {
            Db::Postgres(p) => sqlx::query(sql).fetch_one(p).await.map(|r| r.get(0)),
            Db::MySql(p) => sqlx::query(sql).fetch_one(p).await.map(|r| r.get(0)),
            Db::Sqlite(p) => sqlx::query(sql).fetch_one(p).await.map(|r| r.get(0)),
        };
        r.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn strings(&self, sql: &str) -> Vec<String> {
        let r = match self {
            Db::Postgres(p) => sqlx::query(sql)
                .fetch_all(p)
                .await
                .map(|rows| rows.iter().map(|r| r.get(0)).collect()),
            // A `utf8mb4_bin` column reads as binary through sqlx.
            Db::MySql(p) => sqlx::query(sql).fetch_all(p).await.map(|rows| {
                rows.iter()
                    .map(|r| String::from_utf8(r.get(0)).unwrap())
                    .collect()
            }),
            Db::Sqlite(p) => sqlx::query(sql)
                .fetch_all(p)
                .await
                .map(|rows| rows.iter().map(|r| r.get(0)).collect()),
        };
        r.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn close(self) {
        match self {
            Db::Postgres(p) => p.close().await,
            Db::MySql(p) => p.close().await,
            Db::Sqlite(p) => p.close().await,
        }
    }
}

/// Fail (never skip) when the test server is not there.
async fn reachable(kind: Kind, url: &str) -> Db {
    match tokio::time::timeout(Duration::from_secs(10), Db::connect(kind, url)).await {
        Ok(Ok(db)) => db,
        Ok(Err(e)) if kind == Kind::Sqlite => panic!("cannot open {url}: {e}"),
        Ok(Err(e)) => panic!(
            "cannot reach the {kind:?} test server at {url}: {e}\n\
             start it or point {} at one",
            kind.env_var()
        ),
        Err(_) => panic!(
            "the {kind:?} test server at {url} did not answer within 10s; start it or point {} at one",
            kind.env_var()
        ),
    }
}

/// A unique table for one test: on the shared server (dropped on drop)
/// or in a fresh SQLite file (removed with its temp dir).
pub struct TestTable {
    pub kind: Kind,
    pub url: String,
    pub name: String,
    dir: Option<tempfile::TempDir>,
}

impl TestTable {
    pub async fn new(kind: Kind) -> TestTable {
        let name = super::unique("sgw");
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("sessions.db").display());
                TestTable {
                    kind,
                    url,
                    name,
                    dir: Some(dir),
                }
            }
            _ => {
                let url = kind.server_url();
                reachable(kind, &url).await.close().await;
                TestTable {
                    kind,
                    url,
                    name,
                    dir: None,
                }
            }
        }
    }

    pub fn quoted(&self) -> String {
        self.kind.quote(&self.name)
    }

    /// The `store:` section, plus `extra` keys (`"create_table: false"`).
    pub fn store_yaml(&self, extra: &str) -> String {
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(", {extra}")
        };
        format!(
            "{{type: sql, url: '{}', table: {}, max_connections: 8{extra}}}",
            self.url, self.name
        )
    }

    pub async fn db(&self) -> Db {
        reachable(self.kind, &self.url).await
    }

    pub async fn store(&self, extra: &str) -> Arc<dyn SessionStore> {
        super::open_store(&self.store_yaml(extra)).await
    }

    pub async fn count(&self, db: &Db) -> i64 {
        db.scalar(&format!("SELECT COUNT(*) FROM {}", self.quoted()))
            .await
    }

    /// Insert `n` rows `<prefix>:<i>` expiring `hours` from now (by the
    /// database's clock), in multi-row statements.
    pub async fn insert_rows(&self, db: &Db, prefix: &str, n: usize, hours: i32) {
        let data = self.kind.blob(r#"{"p":true,"d":{"seeded":1}}"#);
        let expires = self.kind.expiry_in_hours(hours);
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            let values: Vec<String> = chunk
                .iter()
                .map(|i| format!("('{prefix}:{i}', {data}, {expires})"))
                .collect();
            db.execute(&format!(
                "INSERT INTO {} (id, data, expires) VALUES {}",
                self.quoted(),
                values.join(", ")
            ))
            .await;
        }
    }
}

impl Drop for TestTable {
    fn drop(&mut self) {
        if self.dir.is_some() {
            return; // the temp dir goes with the SQLite file in it
        }
        let (kind, url, table) = (self.kind, self.url.clone(), self.quoted());
        // The near cache's trigger function outlives its table.
        let function = format!("\"{}_sgw_notify\"", self.name);
        // Drop runs inside the test's runtime; a thread with its own
        // runtime can block on the DROP without stalling that runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(15), async {
                    if let Ok(db) = Db::connect(kind, &url).await {
                        let sql = format!("DROP TABLE IF EXISTS {table}");
                        let r = match &db {
                            Db::Postgres(p) => {
                                let sql = format!("{sql}; DROP FUNCTION IF EXISTS {function}()");
                                sqlx::raw_sql(&sql).execute(p).await.map(drop)
                            }
                            Db::MySql(p) => sqlx::raw_sql(&sql).execute(p).await.map(drop),
                            Db::Sqlite(p) => sqlx::raw_sql(&sql).execute(p).await.map(drop),
                        };
                        if let Err(e) = r {
                            eprintln!("warning: could not drop test table {table}: {e}");
                        }
                        db.close().await;
                    }
                })
                .await;
            });
        })
        .join();
    }
}

/// `protocol_suite!`/`persistence_suite!` fixture.
pub async fn fixture(kind: Kind) -> StoreFixture {
    let table = TestTable::new(kind).await;
    // Create the table now, as a deployed database would have it: a
    // gateway's first request would otherwise run the DDL within
    // `store.timeout` (500 ms), which a busy 2-CPU machine with a dozen
    // tests creating tables at once sometimes exceeds (CI saw a 503).
    drop(table.store("").await);
    // The suites' 50 concurrent patches of one session queue on its row
    // lock; on a busy 2-CPU machine the last can take longer than the
    // default 500 ms (a 503 is not what they test).
    StoreFixture::new(table.store_yaml("timeout: 2000ms"), table)
}

/// Run the gateway binary with an extra environment.
pub fn run_cli_env(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .env_remove("SESSION_SECRET")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run session-gateway");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A complete config file around `store_yaml`, for one-shot commands.
fn write_config(dir: &Path, store_yaml: &str) -> PathBuf {
    let path = dir.join("gateway.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:{}\nupstream: 127.0.0.1:{}\nsecret_keys: [\"{KEY_A}\"]\nstore: {store_yaml}\n",
            super::free_port(),
            super::free_port()
        ),
    )
    .unwrap();
    path
}

// ------------------------------------------------------------ SQL cases

/// An expired row is never loaded, even while it is still in the table
/// (no cleanup ran).
pub async fn expiry_is_honoured_before_cleanup(kind: Kind) {
    let table = TestTable::new(kind).await;
    let s = setup(
        StoreFixture::new(table.store_yaml("cleanup_interval: 0"), ()),
        |b| {
            b.session("lifetime", "1")
                .session("refresh_each_request", "false")
        },
    )
    .await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    let cookie = b.cookie().expect("session cookie");
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = get_with_cookie(&s.gw, "/", &format!("session={cookie}"), &[]).await;
    assert_eq!(r.session(), json!({}), "an expired row was loaded");
    let db = table.db().await;
    assert_eq!(
        table.count(&db).await,
        1,
        "the expired row should still be in the table (no cleanup ran)"
    );
    db.close().await;
}

/// `cleanup` removes exactly the expired rows, in several batches, and
/// says how many.
pub async fn cleanup_command_removes_exactly_expired(kind: Kind) {
    let table = TestTable::new(kind).await;
    drop(table.store("").await); // creates the table
    let db = table.db().await;
    table.insert_rows(&db, "old", 2345, -1).await;
    table.insert_rows(&db, "live", 3, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &table.store_yaml(""));
    let (code, out, err) = run_cli_env(
        &["-c", config.to_str().unwrap(), "cleanup"],
        dir.path(),
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed 2345 expired session(s)"), "{out}");
    let mut left = db
        .strings(&format!("SELECT id FROM {}", table.quoted()))
        .await;
    left.sort();
    assert_eq!(left, ["live:0", "live:1", "live:2"]);
    let (code, out, err) = run_cli_env(
        &["-c", config.to_str().unwrap(), "cleanup"],
        dir.path(),
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed 0 expired session(s)"), "{out}");
    db.close().await;
}

/// Two purgers at once (two gateways, or a gateway and a cron `cleanup`)
/// neither fail nor count a row twice: PostgreSQL splits the rows (SKIP
/// LOCKED), MySQL lets one purge while the other skips, SQLite takes turns.
pub async fn concurrent_purges_remove_each_row_once(kind: Kind) {
    let table = TestTable::new(kind).await;
    let a = Arc::new(table.store("").await);
    let b = Arc::new(table.store("").await);
    let db = table.db().await;
    table.insert_rows(&db, "old", 3000, -1).await;
    table.insert_rows(&db, "live", 2, 1).await;
    let (ra, rb) = tokio::join!(a.purge_expired(), b.purge_expired());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra + rb, 3000, "purged {ra} + {rb}");
    assert_eq!(table.count(&db).await, 2);
    db.close().await;
}

/// The background purge (`cleanup_interval`) runs inside the gateway.
pub async fn background_purge_removes_expired_rows(kind: Kind) {
    let table = TestTable::new(kind).await;
    drop(table.store("").await);
    let db = table.db().await;
    table.insert_rows(&db, "old", 5, -1).await;
    table.insert_rows(&db, "live", 1, 1).await;
    let s = setup(
        StoreFixture::new(table.store_yaml("cleanup_interval: 1s"), ()),
        |b| b,
    )
    .await;
    // The log line follows the commit, so wait for both.
    let deadline = Instant::now() + Duration::from_secs(10);
    while table.count(&db).await != 1 || !s.gw.log().contains("purged 5 expired session(s)") {
        assert!(
            Instant::now() < deadline,
            "expired rows not purged within 10s ({} rows left):\n{}",
            table.count(&db).await,
            s.gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.close().await;
}

/// Rows written by hand (an operator, a migration) in the documented
/// schema with the database's own clock are read correctly: the expiry
/// encoding is UTC (and the legacy record form still decodes).
pub async fn rows_use_utc_and_bad_data_is_ignored(kind: Kind) {
    let table = TestTable::new(kind).await;
    let store = table.store("").await;
    let db = table.db().await;
    table.insert_rows(&db, "live", 1, 1).await;
    table.insert_rows(&db, "old", 1, -1).await;
    let live = store.load("live:0").await.unwrap().expect("live row loads");
    let record = SessionRecord::from_stored(&live.value).expect("the legacy form decodes");
    assert_eq!(record.data["seeded"], 1);
    let in_an_hour = std::time::SystemTime::now() + Duration::from_secs(3600);
    let skew = match live.expires_at.duration_since(in_an_hour) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(skew < Duration::from_secs(5), "expiry off by {skew:?}");
    assert_eq!(store.load("old:0").await.unwrap(), None);
    db.execute(&format!(
        "INSERT INTO {} (id, data, expires) VALUES ('bad', {}, {})",
        table.quoted(),
        kind.blob("not json"),
        kind.expiry_in_hours(1)
    ))
    .await;
    // The store hands back what is there; the engine judges it (the
    // protocol suite's `unreadable_stored_session_starts_fresh`).
    let bad = store.load("bad").await.unwrap().expect("the row is live");
    assert_eq!(&bad.value[..], b"not json");
    let out = store
        .update("bad", Duration::from_secs(60), &|_| {
            Ok(session_gateway::session::Update::Unreadable)
        })
        .await
        .unwrap();
    assert_eq!(out, session_gateway::session::UpdateOutcome::Missing);
    db.close().await;
}

/// `create_table: false` with the documented schema created by hand.
pub async fn documented_schema_works_without_create_table(kind: Kind) {
    let table = TestTable::new(kind).await;
    let db = table.db().await;
    for stmt in kind.documented_ddl(&table.name) {
        db.execute(&stmt).await;
    }
    let s = setup(
        StoreFixture::new(table.store_yaml("create_table: false"), ()),
        |b| b,
    )
    .await;
    let b = Browser::new(&s.gw);
    b.patch("/", json!({"a": 1})).await;
    b.patch("/", json!({"b": 2})).await;
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1, "b": 2}));
    assert_eq!(table.count(&db).await, 1);
    db.close().await;
}

/// `create_table: false` and no table: `--test` fails in one line that
/// names the key to fix.
pub async fn missing_table_fails_check_naming_the_key(kind: Kind) {
    let table = TestTable::new(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &table.store_yaml("create_table: false"));
    let (code, out, err) =
        run_cli_env(&["-c", config.to_str().unwrap(), "--test"], dir.path(), &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("store.table"), "{err}");
    assert!(err.contains(&table.name), "{err}");
    assert!(err.contains("create_table"), "{err}");
}

/// A table name that is not an identifier is refused before any SQL.
pub async fn bad_table_name_is_refused_at_config_time(kind: Kind) {
    let table = TestTable::new(kind).await;
    let dir = tempfile::tempdir().unwrap();
    for bad in ["'x; DROP TABLE y'", "'a.b.c'", "'1st'", "'na-me'"] {
        let yaml = table
            .store_yaml("")
            .replace(&format!("table: {}", table.name), &format!("table: {bad}"));
        let config = write_config(dir.path(), &yaml);
        let (code, out, err) =
            run_cli_env(&["-c", config.to_str().unwrap(), "--test"], dir.path(), &[]);
        assert_eq!(code, 2, "{bad}: {out}{err}");
        assert!(err.contains("store.table"), "{bad}: {err}");
    }
}

/// The shipped config, pointed at the test database, passes `--test`.
pub async fn shipped_config_is_valid(kind: Kind) {
    let table = TestTable::new(kind).await;
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(kind.conf_file()))
            .unwrap();
    assert!(text.contains("${SESSION_SECRET}"));
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let store = config["store"].as_mapping_mut().unwrap();
    assert_eq!(store["type"], "sql");
    store.insert("url".into(), table.url.clone().into());
    store.insert("table".into(), table.name.clone().into());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let (code, out, err) = run_cli_env(
        &["-c", path.to_str().unwrap(), "--test"],
        dir.path(),
        &[("SESSION_SECRET", KEY_A)],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(out.contains("sql"), "{out}");
    // Without the secret the config must not pass.
    let (code, _, err) = run_cli_env(&["-c", path.to_str().unwrap(), "--test"], dir.path(), &[]);
    assert_ne!(code, 0);
    assert!(err.contains("SESSION_SECRET"), "{err}");
}

/// A schema (PostgreSQL) or database (MySQL) made for one test and
/// dropped with everything in it afterwards.
struct SchemaGuard {
    kind: Kind,
    url: String,
    name: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let sql = match self.kind {
            Kind::Postgres => format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name),
            Kind::MySql => format!("DROP DATABASE IF EXISTS `{}`", self.name),
            Kind::Sqlite => return,
        };
        let (kind, url) = (self.kind, self.url.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(15), async {
                    if let Ok(db) = Db::connect(kind, &url).await {
                        db.execute(&sql).await;
                        db.close().await;
                    }
                })
                .await;
            });
        })
        .join();
    }
}

/// `store.table: <schema>.<table>`: created (with its index) in that
/// schema and used there.
pub async fn schema_qualified_table_works(kind: Kind) {
    let table = TestTable::new(kind).await;
    let schema = match kind {
        Kind::Sqlite => "main".to_string(),
        _ => super::unique("sgws"),
    };
    let _guard = SchemaGuard {
        kind,
        url: table.url.clone(),
        name: schema.clone(),
    };
    let db = table.db().await;
    match kind {
        Kind::Postgres => db.execute(&format!("CREATE SCHEMA \"{schema}\"")).await,
        Kind::MySql => db.execute(&format!("CREATE DATABASE `{schema}`")).await,
        Kind::Sqlite => {}
    }
    let qualified = format!("{schema}.{}", table.name);
    let yaml = table.store_yaml("").replace(
        &format!("table: {}", table.name),
        &format!("table: {qualified}"),
    );
    let store = super::open_store(&yaml).await;
    let ttl = Duration::from_secs(60);
    let mut record = SessionRecord::new(true);
    record.data.insert("a".into(), json!(1));
    assert!(store.create("k", &record.encode(), ttl).await.unwrap());
    assert!(store.touch("k", ttl).await.unwrap());
    assert_eq!(
        store.load("k").await.unwrap().unwrap().value,
        record.encode()
    );
    store.check().await.unwrap();
    assert_eq!(store.purge_expired().await.unwrap(), 0);
    let q = |t: &str| match kind {
        Kind::MySql => format!("`{schema}`.`{t}`"),
        _ => format!("\"{schema}\".\"{t}\""),
    };
    assert_eq!(
        db.scalar(&format!("SELECT COUNT(*) FROM {}", q(&table.name)))
            .await,
        1
    );
    // The expiry index exists next to the table.
    let index = format!("{}_expires_idx", table.name);
    let indexes = match kind {
        Kind::Postgres => format!(
            "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = '{schema}' AND indexname = '{index}'"
        ),
        Kind::MySql => format!(
            "SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = '{schema}' AND index_name = '{index}'"
        ),
        Kind::Sqlite => format!(
            "SELECT COUNT(*) FROM main.sqlite_master WHERE type = 'index' AND name = '{index}'"
        ),
    };
    assert_eq!(db.scalar(&indexes).await, 1, "{indexes}");
    db.close().await;
}

/// Loads issued together each get their own answer: live rows, expired
/// rows, missing keys, a key asked twice, an id that needs quoting.
/// PostgreSQL and MySQL read them in batches (`id = ANY(...)`,
/// `id IN (...)`): on a current-thread runtime every load is queued before
/// the store's reader runs, so the first batch holds all 42 (MySQL pads it
/// to 64 places).
pub async fn loads_issued_together_each_get_their_own_row(kind: Kind) {
    let table = TestTable::new(kind).await;
    let store = table.store("").await;
    let db = table.db().await;
    let value = |k: &str| bytes::Bytes::from(format!(r#"{{"p":true,"d":{{"k":"{k}"}}}}"#));
    let mut live: Vec<String> = (0..30).map(|i| format!("live:{i}")).collect();
    live.push(r#"it's "odd", \ too"#.to_string());
    for k in &live {
        assert!(store
            .create(k, &value(k), Duration::from_secs(600))
            .await
            .unwrap());
    }
    table.insert_rows(&db, "expired", 5, -1).await;
    let mut keys = live.clone();
    keys.extend((0..5).map(|i| format!("expired:{i}")));
    keys.extend((0..5).map(|i| format!("missing:{i}")));
    keys.push("live:3".to_string());
    for round in 0..3 {
        let answers = futures::future::join_all(keys.iter().map(|k| store.load(k))).await;
        for (k, got) in keys.iter().zip(answers) {
            let got = got.unwrap().map(|l| l.value);
            let want = live.contains(k);
            assert_eq!(got, want.then(|| value(k)), "round {round}, key {k}");
        }
    }
    db.close().await;
}

/// Every SQL-specific case for one dialect, plus the shared suites.
#[macro_export]
macro_rules! sql_suite {
    ($kind:ident) => {
        async fn fixture() -> $crate::common::StoreFixture {
            $crate::common::sql_server::fixture($crate::common::sql_server::Kind::$kind).await
        }

        $crate::store_suites!(fixture);
        $crate::persistence_suite!(fixture);
        $crate::sql_suite!(@cases $kind;
            expiry_is_honoured_before_cleanup,
            cleanup_command_removes_exactly_expired,
            concurrent_purges_remove_each_row_once,
            background_purge_removes_expired_rows,
            rows_use_utc_and_bad_data_is_ignored,
            documented_schema_works_without_create_table,
            missing_table_fails_check_naming_the_key,
            bad_table_name_is_refused_at_config_time,
            shipped_config_is_valid,
            schema_qualified_table_works,
        );
    };
    (@cases $kind:ident; $($name:ident),* $(,)?) => {
        mod sql_specific {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::sql_server::$name($crate::common::sql_server::Kind::$kind)
                        .await;
                }
            )*

            // Current-thread: see the function.
            #[tokio::test]
            async fn loads_issued_together_each_get_their_own_row() {
                $crate::common::sql_server::loads_issued_together_each_get_their_own_row(
                    $crate::common::sql_server::Kind::$kind,
                )
                .await;
            }
        }
    };
}

// ------------------------------------------------- private servers

/// The uid/gid of a user, when running as root (to drop privileges).
fn user_ids(name: &str) -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let cname = std::ffi::CString::new(name).unwrap();
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root, but there is no `{name}` user to run the private server as"
    );
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A PostgreSQL of our own (initdb in a temp dir, on a free port), so a
/// test can stop and restart it without touching the shared server.
/// Binaries come from `SGW_TEST_PG_BIN` or the newest
/// `/usr/lib/postgresql/*/bin`.
pub struct PrivatePostgres {
    process: ServerProcess,
    pub port: u16,
}

fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("SGW_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin; install postgresql or set SGW_TEST_PG_BIN")
    })
}

impl PrivatePostgres {
    pub async fn start() -> PrivatePostgres {
        let dir = tempfile::tempdir().unwrap();
        let ids = user_ids("postgres");
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let bin = pg_bin();
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .args(["--locale", "C"])
            .current_dir(dir.path());
        if let Some((uid, gid)) = ids {
            use std::os::unix::process::CommandExt;
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ready_bin = bin.clone();
        let process = ServerProcess::start_in(
            ServerKind {
                name: "postgres",
                command: Box::new(move |port, dir| {
                    let mut cmd = Command::new(bin.join("postgres"));
                    cmd.arg("-D")
                        .arg(dir.join("data"))
                        .arg("-p")
                        .arg(port.to_string())
                        .arg("-k")
                        .arg(dir)
                        .args(["-c", "listen_addresses=127.0.0.1"])
                        .args(["-c", "fsync=off", "-c", "max_connections=40"])
                        .args(["-c", "shared_buffers=16MB"]);
                    if let Some((uid, gid)) = ids {
                        use std::os::unix::process::CommandExt;
                        cmd.uid(uid).gid(gid);
                    }
                    cmd
                }),
                ready: Box::new(move |port, _| {
                    Command::new(ready_bin.join("pg_isready"))
                        .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                        .status()
                        .is_ok_and(|s| s.success())
                }),
                install_hint: "Install it with `apt-get install postgresql` (./scripts/test does)",
                start_timeout: Duration::from_secs(30),
                // A fast shutdown: PostgreSQL's SIGTERM is a "smart" one
                // that waits for clients to disconnect, which a gateway's
                // connection pool never does on its own.
                stop_signal: libc::SIGINT,
            },
            dir,
        );
        PrivatePostgres {
            port: process.port,
            process,
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

/// A MariaDB of our own (empty data dir, grant tables skipped, on a free
/// port), so a test can stop and restart it. `SGW_TEST_MARIADBD` names the
/// server binary; default `mariadbd` from PATH or /usr/sbin.
pub struct PrivateMariadb {
    process: ServerProcess,
    pub port: u16,
}

fn mariadbd() -> PathBuf {
    if let Ok(path) = std::env::var("SGW_TEST_MARIADBD") {
        return PathBuf::from(path);
    }
    let path_dirs = std::env::var("PATH").unwrap_or_default();
    for dir in path_dirs.split(':').chain(["/usr/sbin", "/usr/local/sbin"]) {
        for name in ["mariadbd", "mysqld"] {
            let candidate = Path::new(dir).join(name);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    panic!("no mariadbd/mysqld binary found; install mariadb-server or set SGW_TEST_MARIADBD")
}

impl PrivateMariadb {
    pub async fn start() -> PrivateMariadb {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let process = ServerProcess::start_in(
            ServerKind {
                name: "mariadbd",
                command: Box::new(|port, d| {
                    let mut cmd = Command::new(mariadbd());
                    cmd.arg("--no-defaults")
                        .arg(format!("--datadir={}", d.join("data").display()))
                        .arg(format!("--socket={}", d.join("mysqld.sock").display()))
                        .arg(format!("--pid-file={}", d.join("mysqld.pid").display()))
                        .arg(format!("--port={port}"))
                        .args([
                            "--bind-address=127.0.0.1",
                            "--user=root",
                            "--skip-grant-tables",
                            "--skip-log-bin",
                            "--innodb-buffer-pool-size=16M",
                            "--innodb-log-file-size=8M",
                            "--max-connections=60",
                        ]);
                    cmd
                }),
                // mariadbd opens its port once it is ready for connections.
                ready: Box::new(|port, _| accepts(port)),
                install_hint:
                    "Install it with `apt-get install mariadb-server` (./scripts/test does)",
                start_timeout: Duration::from_secs(30),
                stop_signal: libc::SIGTERM,
            },
            dir,
        );
        let db = PrivateMariadb {
            port: process.port,
            process,
        };
        let root = reachable(Kind::MySql, &db.root_url()).await;
        root.execute("CREATE DATABASE IF NOT EXISTS test").await;
        root.close().await;
        db
    }

    fn root_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/", self.port)
    }

    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/test", self.port)
    }
}

/// A database server a test owns and may stop and start again.
pub trait PrivateServer {
    fn kind(&self) -> Kind;
    fn url(&self) -> String;
    fn stop(&mut self);
    /// Start again on the same port and data directory; returns once it
    /// answers queries.
    fn start_again(&mut self) -> impl std::future::Future<Output = ()>;
}

impl PrivateServer for PrivatePostgres {
    fn kind(&self) -> Kind {
        Kind::Postgres
    }
    fn url(&self) -> String {
        PrivatePostgres::url(self)
    }
    fn stop(&mut self) {
        self.process.stop()
    }
    async fn start_again(&mut self) {
        self.process.start_again();
        drop(reachable(Kind::Postgres, &self.url()).await);
    }
}

impl PrivateServer for PrivateMariadb {
    fn kind(&self) -> Kind {
        Kind::MySql
    }
    fn url(&self) -> String {
        PrivateMariadb::url(self)
    }
    fn stop(&mut self) {
        self.process.stop()
    }
    async fn start_again(&mut self) {
        self.process.start_again();
        drop(reachable(Kind::MySql, &self.url()).await);
    }
}

/// Requests while the database is down: 503 within the store timeout
/// (fail_closed), the upstream never reached.
async fn assert_store_down(s: &super::protocol::Setup, b: &Browser) {
    let hits = s.up.hits();
    for _ in 0..3 {
        let started = Instant::now();
        let r = b.get("/", &[]).await;
        let took = started.elapsed();
        assert_eq!(r.status, 503, "{}", r.text);
        assert!(r.text.contains("session store unavailable"), "{}", r.text);
        assert!(
            took < Duration::from_millis(1500),
            "503 took {took:?}; store.timeout is 500ms"
        );
    }
    assert_eq!(s.up.hits(), hits, "fail_closed must not reach the upstream");
}

/// The database is down when the gateway starts, comes up, goes away
/// and comes back: while it is down requests fail with 503 within the
/// store timeout; each time it is back the gateway recovers by itself
/// (a failed connect is not cached, dead pooled connections are
/// replaced), sessions intact.
pub async fn outage_then_recovery(server: &mut impl PrivateServer) {
    let url = server.url();
    let table = super::unique("sgw");
    let s = setup(
        StoreFixture::new(
            format!(
                "{{type: sql, url: '{url}', table: {table}, timeout: 500ms, cleanup_interval: 0}}"
            ),
            (),
        ),
        |b| b,
    )
    .await;
    let b = Browser::new(&s.gw);
    // A cookie so every request needs the store (a visitor without one
    // is served without touching it).
    b.set_cookie(
        &CookieVerifier::new(&[KEY_A.as_bytes().to_vec()], 32).sign(&SessionId::generate(32)),
    );

    // Down before the first connection: connect fails, is not cached.
    server.stop();
    assert_store_down(&s, &b).await;
    server.start_again().await;
    let r = b.patch("/", json!({"a": 1})).await;
    assert_eq!(
        r.status,
        200,
        "after the first start: {}\n{}",
        r.text,
        s.gw.log()
    );
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1}));

    // Down with a pool of live connections.
    server.stop();
    assert_store_down(&s, &b).await;
    server.start_again().await;
    let r = b.get("/", &[]).await;
    assert_eq!(
        r.status,
        200,
        "first request after the database came back: {}\n{}",
        r.text,
        s.gw.log()
    );
    assert_eq!(r.session(), json!({"a": 1}));
    assert_eq!(b.patch("/", json!({"b": 2})).await.status, 200);
    assert_eq!(b.get("/", &[]).await.session(), json!({"a": 1, "b": 2}));
    // The outage is logged as errors.
    s.gw.wait_log_line(|l| l.contains("ERROR"));

    // The server closes the gateway's idle connections (an admin, a
    // failover, an idle timeout on the server or a proxy), no request
    // failing meanwhile. After a quiet second a connection is pinged
    // before use, so even a new visitor's first write (a create, which is
    // not retried) is served.
    let killed = kill_other_connections(server).await;
    assert!(killed >= 1, "the gateway had pooled connections");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let visitor = Browser::new(&s.gw);
    let r = visitor.patch("/", json!({"c": 3})).await;
    assert_eq!(
        r.status,
        200,
        "first write after the server closed the idle connections: {}\n{}",
        r.text,
        s.gw.log()
    );
    assert_eq!(visitor.get("/", &[]).await.session(), json!({"c": 3}));
}

/// Close every client connection of the server but the caller's own;
/// returns how many.
async fn kill_other_connections(server: &impl PrivateServer) -> usize {
    let db = reachable(server.kind(), &server.url()).await;
    let ids = match server.kind() {
        Kind::Postgres => {
            db.strings(
                "SELECT pid::text FROM pg_stat_activity \
                 WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
            )
            .await
        }
        Kind::MySql => {
            db.strings(
                "SELECT CAST(ID AS CHAR) FROM information_schema.PROCESSLIST \
                 WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Daemon', 'Binlog Dump')",
            )
            .await
        }
        Kind::Sqlite => unreachable!("sqlite has no server"),
    };
    for id in &ids {
        let sql = match server.kind() {
            Kind::Postgres => format!("SELECT pg_terminate_backend({id})"),
            _ => format!("KILL {id}"),
        };
        db.execute(&sql).await;
    }
    db.close().await;
    ids.len()
}
