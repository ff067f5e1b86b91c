//! Coalescing. Concurrent gets of one client to one node travel in one `MultiGet` call, and
//! concurrent puts travel together: the puts waiting for one
//! shard form one atomic `Batch`, and the batches for every shard whose cached leader is the same
//! node go to it in one `MultiBatch` call — a *wave*. At most one wave per node is in flight; puts
//! that arrive meanwhile form the next one, so a lone writer never waits and a busy one batches
//! automatically. The per-request cost (an RPC, a Raft entry, a round of replication
//! bookkeeping) is paid once per batch, and because the node starts a wave's proposals together,
//! its groups' log appends share fsyncs and their AppendEntries share peer messages.
//!
//! Semantics are those of separate puts: every put of a batch takes effect at the batch's commit,
//! which lies inside every caller's call; a batch never holds two puts of the same key, so each
//! version still names one write; the batch keeps one request id across retries. If the batch is
//! rejected as invalid (nothing applied), its puts are retried one by one so that one bad put
//! fails alone. A coalesced get is served as its own `Get` call would be: it starts after the
//! caller asked, and ends before the caller hears back.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use strata_proto::v1 as pb;
use tokio::sync::oneshot;

use crate::error::Error;
use crate::session::Ticket;
use crate::BatchOp;

/// Most puts in one batch (the server's default batch limit).
const MAX_BATCH_OPS: usize = 128;
/// Most key and value bytes in one batch.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Most key and value bytes in one wave, well under the 4 MiB message limit.
const MAX_WAVE_BYTES: usize = 2 << 20;

/// A put waiting for its batch.
pub(crate) struct PendingPut {
    pub key: Bytes,
    pub value: Bytes,
    pub reply: oneshot::Sender<Result<u64, Error>>,
}

/// One batch of a wave, on its way: its puts, their wire form and its request id, kept for all
/// retries.
pub(crate) struct CoalescedBatch {
    pub puts: Vec<PendingPut>,
    pub ops: Vec<pb::BatchOp>,
    pub ticket: Ticket,
}

impl CoalescedBatch {
    /// Starts sending `puts` under `ticket`.
    pub fn new(puts: Vec<PendingPut>, ticket: Ticket) -> Self {
        let ops = puts
            .iter()
            .map(|p| BatchOp::Put(p.key.clone(), p.value.clone()).into())
            .collect();
        CoalescedBatch { puts, ops, ticket }
    }

    /// The batch as a request, with its request id as of now.
    pub fn request(&self) -> pb::BatchRequest {
        pb::BatchRequest {
            ops: self.ops.clone(),
            request_id: Some(self.ticket.request_id()),
        }
    }
}

/// How many times a sender yields to the scheduler after answering a wave, before it takes the
/// next one.
///
/// Answering a wave wakes its callers, but they only run (and queue their next request) once the
/// sender gives the worker thread up. Without a pause the sender takes the next wave at once and
/// finds only the few requests that came in meanwhile, so a busy client sends many small waves;
/// a few yields let the woken callers resubmit first, and waves (and the node's Raft entries)
/// grow. Measured on 2 cores with 64 clients (docs/benchmarks.md): with 4 yields the nodes spent a
/// quarter less CPU per put and a fifth less per get than with none; 16 did worse than 4, as each
/// yield costs a trip round the run queue. A lone caller loses only the yields' microseconds.
const GATHER_YIELDS: usize = 4;

/// Lets the callers a sender just answered resubmit before it takes its next wave (see
/// [`GATHER_YIELDS`]).
pub(crate) async fn let_answered_callers_resubmit() {
    for _ in 0..GATHER_YIELDS {
        tokio::task::yield_now().await;
    }
}

/// Most reads in one `MultiGet` wave.
const MAX_WAVE_GETS: usize = 256;

/// A get waiting for its wave.
pub(crate) struct PendingGet {
    pub req: pb::GetRequest,
    pub reply: oneshot::Sender<Result<pb::GetResponse, Error>>,
}

/// Waiting work per node, and whether a sender runs for the node: at most one does, so one
/// wave per node is in flight.
struct PerNode<Q> {
    /// A `std` mutex: held to push or take, never across an await.
    nodes: Mutex<HashMap<u64, (Q, bool)>>,
}

impl<Q: Default> PerNode<Q> {
    /// Adds work for `node` with `push`. Returns true when the caller must start its sender.
    fn enqueue(&self, node: u64, push: impl FnOnce(&mut Q)) -> bool {
        let mut nodes = self.nodes.lock().expect("coalescer poisoned");
        let (queue, sending) = nodes.entry(node).or_default();
        push(queue);
        !std::mem::replace(sending, true)
    }

    /// The next wave for `node`'s sender, taken by `take`; `None` when nothing waits, and then
    /// the sender stops.
    fn next_wave<W>(&self, node: u64, take: impl FnOnce(&mut Q) -> Option<W>) -> Option<W> {
        let mut nodes = self.nodes.lock().expect("coalescer poisoned");
        let (queue, sending) = nodes.get_mut(&node)?;
        let wave = take(queue);
        if wave.is_none() {
            *sending = false;
        }
        wave
    }
}

impl<Q> Default for PerNode<Q> {
    fn default() -> Self {
        PerNode {
            nodes: Mutex::new(HashMap::new()),
        }
    }
}

/// The put queues of one client: per node, the waiting puts of each shard in arrival order.
#[derive(Default)]
pub(crate) struct PutCoalescer(PerNode<BTreeMap<u64, VecDeque<PendingPut>>>);

impl std::fmt::Debug for PutCoalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PutCoalescer")
    }
}

impl PutCoalescer {
    /// Queues `put` for `shard`, to be sent to `node`. Returns true when the caller must start a
    /// sender for `node`.
    pub fn enqueue(&self, node: u64, shard: u64, put: PendingPut) -> bool {
        self.0.enqueue(node, |shards| {
            shards.entry(shard).or_default().push_back(put);
        })
    }

    /// The next wave for the sender of `node`: one batch per shard with waiting puts, within the
    /// size limits. `None` when nothing waits: the sender stops.
    pub fn next_wave(&self, node: u64) -> Option<Vec<(u64, Vec<PendingPut>)>> {
        self.0.next_wave(node, |shards| {
            let mut wave = Vec::new();
            let mut budget = MAX_WAVE_BYTES;
            for (shard, waiting) in shards.iter_mut() {
                let batch = take_batch(waiting, &mut budget, wave.is_empty());
                if !batch.is_empty() {
                    wave.push((*shard, batch));
                }
            }
            shards.retain(|_, waiting| !waiting.is_empty());
            (!wave.is_empty()).then_some(wave)
        })
    }
}

/// The get queues of one client, per node.
#[derive(Default)]
pub(crate) struct GetCoalescer(PerNode<VecDeque<PendingGet>>);

impl std::fmt::Debug for GetCoalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GetCoalescer")
    }
}

impl GetCoalescer {
    /// Queues `get` for `node`. Returns true when the caller must start a sender for `node`.
    pub fn enqueue(&self, node: u64, get: PendingGet) -> bool {
        self.0.enqueue(node, |waiting| waiting.push_back(get))
    }

    /// The next wave for the sender of `node`: waiting gets in arrival order, at most
    /// [`MAX_WAVE_GETS`] and [`MAX_WAVE_BYTES`] of keys. `None` when nothing waits.
    pub fn next_wave(&self, node: u64) -> Option<Vec<PendingGet>> {
        self.0.next_wave(node, |waiting| {
            let mut wave = Vec::new();
            let mut bytes = 0;
            while let Some(g) = waiting.front() {
                let size = g.req.key.len();
                if !wave.is_empty()
                    && (wave.len() == MAX_WAVE_GETS || bytes + size > MAX_WAVE_BYTES)
                {
                    break;
                }
                bytes += size;
                wave.extend(waiting.pop_front());
            }
            (!wave.is_empty()).then_some(wave)
        })
    }
}

/// Takes one batch from `waiting`: puts in arrival order, distinct keys, within the batch limits
/// and the wave's remaining `budget` of bytes. The first batch of a wave always takes at least
/// one put, however large, so that every put gets sent.
fn take_batch(
    waiting: &mut VecDeque<PendingPut>,
    budget: &mut usize,
    first_of_wave: bool,
) -> Vec<PendingPut> {
    let limit = (*budget).min(MAX_BATCH_BYTES);
    let mut batch = Vec::new();
    let mut keys = HashSet::new();
    let mut bytes = 0;
    let mut later = VecDeque::new();
    while let Some(p) = waiting.pop_front() {
        let size = p.key.len() + p.value.len();
        let fits = (batch.is_empty() && first_of_wave)
            || (batch.len() < MAX_BATCH_OPS && bytes + size <= limit);
        if !fits {
            waiting.push_front(p);
            break;
        }
        if keys.contains(&p.key) {
            later.push_back(p);
            continue;
        }
        keys.insert(p.key.clone());
        bytes += size;
        batch.push(p);
    }
    // Puts held back for a repeated key keep their place ahead of newer arrivals.
    while let Some(p) = later.pop_back() {
        waiting.push_front(p);
    }
    *budget = budget.saturating_sub(bytes);
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_of(k: &str, value_len: usize) -> PendingPut {
        PendingPut {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::from(vec![0u8; value_len]),
            reply: oneshot::channel().0,
        }
    }

    fn put(k: &str) -> PendingPut {
        put_of(k, 1)
    }

    fn keys(wave: Vec<(u64, Vec<PendingPut>)>) -> Vec<(u64, Vec<Bytes>)> {
        wave.into_iter()
            .map(|(shard, b)| (shard, b.into_iter().map(|p| p.key).collect()))
            .collect()
    }

    #[test]
    fn a_wave_holds_one_batch_per_shard_of_distinct_keys() {
        let c = PutCoalescer::default();
        assert!(c.enqueue(1, 10, put("a")));
        assert!(!c.enqueue(1, 10, put("b")), "one sender per node");
        assert!(!c.enqueue(1, 10, put("a")));
        assert!(!c.enqueue(1, 11, put("x")), "the node's other shards join");
        assert!(c.enqueue(2, 12, put("y")), "nodes have their own senders");
        assert_eq!(
            keys(c.next_wave(1).unwrap()),
            vec![(10, vec!["a".into(), "b".into()]), (11, vec!["x".into()])]
        );
        assert_eq!(
            keys(c.next_wave(1).unwrap()),
            vec![(10, vec!["a".into()])],
            "the repeated key goes next"
        );
        assert!(c.next_wave(1).is_none());
        assert!(
            c.enqueue(1, 10, put("d")),
            "the sender stopped, a new one starts"
        );
        assert_eq!(keys(c.next_wave(2).unwrap()), vec![(12, vec!["y".into()])]);
    }

    #[test]
    fn get_waves_are_per_node_and_bounded() {
        let c = GetCoalescer::default();
        let get = |k: String| PendingGet {
            req: pb::GetRequest {
                key: k.into(),
                consistency: 0,
            },
            reply: oneshot::channel().0,
        };
        assert!(c.enqueue(1, get("a".into())));
        assert!(!c.enqueue(1, get("a".into())), "one sender per node");
        assert!(c.enqueue(2, get("b".into())));
        for i in 0..MAX_WAVE_GETS {
            c.enqueue(1, get(format!("k{i}")));
        }
        let wave = c.next_wave(1).unwrap();
        assert_eq!(wave.len(), MAX_WAVE_GETS);
        assert_eq!(
            wave[0].req.key, "a",
            "arrival order; repeated keys may share a wave"
        );
        assert_eq!(wave[1].req.key, "a");
        assert_eq!(c.next_wave(1).unwrap().len(), 2);
        assert!(c.next_wave(1).is_none());
        assert!(
            c.enqueue(1, get("c".into())),
            "the sender stopped, a new one starts"
        );
        assert_eq!(c.next_wave(2).unwrap()[0].req.key, "b");
    }

    #[test]
    fn waves_and_batches_stay_within_their_limits() {
        let c = PutCoalescer::default();
        for i in 0..=MAX_BATCH_OPS {
            c.enqueue(1, 10, put(&format!("k{i}")));
        }
        assert_eq!(c.next_wave(1).unwrap()[0].1.len(), MAX_BATCH_OPS);
        assert_eq!(c.next_wave(1).unwrap()[0].1.len(), 1);

        // Three shards of 900 KiB puts: the first two fill the 2 MiB wave, the third waits.
        let big = 900 << 10;
        c.enqueue(1, 10, put_of("a", big));
        c.enqueue(1, 11, put_of("b", big));
        c.enqueue(1, 12, put_of("c", big));
        assert_eq!(
            keys(c.next_wave(1).unwrap()),
            vec![(10, vec!["a".into()]), (11, vec!["b".into()])]
        );
        assert_eq!(keys(c.next_wave(1).unwrap()), vec![(12, vec!["c".into()])]);

        // A put larger than the wave budget still goes, alone.
        c.enqueue(1, 10, put_of("huge", 3 << 20));
        c.enqueue(1, 11, put("small"));
        assert_eq!(
            keys(c.next_wave(1).unwrap()),
            vec![(10, vec!["huge".into()])]
        );
        assert_eq!(
            keys(c.next_wave(1).unwrap()),
            vec![(11, vec!["small".into()])]
        );
    }
}
