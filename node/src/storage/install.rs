//! Installing a snapshot: replacing a group's whole state with a snapshot file, in bounded memory
//! and crash-safe.
//!
//! The shard is not put in one `WriteBatch` (that would hold it in memory twice: the batch and
//! the memtable it lands in). Instead, each step durable before the next:
//!
//! 1. the snapshot file, checked whole (count and CRC), is renamed to the group's installing file;
//! 2. one synced write deletes the group's data and `sm_meta` and stores the install marker
//!    (`TAG_INSTALLING`, the snapshot's last log id);
//! 3. the records go in in batches of at most [`INSTALL_BATCH_BYTES`], without fsync;
//! 4. one synced write stores the sessions, membership and applied id and deletes the marker
//!    (its fsync also covers step 3: the WAL is one ordered stream);
//! 5. the installing file becomes the current snapshot.
//!
//! A crash after step 2 leaves the marker: [`recover`], at the next open, runs steps 2–5 again
//! from the installing file, so the group ends with the new state whole. A crash before leaves
//! the old state whole. Between steps 2 and 4 the group's data is partial, so reads are refused
//! while [`Installs`] says an install is under way.

use std::sync::atomic::{AtomicU64, Ordering};

use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf};
use rocksdb::WriteBatch;

use super::keys::{
    data_key, group_range, tag_key, CF_DATA, CF_SM, TAG_APPLIED, TAG_INSTALLING, TAG_MEMBERSHIP,
};
use super::sessions::SessionTable;
use super::snapshot::{SnapshotFile, StagedFile};
use super::snapshot_format::SnapshotReader;
use super::{io_err, Engine};
use crate::layout::GroupId;
use crate::raft::codec::{decode, encode};
use crate::raft::TypeConfig;

/// Most bytes of records written per `WriteBatch` while installing.
pub const INSTALL_BATCH_BYTES: usize = 4 << 20;

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
    let checked = SnapshotReader::verify(std::fs::File::open(staged.path())?)?;
    if checked != *meta {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "snapshot file is of {:?}, the install is of {:?}",
                checked.last_log_id, meta.last_log_id
            ),
        ));
    }
    files.begin_install(staged)?;
    let index = meta.last_log_id.map_or(0, |l| l.index());
    tracing::info!(group, index, "installing snapshot");
    installs.bump();
    let installed = replace_state(engine, group, files, meta)?;
    installs.bump();
    tracing::info!(group, index, keys = installed.keys, "installed snapshot");
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
            let installed = replace_state(engine, group, files, &meta)?;
            files.finish_install(&meta)?;
            Ok(Some(installed))
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("group {group}: a snapshot install was cut short and its file is missing"),
        )),
    }
}

/// Step 2: deletes the group's data and `sm_meta` and stores the install marker, synced.
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
    engine.write(b, true)
}

/// Steps 2–4: replaces the group's state with the installing file's.
fn replace_state(
    engine: &Engine,
    group: GroupId,
    files: &SnapshotFile,
    meta: &SnapshotMetaOf<TypeConfig>,
) -> std::io::Result<Installed> {
    let mut reader = SnapshotReader::open(files.open_installing()?)?;
    clear_and_mark(engine, group, meta)?;
    let (data, sm) = (engine.cf(CF_DATA), engine.cf(CF_SM));
    let mut sessions = SessionTable::from_sessions(group, reader.take_sessions());
    let mut b = WriteBatch::default();
    let mut keys = 0;
    while let Some((key, record)) = reader.next_record()? {
        b.put_cf(data, data_key(group, &key), record);
        keys += 1;
        if b.size_in_bytes() >= INSTALL_BATCH_BYTES {
            engine.write(std::mem::take(&mut b), false)?;
            // Written out, not fsynced: with manual WAL flush the WAL buffer would otherwise
            // hold the whole shard until the next sync.
            engine.db().flush_wal(false).map_err(io_err)?;
        }
    }
    sessions.write_all(engine, &mut b);
    b.put_cf(
        sm,
        tag_key(group, TAG_MEMBERSHIP),
        encode(&meta.last_membership),
    );
    b.put_cf(sm, tag_key(group, TAG_APPLIED), encode(&meta.last_log_id));
    b.delete_cf(sm, tag_key(group, TAG_INSTALLING));
    engine.write(b, true)?;
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
            let staged = self.files.stage().unwrap();
            let mut w = SnapshotWriter::create(staged.path(), &meta(index), &Vec::new()).unwrap();
            let mut keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
            keys.sort();
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

        fn current_snapshot(&self) -> Option<u64> {
            let current = self.files.load().unwrap()?;
            current.meta.last_log_id.map(|l| l.index())
        }
    }

    fn node() -> Node {
        Node::open(tempfile::tempdir().unwrap())
    }

    #[test]
    fn an_install_larger_than_a_batch_replaces_the_state_and_becomes_current() {
        let node = node();
        node.install(node.snapshot(10, 5), 10).unwrap();
        // Records of ~30 bytes: 200 000 of them span two install batches.
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
