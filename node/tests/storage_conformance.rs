//! openraft's storage conformance suite, run against the real RocksDB log store and state
//! machine (not a mock): vote/log durability contracts, truncation, purge, membership recovery
//! and snapshot build/install.

use std::sync::Arc;

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;
use strata_node::raft::TypeConfig;
use strata_node::storage::{Engine, LogStore, StateMachine};
use tempfile::TempDir;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine: Arc<Engine> =
            Engine::open(&dir.path().join("db"), 16 << 20).expect("open engine");
        let log = LogStore::new(engine.clone(), 3);
        let sm = StateMachine::open(engine, 3, dir.path().join("snapshots"))
            .expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocksdb_store_passes_openraft_conformance_suite() {
    Suite::test_all(RocksBuilder)
        .await
        .expect("conformance suite");
}
