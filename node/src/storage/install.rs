//! Installing a snapshot: replacing a group's whole state with a snapshot file, in bounded memory
//! and crash-safe.
//!
//! The shard's records do not go through the WAL and the memtables (which would write them three
//! times — WAL, flush, compaction — and fill the memtables every other group writes to). An
//! install is delete-range plus ingest, as in TiKV, each step durable before the next:
//!
//! 1. the snapshot file is read through once, checking its count and CRC, and its records are
//!    written to a staged SST file (fsynced); a corrupt file or one whose keys are out of order
//!    is refused here, before anything is touched;
//! 2. the snapshot file is renamed to the group's installing file;
//! 3. one durable write deletes the group's data and `sm_meta` and stores the install marker
//!    (`TAG_INSTALLING`, the snapshot's last log id);
//! 4. the SST file is ingested into the `data` column family (durable when it returns; its
//!    records are newer than the range deletion);
//! 5. one durable write stores the sessions, membership and applied id and deletes the marker;
//! 6. the installing file becomes the current snapshot.
//!
//! A crash after step 3 leaves the marker: [`recover`], at the next open, runs steps 1 and 3–6
//! again from the installing file (a second range deletion also covers records a first ingest
//! left), so the group ends with the new state whole. A crash before leaves the old state whole.
//! Between steps 3 and 5 the group's data is partial, so reads are refused while [`Installs`]
//! says an install is under way.

use std::sync::atomic::{AtomicU64, Ordering};

use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf};
use rocksdb::WriteBatch;

use super::keys::{
    data_key, group_range, tag_key, CF_DATA, CF_SM, TAG_APPLIED, TAG_INSTALLING, TAG_MEMBERSHIP,
};
use super::sessions::SessionTable;
use super::snapshot::{SnapshotFile, StagedFile};
use super::snapshot_format::{invalid, SnapshotReader};
use super::{io_err, Engine};
use crate::layout::GroupId;
use crate::raft::codec::{decode, encode};
use crate::raft::TypeConfig;

/// The snapshot installs of one group, shared with the read path: a counter that is odd while an
/// install is replacing the data (a seqlock). A read that saw the same even value before and
/// after it did not overlap an install.
#[derive(Debug, Default)]
pub struct Installs(AtomicU64);

impl Installs {
    /// Installs from a leader completed since this process started.
    pub fn completed(&self) -> u64 {
        self.0.load(Ordering::SeqCst) / 2
    }

    /// The current value, if no install is under way.
    pub fn settled(&self) -> Option<u64> {
        Some(self.0.load(Ordering::SeqCst)).filter(|v| v % 2 == 0)
    }

    /// Runs `read` and returns its result if no install overlapped it.
    pub fn read<T>(&self, read: impl FnOnce() -> T) -> Result<T, &'static str> {
        const BUSY: &str = "the replica is installing a snapshot";
        let before = self.settled().ok_or(BUSY)?;
        let out = read();
        (self.settled() == Some(before)).then_some(out).ok_or(BUSY)
    }

    fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// What an install leaves for the state machine to adopt.
#[derive(Debug)]
pub struct Installed {
    /// The snapshot's client sessions.
    pub sessions: SessionTable,
    /// Number of keys written.
    pub keys: u64,
}

/// Installs the snapshot in `staged` (a complete snapshot file) as `group`'s state. `meta` is
/// what openraft says it installs; the file must agree. On error after the data was touched the
/// install stays marked (reads stay refused) and the next open finishes it.
pub fn install(
    engine: &Engine,
    group: GroupId,
    files: &SnapshotFile,
    staged: StagedFile,
    meta: &SnapshotMetaOf<TypeConfig>,
    installs: &Installs,
) -> std::io::Result<Installed> {
    let reader = SnapshotReader::open(std::fs::File::open(staged.path())?)?;
    if reader.meta() != meta {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "snapshot file is of {:?}, the install is of {:?}",
                reader.meta().last_log_id,
                meta.last_log_id
            ),
        ));
    }
    let prepared = prepare(engine, group, files, reader)?;
    files.begin_install(staged)?;
    let index = meta.last_log_id.map_or(0, |l| l.index());
    tracing::info!(group, index, keys = prepared.keys, "installing snapshot");
    installs.bump();
    let installed = replace_state(engine, group, meta, prepared)?;
    installs.bump();
    tracing::info!(group, index, "installed snapshot");
    files.finish_install(meta)?;
    Ok(installed)
}

/// At open: finishes an install a crash cut short, and tidies an installing file left before an
/// install began (deleted) or after it ended (published). Returns what a finished install left.
pub fn recover(
    engine: &Engine,
    group: GroupId,
    files: &SnapshotFile,
    applied: Option<LogIdOf<TypeConfig>>,
) -> std::io::Result<Option<Installed>> {
    let marker = engine
        .db()
        .get_cf(engine.cf(CF_SM), tag_key(group, TAG_INSTALLING))
        .map_err(io_err)?;
    let installing = files.installing_meta()?;
    let Some(marker) = marker else {
        return match installing {
            Some(meta) if meta.last_log_id == applied => files.finish_install(&meta).map(|_| None),
            Some(_) => files.discard_install().map(|_| None),
            None => Ok(None),
        };
    };
    let at: Option<LogIdOf<TypeConfig>> = decode(&marker)?;
    match installing {
        Some(meta) if meta.last_log_id == at => {
            tracing::warn!(group, "finishing a snapshot install cut short");
            let reader = SnapshotReader::open(files.open_installing()?)?;
            let prepared = prepare(engine, group, files, reader)?;
            let installed = replace_state(engine, group, &meta, prepared)?;
            files.finish_install(&meta)?;
            Ok(Some(installed))
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("group {group}: a snapshot install was cut short and its file is missing"),
        )),
    }
}

/// A snapshot checked whole and turned into an SST file, ready to replace the group's state.
struct Prepared {
    sessions: SessionTable,
    /// The records as a staged SST file; `None` for a snapshot without records (RocksDB does
    /// not write empty SST files).
    sst: Option<StagedFile>,
    keys: u64,
}

/// Step 1: reads the rest of the snapshot (its records, then its count and CRC) into a staged
/// SST file, fsynced. Touches no state: on error nothing but the staged file (removed) was
/// written.
fn prepare(
    engine: &Engine,
    group: GroupId,
    files: &SnapshotFile,
    mut reader: SnapshotReader,
) -> std::io::Result<Prepared> {
    let sessions = SessionTable::from_sessions(group, reader.take_sessions());
    let sst = files.stage()?;
    let mut writer = engine.data_sst_writer();
    writer.open(sst.path()).map_err(io_err)?;
    let mut keys = 0;
    while let Some((key, record)) = reader.next_record()? {
        // The writer refuses a key not greater than the one before: a snapshot is one range
        // scan, so its keys come in order, and a file whose keys do not is refused here.
        writer
            .put(data_key(group, &key), record)
            .map_err(|e| invalid(format!("record {}: {e}", keys + 1)))?;
        keys += 1;
    }
    let sst = if keys == 0 {
        None
    } else {
        writer.finish().map_err(io_err)?; // also fsyncs the file
        Some(sst)
    };
    Ok(Prepared {
        sessions,
        sst,
        keys,
    })
}

/// Step 3: deletes the group's data and `sm_meta` and stores the install marker, durably.
fn clear_and_mark(
    engine: &Engine,
    group: GroupId,
    meta: &SnapshotMetaOf<TypeConfig>,
) -> std::io::Result<()> {
    let (lo, hi) = group_range(group);
    let mut b = WriteBatch::default();
    b.delete_range_cf(engine.cf(CF_DATA), lo, hi);
    b.delete_range_cf(engine.cf(CF_SM), lo, hi);
    let marker = tag_key(group, TAG_INSTALLING);
    b.put_cf(engine.cf(CF_SM), marker, encode(&meta.last_log_id));
    engine.write_durable_blocking(b)
}

/// Steps 3–5: replaces the group's state with the prepared snapshot.
fn replace_state(
    engine: &Engine,
    group: GroupId,
    meta: &SnapshotMetaOf<TypeConfig>,
    prepared: Prepared,
) -> std::io::Result<Installed> {
    let Prepared {
        mut sessions,
        sst,
        keys,
    } = prepared;
    clear_and_mark(engine, group, meta)?;
    if let Some(sst) = &sst {
        engine.ingest_data(sst.path())?;
    }
    let sm = engine.cf(CF_SM);
    let mut b = WriteBatch::default();
    sessions.write_all(engine, &mut b);
    b.put_cf(
        sm,
        tag_key(group, TAG_MEMBERSHIP),
        encode(&meta.last_membership),
    );
    b.put_cf(sm, tag_key(group, TAG_APPLIED), encode(&meta.last_log_id));
    b.delete_cf(sm, tag_key(group, TAG_INSTALLING));
    engine.write_durable_blocking(b)?;
    Ok(Installed { sessions, keys })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::keys::encode_record;
    use crate::storage::snapshot_format::SnapshotWriter;
    use crate::storage::state_machine::get;
    use std::sync::Arc;

    const GROUP: GroupId = 4;

    fn meta(index: u64) -> SnapshotMetaOf<TypeConfig> {
        openraft::SnapshotMeta {
            last_log_id: Some(openraft::testing::log_id::<TypeConfig>(1, 1, index)),
            ..Default::default()
        }
    }

    /// A node's storage for one group, in a temporary directory.
    struct Node {
        dir: tempfile::TempDir,
        engine: Arc<Engine>,
        files: SnapshotFile,
        installs: Installs,
    }

    impl Node {
        fn open(dir: tempfile::TempDir) -> Node {
            let engine = Engine::open(&dir.path().join("db"), 16 << 20).unwrap();
            let files = SnapshotFile::new(dir.path().join("snapshots"), GROUP);
            Node {
                dir,
                engine,
                files,
                installs: Installs::default(),
            }
        }

        /// The node closed (as by a crash) and opened again.
        fn reopen(self) -> Node {
            let Node { dir, engine, .. } = self;
            drop(engine); // closes the database
            Node::open(dir)
        }

        /// A staged snapshot at `index` of `n` keys `k…` whose records carry version `index`.
        fn snapshot(&self, index: u64, n: u64) -> StagedFile {
            let mut keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
            keys.sort();
            self.snapshot_of(index, &keys)
        }

        /// A staged snapshot at `index` of `keys`, in the order given.
        fn snapshot_of(&self, index: u64, keys: &[String]) -> StagedFile {
            let staged = self.files.stage().unwrap();
            let mut w = SnapshotWriter::create(staged.path(), &meta(index), &Vec::new()).unwrap();
            for k in keys {
                w.record(k.as_bytes(), &encode_record(index, b"v")).unwrap();
            }
            w.finish().unwrap();
            staged
        }

        fn install(&self, staged: StagedFile, index: u64) -> std::io::Result<Installed> {
            let (e, f) = (&self.engine, &self.files);
            install(e, GROUP, f, staged, &meta(index), &self.installs)
        }

        fn recover(&self, applied: u64) -> Option<Installed> {
            let applied = (applied > 0).then(|| meta(applied).last_log_id.unwrap());
            recover(&self.engine, GROUP, &self.files, applied).unwrap()
        }

        fn version(&self, key: &str) -> Option<u64> {
            let record = get(&self.engine, GROUP, key.as_bytes()).unwrap();
            record.map(|r| r.version)
        }

        fn applied(&self) -> Option<u64> {
            let sm = self.engine.cf(CF_SM);
            let raw = self.engine.db().get_cf(sm, tag_key(GROUP, TAG_APPLIED));
            let id: Option<LogIdOf<TypeConfig>> = decode(&raw.unwrap()?).unwrap();
            id.map(|l| l.index())
        }

        /// The `data` column family's SST files: (level, number of entries).
        fn data_files(&self) -> Vec<(i32, u64)> {
            let files = self.engine.db().live_files().unwrap();
            let data = files.iter().filter(|f| f.column_family_name == CF_DATA);
            data.map(|f| (f.level, f.num_entries)).collect()
        }

        fn current_snapshot(&self) -> Option<u64> {
            let current = self.files.load().unwrap()?;
            current.meta.last_log_id.map(|l| l.index())
        }
    }

    fn node() -> Node {
        Node::open(tempfile::tempdir().unwrap())
    }

    #[test]
    fn an_install_replaces_the_state_and_becomes_current() {
        let node = node();
        node.install(node.snapshot(10, 5), 10).unwrap();
        let n = 200_000;
        assert_eq!(node.install(node.snapshot(20, n), 20).unwrap().keys, n);
        assert_eq!(node.installs.completed(), 2);
        assert_eq!(node.version("k0"), Some(20));
        assert_eq!(node.version(&format!("k{}", n - 1)), Some(20));
        assert_eq!(node.applied(), Some(20));
        assert_eq!(node.current_snapshot(), Some(20));
        assert!(node.files.installing_meta().unwrap().is_none());
    }

    #[test]
    fn the_records_are_ingested_as_one_sst_file_not_written_through_the_memtable() {
        let node = node();
        let n = 50_000;
        node.install(node.snapshot(10, n), 10).unwrap();
        let files = node.data_files();
        assert!(files.iter().any(|&(_, entries)| entries == n), "{files:?}");
        let db = node.engine.db();
        let in_memtable = db
            .property_int_value_cf(
                node.engine.cf(CF_DATA),
                "rocksdb.num-entries-active-mem-table",
            )
            .unwrap();
        assert_eq!(in_memtable, Some(0));
        // No staged file is left behind: the SST was moved into the database.
        let left: Vec<_> = std::fs::read_dir(node.dir.path().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec![format!("group-{GROUP}.snap")]);
    }

    #[test]
    fn an_empty_snapshot_leaves_the_group_empty() {
        let node = node();
        node.install(node.snapshot(10, 3), 10).unwrap();
        assert_eq!(node.install(node.snapshot(20, 0), 20).unwrap().keys, 0);
        assert_eq!((node.version("k0"), node.applied()), (None, Some(20)));
    }

    #[test]
    fn a_snapshot_with_keys_out_of_order_is_refused_before_anything_is_written() {
        let node = node();
        node.install(node.snapshot(10, 3), 10).unwrap();
        let keys = ["a", "c", "b"].map(String::from);
        let err = node.install(node.snapshot_of(20, &keys), 20).unwrap_err();
        assert!(err.to_string().contains("record 3"), "{err}");
        let same_twice = ["a", "a"].map(String::from);
        let err = node
            .install(node.snapshot_of(30, &same_twice), 30)
            .unwrap_err();
        assert!(err.to_string().contains("record 2"), "{err}");
        assert_eq!((node.version("k0"), node.applied()), (Some(10), Some(10)));
        assert_eq!(node.version("a"), None);
        assert!(node.files.installing_meta().unwrap().is_none());
    }

    #[test]
    fn a_corrupt_or_mismatched_snapshot_is_refused_before_anything_is_written() {
        let node = node();
        node.install(node.snapshot(10, 3), 10).unwrap();

        let staged = node.snapshot(20, 3);
        let mut bytes = std::fs::read(staged.path()).unwrap();
        let at = bytes.len() - 20;
        bytes[at] ^= 0x40;
        std::fs::write(staged.path(), bytes).unwrap();
        let err = node.install(staged, 20).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");

        let err = node.install(node.snapshot(30, 3), 31).unwrap_err();
        assert!(err.to_string().contains("the install is of"), "{err}");

        assert_eq!((node.version("k0"), node.applied()), (Some(10), Some(10)));
        assert_eq!(node.installs.settled(), Some(2));
    }

    #[test]
    fn a_crash_midway_is_finished_at_the_next_open() {
        let node = node();
        node.install(node.snapshot(10, 3), 10).unwrap();
        // An install of index 20 that "crashes" right after clearing the old state.
        node.files.begin_install(node.snapshot(20, 4)).unwrap();
        clear_and_mark(&node.engine, GROUP, &meta(20)).unwrap();
        assert_eq!(node.version("k0"), None);

        let node = node.reopen();
        let recovered = node.recover(0).expect("the install is finished");
        assert_eq!(recovered.keys, 4);
        assert_eq!(node.version("k3"), Some(20));
        assert_eq!(node.applied(), Some(20));
        assert_eq!(node.current_snapshot(), Some(20));
        assert!(node.recover(20).is_none(), "nothing left to finish");
    }

    #[test]
    fn a_crash_after_the_ingest_is_finished_at_the_next_open() {
        let node = node();
        node.install(node.snapshot(10, 3), 10).unwrap();
        // An install of index 20 of keys k0..k1 that "crashes" after ingesting, before its last
        // write: the next open clears and ingests again, and ends with exactly the new state.
        let staged = node.snapshot(20, 2);
        let reader = SnapshotReader::open(std::fs::File::open(staged.path()).unwrap()).unwrap();
        let prepared = prepare(&node.engine, GROUP, &node.files, reader).unwrap();
        node.files.begin_install(staged).unwrap();
        clear_and_mark(&node.engine, GROUP, &meta(20)).unwrap();
        node.engine
            .ingest_data(prepared.sst.as_ref().unwrap().path())
            .unwrap();
        drop(prepared);

        let node = node.reopen();
        assert_eq!(node.recover(0).expect("the install is finished").keys, 2);
        assert_eq!(node.version("k1"), Some(20));
        assert_eq!(node.version("k2"), None, "the old state is gone");
        assert_eq!(node.applied(), Some(20));
        assert_eq!(node.current_snapshot(), Some(20));
    }

    #[test]
    fn a_marker_without_its_file_is_an_error_not_an_empty_shard() {
        let node = node();
        clear_and_mark(&node.engine, GROUP, &meta(20)).unwrap();
        let err = recover(&node.engine, GROUP, &node.files, None).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn an_installing_file_left_before_or_after_an_install_is_tidied() {
        let node = node();
        // Before: the state is at 10, the installing file at 20 never began.
        node.files.begin_install(node.snapshot(20, 1)).unwrap();
        assert!(node.recover(10).is_none());
        assert!(node.files.installing_meta().unwrap().is_none());
        assert_eq!(node.current_snapshot(), None);
        // After: the state already is the installing file's; it becomes the current snapshot.
        node.files.begin_install(node.snapshot(30, 1)).unwrap();
        assert!(node.recover(30).is_none());
        assert_eq!(node.current_snapshot(), Some(30));
    }

    #[test]
    fn a_read_overlapping_an_install_is_refused() {
        let installs = Installs::default();
        assert_eq!(installs.read(|| 1), Ok(1));
        assert!(installs.read(|| installs.bump()).is_err());
        assert!(installs.read(|| 2).is_err(), "an install is under way");
        installs.bump();
        assert_eq!(installs.read(|| 3), Ok(3));
        assert_eq!(installs.completed(), 1);
    }
}
