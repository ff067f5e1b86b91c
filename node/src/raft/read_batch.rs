//! Batched ReadIndex. A linearizable read needs the leader to confirm, with a quorum round, that it
//! is still the leader, and to have applied up to the commit index at that moment. Concurrent
//! reads of a group share one round: a read joins the next round that *starts after it arrived*,
//! which is exactly what its linearizability needs, and a busy group pays one quorum round per
//! batch instead of one per read.

use std::sync::{Arc, Mutex};

use openraft::error::{LinearizableReadError, RaftError};
use openraft::raft::linearizable_read::LinearizerOption;
use openraft::ReadPolicy;
use tokio::sync::oneshot;

use super::group::{ReadError, StrataRaft};

/// One group's read batcher.
pub struct ReadBatcher {
    raft: StrataRaft,
    /// Reads waiting for the next round, and whether a driver task is running. A `std` mutex:
    /// held only to push or take, never across an await.
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    waiters: Vec<oneshot::Sender<Result<(), ReadError>>>,
    driving: bool,
}

impl ReadBatcher {
    /// A batcher for `raft`.
    pub fn new(raft: StrataRaft) -> Arc<ReadBatcher> {
        Arc::new(ReadBatcher {
            raft,
            pending: Mutex::new(Pending::default()),
        })
    }

    /// Waits for a ReadIndex round that started after this call, and for the state machine to
    /// apply up to its read index.
    pub async fn linearize(self: &Arc<Self>) -> Result<(), ReadError> {
        let (tx, rx) = oneshot::channel();
        let start_driver = {
            let mut p = self.pending.lock().expect("read batcher poisoned");
            p.waiters.push(tx);
            !std::mem::replace(&mut p.driving, true)
        };
        if start_driver {
            tokio::spawn(self.clone().drive());
        }
        rx.await
            .unwrap_or_else(|_| Err(ReadError::Unavailable("read batcher stopped".into())))
    }

    /// Runs rounds while reads are waiting; each round serves the reads that arrived before it.
    async fn drive(self: Arc<Self>) {
        loop {
            let batch = {
                let mut p = self.pending.lock().expect("read batcher poisoned");
                if p.waiters.is_empty() {
                    p.driving = false;
                    return;
                }
                std::mem::take(&mut p.waiters)
            };
            let result = linearize_once(&self.raft, ReadPolicy::ReadIndex).await;
            for tx in batch {
                let _ = tx.send(result.clone());
            }
        }
    }
}

/// One leadership confirmation with `option` (a [`ReadPolicy`] or finer), classified for the
/// services.
pub async fn linearize_once(
    raft: &StrataRaft,
    option: impl Into<LinearizerOption>,
) -> Result<(), ReadError> {
    match raft.ensure_linearizable(option).await {
        Ok(_) => Ok(()),
        Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
            Err(ReadError::NotLeader(f.leader_id))
        }
        Err(e) => Err(ReadError::Unavailable(e.to_string())),
    }
}
