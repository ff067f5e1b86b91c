//! The retry loop every operation runs in: pick a node for the shard, attempt with a timeout,
//! follow hints and reload the map as the error says, back off, stop at the deadline.

use std::future::Future;
use std::time::Duration;

use strata_proto::v1::{self as pb, kv_client::KvClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::Client;
use crate::error::{classify, Error, LeaderHint, Verdict};
use crate::route::RouteTable;

/// Longest pause between two attempts of one operation.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// A `WrongShard` status for a node missing from the cached map, so the retry loop reloads it.
fn unknown_node(node: u64, epoch: u64) -> tonic::Status {
    use prost::Message;
    let details = pb::ErrorDetails {
        code: "WrongShard".into(),
        retryable: true,
        epoch,
        ..Default::default()
    };
    tonic::Status::with_details(
        tonic::Code::FailedPrecondition,
        format!("node {node} is not in shard map epoch {epoch}"),
        details.encode_to_vec().into(),
    )
}

/// Where an operation goes.
#[derive(Clone, Copy)]
pub(super) enum Target<'a> {
    Key(&'a [u8]),
    Shard(u64),
}

impl Client {
    /// Runs `call` against the right node for `target`, retrying per the error table until the
    /// deadline. `is_write` makes transport failures count as "may have applied".
    pub(super) async fn run<T, F, Fut>(
        &self,
        target: Target<'_>,
        is_write: bool,
        call: F,
    ) -> Result<T, Error>
    where
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.run_from(target, is_write, None, call).await
    }

    /// [`run`](Self::run), when the first attempt already happened elsewhere (a batch of a
    /// `MultiBatch` call): `first` is the node it went to and its outcome.
    pub(super) async fn run_from<T, F, Fut>(
        &self,
        target: Target<'_>,
        is_write: bool,
        mut first: Option<(u64, Result<T, tonic::Status>)>,
        mut call: F,
    ) -> Result<T, Error>
    where
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.inner.config.deadline;
        let mut may_have_applied = false;
        let mut backoff = Duration::from_millis(10);
        let mut attempt = 0usize;
        let mut last;
        loop {
            let table = match self.table() {
                Some(t) => t,
                None => self.refresh_map().await?,
            };
            let shard = match target {
                Target::Key(k) => table.shard_for_key(k).clone(),
                Target::Shard(id) => table
                    .shard(id)
                    .cloned()
                    .ok_or_else(|| Error::InvalidArgument(format!("unknown shard {id}")))?,
            };
            let (node, outcome) = match first.take() {
                Some(done) => done,
                None => {
                    let node = self.inner.leaders.lock().expect("leaders poisoned").pick(
                        shard.id,
                        &shard.replicas,
                        attempt,
                    );
                    (node, self.attempt(&table, node, &mut call).await)
                }
            };
            attempt += 1;
            let status = match outcome {
                Ok(v) => {
                    let mut leaders = self.inner.leaders.lock().expect("leaders poisoned");
                    leaders.answered(node);
                    leaders.set(shard.id, node);
                    return Ok(v);
                }
                Err(status) => status,
            };
            let mut wait = true;
            match classify(&status, is_write) {
                Verdict::Fail(e) => {
                    return Err(match e {
                        // A final error after an earlier attempt may have applied is unknown.
                        Error::InvalidArgument(_) => e,
                        e if may_have_applied => Error::OutcomeUnknown(e.to_string()),
                        e => e,
                    });
                }
                Verdict::NotLeader(hint) => {
                    let moved = match &hint {
                        Some(h) => self.leader_moved(&table, h).await,
                        None => false,
                    };
                    let hint = hint.map(|h| h.id);
                    let mut leaders = self.inner.leaders.lock().expect("leaders poisoned");
                    if let (true, Some(leader)) = (moved, hint) {
                        // It failed at its old address; that says nothing about the new one.
                        leaders.answered(leader);
                    }
                    wait = !leaders.follow_hint(shard.id, node, hint);
                    last = status.message().to_string();
                }
                Verdict::WrongShard => {
                    self.inner
                        .leaders
                        .lock()
                        .expect("leaders poisoned")
                        .forget(shard.id);
                    let _ = self.refresh_map().await;
                    last = status.message().to_string();
                }
                Verdict::Retry {
                    may_have_applied: m,
                    node_failed,
                    reason,
                } => {
                    may_have_applied |= m;
                    {
                        let mut leaders = self.inner.leaders.lock().expect("leaders poisoned");
                        leaders.forget(shard.id);
                        if node_failed {
                            leaders.suspect(node);
                            // Another replica can be tried at once.
                            wait = attempt.is_multiple_of(shard.replicas.len());
                        }
                    }
                    if wait && node_failed {
                        // Every replica failed: the shard's replicas may have moved.
                        let _ = self.refresh_map().await;
                    }
                    last = reason;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let msg = format!("deadline exceeded after {attempt} attempts; last error: {last}");
                return Err(if may_have_applied {
                    Error::OutcomeUnknown(msg)
                } else {
                    Error::Unavailable(msg)
                });
            }
            if wait {
                let jitter =
                    Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 + 1));
                tokio::time::sleep((backoff + jitter).min(deadline - now)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Whether the leader named by `hint` moved since `table` was loaded (`node update`): the
    /// hint gives it another address than `table`, and the reloaded map (now cached) does too.
    async fn leader_moved(&self, table: &RouteTable, hint: &LeaderHint) -> bool {
        let was = table.nodes.get(&hint.id);
        if hint.addr.is_empty() || was == Some(&hint.addr) {
            return false;
        }
        self.refresh_map()
            .await
            .is_ok_and(|now| now.nodes.get(&hint.id) != was)
    }

    /// One attempt: `call` against `node`, bounded by the attempt timeout.
    pub(super) async fn attempt<T, F, Fut>(
        &self,
        table: &RouteTable,
        node: u64,
        call: F,
    ) -> Result<T, tonic::Status>
    where
        F: FnOnce(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let Some(addr) = table.nodes.get(&node) else {
            // The node (a leader hint) joined after this map was loaded: reload it.
            return Err(unknown_node(node, table.epoch));
        };
        let ch = self
            .channel(addr)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        match tokio::time::timeout(self.inner.config.attempt_timeout, call(KvClient::new(ch))).await
        {
            Ok(r) => r.map(|r| r.into_inner()),
            Err(_) => Err(tonic::Status::deadline_exceeded("attempt timed out")),
        }
    }

    /// One attempt against `node` with the cached map (loading it first if there is none).
    pub(super) async fn attempt_on<T, F, Fut>(&self, node: u64, call: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let table = match self.table() {
            Some(t) => t,
            None => self
                .refresh_map()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?,
        };
        self.attempt(&table, node, call).await
    }
}
