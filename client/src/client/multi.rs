//! The senders of coalesced requests: each wave of puts goes to its node in one `MultiBatch`
//! call and each wave of gets in one `MultiGet` call; every item gets the outcome its own call
//! would have had, and an item that failed goes through the retry loop alone.

use strata_proto::v1 as pb;

use super::Client;
use crate::coalesce::{self, CoalescedBatch};
use crate::error::{is_reply_full, Error};
use crate::route::ShardRoute;

/// One item's failure from a `MultiBatch` or `MultiGet` answer, as the status its own call would
/// have returned, so that the usual retry rules apply to it.
fn item_failure(f: pb::ItemFailure) -> tonic::Status {
    use prost::Message;
    tonic::Status::with_details(
        tonic::Code::from(f.code),
        f.message,
        f.details.unwrap_or_default().encode_to_vec().into(),
    )
}

fn batch_outcome(r: pb::BatchResult) -> Result<pb::BatchResponse, tonic::Status> {
    match r.result {
        Some(pb::batch_result::Result::Ok(ok)) => Ok(ok),
        Some(pb::batch_result::Result::Failed(f)) => Err(item_failure(f)),
        None => Err(tonic::Status::internal(
            "a MultiBatch result holds no outcome",
        )),
    }
}

fn get_outcome(r: pb::GetResult) -> Result<pb::GetResponse, tonic::Status> {
    match r.result {
        Some(pb::get_result::Result::Ok(ok)) => Ok(ok),
        Some(pb::get_result::Result::Failed(f)) => Err(item_failure(f)),
        None => Err(tonic::Status::internal(
            "a MultiGet result holds no outcome",
        )),
    }
}

/// The per-item outcomes of a multi-item call with `items` items: the answer's, or the call's
/// own failure for every item.
fn per_item<R, T>(
    node: u64,
    items: usize,
    answer: Result<Vec<R>, tonic::Status>,
    outcome: fn(R) -> Result<T, tonic::Status>,
) -> Vec<Result<T, tonic::Status>> {
    match answer {
        Ok(results) if results.len() == items => results.into_iter().map(outcome).collect(),
        Ok(results) => {
            let wrong = tonic::Status::internal(format!(
                "node {node} answered {} results for {items} items",
                results.len()
            ));
            (0..items).map(|_| Err(wrong.clone())).collect()
        }
        Err(status) => (0..items).map(|_| Err(status.clone())).collect(),
    }
}

impl Client {
    /// The sender of coalesced gets to `node`: sends `MultiGet` waves, one at a time, until none
    /// waits. A read whose first attempt failed is retried in a task of its own.
    pub(super) async fn send_get_waves(&self, node: u64) {
        while let Some(wave) = self.inner.gets.next_wave(node) {
            let req = pb::MultiGetRequest {
                gets: wave.iter().map(|g| g.req.clone()).collect(),
            };
            let answer = self
                .attempt_on(node, |mut c| async move { c.multi_get(req).await })
                .await
                .map(|r| r.results);
            let outcomes = per_item(node, wave.len(), answer, get_outcome);
            if outcomes.iter().any(Result::is_ok) {
                self.inner
                    .leaders
                    .lock()
                    .expect("leaders poisoned")
                    .answered(node);
            }
            for (get, first) in wave.into_iter().zip(outcomes) {
                match first {
                    Ok(r) => {
                        let _ = get.reply.send(Ok(r));
                    }
                    Err(status) => {
                        let client = self.clone();
                        tokio::spawn(async move {
                            // A read the answer had no room for was not served: it goes alone.
                            let first = (!is_reply_full(&status)).then_some((node, Err(status)));
                            let _ = get.reply.send(client.get_once(get.req, first).await);
                        });
                    }
                }
            }
            coalesce::let_answered_callers_resubmit().await;
        }
    }

    /// The sender of coalesced puts to `node`: sends waves, one at a time, until none waits. A
    /// batch whose first attempt failed is retried in a task of its own, so one shard's trouble
    /// does not hold up the node's next wave.
    pub(super) async fn send_put_waves(&self, node: u64) {
        while let Some(wave) = self.inner.puts.next_wave(node) {
            let batches: Vec<CoalescedBatch> = wave
                .into_iter()
                .map(|(_, puts)| CoalescedBatch::new(puts, self.inner.session.begin()))
                .collect();
            let outcomes = self.multi_batch(node, &batches).await;
            for (batch, first) in batches.into_iter().zip(outcomes) {
                if first.is_ok() {
                    self.finish_batch(batch, node, first).await;
                } else {
                    let client = self.clone();
                    tokio::spawn(async move { client.finish_batch(batch, node, first).await });
                }
            }
            coalesce::let_answered_callers_resubmit().await;
        }
    }

    /// Sends `batches` to `node` in one `MultiBatch` call: one outcome per batch, each the
    /// status its own `Batch` call would have had (the call's own failure for all of them).
    pub(super) async fn multi_batch(
        &self,
        node: u64,
        batches: &[CoalescedBatch],
    ) -> Vec<Result<pb::BatchResponse, tonic::Status>> {
        let req = pb::MultiBatchRequest {
            batches: batches.iter().map(CoalescedBatch::request).collect(),
        };
        let answer = self
            .attempt_on(node, |mut c| async move { c.multi_batch(req).await })
            .await
            .map(|r| r.results);
        per_item(node, batches.len(), answer, batch_outcome)
    }

    /// The node a coalesced request for `shard` goes to: its cached leader, else a replica.
    pub(super) fn first_node(&self, shard: &ShardRoute) -> u64 {
        self.inner
            .leaders
            .lock()
            .expect("leaders poisoned")
            .pick(shard.id, &shard.replicas, 0)
    }

    /// Completes a coalesced batch from its first outcome: retries it (same request id) if that
    /// failed, then answers its puts.
    pub(super) async fn finish_batch(
        &self,
        batch: CoalescedBatch,
        node: u64,
        first: Result<pb::BatchResponse, tonic::Status>,
    ) {
        let result = self
            .send_batch(&batch.ops, &batch.ticket, Some((node, first)))
            .await;
        match result {
            Ok(version) => {
                for p in batch.puts {
                    let _ = p.reply.send(Ok(version));
                }
            }
            // Nothing was applied: send each put alone so only a bad one fails.
            Err(Error::InvalidArgument(_)) => {
                for p in batch.puts {
                    let _ = p.reply.send(self.put_one(p.key, p.value).await);
                }
            }
            Err(e) => {
                for p in batch.puts {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
