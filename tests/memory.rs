//! The memory store: the store contract and the whole protocol suite.

mod common;

use common::StoreFixture;

async fn fixture() -> StoreFixture {
    StoreFixture::new("{type: memory, max_entries: 10000}", ())
}

store_suites!(fixture);
sealed_suite!(fixture);
