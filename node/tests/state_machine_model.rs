//! Model test: the RocksDB state machine behaves like a `BTreeMap` under random puts, deletes,
//! CAS and batches — including retried commands (deduplication) and restarts (close and reopen
//! the database between any two steps).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::testing::log_id;
use proptest::prelude::*;
use strata_node::raft::{BatchOp, Command, Op, Outcome, TypeConfig};
use strata_node::storage::state_machine::{get, scan};
use strata_node::storage::{Engine, StateMachine};

const GROUP: u64 = 2;

#[derive(Debug, Clone)]
enum Step {
    Put(u8, u8),
    Delete(u8),
    /// CAS on key with expected = the model's version (true) or a wrong one (false).
    Cas(u8, bool, Option<u8>),
    Batch(Vec<(u8, Option<u8>)>),
    /// Re-apply the previous command under its request id: must not change anything.
    Retry,
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    let key = 0u8..6;
    prop_oneof![
        4 => (key.clone(), any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
        2 => key.clone().prop_map(Step::Delete),
        2 => (key.clone(), any::<bool>(), proptest::option::of(any::<u8>())).prop_map(|(k, ok, v)| Step::Cas(k, ok, v)),
        1 => proptest::collection::vec((key, proptest::option::of(any::<u8>())), 1..4).prop_map(Step::Batch),
        1 => Just(Step::Retry),
        1 => Just(Step::Restart),
    ]
}

fn k(key: u8) -> Bytes {
    Bytes::from(format!("key-{key}"))
}

fn v(val: u8) -> Bytes {
    Bytes::from(vec![val; 3])
}

struct Harness {
    dir: tempfile::TempDir,
    engine: Option<Arc<Engine>>,
    sm: Option<StateMachine>,
    index: u64,
}

impl Harness {
    fn open(path: &Path) -> (Arc<Engine>, StateMachine) {
        let engine = Engine::open(&path.join("db"), 16 << 20).unwrap();
        let sm = StateMachine::open(engine.clone(), GROUP, path.join("snap")).unwrap();
        (engine, sm)
    }

    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (engine, sm) = Harness::open(dir.path());
        Harness {
            dir,
            engine: Some(engine),
            sm: Some(sm),
            index: 0,
        }
    }

    fn restart(&mut self) {
        self.sm.take();
        self.engine.take();
        let (engine, sm) = Harness::open(self.dir.path());
        self.engine = Some(engine);
        self.sm = Some(sm);
    }

    fn apply(&mut self, cmd: Command) -> Outcome {
        self.index += 1;
        let entry = openraft::type_config::alias::EntryOf::<TypeConfig>::new_normal(
            log_id::<TypeConfig>(1, 1, self.index),
            cmd,
        );
        let mut outcomes = self.sm.as_mut().unwrap().apply_entries([&entry]).unwrap();
        outcomes.pop().unwrap()
    }

    fn read_all(&self) -> BTreeMap<Bytes, (u64, Bytes)> {
        let (items, more) = scan(self.engine.as_ref().unwrap(), GROUP, b"", b"", 1000).unwrap();
        assert!(!more);
        items
            .into_iter()
            .map(|(k, r)| (k, (r.version, r.value)))
            .collect()
    }
}

fn run_model(steps: Vec<Step>) {
    let mut h = Harness::new();
    let mut model: BTreeMap<Bytes, (u64, Bytes)> = BTreeMap::new();
    let mut seq = 0u64;
    let mut last: Option<(Command, Outcome)> = None;
    for s in steps {
        let op = match s {
            Step::Restart => {
                h.restart();
                assert_eq!(h.read_all(), model, "state after restart");
                continue;
            }
            Step::Retry => {
                if let Some((cmd, outcome)) = last.clone() {
                    let again = h.apply(cmd);
                    assert_eq!(
                        again, outcome,
                        "a retried request returns the saved outcome"
                    );
                    assert_eq!(h.read_all(), model, "a retried request changes nothing");
                }
                continue;
            }
            Step::Put(key, val) => Op::Put {
                key: k(key),
                value: v(val),
            },
            Step::Delete(key) => Op::Delete { key: k(key) },
            Step::Cas(key, matching, new) => {
                let current = model.get(&k(key)).map_or(0, |(ver, _)| *ver);
                Op::Cas {
                    key: k(key),
                    expected_version: if matching { current } else { current + 1000 },
                    new_value: new.map(v),
                }
            }
            Step::Batch(ops) => Op::Batch {
                ops: ops
                    .into_iter()
                    .map(|(key, val)| match val {
                        Some(val) => BatchOp::Put {
                            key: k(key),
                            value: v(val),
                        },
                        None => BatchOp::Delete { key: k(key) },
                    })
                    .collect(),
            },
        };
        seq += 1;
        let cmd = Command {
            client_id: 77,
            sequence: seq,
            acked_below: seq.saturating_sub(1),
            op: op.clone(),
        };
        let outcome = h.apply(cmd.clone());
        let index = h.index;
        // The model.
        let expected = match op {
            Op::Put { key, value } => {
                model.insert(key, (index, value));
                Outcome::Put { version: index }
            }
            Op::Delete { key } => Outcome::Delete {
                existed: model.remove(&key).is_some(),
                version: index,
            },
            Op::Cas {
                key,
                expected_version,
                new_value,
            } => {
                let current = model.get(&key).cloned();
                let cur_ver = current.as_ref().map_or(0, |(ver, _)| *ver);
                if cur_ver == expected_version {
                    match new_value {
                        Some(val) => {
                            model.insert(key, (index, val));
                            Outcome::Cas {
                                succeeded: true,
                                version: index,
                                current_value: None,
                            }
                        }
                        None => {
                            model.remove(&key);
                            Outcome::Cas {
                                succeeded: true,
                                version: 0,
                                current_value: None,
                            }
                        }
                    }
                } else {
                    Outcome::Cas {
                        succeeded: false,
                        version: cur_ver,
                        current_value: current.map(|(_, val)| val),
                    }
                }
            }
            Op::Batch { ops } => {
                for op in ops {
                    match op {
                        BatchOp::Put { key, value } => {
                            model.insert(key, (index, value));
                        }
                        BatchOp::Delete { key } => {
                            model.remove(&key);
                        }
                    }
                }
                Outcome::Batch { version: index }
            }
        };
        assert_eq!(outcome, expected);
        last = Some((cmd, outcome));
        for (key, (ver, val)) in &model {
            let r = get(h.engine.as_ref().unwrap(), GROUP, key)
                .unwrap()
                .expect("key in model is stored");
            assert_eq!((r.version, &r.value), (*ver, val));
        }
        assert_eq!(h.read_all(), model);
    }
    // Sessions keep only in-flight outcomes: with acked_below = seq - 1 at most two remain.
    let sessions = h.sm.as_ref().unwrap().sessions();
    assert!(
        sessions.get(&77).is_none_or(|s| s.outcomes.len() <= 2),
        "{sessions:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn state_machine_matches_btreemap_model(steps in proptest::collection::vec(step(), 1..40)) {
        run_model(steps);
    }
}

/// A sequence below the client's acknowledged floor is a late duplicate: not applied.
#[test]
fn late_duplicate_below_floor_is_not_applied() {
    let mut h = Harness::new();
    let put = |seq, acked, val| Command {
        client_id: 5,
        sequence: seq,
        acked_below: acked,
        op: Op::Put {
            key: k(1),
            value: v(val),
        },
    };
    assert_eq!(h.apply(put(1, 0, 1)), Outcome::Put { version: 1 });
    assert_eq!(h.apply(put(2, 2, 2)), Outcome::Put { version: 2 });
    // Sequence 1 arrives again after the client said everything below 2 is done.
    assert_eq!(h.apply(put(1, 0, 9)), Outcome::Stale);
    assert_eq!(h.read_all()[&k(1)], (2, v(2)));
    h.restart();
    assert_eq!(
        h.apply(put(1, 0, 9)),
        Outcome::Stale,
        "the floor survives a restart"
    );
    assert_eq!(
        h.apply(put(2, 2, 2)),
        Outcome::Put { version: 2 },
        "and so does the saved outcome"
    );
}
