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
//! On disk (`sm_meta`), written in the apply batch: `group ‖ f ‖ client` → floor ‖ last index,
//! and `group ‖ d ‖ client ‖ sequence` → the saved outcome.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rocksdb::{IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};

use super::keys::{dedup_key, floor_key, parse_dedup_key, tag_key, CF_SM, TAG_DEDUP, TAG_FLOOR};
use super::{io_err, Engine};
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
}

impl SessionTable {
    /// An empty table for `group`.
    pub fn new(group: GroupId) -> SessionTable {
        SessionTable {
            group,
            sessions: HashMap::new(),
            by_age: BTreeSet::new(),
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

    /// Loads the table of `group` from `sm_meta`.
    pub fn load(engine: &Engine, group: GroupId) -> std::io::Result<SessionTable> {
        let mut sessions: HashMap<u64, ClientSession> = HashMap::new();
        let cf = engine.cf(CF_SM);
        for tag in [TAG_FLOOR, TAG_DEDUP] {
            let prefix = tag_key(group, tag);
            let mut opts = ReadOptions::default();
            opts.set_iterate_upper_bound(tag_key(group, tag + 1).to_vec());
            let mode = IteratorMode::From(&prefix, rocksdb::Direction::Forward);
            for item in engine.db().iterator_cf_opt(cf, opts, mode) {
                let (k, v) = item.map_err(io_err)?;
                if tag == TAG_DEDUP {
                    let (client, seq) = parse_dedup_key(&k);
                    sessions
                        .entry(client)
                        .or_default()
                        .outcomes
                        .insert(seq, decode(&v)?);
                } else {
                    let client = u64::from_be_bytes(k[9..17].try_into().expect("floor key"));
                    let (floor, last_index) = decode_floor(&v)?;
                    let s = sessions.entry(client).or_default();
                    s.floor = floor;
                    s.last_index = last_index;
                }
            }
        }
        Ok(SessionTable::from_sessions(group, sessions))
    }

    /// The sessions, for snapshots and tests.
    pub fn sessions(&self) -> &HashMap<u64, ClientSession> {
        &self.sessions
    }

    /// Writes every session into `batch` (after a snapshot install cleared the group's range).
    pub fn write_all(&self, engine: &Engine, batch: &mut WriteBatch) {
        let cf = engine.cf(CF_SM);
        for (client, s) in &self.sessions {
            batch.put_cf(
                cf,
                floor_key(self.group, *client),
                encode_floor(s.floor, s.last_index),
            );
            for (seq, outcome) in &s.outcomes {
                batch.put_cf(cf, dedup_key(self.group, *client, *seq), encode(outcome));
            }
        }
    }

    /// Decides whether `cmd` must execute. Returns the answer when it must not: the saved outcome
    /// of a retry, or `Stale` for a sequence below the client's floor. Advances the floor (and
    /// forgets the outcomes below it) as `cmd.acked_below` allows.
    pub fn precheck(
        &mut self,
        engine: &Engine,
        cmd: &Command,
        batch: &mut WriteBatch,
    ) -> Option<Outcome> {
        let session = self.sessions.get_mut(&cmd.client_id)?;
        if let Some(saved) = session.outcomes.get(&cmd.sequence) {
            return Some(saved.clone());
        }
        let cf = engine.cf(CF_SM);
        if cmd.acked_below > session.floor {
            let keep = session.outcomes.split_off(&cmd.acked_below);
            for seq in std::mem::replace(&mut session.outcomes, keep).into_keys() {
                batch.delete_cf(cf, dedup_key(self.group, cmd.client_id, seq));
            }
            session.floor = cmd.acked_below;
            batch.put_cf(
                cf,
                floor_key(self.group, cmd.client_id),
                encode_floor(session.floor, session.last_index),
            );
        }
        (cmd.sequence < session.floor).then_some(Outcome::Stale)
    }

    /// Saves the outcome of `cmd`, applied at log index `index`, and evicts the session idle the
    /// longest when the table is over its bound.
    pub fn record(
        &mut self,
        engine: &Engine,
        cmd: &Command,
        index: u64,
        outcome: &Outcome,
        batch: &mut WriteBatch,
    ) {
        let cf = engine.cf(CF_SM);
        let session = self.sessions.entry(cmd.client_id).or_default();
        self.by_age.remove(&(session.last_index, cmd.client_id));
        session.last_index = index;
        session.floor = session.floor.max(cmd.acked_below);
        session.outcomes.insert(cmd.sequence, outcome.clone());
        self.by_age.insert((index, cmd.client_id));
        batch.put_cf(
            cf,
            dedup_key(self.group, cmd.client_id, cmd.sequence),
            encode(outcome),
        );
        batch.put_cf(
            cf,
            floor_key(self.group, cmd.client_id),
            encode_floor(session.floor, session.last_index),
        );
        while self.sessions.len() > MAX_SESSIONS {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            if let Some(gone) = self.sessions.remove(&oldest) {
                batch.delete_cf(cf, floor_key(self.group, oldest));
                for seq in gone.outcomes.keys() {
                    batch.delete_cf(cf, dedup_key(self.group, oldest, *seq));
                }
            }
        }
    }
}

fn encode_floor(floor: u64, last_index: u64) -> [u8; 16] {
    let mut v = [0; 16];
    v[..8].copy_from_slice(&floor.to_be_bytes());
    v[8..].copy_from_slice(&last_index.to_be_bytes());
    v
}

fn decode_floor(v: &[u8]) -> std::io::Result<(u64, u64)> {
    if v.len() != 16 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad session record",
        ));
    }
    let floor = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
    let last = u64::from_be_bytes(v[8..].try_into().expect("8 bytes"));
    Ok((floor, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Op;

    fn cmd(client: u64, seq: u64, acked: u64) -> Command {
        Command {
            client_id: client,
            sequence: seq,
            acked_below: acked,
            op: Op::Delete { key: "k".into() },
        }
    }

    #[test]
    fn retries_get_the_saved_outcome_and_late_duplicates_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), 16 << 20).unwrap();
        let mut t = SessionTable::new(1);
        let mut b = WriteBatch::default();
        let out = Outcome::Batch { version: 7 };
        assert_eq!(t.precheck(&engine, &cmd(5, 1, 0), &mut b), None);
        t.record(&engine, &cmd(5, 1, 0), 7, &out, &mut b);
        assert_eq!(t.precheck(&engine, &cmd(5, 1, 0), &mut b), Some(out));
        // Sequence 2 says 1 is done: 1's outcome goes, and a late 1 is stale.
        assert_eq!(t.precheck(&engine, &cmd(5, 2, 2), &mut b), None);
        assert!(t.sessions()[&5].outcomes.is_empty());
        assert_eq!(
            t.precheck(&engine, &cmd(5, 1, 0), &mut b),
            Some(Outcome::Stale)
        );
        engine.write(b, false).unwrap();
        let loaded = SessionTable::load(&engine, 1).unwrap();
        assert_eq!(loaded.sessions(), t.sessions());
    }

    #[test]
    fn the_table_is_bounded_by_evicting_the_longest_idle_client() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), 16 << 20).unwrap();
        let mut t = SessionTable::new(1);
        let mut b = WriteBatch::default();
        for client in 0..(MAX_SESSIONS as u64 + 10) {
            t.record(
                &engine,
                &cmd(client + 2, 1, 0),
                client + 1,
                &Outcome::None,
                &mut b,
            );
        }
        assert_eq!(t.sessions().len(), MAX_SESSIONS);
        assert!(
            !t.sessions().contains_key(&2),
            "the oldest client was evicted"
        );
        assert!(t.sessions().contains_key(&(MAX_SESSIONS as u64 + 11)));
        engine.write(b, false).unwrap();
        assert_eq!(
            SessionTable::load(&engine, 1).unwrap().sessions().len(),
            MAX_SESSIONS
        );
    }
}
