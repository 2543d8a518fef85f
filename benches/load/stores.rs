//! The stores the bench can run, and what each needs around it: a private
//! `redis-server`, `memcached`, SecantusDB (a MongoDB stand-in) or
//! `moto_server` (a DynamoDB stand-in): `mongodb` and `dynamodb` measure the
//! gateway plus those servers, not MongoDB or DynamoDB; a SQLite file, a
//! unique table on the shared PostgreSQL and MariaDB servers (dropped at
//! the end). `baseline` is the same gateway
//! with sessions excluded on every path (`session.exclude: ["/"]`), which
//! is what every other store is compared with. Three variants run `read`
//! only: `baseline-quiet` (the baseline without access log and admin
//! listener, issue 13) and `memory-sealed`, `redis-sealed` (the store with
//! `session.seal: true`, issue 16).

use crate::procs::{self, Proc};
use std::path::Path;

/// Every store, in run order: a variant right after what it is compared
/// with, so both see the same background load.
pub const ALL: [&str; 16] = [
    "baseline",
    "baseline-quiet",
    "memory",
    "memory-sealed",
    "filesystem",
    "redis",
    "redis-sealed",
    "redis-near",
    "memcached",
    "sqlite",
    "postgres",
    "postgres-near",
    "postgres-unix",
    "mysql",
    "mongodb",
    "dynamodb",
];

pub const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The same database through its Unix-domain socket (Debian's directory).
pub const POSTGRES_UNIX_URL: &str = "postgres://postgres@localhost/test?host=/var/run/postgresql";
pub const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// A store ready to be used by any number of gateway starts.
pub struct StoreEnv {
    pub name: String,
    /// The `store:` section (YAML flow mapping); relative paths are
    /// relative to the gateway's working directory.
    pub yaml: String,
    /// `session.exclude: ["/"]`: the baseline.
    pub sessions_off: bool,
    /// `session.seal: true`.
    pub seal: bool,
    /// `access_log: false` and no admin listener (otherwise the access log
    /// is written to a file and /metrics is scraped).
    pub quiet: bool,
    /// A SQL table to drop at the end: (url, table).
    pub sql_table: Option<(String, String)>,
    /// The private store server (redis-server, memcached, SecantusDB,
    /// moto_server), if any
    /// (killed on drop).
    pub server: Option<Proc>,
}

/// Does `name` run only the `read` scenario? The variants do: their
/// targets are about reads.
pub fn read_only(name: &str) -> bool {
    matches!(
        name,
        "baseline-quiet" | "memory-sealed" | "redis-sealed" | "postgres-near" | "postgres-unix"
    )
}

/// Set up `name` under `dir`. `run_id` makes table names unique.
pub fn prepare(name: &str, dir: &Path, run_id: &str) -> Result<StoreEnv, String> {
    let (kind, seal, quiet) = match name {
        "baseline-quiet" => ("baseline", false, true),
        "memory-sealed" => ("memory", true, false),
        "redis-sealed" => ("redis", true, false),
        other => (other, false, false),
    };
    let mut env = prepare_kind(kind, name, dir, run_id)?;
    env.seal = seal;
    env.quiet = quiet;
    Ok(env)
}

/// Set up a store of type `kind` (a name of [`ALL`] without variant) as
/// `name`; a private server runs in `dir/<name>`.
fn prepare_kind(kind: &str, name: &str, dir: &Path, run_id: &str) -> Result<StoreEnv, String> {
    let env = |yaml: String| StoreEnv {
        name: name.to_string(),
        yaml,
        sessions_off: false,
        seal: false,
        quiet: false,
        sql_table: None,
        server: None,
    };
    let sql = |url: &str, extra: &str| {
        let table = format!("sgw_bench_{run_id}_{}", name.replace('-', "_"));
        let mut e = env(format!(
            "{{type: sql, url: \"{url}\", table: {table}, create_table: true{extra}}}"
        ));
        e.sql_table = Some((url.to_string(), table));
        e
    };
    // A private server started in `dir/<name>`, and the YAML for its port.
    let with_server = |start: fn(&Path) -> Result<Proc, String>, yaml: fn(u16) -> String| {
        let server_dir = dir.join(name);
        std::fs::create_dir_all(&server_dir).map_err(|e| e.to_string())?;
        let server = start(&server_dir)?;
        let yaml = yaml(server.port);
        Ok(StoreEnv {
            server: Some(server),
            ..env(yaml)
        })
    };
    match kind {
        "baseline" => Ok(StoreEnv {
            sessions_off: true,
            ..env("{type: memory}".into())
        }),
        "memory" => Ok(env("{type: memory}".into())),
        // `dir` is relative to each gateway's own temporary directory.
        "filesystem" => Ok(env("{type: filesystem, dir: ./sessions}".into())),
        "redis" => with_server(procs::start_redis, |port| {
            format!("{{type: redis, url: \"redis://127.0.0.1:{port}\"}}")
        }),
        // The same with the near cache on (store.near_cache).
        "redis-near" => with_server(procs::start_redis, |port| {
            format!(
                "{{type: redis, url: \"redis://127.0.0.1:{port}\", near_cache: {{enabled: true}}}}"
            )
        }),
        "memcached" => with_server(procs::start_memcached, |port| {
            format!("{{type: memcached, servers: [127.0.0.1:{port}]}}")
        }),
        "dynamodb" => {
            // moto takes any credentials; the gateways inherit these, and
            // nothing asks instance metadata. Set from the bench's main
            // thread before any gateway starts.
            std::env::set_var("AWS_ACCESS_KEY_ID", "bench");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "bench");
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
            // A roomier timeout: moto is a Python server on the same CPUs.
            with_server(procs::start_moto, |port| {
                format!(
                    "{{type: dynamodb, region: us-east-1, \
                     endpoint_url: \"http://127.0.0.1:{port}\", timeout: 2s}}"
                )
            })
        }
        "sqlite" => {
            // An existing (empty) file is a valid database for any URL form.
            let file = dir.join("sessions.db");
            std::fs::write(&file, b"").map_err(|e| e.to_string())?;
            let mut e = sql(&format!("sqlite://{}", file.display()), "");
            e.sql_table = None; // the file goes with the temp dir
            Ok(e)
        }
        "mongodb" => {
            let mongo_dir = dir.join("secantus");
            std::fs::create_dir_all(&mongo_dir).map_err(|e| e.to_string())?;
            let server = procs::start_secantus(&mongo_dir)?;
            println!("store mongodb: measured against SecantusDB (a Python MongoDB stand-in), not MongoDB");
            let mut e = env(format!(
                "{{type: mongodb, url: \"mongodb://127.0.0.1:{}/\"}}",
                server.port
            ));
            e.server = Some(server);
            Ok(e)
        }
        "postgres" => Ok(sql(POSTGRES_URL, "")),
        // The same with the near cache on (a trigger + LISTEN/NOTIFY).
        "postgres-near" => Ok(sql(POSTGRES_URL, ", near_cache: {enabled: true}")),
        // The same over a Unix-domain socket instead of loopback TCP.
        "postgres-unix" => Ok(sql(POSTGRES_UNIX_URL, "")),
        "mysql" => Ok(sql(MYSQL_URL, "")),
        other => Err(format!(
            "unknown store `{other}` (known: {})",
            ALL.join(", ")
        )),
    }
}

/// Drop the table a SQL store created on a shared server (best effort).
pub async fn drop_table(url: &str, table: &str) {
    #[cfg(feature = "sql")]
    {
        use sqlx::Connection;
        let sql = format!("DROP TABLE IF EXISTS {table}");
        let work = async {
            if url.starts_with("postgres") {
                let mut c = sqlx::PgConnection::connect(url).await?;
                sqlx::query(&sql).execute(&mut c).await?;
                // The near cache's trigger function outlives the table.
                let function = format!("DROP FUNCTION IF EXISTS \"{table}_sgw_notify\"()");
                sqlx::query(&function).execute(&mut c).await?;
            } else if url.starts_with("mysql") {
                let mut c = sqlx::MySqlConnection::connect(url).await?;
                sqlx::query(&sql).execute(&mut c).await?;
            }
            Ok::<_, sqlx::Error>(())
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), work).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("note: could not drop {table} on {url}: {e}"),
            Err(_) => eprintln!("note: dropping {table} on {url} timed out"),
        }
    }
    #[cfg(not(feature = "sql"))]
    let _ = (url, table);
}
