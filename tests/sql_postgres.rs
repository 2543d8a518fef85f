//! The SQL store on PostgreSQL: the store contract, the protocol and
//! persistence suites and the SQL cases (expiry before cleanup, batched
//! cleanup, schema, config errors, shipped config) against the shared
//! server (`SGW_TEST_POSTGRES_URL`), plus an outage on a private server
//! this test starts, stops and restarts.
#![cfg(feature = "sql")]

mod common;

use common::sql_server::{outage_then_recovery, PrivatePostgres};

sql_suite!(Postgres);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_answers_503_then_recovers() {
    let mut pg = PrivatePostgres::start().await;
    outage_then_recovery(&mut pg).await;
}
