//! Put coalescing. Concurrent puts of one client to the same shard ride in one atomic `Batch`
//! request instead of one request each: the per-request cost (an RPC, a Raft entry, a round of
//! replication bookkeeping) is paid once per batch. At most [`SENDERS_PER_SHARD`] request per
//! shard is in flight; puts that arrive meanwhile wait and form the next batch, so a lone writer
//! never waits and a busy one batches automatically.
//!
//! Semantics are those of separate puts: every put of a batch takes effect at the batch's commit,
//! which lies inside every caller's call; a batch never holds two puts of the same key, so each
//! version still names one write; the batch keeps one request id across retries. If the batch is
//! rejected as invalid (nothing applied), its puts are retried one by one so that one bad put
//! fails alone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::error::Error;

/// Requests in flight per shard carrying coalesced puts. One: puts that arrive while a batch is
/// in flight form the next one (measured: 8.7k puts/s with one sender against 6.9k with two).
pub const SENDERS_PER_SHARD: usize = 1;
/// Most puts in one batch (the server's default batch limit).
const MAX_BATCH_OPS: usize = 128;
/// Most key and value bytes in one batch, well under the 4 MiB message limit.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// A put waiting for its batch.
pub(crate) struct PendingPut {
    pub key: Bytes,
    pub value: Bytes,
    pub reply: oneshot::Sender<Result<u64, Error>>,
}

#[derive(Default)]
struct ShardQueue {
    waiting: VecDeque<PendingPut>,
    senders: usize,
}

/// The put queues of one client, per shard.
#[derive(Default)]
pub(crate) struct PutCoalescer {
    /// A `std` mutex: held to push or take, never across an await.
    shards: Mutex<HashMap<u64, ShardQueue>>,
}

impl std::fmt::Debug for PutCoalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PutCoalescer")
    }
}

impl PutCoalescer {
    /// Queues `put` for `shard`. Returns true when the caller must start a sender for it.
    pub fn enqueue(&self, shard: u64, put: PendingPut) -> bool {
        let mut shards = self.shards.lock().expect("coalescer poisoned");
        let q = shards.entry(shard).or_default();
        q.waiting.push_back(put);
        if q.senders < SENDERS_PER_SHARD {
            q.senders += 1;
            true
        } else {
            false
        }
    }

    /// The next batch for a sender of `shard`: waiting puts in arrival order, distinct keys,
    /// within the size limits. `None` when nothing waits: the sender stops.
    pub fn next_batch(&self, shard: u64) -> Option<Vec<PendingPut>> {
        let mut shards = self.shards.lock().expect("coalescer poisoned");
        let q = shards.get_mut(&shard)?;
        if q.waiting.is_empty() {
            q.senders = q.senders.saturating_sub(1);
            return None;
        }
        let mut batch = Vec::new();
        let mut keys = HashSet::new();
        let mut bytes = 0;
        let mut later = VecDeque::new();
        while let Some(p) = q.waiting.pop_front() {
            let size = p.key.len() + p.value.len();
            let fits = batch.is_empty()
                || (batch.len() < MAX_BATCH_OPS && bytes + size <= MAX_BATCH_BYTES);
            if !fits {
                q.waiting.push_front(p);
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
            q.waiting.push_front(p);
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &'static str) -> PendingPut {
        PendingPut {
            key: Bytes::from_static(k.as_bytes()),
            value: Bytes::from_static(b"v"),
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn batches_hold_distinct_keys_and_senders_are_bounded() {
        let c = PutCoalescer::default();
        assert!(c.enqueue(1, put("a")));
        assert!(!c.enqueue(1, put("b")), "one sender per shard");
        assert!(!c.enqueue(1, put("a")));
        assert!(!c.enqueue(1, put("c")));
        assert!(c.enqueue(2, put("x")), "shards have their own senders");
        let keys = |b: Vec<PendingPut>| b.into_iter().map(|p| p.key).collect::<Vec<_>>();
        assert_eq!(keys(c.next_batch(1).unwrap()), vec!["a", "b", "c"]);
        assert_eq!(
            keys(c.next_batch(1).unwrap()),
            vec!["a"],
            "the repeated key goes next"
        );
        assert!(c.next_batch(1).is_none());
        assert!(
            c.enqueue(1, put("d")),
            "the sender stopped, a new one starts"
        );
    }
}
