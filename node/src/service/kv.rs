//! The client-facing `Kv` service.
//!
//! Every request is validated first (nothing is proposed for a bad request), then routed: key →
//! slot → shard. A node that holds no replica of the shard answers `WrongShard`; one that does not
//! lead it answers `NotLeader` with a hint. There is no forwarding: the client follows the hints.
//! Reads are linearizable (ReadIndex) unless the request asks for `LEASE` or `STALE`.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;
use openraft::ReadPolicy;
use strata_proto::v1::kv_server::Kv;
use strata_proto::v1::{
    batch_result, get_result, BatchRequest, BatchResponse, BatchResult, CasRequest, CasResponse,
    Consistency, DeleteRequest, DeleteResponse, GetRequest, GetResponse, GetResult, ItemFailure,
    KeyValue, MultiBatchRequest, MultiBatchResponse, MultiGetRequest, MultiGetResponse, PutRequest,
    PutResponse, RequestId, ScanRequest, ScanResponse,
};
use tonic::{Request, Response, Status};

use super::NodeState;
use crate::error::KvError;
use crate::layout::GroupId;
use crate::raft::group::{ReadError, WriteError};
use crate::raft::{BatchOp, Command, Group, Op, Outcome};
use crate::storage::state_machine::{get, scan};

/// Scan limit when the request gives none.
const DEFAULT_SCAN_LIMIT: usize = 1000;
/// Largest scan limit honoured.
const MAX_SCAN_LIMIT: usize = 10_000;
/// Value bytes one `MultiGet` answer carries at most (beyond its first read), well under the
/// 4 MiB message limit; later reads are answered `ReplyFull` for the client to send alone.
const MULTI_GET_REPLY_BYTES: usize = 2 << 20;

/// The `Kv` gRPC service.
pub struct KvService {
    node: Arc<NodeState>,
}

impl KvService {
    /// A Kv service over `node`.
    pub fn new(node: Arc<NodeState>) -> Self {
        KvService { node }
    }

    /// Proposes `cmd` to `shard` and classifies the result into the three write outcomes.
    async fn propose(&self, shard: GroupId, cmd: Command) -> Result<Outcome, KvError> {
        let group = self.node.group(shard)?;
        if !group.is_leader() {
            return Err(self.node.not_leader(shard, group.leader()));
        }
        let (client_id, sequence) = (cmd.client_id, cmd.sequence);
        match group.write(cmd).await {
            Ok(Outcome::Stale) => Err(KvError::StaleRequest {
                client_id,
                sequence,
            }),
            Ok(outcome) => Ok(outcome),
            Err(WriteError::NotLeader(hint)) => Err(self.node.not_leader(shard, hint)),
            Err(WriteError::Unknown(reason)) => Err(KvError::OutcomeUnknown { shard, reason }),
        }
    }

    /// The group of `shard`, ready to serve a read at `consistency`.
    async fn readable(&self, shard: GroupId, consistency: i32) -> Result<Arc<Group>, KvError> {
        let group = self.node.group(shard)?;
        let policy = match Consistency::try_from(consistency) {
            Ok(Consistency::Linearizable) => ReadPolicy::ReadIndex,
            Ok(Consistency::Lease) => ReadPolicy::LeaseRead,
            Ok(Consistency::Stale) => return Ok(group),
            Err(_) => {
                return Err(KvError::InvalidArgument(format!(
                    "unknown consistency level {consistency}"
                )))
            }
        };
        if crate::planted::active(crate::planted::Bug::StaleReads) {
            return Ok(group);
        }
        match group.linearize(policy).await {
            Ok(()) => Ok(group),
            Err(ReadError::NotLeader(hint)) => Err(self.node.not_leader(shard, hint)),
            Err(ReadError::Unavailable(reason)) => Err(KvError::Unavailable { shard, reason }),
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<GroupId, KvError> {
        self.node.limits.check_key(key)?;
        Ok(self.node.member_layout()?.shard_for_key(key).id)
    }
}

/// Builds the command for a write, requiring a well-formed request id.
fn command(id: Option<RequestId>, op: Op) -> Result<Command, KvError> {
    let id =
        id.ok_or_else(|| KvError::InvalidArgument("request_id is required on writes".into()))?;
    if id.client_id == 0 || id.sequence == 0 {
        return Err(KvError::InvalidArgument(
            "request_id needs a non-zero client_id and sequence".into(),
        ));
    }
    if id.acked_below > id.sequence {
        return Err(KvError::InvalidArgument(format!(
            "request_id.acked_below {} is above its sequence {}",
            id.acked_below, id.sequence
        )));
    }
    Ok(Command {
        client_id: id.client_id,
        sequence: id.sequence,
        acked_below: id.acked_below,
        op,
    })
}

fn unexpected(outcome: Outcome) -> KvError {
    KvError::Internal(format!("unexpected outcome {outcome:?}"))
}

fn storage(e: std::io::Error) -> KvError {
    KvError::Internal(format!("storage read failed: {e}"))
}

/// Runs the storage read `read` on `group`'s applied state: `Unavailable` if a snapshot install
/// overlapped it, `Internal` if storage failed.
fn read_applied<T>(group: &Group, read: impl FnOnce() -> std::io::Result<T>) -> Result<T, KvError> {
    group
        .read_applied(read)
        .map_err(|reason| KvError::Unavailable {
            shard: group.id,
            reason,
        })?
        .map_err(storage)
}

/// The smallest key greater than every key starting with `prefix` (empty = none).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// The `[start, end)` a scan covers after intersecting its range with its prefix.
fn scan_bounds(req: &ScanRequest) -> (Vec<u8>, Vec<u8>) {
    let start = req.start.as_ref().max(req.prefix.as_ref()).to_vec();
    let prefix_end = prefix_end(&req.prefix);
    let end = match (req.end.is_empty(), prefix_end.is_empty()) {
        (true, _) => prefix_end,
        (false, true) => req.end.to_vec(),
        (false, false) => req.end.as_ref().min(prefix_end.as_slice()).to_vec(),
    };
    (start, end)
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Ok(Response::new(self.run_get(req.into_inner()).await?))
    }

    async fn multi_get(
        &self,
        req: Request<MultiGetRequest>,
    ) -> Result<Response<MultiGetResponse>, Status> {
        let req = req.into_inner();
        self.node.limits.check_multi_len(req.gets.len(), "reads")?;
        // All reads start together, so the reads of one shard share one ReadIndex round.
        let answers = join_all(req.gets.into_iter().map(|g| self.run_get(g))).await;
        let mut budget = MULTI_GET_REPLY_BYTES;
        let results = answers
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let result = match r {
                    Ok(ok) if i > 0 && ok.value.len() > budget => {
                        get_result::Result::Failed(failure(KvError::ReplyFull))
                    }
                    Ok(ok) => {
                        budget = budget.saturating_sub(ok.value.len());
                        get_result::Result::Ok(ok)
                    }
                    Err(e) => get_result::Result::Failed(failure(e)),
                };
                GetResult {
                    result: Some(result),
                }
            })
            .collect();
        Ok(Response::new(MultiGetResponse { results }))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = req.into_inner();
        let shard = self.check_key(&req.key)?;
        self.node.limits.check_value(&req.value)?;
        let cmd = command(
            req.request_id,
            Op::Put {
                key: req.key,
                value: req.value,
            },
        )?;
        match self.propose(shard, cmd).await? {
            Outcome::Put { version } => Ok(Response::new(PutResponse { version })),
            other => Err(unexpected(other).into()),
        }
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let req = req.into_inner();
        let shard = self.check_key(&req.key)?;
        let cmd = command(req.request_id, Op::Delete { key: req.key })?;
        match self.propose(shard, cmd).await? {
            Outcome::Delete { existed, version } => {
                Ok(Response::new(DeleteResponse { existed, version }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let req = req.into_inner();
        let layout = self.node.member_layout()?;
        if layout.shard(req.shard_id).is_none() {
            return Err(KvError::InvalidArgument(format!(
                "unknown shard {}; this cluster has shards 1..={}",
                req.shard_id,
                layout.shards.len()
            ))
            .into());
        }
        let (start, end) = scan_bounds(&req);
        if !end.is_empty() && start >= end {
            return Ok(Response::new(ScanResponse::default()));
        }
        let limit = match req.limit as usize {
            0 => DEFAULT_SCAN_LIMIT,
            n => n.min(MAX_SCAN_LIMIT),
        };
        let group = self.readable(req.shard_id, req.consistency).await?;
        let (items, more) = read_applied(&group, || {
            scan(&self.node.engine, group.id, &start, &end, limit)
        })?;
        let items = items
            .into_iter()
            .map(|(key, r)| KeyValue {
                key,
                value: r.value,
                version: r.version,
            })
            .collect();
        Ok(Response::new(ScanResponse { items, more }))
    }

    async fn cas(&self, req: Request<CasRequest>) -> Result<Response<CasResponse>, Status> {
        let req = req.into_inner();
        let shard = self.check_key(&req.key)?;
        let new_value = if req.delete {
            None
        } else {
            self.node.limits.check_value(&req.new_value)?;
            Some(req.new_value)
        };
        let cmd = command(
            req.request_id,
            Op::Cas {
                key: req.key,
                expected_version: req.expected_version,
                new_value,
            },
        )?;
        match self.propose(shard, cmd).await? {
            Outcome::Cas {
                succeeded,
                version,
                current_value,
            } => Ok(Response::new(CasResponse {
                succeeded,
                version,
                current_value: current_value.unwrap_or_default(),
            })),
            other => Err(unexpected(other).into()),
        }
    }

    async fn batch(&self, req: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
        Ok(Response::new(self.run_batch(req.into_inner()).await?))
    }

    async fn multi_batch(
        &self,
        req: Request<MultiBatchRequest>,
    ) -> Result<Response<MultiBatchResponse>, Status> {
        let req = req.into_inner();
        self.node
            .limits
            .check_multi_len(req.batches.len(), "batches")?;
        // All proposals start together, so the groups' log appends share fsyncs and their
        // AppendEntries share peer messages.
        let results = join_all(req.batches.into_iter().map(|b| self.run_batch(b)))
            .await
            .into_iter()
            .map(|r| BatchResult {
                result: Some(match r {
                    Ok(ok) => batch_result::Result::Ok(ok),
                    Err(e) => batch_result::Result::Failed(failure(e)),
                }),
            })
            .collect();
        Ok(Response::new(MultiBatchResponse { results }))
    }
}

impl KvService {
    /// Serves one read (a `Get` call or one read of a `MultiGet`).
    async fn run_get(&self, req: GetRequest) -> Result<GetResponse, KvError> {
        let shard = self.check_key(&req.key)?;
        let group = self.readable(shard, req.consistency).await?;
        Ok(match get_record(&group, &self.node, &req.key)? {
            Some((version, value)) => GetResponse {
                found: true,
                value,
                version,
            },
            None => GetResponse::default(),
        })
    }

    /// Validates and proposes one single-shard batch (a `Batch` call or one batch of a
    /// `MultiBatch`).
    async fn run_batch(&self, req: BatchRequest) -> Result<BatchResponse, KvError> {
        self.node.limits.check_batch_len(req.ops.len())?;
        let mut shards = Vec::new();
        let mut ops = Vec::with_capacity(req.ops.len());
        for op in req.ops {
            let shard = self.check_key(&op.key)?;
            if !shards.contains(&shard) {
                shards.push(shard);
            }
            ops.push(if op.delete {
                BatchOp::Delete { key: op.key }
            } else {
                self.node.limits.check_value(&op.value)?;
                BatchOp::Put {
                    key: op.key,
                    value: op.value,
                }
            });
        }
        if shards.len() > 1 {
            shards.sort_unstable();
            return Err(KvError::InvalidArgument(format!(
                "batch spans shards {shards:?}; an atomic batch must stay in one shard \
                 (give its keys a common hash tag such as {{user:42}})"
            )));
        }
        let cmd = command(req.request_id, Op::Batch { ops })?;
        match self.propose(shards[0], cmd).await? {
            Outcome::Batch { version } => Ok(BatchResponse { version }),
            other => Err(unexpected(other)),
        }
    }
}

/// One failed item of a `MultiBatch` or `MultiGet`, as the status its own call would have
/// carried.
fn failure(e: KvError) -> ItemFailure {
    let (code, details) = e.details();
    ItemFailure {
        code: code as i32,
        message: e.to_string(),
        details: Some(details),
    }
}

fn get_record(
    group: &Group,
    node: &NodeState,
    key: &Bytes,
) -> Result<Option<(u64, Bytes)>, KvError> {
    let record = read_applied(group, || get(&node.engine, group.id, key))?;
    Ok(record.map(|r| (r.version, r.value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_incrementable_byte() {
        assert_eq!(prefix_end(b"ab"), b"ac");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"");
        assert_eq!(prefix_end(b""), b"");
    }

    #[test]
    fn scan_bounds_intersect_range_and_prefix() {
        let req = |start: &[u8], end: &[u8], prefix: &[u8]| ScanRequest {
            start: Bytes::copy_from_slice(start),
            end: Bytes::copy_from_slice(end),
            prefix: Bytes::copy_from_slice(prefix),
            ..Default::default()
        };
        assert_eq!(
            scan_bounds(&req(b"", b"", b"user:")),
            (b"user:".to_vec(), b"user;".to_vec())
        );
        assert_eq!(
            scan_bounds(&req(b"user:5", b"", b"user:")),
            (b"user:5".to_vec(), b"user;".to_vec())
        );
        assert_eq!(
            scan_bounds(&req(b"a", b"c", b"")),
            (b"a".to_vec(), b"c".to_vec())
        );
        assert_eq!(
            scan_bounds(&req(b"", b"user:3", b"user:")),
            (b"user:".to_vec(), b"user:3".to_vec())
        );
    }

    #[test]
    fn writes_require_a_request_id() {
        let op = || Op::Delete {
            key: Bytes::from_static(b"k"),
        };
        assert!(command(None, op()).is_err());
        let id = |c, s, a| {
            Some(RequestId {
                client_id: c,
                sequence: s,
                acked_below: a,
            })
        };
        assert!(command(id(0, 1, 0), op()).is_err());
        assert!(command(id(1, 0, 0), op()).is_err());
        assert!(command(id(1, 2, 3), op()).is_err());
        assert_eq!(command(id(7, 3, 2), op()).unwrap().sequence, 3);
    }
}
