//! The node's RocksDB and its group-commit syncer.
//!
//! Group commit: a log append writes its entries without fsync (so they are readable at once) and
//! hands its completion callback to the syncer thread. The syncer takes every callback waiting at
//! that moment, from every group, issues **one** WAL fsync for all of them, and only then
//! completes them. Under load one fsync acknowledges many appends; this is where write throughput
//! comes from.
//!
//! Every other write that must be durable before it returns (a Raft vote, the layout, the steps of
//! a snapshot install) goes the same way ([`Engine::write_durable`],
//! [`Engine::write_durable_blocking`]); there are no synced RocksDB writes. A synced write fsyncs
//! while it leads RocksDB's write queue, so every writer behind it — applies and appends of every
//! group, on the async runtime's threads — waits for that fsync too. On a slow disk that froze
//! the whole node (found by the chaos suite's `slow-disk` nemesis, `docs/testing.md`).

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::storage::IOFlushed;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType,
    IngestExternalFileOptions, IteratorMode, Options, ReadOptions, SstFileWriter, WriteBatch,
    WriteBufferManager, WriteOptions, DB,
};

use super::io_err;
use super::keys::{group_range, CF_DATA, CF_LOG, CF_SM, CF_STATE, LAYOUT_KEY, NODE_ID_KEY};
use crate::layout::{GroupId, Layout};
use crate::raft::TypeConfig;

/// One record read by [`Engine::range`]: key and value, or the read error.
pub type RecordRead = std::io::Result<(Box<[u8]>, Box<[u8]>)>;

/// WAL size that forces a flush of the column families pinning the oldest WAL file.
const MAX_TOTAL_WAL_BYTES: u64 = 64 << 20;

/// Most callbacks completed by one fsync; bounds the latency of the first waiter.
const MAX_SYNC_BATCH: usize = 4096;

/// A WAL fsync slower than this is logged, and marks the disk slow (etcd warns from 1 s on; a
/// healthy SSD takes well under 10 ms).
pub const SLOW_SYNC: Duration = Duration::from_millis(500);

/// How long a slow fsync keeps counting in [`Engine::slowest_recent_sync`].
const SLOW_SYNC_MEMORY: Duration = Duration::from_secs(10);

/// The syncer's fsync times, for [`Engine::slowest_recent_sync`].
#[derive(Default)]
struct SyncWatch {
    /// When the fsync under way started.
    in_flight: Option<Instant>,
    /// The slowest fsync that ended within [`SLOW_SYNC_MEMORY`]: how long it took, and when it
    /// ended.
    slowest: Option<(Duration, Instant)>,
}

impl SyncWatch {
    fn slowest_recent(&self, now: Instant) -> Duration {
        let ended = self
            .slowest
            .filter(|(_, at)| now.duration_since(*at) <= SLOW_SYNC_MEMORY)
            .map_or(Duration::ZERO, |(took, _)| took);
        let running = self
            .in_flight
            .map_or(Duration::ZERO, |t| now.duration_since(t));
        ended.max(running)
    }

    fn started(&mut self, now: Instant) {
        self.in_flight = Some(now);
    }

    /// Ends the fsync under way at `now`; returns how long it took.
    fn ended(&mut self, now: Instant) -> Duration {
        let took = self
            .in_flight
            .take()
            .map_or(Duration::ZERO, |t| now.duration_since(t));
        if self.slowest_recent(now) <= took {
            self.slowest = Some((took, now));
        }
        took
    }
}

/// Who waits for the syncer's next WAL fsync.
enum SyncWaiter {
    /// A Raft log append: openraft's completion callback.
    Append(IOFlushed<TypeConfig>),
    /// A [`Engine::write_durable`] call.
    Write(tokio::sync::oneshot::Sender<std::io::Result<()>>),
}

impl SyncWaiter {
    fn complete(self, result: std::io::Result<()>) {
        match self {
            SyncWaiter::Append(callback) => callback.io_completed(result),
            // A dropped receiver: its caller gave up waiting; nothing to tell.
            SyncWaiter::Write(tx) => drop(tx.send(result)),
        }
    }
}

/// The node's RocksDB plus the syncer feeding group commit.
pub struct Engine {
    db: Arc<DB>,
    /// Who waits for the next WAL fsync. A `std` mutex: held only to send. `None` once the
    /// engine is dropping.
    sync_tx: Mutex<Option<mpsc::Sender<SyncWaiter>>>,
    /// The syncer thread, joined on drop so the database is closed when the engine is gone.
    syncer: Option<std::thread::JoinHandle<()>>,
    /// How long the syncer's fsyncs take. A `std` mutex: taken twice per fsync and by readers
    /// of [`slowest_recent_sync`](Self::slowest_recent_sync), never across an fsync.
    sync_watch: Arc<Mutex<SyncWatch>>,
    /// The `data` column family's options, for SST files written to be ingested into it.
    data_options: Options,
}

impl Engine {
    /// Opens (or creates) the database under `dir`, bounding memtables and block cache by
    /// `memory_budget` bytes in total.
    pub fn open(dir: &Path, memory_budget: usize) -> anyhow::Result<Arc<Engine>> {
        // Durably: a power cut must not lose the new database's directory entry.
        super::dirs::create_dir_durable(dir)?;
        // One budget: the block cache gets the budget, and memtables are charged against the same
        // cache by the write buffer manager (at most half of it).
        let cache = Cache::new_lru_cache(memory_budget);
        let wbm = WriteBufferManager::new_write_buffer_manager_with_cache(
            memory_budget / 2,
            false,
            cache.clone(),
        );
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_cache_index_and_filter_blocks(true);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_write_buffer_manager(&wbm);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(4);
        // A WAL file is deleted only once every column family has flushed what it holds, and the
        // rarely written ones (vote, applied ids) would otherwise pin every WAL file forever:
        // past this total, RocksDB flushes the column families that hold the oldest WAL.
        db_opts.set_max_total_wal_size(MAX_TOTAL_WAL_BYTES);
        // Unsynced writes (applies, log appends waiting for group commit) stay in RocksDB's WAL
        // buffer instead of costing a write(2) each; the syncer's flush writes and fsyncs them
        // in one go. Nothing is acknowledged from an unflushed write, and the WAL stays one
        // ordered stream, so a crash loses only a suffix of unacknowledged work — as a power
        // loss already can.
        db_opts.set_manual_wal_flush(true);
        // Reused WAL files are overwritten in place, so the group-commit fsync does not also have
        // to persist a growing file size.
        db_opts.set_recycle_log_file_num(4);
        // RocksDB's default (point-in-time recovery) is what a power loss needs: the WAL is
        // replayed up to its first incomplete record, which was never acknowledged.
        if crate::planted::active(crate::planted::Bug::StrictWalRecovery) {
            db_opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::AbsoluteConsistency);
        }

        let buffer = (memory_budget / 8).max(1 << 20);
        let data_options = cf_options(&table, true, buffer);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOG, cf_options(&table, false, buffer)),
            ColumnFamilyDescriptor::new(CF_STATE, cf_options(&table, false, 1 << 20)),
            ColumnFamilyDescriptor::new(CF_DATA, data_options.clone()),
            ColumnFamilyDescriptor::new(CF_SM, cf_options(&table, false, buffer / 2)),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, dir, cfs)?);

        let (tx, rx) = mpsc::channel();
        let sync_db = db.clone();
        let sync_watch = Arc::new(Mutex::new(SyncWatch::default()));
        let watch = sync_watch.clone();
        let syncer = std::thread::Builder::new()
            .name("strata-wal-sync".into())
            .spawn(move || run_syncer(&sync_db, rx, &watch))?;
        Ok(Arc::new(Engine {
            db,
            sync_tx: Mutex::new(Some(tx)),
            syncer: Some(syncer),
            sync_watch,
            data_options,
        }))
    }

    /// The database.
    pub fn db(&self) -> &DB {
        &self.db
    }

    /// A column family handle (they are created at open, so this never fails).
    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// The records of column family `cf` with keys in `lo..hi`, in key order.
    pub fn range(&self, cf: &str, lo: &[u8], hi: &[u8]) -> impl Iterator<Item = RecordRead> + '_ {
        self.range_at(None, cf, lo, hi)
    }

    /// [`range`](Self::range) as of `view` (a point-in-time snapshot of the database), or as of
    /// now without one.
    pub fn range_at<'a>(
        &'a self,
        view: Option<&rocksdb::Snapshot<'_>>,
        cf: &str,
        lo: &[u8],
        hi: &[u8],
    ) -> impl Iterator<Item = RecordRead> + 'a {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(hi.to_vec());
        if let Some(view) = view {
            opts.set_snapshot(view);
        }
        let mode = IteratorMode::From(lo, rocksdb::Direction::Forward);
        self.db
            .iterator_cf_opt(self.cf(cf), opts, mode)
            .map(|item| item.map_err(io_err))
    }

    /// Writes `batch` without fsync: into the memtables and RocksDB's WAL buffer, which the
    /// syncer's next flush writes out and fsyncs. For a write that must be durable when the call
    /// returns, use [`write_durable`](Self::write_durable).
    pub fn write(&self, batch: WriteBatch) -> std::io::Result<()> {
        self.db.write(batch).map_err(io_err)
    }

    /// A writer of an SST file for the `data` column family, in its format (see
    /// [`ingest_data`](Self::ingest_data)). Keys must be put in strictly increasing order.
    pub fn data_sst_writer(&self) -> SstFileWriter<'_> {
        SstFileWriter::create(&self.data_options)
    }

    /// Moves the finished SST file at `path` into the `data` column family, durably: its records
    /// become visible at once, newer than every write before, without passing through the WAL
    /// or a memtable. RocksDB first flushes the memtable if it overlaps the file's keys.
    pub fn ingest_data(&self, path: &Path) -> std::io::Result<()> {
        let mut opts = IngestExternalFileOptions::default();
        opts.set_move_files(true);
        self.db
            .ingest_external_file_cf_opts(self.cf(CF_DATA), &opts, vec![path])
            .map_err(io_err)
    }

    /// Writes `batch` and returns once it is durable: written without fsync, then fsynced by
    /// the syncer's next group commit, which the caller awaits without holding a thread or
    /// RocksDB's write queue.
    pub async fn write_durable(&self, batch: WriteBatch) -> std::io::Result<()> {
        // The chaos suite's planted bug: the old synced write, which fsyncs while it leads
        // RocksDB's write queue, on the caller's thread.
        if crate::planted::active(crate::planted::Bug::BlockingSyncedWrites) {
            let mut opts = WriteOptions::default();
            opts.set_sync(true);
            return self.db.write_opt(batch, &opts).map_err(io_err);
        }
        self.write(batch)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.wait_for_sync(SyncWaiter::Write(tx));
        rx.await
            .unwrap_or_else(|_| Err(std::io::Error::other("WAL syncer stopped")))
    }

    /// [`write_durable`](Self::write_durable) for a thread that may block: snapshot installs
    /// (a blocking thread) and startup. It waits like a synced write would, but does not hold
    /// RocksDB's write queue while it waits, so the runtime threads' writes go on.
    pub fn write_durable_blocking(&self, batch: WriteBatch) -> std::io::Result<()> {
        futures::executor::block_on(self.write_durable(batch))
    }

    /// Completes `callback` after the next WAL fsync (group commit).
    pub fn complete_after_sync(&self, callback: IOFlushed<TypeConfig>) {
        // The planted bug of the chaos suite: acknowledged before the fsync, or even the write.
        if crate::planted::active(crate::planted::Bug::AckBeforeFsync) {
            callback.io_completed(Ok(()));
            return;
        }
        self.wait_for_sync(SyncWaiter::Append(callback));
    }

    /// The longest WAL fsync of the last 10 s, or the one under way if it has taken longer: a
    /// node whose disk is slow ([`SLOW_SYNC`] or more) should not be handed a leadership, since
    /// a new leader stores its vote before it can lead.
    pub fn slowest_recent_sync(&self) -> Duration {
        let watch = self.sync_watch.lock().expect("sync_watch poisoned");
        watch.slowest_recent(Instant::now())
    }

    /// Hands `waiter` to the syncer, or fails it if the syncer has stopped.
    fn wait_for_sync(&self, waiter: SyncWaiter) {
        let guard = self.sync_tx.lock().expect("sync_tx poisoned");
        let unsent = match guard.as_ref() {
            Some(tx) => tx.send(waiter).err().map(|mpsc::SendError(w)| w),
            None => Some(waiter),
        };
        if let Some(w) = unsent {
            w.complete(Err(std::io::Error::other("WAL syncer stopped")));
        }
    }

    /// The id this node was given (stored when a joining node is added), if any.
    pub fn load_node_id(&self) -> anyhow::Result<Option<u64>> {
        match self.db.get_cf(self.cf(CF_STATE), NODE_ID_KEY)? {
            Some(raw) => Ok(Some(u64::from_be_bytes(raw.as_slice().try_into()?))),
            None => Ok(None),
        }
    }

    /// Stores this node's id and the layout that names it, in one durable write.
    pub async fn save_identity(&self, id: u64, layout: &Layout) -> anyhow::Result<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_STATE), NODE_ID_KEY, id.to_be_bytes());
        b.put_cf(self.cf(CF_STATE), LAYOUT_KEY, serde_json::to_vec(layout)?);
        self.write_durable(b).await?;
        Ok(())
    }

    /// Whether any state of `group` (log, vote, applied data) is stored here.
    pub fn holds_group(&self, group: GroupId) -> bool {
        let (lo, hi) = group_range(group);
        [CF_LOG, CF_STATE, CF_SM]
            .iter()
            .any(|cf| self.range(cf, &lo, &hi).next().is_some())
    }

    /// Deletes every trace of `group` (log, vote, data, sessions), in one durable write. Only
    /// for a group whose Raft instance is stopped and that this node no longer replicates.
    pub async fn drop_group(&self, group: GroupId) -> std::io::Result<()> {
        let (lo, hi) = group_range(group);
        let mut b = WriteBatch::default();
        for cf in [CF_LOG, CF_STATE, CF_DATA, CF_SM] {
            b.delete_range_cf(self.cf(cf), lo, hi);
        }
        self.write_durable(b).await
    }

    /// The newest layout this node has seen, if any.
    pub fn load_layout(&self) -> anyhow::Result<Option<Layout>> {
        match self.db.get_cf(self.cf(CF_STATE), LAYOUT_KEY)? {
            Some(raw) => Ok(Some(serde_json::from_slice(&raw)?)),
            None => Ok(None),
        }
    }

    /// Stores the layout durably.
    pub async fn save_layout(&self, layout: &Layout) -> anyhow::Result<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_STATE), LAYOUT_KEY, serde_json::to_vec(layout)?);
        self.write_durable(b).await?;
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel ends the syncer after it completes what is queued.
        self.sync_tx.lock().expect("sync_tx poisoned").take();
        if let Some(h) = self.syncer.take() {
            let _ = h.join();
        }
    }
}

/// The options of one column family: the shared table format (block cache), its memtable size,
/// and whether its blocks are compressed.
fn cf_options(table: &BlockBasedOptions, compress: bool, write_buffer: usize) -> Options {
    let mut o = Options::default();
    o.set_block_based_table_factory(table);
    o.set_write_buffer_size(write_buffer);
    // The log is written once, read rarely and deleted soon: compressing it wastes CPU.
    o.set_compression_type(if compress {
        DBCompressionType::Lz4
    } else {
        DBCompressionType::None
    });
    o
}

/// The syncer loop: wait for one waiter, take all others already queued, fsync once, complete
/// them all. Ends when every sender is gone.
fn run_syncer(db: &DB, rx: mpsc::Receiver<SyncWaiter>, watch: &Mutex<SyncWatch>) {
    let mut pending = Vec::with_capacity(64);
    while let Ok(first) = rx.recv() {
        pending.push(first);
        while pending.len() < MAX_SYNC_BATCH {
            match rx.try_recv() {
                Ok(cb) => pending.push(cb),
                Err(_) => break,
            }
        }
        // The planted `skip-fsync` bug writes the WAL to the OS without the fsync.
        let sync = !crate::planted::active(crate::planted::Bug::SkipFsync);
        watch
            .lock()
            .expect("sync_watch poisoned")
            .started(Instant::now());
        let result = db.flush_wal(sync);
        let took = watch
            .lock()
            .expect("sync_watch poisoned")
            .ended(Instant::now());
        if took >= SLOW_SYNC {
            tracing::warn!(
                took_ms = took.as_millis() as u64,
                waiters = pending.len(),
                "slow WAL fsync: this node's disk is slow; it is handed no leadership meanwhile"
            );
        }
        for waiter in pending.drain(..) {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(format!("WAL fsync failed: {e}"))),
            };
            waiter.complete(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_fsync_counts_for_ten_seconds_and_one_under_way_at_once() {
        let t0 = Instant::now();
        let s = |ms| Duration::from_millis(ms);
        let mut w = SyncWatch::default();
        assert_eq!(w.slowest_recent(t0), Duration::ZERO);
        w.started(t0);
        assert_eq!(w.slowest_recent(t0 + s(700)), s(700), "under way");
        w.ended(t0 + s(800));
        assert_eq!(w.slowest_recent(t0 + s(900)), s(800));
        // Faster ones after it do not hide it while it counts.
        w.started(t0 + s(1_000));
        w.ended(t0 + s(1_002));
        assert_eq!(w.slowest_recent(t0 + s(5_000)), s(800));
        // Ten seconds after it ended it no longer counts; the next one replaces it.
        assert_eq!(w.slowest_recent(t0 + s(10_801)), Duration::ZERO);
        w.started(t0 + s(11_000));
        w.ended(t0 + s(11_003));
        assert_eq!(w.slowest_recent(t0 + s(11_004)), s(3));
    }
}
