//! The SQL store on MySQL/MariaDB: the store contract, the protocol and
//! persistence suites and the SQL cases against the shared server
//! (`SGW_TEST_MYSQL_URL`), plus an outage on a private MariaDB this test
//! starts, stops and restarts.
#![cfg(feature = "sql")]

mod common;

use common::sql_server::{outage_then_recovery, PrivateMariadb};

sql_suite!(MySql);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_answers_503_then_recovers() {
    let mut db = PrivateMariadb::start().await;
    outage_then_recovery(&mut db).await;
}
