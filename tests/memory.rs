//! The memory store: the store contract and the whole protocol suite.

mod common;

use common::StoreFixture;
use session_gateway::session::SessionStore;
use session_gateway::store::memory::MemoryStore;
use std::sync::Arc;

async fn fixture() -> StoreFixture {
    StoreFixture::new("{type: memory, max_entries: 10000}", ())
}

async fn store() -> (Arc<dyn SessionStore>, ()) {
    (Arc::new(MemoryStore::new(10_000)), ())
}

protocol_suite!(fixture);
store_contract!(store);
