//! openraft's log storage for one group, on the node's shared RocksDB.
//!
//! Contract kept here (openraft `RaftLogStorage`):
//! - `append`: entries are written (readable) before it returns; the callback fires only after
//!   the WAL fsync that covers them (group commit, see [`super::engine`]).
//! - `save_vote`: durable before it returns (it waits for the syncer's next fsync, see
//!   [`Engine::write_durable`]). Vote and appends go through the same WAL in call order, so they
//!   are never reordered. While it waits, [`VoteInFlight`] tells the group whom it is voting for.
//! - `truncate_after` / `purge`: delete a suffix / prefix; the purged marker is written in the
//!   same batch as the deletion so the log never has a hole.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use super::keys::{log_index, log_key, tag_key, CF_LOG, CF_STATE, TAG_PURGED, TAG_VOTE};
use super::{io_err, Engine};
use crate::layout::GroupId;
use crate::raft::codec::{decode, encode};
use crate::raft::TypeConfig;

type Entry = EntryOf<TypeConfig>;
type LogId = LogIdOf<TypeConfig>;
type Vote = VoteOf<TypeConfig>;

/// The node named by the vote a group's log store is making durable, if any. A node that grants
/// another its vote, or learns of a newer leader, has given up leading, but openraft says so only
/// once the vote is durable: its Raft core waits for that write. On a slow disk that is seconds
/// in which clients would queue writes and reads behind a leadership already gone; the
/// [`Group`](crate::raft::Group) reads this to turn them away at once instead.
#[derive(Clone, Debug, Default)]
pub struct VoteInFlight(Arc<Mutex<Option<u64>>>);

impl VoteInFlight {
    /// The node the vote being made durable names (leader or candidate).
    pub fn node(&self) -> Option<u64> {
        *self.0.lock().expect("vote in flight poisoned")
    }

    /// Records `node` until the returned guard is dropped.
    fn saving(&self, node: u64) -> SavingVote<'_> {
        *self.0.lock().expect("vote in flight poisoned") = Some(node);
        SavingVote(self)
    }
}

/// Clears the [`VoteInFlight`] when the vote write ends, whether it succeeded or not.
struct SavingVote<'a>(&'a VoteInFlight);

impl Drop for SavingVote<'_> {
    fn drop(&mut self) {
        *self.0 .0.lock().expect("vote in flight poisoned") = None;
    }
}

/// Bound of the in-memory log tail per group, in entries and in payload bytes. Replication and
/// apply read the newest entries again right after appending them; serving those reads from
/// memory skips a RocksDB iterator and a decode per read.
const TAIL_CACHE_ENTRIES: usize = 1024;
const TAIL_CACHE_BYTES: usize = 1 << 20;

/// The newest entries of a group's log, contiguous, always equal to what RocksDB holds for their
/// indexes: every append, truncation and purge updates it.
#[derive(Default)]
struct Tail {
    entries: VecDeque<Entry>,
    /// Sum of [`payload_bytes`] over `entries`.
    bytes: usize,
}

/// Approximate memory held by an entry's payload (keys and values).
fn payload_bytes(entry: &Entry) -> usize {
    use crate::raft::{BatchOp, Op};
    let openraft::EntryPayload::Normal(cmd) = &entry.payload else {
        return 64;
    };
    64 + match &cmd.op {
        Op::Put { key, value } => key.len() + value.len(),
        Op::Delete { key } => key.len(),
        Op::Cas { key, new_value, .. } => key.len() + new_value.as_ref().map_or(0, |v| v.len()),
        Op::Batch { ops } => ops
            .iter()
            .map(|op| match op {
                BatchOp::Put { key, value } => key.len() + value.len(),
                BatchOp::Delete { key } => key.len(),
            })
            .sum(),
    }
}

impl Tail {
    fn push_back(&mut self, entry: Entry) {
        if self
            .entries
            .back()
            .is_some_and(|last| last.index() + 1 != entry.index())
        {
            // Never keep a gap: start over from this entry.
            self.entries.clear();
            self.bytes = 0;
        }
        self.bytes += payload_bytes(&entry);
        self.entries.push_back(entry);
        while self.entries.len() > TAIL_CACHE_ENTRIES || self.bytes > TAIL_CACHE_BYTES {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= payload_bytes(&e);
        }
    }

    fn pop_back(&mut self) {
        if let Some(e) = self.entries.pop_back() {
            self.bytes -= payload_bytes(&e);
        }
    }
}

/// The Raft log of one group. Cheap to clone: clones share the engine and the tail cache.
#[derive(Clone)]
pub struct LogStore {
    group: GroupId,
    engine: Arc<Engine>,
    /// The in-memory log tail. A `std` mutex: never held across an await.
    tail: Arc<Mutex<Tail>>,
    vote_in_flight: VoteInFlight,
}

impl LogStore {
    /// The log of `group` in `engine`.
    pub fn new(engine: Arc<Engine>, group: GroupId) -> LogStore {
        LogStore {
            group,
            engine,
            tail: Arc::new(Mutex::new(Tail::default())),
            vote_in_flight: VoteInFlight::default(),
        }
    }

    /// Whom the vote being made durable names, shared with the group.
    pub fn vote_in_flight(&self) -> VoteInFlight {
        self.vote_in_flight.clone()
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().expect("log tail poisoned")
    }

    /// Entries `[start, end)` from the tail cache, if it holds all of them.
    fn cached(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let tail = self.tail();
        let first = tail.entries.front()?.index();
        let last = tail.entries.back()?.index();
        if start < first || end > last + 1 {
            return None;
        }
        let from = (start - first) as usize;
        Some(
            tail.entries
                .range(from..from + (end - start) as usize)
                .cloned()
                .collect(),
        )
    }

    fn get_state<T: serde::de::DeserializeOwned>(&self, tag: u8) -> std::io::Result<Option<T>> {
        let e = &self.engine;
        match e
            .db()
            .get_cf(e.cf(CF_STATE), tag_key(self.group, tag))
            .map_err(io_err)?
        {
            Some(raw) => decode(&raw).map(Some),
            None => Ok(None),
        }
    }

    /// The last entry's log id, if the log holds any entry.
    fn last_entry_id(&self) -> std::io::Result<Option<LogId>> {
        let e = &self.engine;
        let upper = log_key(self.group, u64::MAX);
        let mode = IteratorMode::From(&upper, Direction::Reverse);
        match e.db().iterator_cf(e.cf(CF_LOG), mode).next() {
            Some(item) => {
                let (k, v) = item.map_err(io_err)?;
                if k[..8] != self.group.to_be_bytes() {
                    return Ok(None);
                }
                let entry: Entry = decode(&v)?;
                Ok(Some(entry.log_id()))
            }
            None => Ok(None),
        }
    }
}

/// Turns a range over log indexes into `[start, end)`.
fn index_bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> std::io::Result<Vec<Entry>> {
        let (start, end) = index_bounds(&range);
        if start >= end {
            return Ok(Vec::new());
        }
        if let Some(entries) = self.cached(start, end) {
            return Ok(entries);
        }
        let e = &self.engine;
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(log_key(self.group, end).to_vec());
        let from = log_key(self.group, start);
        let iter = e.db().iterator_cf_opt(
            e.cf(CF_LOG),
            opts,
            IteratorMode::From(&from, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(io_err)?;
            debug_assert_eq!(log_index(&k), start + out.len() as u64, "hole in the log");
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> std::io::Result<Option<Vote>> {
        self.get_state(TAG_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> std::io::Result<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId> = self.get_state(TAG_PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> std::io::Result<()> {
        let e = &self.engine;
        let mut b = WriteBatch::default();
        b.put_cf(e.cf(CF_STATE), tag_key(self.group, TAG_VOTE), encode(vote));
        let _saving = self.vote_in_flight.saving(vote.leader_id().node_id);
        e.write_durable(b).await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> std::io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let e = &self.engine;
        let cf = e.cf(CF_LOG);
        let mut b = WriteBatch::default();
        let entries: Vec<Entry> = entries.into_iter().collect();
        for entry in &entries {
            b.put_cf(cf, log_key(self.group, entry.index()), encode(entry));
        }
        e.write(b)?;
        let mut tail = self.tail();
        for entry in entries {
            tail.push_back(entry);
        }
        drop(tail);
        e.complete_after_sync(callback);
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> std::io::Result<()> {
        let first_removed = last_log_id.map_or(0, |id| id.index() + 1);
        {
            let mut tail = self.tail();
            while tail
                .entries
                .back()
                .is_some_and(|last| last.index() >= first_removed)
            {
                tail.pop_back();
            }
        }
        let e = &self.engine;
        let mut b = WriteBatch::default();
        b.delete_range_cf(
            e.cf(CF_LOG),
            log_key(self.group, first_removed),
            log_key(self.group + 1, 0),
        );
        e.write(b)
    }

    async fn purge(&mut self, log_id: LogId) -> std::io::Result<()> {
        {
            let mut tail = self.tail();
            while tail
                .entries
                .front()
                .is_some_and(|first| first.index() <= log_id.index())
            {
                tail.pop_front();
            }
        }
        let e = &self.engine;
        let mut b = WriteBatch::default();
        b.put_cf(
            e.cf(CF_STATE),
            tag_key(self.group, TAG_PURGED),
            encode(&log_id),
        );
        b.delete_range_cf(
            e.cf(CF_LOG),
            log_key(self.group, 0),
            log_key(self.group, log_id.index() + 1),
        );
        e.write(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::storage::RaftLogReader;

    #[tokio::test]
    async fn a_vote_being_stored_names_its_node_until_it_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("db"), 16 << 20).unwrap();
        let mut log = LogStore::new(engine, 3);
        let in_flight = log.vote_in_flight();
        assert_eq!(in_flight.node(), None);
        {
            let _saving = in_flight.saving(2);
            assert_eq!(in_flight.node(), Some(2), "seen through the shared handle");
        }
        assert_eq!(in_flight.node(), None);

        let vote = Vote::new(4, 2);
        log.save_vote(&vote).await.unwrap();
        assert_eq!(in_flight.node(), None, "cleared once the vote is durable");
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    }
}
