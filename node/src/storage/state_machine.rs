//! The KV state machine of one group.
//!
//! Applying a run of committed entries builds **one** `WriteBatch` holding the data changes, the
//! saved outcomes for de-duplication and the new last-applied log id, and writes it atomically, so
//! a crash never separates data from the record of what was applied. Apply does not fsync: after a
//! crash the group re-applies committed entries after its durable last-applied id.
//!
//! Every command passes through the group's [`SessionTable`] first, so a retried write is
//! answered from its saved outcome instead of applying twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{
    EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf,
};
use openraft::EntryPayload;
use rocksdb::{IteratorMode, ReadOptions, WriteBatch};

use super::install::{self, Installs};
use super::keys::{
    data_key, decode_record, encode_record, group_range, tag_key, CF_DATA, CF_SM, TAG_APPLIED,
    TAG_MEMBERSHIP,
};
use super::sessions::{ClientSession, SessionTable};
use super::snapshot::{SnapshotBuilder, SnapshotData, SnapshotFile};
use super::{io_err, on_blocking_thread, Engine};
use crate::layout::GroupId;
use crate::raft::codec::{decode, encode};
use crate::raft::{BatchOp, Command, Op, Outcome, TypeConfig};

type LogId = LogIdOf<TypeConfig>;
type StoredMembership = StoredMembershipOf<TypeConfig>;

/// Most entries applied in one `WriteBatch`; bounds the batch when a replica catches up.
const MAX_APPLY_BATCH: usize = 1024;

/// The state machine of one group.
pub struct StateMachine {
    group: GroupId,
    engine: Arc<Engine>,
    /// Last applied log id (durable in `sm_meta`).
    applied: Option<LogId>,
    /// Last applied membership (durable in `sm_meta`).
    membership: StoredMembership,
    /// Client sessions (de-duplication), mirrored durably in `sm_meta`; loaded at open.
    sessions: SessionTable,
    /// Where the group's current snapshot file lives.
    snapshot: SnapshotFile,
    /// Snapshot installs, shared with the read path and status.
    installs: Arc<Installs>,
}

/// A record read from the data column family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The log index that last wrote the key.
    pub version: u64,
    /// The value.
    pub value: Bytes,
}

impl StateMachine {
    /// Opens the state machine of `group`, loading its applied id, membership and sessions
    /// (after finishing a snapshot install a crash cut short).
    pub fn open(
        engine: Arc<Engine>,
        group: GroupId,
        snapshot_dir: PathBuf,
    ) -> std::io::Result<StateMachine> {
        let snapshot = SnapshotFile::new(snapshot_dir, group);
        snapshot.convert_legacy()?;
        let sm_cf = engine.cf(CF_SM);
        let get = |tag| {
            engine
                .db()
                .get_cf(sm_cf, tag_key(group, tag))
                .map_err(io_err)
        };
        let load_applied = || -> std::io::Result<Option<LogId>> {
            match get(TAG_APPLIED)? {
                Some(raw) => decode(&raw),
                None => Ok(None),
            }
        };
        install::recover(&engine, group, &snapshot, load_applied()?)?;
        let applied = load_applied()?;
        let membership = match get(TAG_MEMBERSHIP)? {
            Some(raw) => decode(&raw)?,
            None => StoredMembership::default(),
        };
        let sessions = SessionTable::load(&engine, group)?;
        Ok(StateMachine {
            group,
            snapshot,
            engine,
            applied,
            membership,
            sessions,
            installs: Arc::default(),
        })
    }

    /// The group's snapshot installs, shared with whoever reads applied state or reports status.
    pub fn installs(&self) -> Arc<Installs> {
        self.installs.clone()
    }

    /// Sessions as currently applied (for tests and snapshots).
    pub fn sessions(&self) -> &HashMap<u64, ClientSession> {
        self.sessions.sessions()
    }

    /// Applies one entry into `batch`, returning its outcome.
    fn apply_entry(
        &mut self,
        entry: &EntryOf<TypeConfig>,
        batch: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> std::io::Result<Outcome> {
        let log_id = entry.log_id();
        let index = log_id.index();
        self.applied = Some(log_id);
        Ok(match &entry.payload {
            EntryPayload::Blank => Outcome::None,
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(log_id), m.clone());
                let sm = self.engine.cf(CF_SM);
                batch.put_cf(
                    sm,
                    tag_key(self.group, TAG_MEMBERSHIP),
                    encode(&self.membership),
                );
                Outcome::None
            }
            EntryPayload::Normal(cmd) => self.apply_command(index, cmd, batch, overlay)?,
        })
    }

    /// Applies a command unless its session already answers it.
    fn apply_command(
        &mut self,
        index: u64,
        cmd: &Command,
        batch: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> std::io::Result<Outcome> {
        if !crate::planted::active(crate::planted::Bug::SkipDedup) {
            if let Some(answer) = self.sessions.precheck(cmd) {
                return Ok(answer);
            }
        }
        let outcome = execute(&self.engine, self.group, index, &cmd.op, batch, overlay)?;
        self.sessions.record(cmd, index, &outcome);
        Ok(outcome)
    }

    /// Applies `entries` (consecutive, committed) in one atomic write; returns their outcomes.
    pub fn apply_entries<'a>(
        &mut self,
        entries: impl IntoIterator<Item = &'a EntryOf<TypeConfig>>,
    ) -> std::io::Result<Vec<Outcome>> {
        let mut batch = WriteBatch::default();
        let mut overlay = Overlay::new();
        let outcomes = entries
            .into_iter()
            .map(|e| self.apply_entry(e, &mut batch, &mut overlay))
            .collect::<std::io::Result<Vec<_>>>()?;
        self.commit(batch)?;
        Ok(outcomes)
    }

    fn apply_and_respond(
        &mut self,
        chunk: &mut Vec<EntryOf<TypeConfig>>,
        responders: &mut Vec<Option<openraft::storage::ApplyResponder<TypeConfig>>>,
    ) -> std::io::Result<()> {
        let outcomes = self.apply_entries(chunk.iter())?;
        chunk.clear();
        for (responder, outcome) in responders.drain(..).zip(outcomes) {
            if let Some(r) = responder {
                r.send(outcome);
            }
        }
        Ok(())
    }

    /// Writes the changed sessions and the applied id into `batch`, and the batch into RocksDB.
    fn commit(&mut self, mut batch: WriteBatch) -> std::io::Result<()> {
        self.sessions.write_changed(&self.engine, &mut batch);
        let sm = self.engine.cf(CF_SM);
        batch.put_cf(sm, tag_key(self.group, TAG_APPLIED), encode(&self.applied));
        self.engine.write(batch)
    }
}

/// Values written earlier in the batch being built, so later entries of the same batch read them
/// (`None` = deleted).
type Overlay = HashMap<Bytes, Option<Record>>;

fn read_through(
    engine: &Engine,
    group: GroupId,
    key: &Bytes,
    overlay: &Overlay,
) -> std::io::Result<Option<Record>> {
    match overlay.get(key) {
        Some(v) => Ok(v.clone()),
        None => get(engine, group, key),
    }
}

fn put(
    engine: &Engine,
    group: GroupId,
    index: u64,
    key: &Bytes,
    value: &Bytes,
    batch: &mut WriteBatch,
    overlay: &mut Overlay,
) {
    batch.put_cf(
        engine.cf(CF_DATA),
        data_key(group, key),
        encode_record(index, value),
    );
    overlay.insert(
        key.clone(),
        Some(Record {
            version: index,
            value: value.clone(),
        }),
    );
}

fn delete(
    engine: &Engine,
    group: GroupId,
    key: &Bytes,
    batch: &mut WriteBatch,
    overlay: &mut Overlay,
) {
    batch.delete_cf(engine.cf(CF_DATA), data_key(group, key));
    overlay.insert(key.clone(), None);
}

/// Executes an operation at log index `index`.
fn execute(
    engine: &Engine,
    group: GroupId,
    index: u64,
    op: &Op,
    batch: &mut WriteBatch,
    overlay: &mut Overlay,
) -> std::io::Result<Outcome> {
    Ok(match op {
        Op::Put { key, value } => {
            put(engine, group, index, key, value, batch, overlay);
            Outcome::Put { version: index }
        }
        Op::Delete { key } => {
            let existed = read_through(engine, group, key, overlay)?.is_some();
            delete(engine, group, key, batch, overlay);
            Outcome::Delete {
                existed,
                version: index,
            }
        }
        Op::Cas {
            key,
            expected_version,
            new_value,
        } => {
            let current = read_through(engine, group, key, overlay)?;
            let current_version = current.as_ref().map_or(0, |r| r.version);
            if current_version != *expected_version {
                return Ok(Outcome::Cas {
                    succeeded: false,
                    version: current_version,
                    current_value: current.map(|r| r.value),
                });
            }
            match new_value {
                Some(v) => put(engine, group, index, key, v, batch, overlay),
                None => delete(engine, group, key, batch, overlay),
            }
            Outcome::Cas {
                succeeded: true,
                version: if new_value.is_some() { index } else { 0 },
                current_value: None,
            }
        }
        Op::Batch { ops } => {
            for op in ops {
                match op {
                    BatchOp::Put { key, value } => {
                        put(engine, group, index, key, value, batch, overlay)
                    }
                    BatchOp::Delete { key } => delete(engine, group, key, batch, overlay),
                }
            }
            Outcome::Batch { version: index }
        }
    })
}

/// Reads one key of `group` from applied state.
pub fn get(engine: &Engine, group: GroupId, key: &[u8]) -> std::io::Result<Option<Record>> {
    match engine
        .db()
        .get_pinned_cf(engine.cf(CF_DATA), data_key(group, key))
        .map_err(io_err)?
    {
        Some(raw) => {
            let (version, value) = decode_record(&raw)?;
            Ok(Some(Record {
                version,
                value: Bytes::copy_from_slice(value),
            }))
        }
        None => Ok(None),
    }
}

/// Scans `group`'s applied state over `[start, end)` (empty `end` = unbounded), returning at most
/// `limit` records and whether more remained.
pub fn scan(
    engine: &Engine,
    group: GroupId,
    start: &[u8],
    end: &[u8],
    limit: usize,
) -> std::io::Result<(Vec<(Bytes, Record)>, bool)> {
    let mut opts = ReadOptions::default();
    let upper = if end.is_empty() {
        group_range(group).1.to_vec()
    } else {
        data_key(group, end)
    };
    opts.set_iterate_upper_bound(upper);
    let from = data_key(group, start);
    let mode = IteratorMode::From(&from, rocksdb::Direction::Forward);
    let mut out = Vec::new();
    for item in engine.db().iterator_cf_opt(engine.cf(CF_DATA), opts, mode) {
        let (k, v) = item.map_err(io_err)?;
        if out.len() == limit {
            return Ok((out, true));
        }
        let (version, value) = decode_record(&v)?;
        out.push((
            Bytes::copy_from_slice(&k[8..]),
            Record {
                version,
                value: Bytes::copy_from_slice(value),
            },
        ));
    }
    Ok((out, false))
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> std::io::Result<(Option<LogId>, StoredMembership)> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> std::io::Result<()>
    where
        S: Stream<Item = std::io::Result<EntryResponder<TypeConfig>>> + Unpin + Send,
    {
        let mut chunk = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            chunk.push(entry);
            responders.push(responder);
            if chunk.len() >= MAX_APPLY_BATCH {
                self.apply_and_respond(&mut chunk, &mut responders)?;
            }
        }
        if !chunk.is_empty() {
            self.apply_and_respond(&mut chunk, &mut responders)?;
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.try_create_snapshot_builder(true)
            .await
            .expect("forced snapshot builder")
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<SnapshotBuilder> {
        // Runs on the state machine task, between applies: the view pinned here is consistent
        // with `applied`, and the builder writes from it while applies continue.
        let sessions = self.sessions.sessions();
        Some(
            SnapshotBuilder::capture(
                self.engine.clone(),
                self.group,
                self.applied,
                self.membership.clone(),
                sessions.iter().map(|(c, s)| (*c, s.clone())).collect(),
                self.snapshot.clone(),
            )
            .await,
        )
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: SnapshotData,
    ) -> std::io::Result<()> {
        // Seconds of disk work for a large shard: on a blocking thread, not a runtime worker
        // (the applies wait anyway; heartbeats and other groups must not).
        let (engine, group, files) = (self.engine.clone(), self.group, self.snapshot.clone());
        let (installs, install_meta) = (self.installs.clone(), meta.clone());
        let installed = on_blocking_thread(move || {
            // A received snapshot is already a staged file; one handed over otherwise is copied.
            let staged = match snapshot.into_parts() {
                (_, Some(staged)) => staged,
                (file, None) => files.copy_to_stage(file)?,
            };
            install::install(&engine, group, &files, staged, &install_meta, &installs)
        })
        .await?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.sessions = installed.sessions;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> std::io::Result<Option<SnapshotOf<TypeConfig, SnapshotData>>> {
        let files = self.snapshot.clone();
        on_blocking_thread(move || files.load()).await
    }
}
