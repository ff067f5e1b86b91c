//! Micro-benchmarks of one replica's share of a put, on the real RocksDB store in a temporary
//! directory: the storage and encoding pieces of the put path that `docs/benchmarks.md`
//! measures end to end (where they turn out to be a small part of a put's CPU).
//!
//! Every benchmark handles one Raft entry holding a batch of [`PUTS_PER_ENTRY`] puts of
//! [`VALUE_BYTES`] bytes (about what one Raft round of a shard carries in the 64-client put
//! bench) and reports throughput per put. Run with `cargo bench -p strata-node`.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::testing::log_id;
use openraft::type_config::alias::EntryOf;
use openraft::type_config::TypeConfigExt;
use strata_node::raft::codec::{decode, encode};
use strata_node::raft::{BatchOp, Command, Op, TypeConfig};
use strata_node::storage::{Engine, LogStore, StateMachine};

const PUTS_PER_ENTRY: usize = 8;
const VALUE_BYTES: usize = 256;
/// The bench's key space (`strata bench --keys`).
const KEYS: u64 = 10_000;
const GROUP: u64 = 1;
/// The node's default memory budget.
const MEMORY_BUDGET: usize = 64 << 20;

type Entry = EntryOf<TypeConfig>;

/// The `index`-th entry: one batch of puts to keys that cycle through the key space.
fn entry(index: u64) -> Entry {
    let value = Bytes::from(vec![b'v'; VALUE_BYTES]);
    let ops = (0..PUTS_PER_ENTRY as u64)
        .map(|i| BatchOp::Put {
            key: Bytes::from(format!(
                "key-{}",
                (index * PUTS_PER_ENTRY as u64 + i) % KEYS
            )),
            value: value.clone(),
        })
        .collect();
    let cmd = Command {
        client_id: 7,
        sequence: index,
        acked_below: index,
        op: Op::Batch { ops },
    };
    Entry::new_normal(log_id::<TypeConfig>(1, 1, index), cmd)
}

fn open_engine(dir: &tempfile::TempDir) -> Arc<Engine> {
    Engine::open(&dir.path().join("db"), MEMORY_BUDGET).expect("open engine")
}

fn replica_put(c: &mut Criterion) {
    let mut g = c.benchmark_group("replica_put");
    g.throughput(Throughput::Elements(PUTS_PER_ENTRY as u64));

    // Encoding an entry for the log and for the wire, and decoding it on a follower.
    let sample = entry(1);
    g.bench_function("entry_encode", |b| b.iter(|| encode(&sample)));
    let encoded = encode(&sample);
    g.bench_function("entry_decode", |b| {
        b.iter(|| decode::<Entry>(&encoded).expect("decode"))
    });

    // Appending to the log: written at once, made durable by the syncer thread's group-commit
    // fsync in the background (so this is the appending thread's cost, as under load).
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = LogStore::new(open_engine(&dir), GROUP);
        let mut index = 0;
        g.bench_function("log_append", |b| {
            b.iter(|| {
                index += 1;
                futures::executor::block_on(log.append([entry(index)], IOFlushed::noop()))
                    .expect("append")
            })
        });
    }

    // Appending and waiting for the fsync that makes it durable: the latency of a lone append.
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = LogStore::new(open_engine(&dir), GROUP);
        let mut index = 0;
        g.bench_function("log_append_durable", |b| {
            b.iter(|| {
                index += 1;
                let (tx, rx) = TypeConfig::oneshot();
                futures::executor::block_on(async {
                    log.append([entry(index)], IOFlushed::signal(tx))
                        .await
                        .expect("append");
                    rx.await.expect("callback").expect("fsync")
                })
            })
        });
    }

    // Applying a committed entry: data, de-duplication outcome and applied id in one write.
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open_engine(&dir);
        let mut sm =
            StateMachine::open(engine, GROUP, dir.path().join("snap")).expect("open state machine");
        let mut index = 0;
        g.bench_function("apply", |b| {
            b.iter(|| {
                index += 1;
                sm.apply_entries([&entry(index)]).expect("apply")
            })
        });
    }
    g.finish();
}

/// Key → slot, paid by the client and again by the node on every request.
fn slot_of(c: &mut Criterion) {
    let key = b"{user:42}:profile";
    c.bench_function("slot_of", |b| {
        b.iter(|| strata_proto::keyspace::slot_of(std::hint::black_box(key)))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = replica_put, slot_of
}
criterion_main!(benches);
