//! Client sessions: the de-duplication table of one group (Raft dissertation §6.3).
//!
//! Each write carries `(client_id, sequence, acked_below)`. The outcome of every applied sequence
//! is saved; a retry of a saved sequence gets the saved outcome and changes nothing.
//! `acked_below` lets the table forget outcomes the client will never ask about again, so a
//! client's entry holds only its in-flight writes; a sequence below that floor is answered
//! `Stale` and not applied.
//!
//! The table is bounded: past [`MAX_SESSIONS`] clients, the one idle the longest (by the log index
//! of its last write, so every replica evicts the same one) is forgotten. A write retried after
//! its client was evicted would apply again; with the bound far above the number of live clients
//! per shard, only clients gone for good are evicted.
//!
//! On disk (`sm_meta`): one record per client, `group ‖ s ‖ client` → the whole
//! [`ClientSession`]. Commands only change the table in memory and mark their client; the apply
//! writes each marked client's record once ([`SessionTable::write_changed`]) in the same
//! `WriteBatch` as the data. A run of entries from one client therefore costs one session write,
//! not an outcome insert, an outcome delete and a floor update per command.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use super::engine::RecordRead;
use super::keys::{session_key, tag_key, CF_SM, TAG_SESSION};
use super::Engine;
use crate::layout::GroupId;
use crate::raft::codec::{decode, encode};
use crate::raft::{Command, Outcome};

/// Most client sessions kept per group.
pub const MAX_SESSIONS: usize = 20_000;

/// One client's de-duplication state.
#[derive(Default, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientSession {
    /// Sequences below this were acknowledged by the client; their outcomes are forgotten.
    pub floor: u64,
    /// Log index of the client's last write; orders eviction.
    pub last_index: u64,
    /// Saved outcomes of sequences at or above the floor.
    pub outcomes: BTreeMap<u64, Outcome>,
}

/// The sessions of one group, mirrored durably in `sm_meta`.
#[derive(Debug)]
pub struct SessionTable {
    group: GroupId,
    sessions: HashMap<u64, ClientSession>,
    /// `(last_index, client)` of every session: the first is the one idle the longest.
    by_age: BTreeSet<(u64, u64)>,
    /// Clients whose session changed (or was evicted) since the last
    /// [`write_changed`](Self::write_changed).
    changed: HashSet<u64>,
}

impl SessionTable {
    /// An empty table for `group`.
    pub fn new(group: GroupId) -> SessionTable {
        SessionTable {
            group,
            sessions: HashMap::new(),
            by_age: BTreeSet::new(),
            changed: HashSet::new(),
        }
    }

    /// Builds a table from `(client, session)` pairs (a snapshot or the disk).
    pub fn from_sessions(
        group: GroupId,
        sessions: impl IntoIterator<Item = (u64, ClientSession)>,
    ) -> SessionTable {
        let mut t = SessionTable::new(group);
        for (client, s) in sessions {
            t.by_age.insert((s.last_index, client));
            t.sessions.insert(client, s);
        }
        t
    }

    /// Loads the table of `group` from `sm_meta`, first converting records written by nodes
    /// before one record per client (module `legacy`).
    pub fn load(engine: &Engine, group: GroupId) -> std::io::Result<SessionTable> {
        legacy::convert(engine, group)?;
        let mut sessions = Vec::new();
        for item in tagged(engine, group, TAG_SESSION) {
            let (k, v) = item?;
            sessions.push((client_of(&k)?, decode(&v)?));
        }
        Ok(SessionTable::from_sessions(group, sessions))
    }

    /// The sessions, for snapshots and tests.
    pub fn sessions(&self) -> &HashMap<u64, ClientSession> {
        &self.sessions
    }

    /// Writes every session into `batch` (after a snapshot install cleared the group's range).
    pub fn write_all(&mut self, engine: &Engine, batch: &mut WriteBatch) {
        self.changed = self.sessions.keys().copied().collect();
        self.write_changed(engine, batch);
    }

    /// Writes the record of every client changed since the last call into `batch`: the session,
    /// or a delete when it was evicted.
    pub fn write_changed(&mut self, engine: &Engine, batch: &mut WriteBatch) {
        let cf = engine.cf(CF_SM);
        for client in self.changed.drain() {
            let key = session_key(self.group, client);
            match self.sessions.get(&client) {
                Some(s) => batch.put_cf(cf, key, encode(s)),
                None => batch.delete_cf(cf, key),
            }
        }
    }

    /// Decides whether `cmd` must execute. Returns the answer when it must not: the saved outcome
    /// of a retry, or `Stale` for a sequence below the client's floor. Advances the floor (and
    /// forgets the outcomes below it) as `cmd.acked_below` allows.
    pub fn precheck(&mut self, cmd: &Command) -> Option<Outcome> {
        let session = self.sessions.get_mut(&cmd.client_id)?;
        if let Some(saved) = session.outcomes.get(&cmd.sequence) {
            return Some(saved.clone());
        }
        if cmd.acked_below > session.floor {
            session.outcomes = session.outcomes.split_off(&cmd.acked_below);
            session.floor = cmd.acked_below;
            self.changed.insert(cmd.client_id);
        }
        (cmd.sequence < session.floor).then_some(Outcome::Stale)
    }

    /// Saves the outcome of `cmd`, applied at log index `index`, and evicts the session idle the
    /// longest when the table is over its bound.
    pub fn record(&mut self, cmd: &Command, index: u64, outcome: &Outcome) {
        let session = self.sessions.entry(cmd.client_id).or_default();
        self.by_age.remove(&(session.last_index, cmd.client_id));
        session.last_index = index;
        session.floor = session.floor.max(cmd.acked_below);
        session.outcomes.insert(cmd.sequence, outcome.clone());
        self.by_age.insert((index, cmd.client_id));
        self.changed.insert(cmd.client_id);
        while self.sessions.len() > MAX_SESSIONS {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            self.sessions.remove(&oldest);
            self.changed.insert(oldest);
        }
    }
}

/// The big-endian u64 at `bytes[at..at + 8]`, or an error naming `what` was malformed.
fn be_u64(bytes: &[u8], at: usize, what: &str) -> std::io::Result<u64> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad {what}")))
}

/// The `sm_meta` records of `group` under `tag`.
fn tagged(engine: &Engine, group: GroupId, tag: u8) -> impl Iterator<Item = RecordRead> + '_ {
    engine.range(CF_SM, &tag_key(group, tag), &tag_key(group, tag + 1))
}

/// The client id of a session key (`group ‖ tag ‖ client`).
fn client_of(key: &[u8]) -> std::io::Result<u64> {
    be_u64(key, 9, "session key")
}

/// Sessions as nodes before 2026-12-02 stored them: an outcome record per `(client, sequence)`
/// (tag `d`) and a `floor ‖ last index` record per client (tag `f`). A data dir of such a node is
/// converted once, at open, in one durable write; this module can go once no such data dir is left.
mod legacy {
    use super::*;

    const TAG_OUTCOME: u8 = b'd';
    const TAG_FLOOR: u8 = b'f';

    /// Rewrites `group`'s old-format session records as one record per client, if there are any.
    pub(super) fn convert(engine: &Engine, group: GroupId) -> std::io::Result<()> {
        let cf = engine.cf(CF_SM);
        let mut sessions: BTreeMap<u64, ClientSession> = BTreeMap::new();
        for tag in [TAG_FLOOR, TAG_OUTCOME] {
            for item in tagged(engine, group, tag) {
                let (k, v) = item?;
                let session = sessions.entry(client_of(&k)?).or_default();
                if tag == TAG_OUTCOME {
                    let seq = be_u64(&k, 17, "outcome key")?;
                    session.outcomes.insert(seq, decode(&v)?);
                } else {
                    session.floor = be_u64(&v, 0, "floor record")?;
                    session.last_index = be_u64(&v, 8, "floor record")?;
                }
            }
        }
        if sessions.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for tag in [TAG_FLOOR, TAG_OUTCOME] {
            batch.delete_range_cf(cf, tag_key(group, tag), tag_key(group, tag + 1));
        }
        for (client, s) in &sessions {
            batch.put_cf(cf, session_key(group, *client), encode(s));
        }
        tracing::info!(
            group,
            clients = sessions.len(),
            "converted old session records"
        );
        engine.write_durable_blocking(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Op;
    use rocksdb::IteratorMode;

    fn cmd(client: u64, seq: u64, acked: u64) -> Command {
        Command {
            client_id: client,
            sequence: seq,
            acked_below: acked,
            op: Op::Delete { key: "k".into() },
        }
    }

    fn save(t: &mut SessionTable, engine: &Engine) {
        let mut b = WriteBatch::default();
        t.write_changed(engine, &mut b);
        engine.write(b).unwrap();
    }

    #[test]
    fn retries_get_the_saved_outcome_and_late_duplicates_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), 16 << 20).unwrap();
        let mut t = SessionTable::new(1);
        let out = Outcome::Batch { version: 7 };
        assert_eq!(t.precheck(&cmd(5, 1, 0)), None);
        t.record(&cmd(5, 1, 0), 7, &out);
        assert_eq!(t.precheck(&cmd(5, 1, 0)), Some(out.clone()));
        save(&mut t, &engine);
        assert_eq!(
            SessionTable::load(&engine, 1).unwrap().sessions(),
            t.sessions()
        );
        // Sequence 2 says 1 is done: 1's outcome goes, and a late 1 is stale.
        assert_eq!(t.precheck(&cmd(5, 2, 2)), None);
        assert!(t.sessions()[&5].outcomes.is_empty());
        assert_eq!(t.precheck(&cmd(5, 1, 0)), Some(Outcome::Stale));
        save(&mut t, &engine);
        let loaded = SessionTable::load(&engine, 1).unwrap();
        assert_eq!(loaded.sessions(), t.sessions());
        assert_eq!(loaded.sessions()[&5].floor, 2);
    }

    #[test]
    fn a_run_of_one_clients_writes_costs_one_session_record() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), 16 << 20).unwrap();
        let mut t = SessionTable::new(1);
        for seq in 1..=10 {
            assert_eq!(t.precheck(&cmd(5, seq, seq.saturating_sub(3))), None);
            t.record(&cmd(5, seq, seq.saturating_sub(3)), seq, &Outcome::None);
        }
        t.record(&cmd(6, 1, 0), 11, &Outcome::None);
        let mut b = WriteBatch::default();
        t.write_changed(&engine, &mut b);
        assert_eq!(b.len(), 2, "one record per client changed");
        assert_eq!(t.sessions()[&5].outcomes.len(), 4, "only 7..=10 in flight");
        let mut again = WriteBatch::default();
        t.write_changed(&engine, &mut again);
        assert_eq!(again.len(), 0, "nothing changed since");
    }

    #[test]
    fn the_table_is_bounded_by_evicting_the_longest_idle_client() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), 16 << 20).unwrap();
        let mut t = SessionTable::new(1);
        for client in 0..(MAX_SESSIONS as u64 + 10) {
            t.record(&cmd(client + 2, 1, 0), client + 1, &Outcome::None);
            if client == 0 {
                // The first client's record reaches the disk before it is evicted.
                save(&mut t, &engine);
            }
        }
        assert_eq!(t.sessions().len(), MAX_SESSIONS);
        assert!(
            !t.sessions().contains_key(&2),
            "the oldest client was evicted"
        );
        assert!(t.sessions().contains_key(&(MAX_SESSIONS as u64 + 11)));
        save(&mut t, &engine);
        let loaded = SessionTable::load(&engine, 1).unwrap();
        assert_eq!(loaded.sessions().len(), MAX_SESSIONS);
        assert!(!loaded.sessions().contains_key(&2), "its record is deleted");
    }

    #[test]
    fn old_format_records_are_converted_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), 16 << 20).unwrap();
        let cf = engine.cf(CF_SM);
        let mut b = WriteBatch::default();
        // Client 5 of group 1: floor 3, last index 40, outcomes of sequences 3 and 4.
        let client_key = |tag: u8| [&tag_key(1, tag)[..], &5u64.to_be_bytes()].concat();
        let floor = [3u64.to_be_bytes(), 40u64.to_be_bytes()].concat();
        b.put_cf(cf, client_key(b'f'), floor);
        for seq in [3u64, 4] {
            let key = [client_key(b'd'), seq.to_be_bytes().to_vec()].concat();
            b.put_cf(cf, key, encode(&Outcome::Put { version: seq * 10 }));
        }
        engine.write(b).unwrap();

        let loaded = SessionTable::load(&engine, 1).unwrap();
        let s = &loaded.sessions()[&5];
        assert_eq!((s.floor, s.last_index), (3, 40));
        assert_eq!(s.outcomes[&4], Outcome::Put { version: 40 });
        assert_eq!(s.outcomes.len(), 2);
        // Converted once: the old records are gone and the new one loads alone.
        let again = SessionTable::load(&engine, 1).unwrap();
        assert_eq!(again.sessions(), loaded.sessions());
        let old = engine
            .db()
            .iterator_cf(cf, IteratorMode::Start)
            .filter(|item| {
                let (k, _) = item.as_ref().unwrap();
                k[8] == b'd' || k[8] == b'f'
            })
            .count();
        assert_eq!(old, 0);
    }
}
