//! A power cut while a WAL write is on its way to the disk can leave the WAL ending in a torn
//! record: its first sectors written, the rest zeros. That write was never acknowledged (it was
//! not fsynced), but every write before it was, and the node must still open its data: RocksDB's
//! point-in-time recovery replays the WAL up to the torn record. A stricter recovery mode
//! (`AbsoluteConsistency`) takes the torn record for corruption and refuses to open, so the node
//! could never restart — the chaos suite's torn power losses find that too (planted bug
//! `strict-wal-recovery`), but only now and then; this test finds it every time.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rocksdb::WriteBatch;
use strata_node::storage::keys::CF_DATA;
use strata_node::storage::Engine;

const BUDGET: usize = 16 << 20;

/// The WAL file RocksDB writes to: the newest `*.log` in `db`.
fn newest_wal(db: &Path) -> PathBuf {
    let mut wals: Vec<PathBuf> = std::fs::read_dir(db)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    wals.sort();
    wals.pop().expect("a WAL file")
}

fn put_synced(engine: &Engine, key: &str, value: &[u8]) {
    let mut batch = WriteBatch::default();
    batch.put_cf(engine.cf(CF_DATA), key, value);
    engine.write_durable_blocking(batch).unwrap();
}

#[test]
fn a_torn_wal_tail_loses_only_the_write_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let acknowledged = ["a", "b", "c"];
    let in_flight_value = vec![7u8; 4096];
    {
        let engine = Engine::open(&db, BUDGET).unwrap();
        for key in acknowledged {
            put_synced(&engine, key, key.as_bytes());
        }
        put_synced(&engine, "in-flight", &in_flight_value);
    }

    // The power went with only the in-flight record's first half on the disk: zero the rest.
    let wal = newest_wal(&db);
    let len = std::fs::metadata(&wal).unwrap().len();
    let mut file = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
    file.seek(SeekFrom::Start(len - 2048)).unwrap();
    file.write_all(&[0u8; 2048]).unwrap();
    file.sync_all().unwrap();
    drop(file);

    let engine = Engine::open(&db, BUDGET)
        .expect("a node must open its data after a power cut tore its last WAL write");
    let get = |key: &str| engine.db().get_cf(engine.cf(CF_DATA), key).unwrap();
    for key in acknowledged {
        assert_eq!(
            get(key).as_deref(),
            Some(key.as_bytes()),
            "{key} was synced"
        );
    }
    assert_eq!(get("in-flight"), None, "the torn record is not replayed");
}
