//! The SQL store on SQLite (a file in a temp dir per test): the store
//! contract, the protocol and persistence suites and the SQL cases, plus
//! the dialect-independent config checks of `store.type: sql`.
#![cfg(feature = "sql")]

mod common;

use common::gateway::KEY_A;
use common::sql_server::run_cli_env;

sql_suite!(Sqlite);
sealed_suite!(fixture);

fn check(store_yaml: &str, dir: &std::path::Path) -> (i32, String, String) {
    let path = dir.join("g.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:6188\nupstream: 127.0.0.1:8000\nsecret_keys: [\"{KEY_A}\"]\nstore: {store_yaml}\n"
        ),
    )
    .unwrap();
    run_cli_env(&["-c", path.to_str().unwrap(), "--test"], dir, &[])
}

#[test]
fn config_errors_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    for (store, key) in [
        ("{type: sql}", "store.url"),
        ("{type: sql, url: 'oracle://db/x'}", "store.url"),
        ("{type: sql, url: 'postgres://db:port/x'}", "store.url"),
        ("{type: sql, url: 'sqlite::memory:'}", "store.url"),
        (
            "{type: sql, url: 'sqlite://s.db', table: 's;x'}",
            "store.table",
        ),
        (
            "{type: sql, url: 'sqlite://s.db', colour: blue}",
            "store.colour",
        ),
        (
            "{type: sql, url: 'sqlite://s.db', create_table: maybe}",
            "store.create_table",
        ),
        (
            "{type: sql, url: 'sqlite://s.db', max_connections: 0}",
            "store.max_connections",
        ),
    ] {
        let (code, out, err) = check(store, dir.path());
        assert_eq!(code, 2, "{store}: {out}{err}");
        assert!(err.starts_with(&format!("error: {key}")), "{store}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn relative_file_is_created_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = check("{type: sql, url: 'sqlite://./data.db'}", dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("sql sqlite (sqlite://./data.db, table sessions"),
        "{out}"
    );
    assert!(dir.path().join("data.db").exists());
}

#[test]
fn password_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    // An unreachable port: the check fails, and neither the summary nor
    // the error may show the password.
    let port = common::free_port();
    let (code, out, err) = check(
        &format!("{{type: sql, url: 'postgres://u:hunter2@127.0.0.1:{port}/db'}}"),
        dir.path(),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.starts_with("error: store.url"), "{err}");
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );
}
