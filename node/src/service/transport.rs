//! The peer side of the Raft transport: decodes each request, hands it to the named group's
//! openraft instance, and encodes `Result<Response, String>` back.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use openraft::type_config::alias::{SnapshotMetaOf, VoteOf};
use serde::de::DeserializeOwned;
use serde::Serialize;
use strata_proto::v1::raft_server::Raft;
use strata_proto::v1::{
    AdminReply, AppendAnswer, AppendBatch, AppendBatchReply, LayoutExchange, PeerHello, RaftReply,
    RaftRequest, SetVotersRequest, SnapshotChunk, TransferLeadershipRequest,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, RwLockReadGuard};
use tonic::{Request, Response, Status, Streaming};

use super::NodeState;
use crate::layout::{GroupId, Layout, NodePhase, NodeSpec};
use crate::membership::driver::{describe, CATCH_UP, TRANSFER_TIMEOUT};
use crate::membership::reconcile;
use crate::raft::codec::{decode, encode};
use crate::raft::{Group, TypeConfig};
use crate::storage::on_blocking_thread;
use crate::storage::snapshot::{SnapshotData, SnapshotFile};

/// The answers of one AppendEntries stream.
type AnswerStream = Pin<Box<dyn Stream<Item = Result<AppendBatchReply, Status>> + Send>>;

/// The `Raft` gRPC service.
pub struct TransportService {
    node: Arc<NodeState>,
}

impl TransportService {
    /// A transport service over `node`'s groups.
    pub fn new(node: Arc<NodeState>) -> Self {
        TransportService { node }
    }
}

/// Admits a peer request for group `id`: a hold that keeps the node from shutting its groups down
/// until the request is answered, and the group. Refused once the node is stopping.
async fn admit(
    node: &NodeState,
    id: GroupId,
) -> Result<(RwLockReadGuard<'_, ()>, Arc<Group>), Status> {
    let hold = node
        .admit_peer_request()
        .await
        .ok_or_else(|| Status::unavailable(format!("node {} is stopping", node.id())))?;
    let group = node.groups.get(id).ok_or_else(|| {
        Status::not_found(format!("group {id} is not hosted on node {}", node.id()))
    })?;
    Ok((hold, group))
}

/// Writes the data of a snapshot stream (its `first` chunk and the rest) to a new, fsynced staged
/// file, and opens it for reading. The file is deleted again if anything fails.
async fn receive_snapshot(
    node: &NodeState,
    first: SnapshotChunk,
    mut rest: Streaming<SnapshotChunk>,
) -> std::io::Result<SnapshotData> {
    let files = SnapshotFile::new(node.snapshot_dir.clone(), first.group_id);
    let staged = on_blocking_thread(move || files.stage()).await?;
    let mut out = tokio::fs::File::create(staged.path()).await?;
    out.write_all(&first.data).await?;
    while let Some(chunk) = rest.next().await {
        let chunk = chunk.map_err(std::io::Error::other)?;
        out.write_all(&chunk.data).await?;
    }
    out.flush().await?;
    out.sync_all().await?;
    on_blocking_thread(move || SnapshotData::staged(staged)).await
}

/// The bincode of `r` as `Result<T, String>`, the shape every peer reply carries.
fn encode_result<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Vec<u8> {
    encode(&r.map_err(|e| e.to_string()))
}

fn reply<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Response<RaftReply> {
    Response::new(RaftReply {
        payload: encode_result(r).into(),
    })
}

fn bad_payload(e: std::io::Error) -> Status {
    Status::invalid_argument(format!("undecodable raft payload: {e}"))
}

/// Decodes `payload` for group `group_id`, runs `handle` on the group's openraft instance, and
/// encodes the result; `Err` when the group is not here or the payload does not decode.
async fn run_on_group<Req, Resp, E, F, Fut>(
    node: &NodeState,
    group_id: GroupId,
    payload: &[u8],
    handle: F,
) -> Result<Vec<u8>, Status>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    E: std::fmt::Display,
    F: FnOnce(Arc<Group>, Req) -> Fut,
    Fut: Future<Output = Result<Resp, E>>,
{
    let (_hold, group) = admit(node, group_id).await?;
    let rpc = decode(payload).map_err(bad_payload)?;
    Ok(encode_result(handle(group, rpc).await))
}

/// Runs one AppendEntries of a stream; a group that is not here or an undecodable payload is an
/// `Err` answer (the stream carries no per-item status).
async fn append_one(node: &NodeState, group_id: GroupId, payload: &[u8]) -> Vec<u8> {
    run_on_group(node, group_id, payload, |g, rpc| async move {
        g.raft().append_entries(rpc).await
    })
    .await
    .unwrap_or_else(|status| encode_result::<(), _>(Err(status.message())))
}

impl TransportService {
    /// Runs a unary request on its group.
    async fn dispatch<Req, Resp, E, F, Fut>(
        &self,
        req: Request<RaftRequest>,
        handle: F,
    ) -> Result<Response<RaftReply>, Status>
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        E: std::fmt::Display,
        F: FnOnce(Arc<Group>, Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
    {
        let req = req.into_inner();
        let payload = run_on_group(&self.node, req.group_id, &req.payload, handle).await?;
        Ok(Response::new(RaftReply {
            payload: payload.into(),
        }))
    }
}

#[tonic::async_trait]
impl Raft for TransportService {
    type AppendEntriesStream = AnswerStream;

    /// One peer's AppendEntries of every group (see [`crate::raft::peer_link`]): each request is
    /// handed to its group as it arrives; answers go back in completion order, those ready
    /// together in one message.
    async fn append_entries(
        &self,
        req: Request<Streaming<AppendBatch>>,
    ) -> Result<Response<AnswerStream>, Status> {
        let mut requests = req.into_inner();
        let (answer, answers) = mpsc::unbounded_channel::<AppendAnswer>();
        let node = self.node.clone();
        tokio::spawn(async move {
            while let Ok(Some(batch)) = requests.message().await {
                for item in batch.items {
                    let (node, answer) = (node.clone(), answer.clone());
                    tokio::spawn(async move {
                        let payload = append_one(&node, item.group_id, &item.payload).await;
                        // The stream may be gone; the peer then treats the request as lost.
                        let _ = answer.send(AppendAnswer {
                            seq: item.seq,
                            payload: payload.into(),
                        });
                    });
                }
            }
        });
        let replies = futures::stream::unfold(answers, |mut answers| async move {
            let first = answers.recv().await?;
            let mut batch = vec![first];
            while let Ok(more) = answers.try_recv() {
                batch.push(more);
            }
            Some((Ok(AppendBatchReply { answers: batch }), answers))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.dispatch(req, |g, rpc| async move { g.raft().vote(rpc).await })
            .await
    }

    async fn pre_vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.dispatch(req, |g, rpc| async move { g.raft().pre_vote(rpc).await })
            .await
    }

    async fn transfer_leader(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.dispatch(req, |g, rpc| async move {
            g.raft().handle_transfer_leader(rpc).await
        })
        .await
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let (vote, meta): (VoteOf<TypeConfig>, SnapshotMetaOf<TypeConfig>) =
            decode(&first.header).map_err(bad_payload)?;
        let group = first.group_id;
        let data = receive_snapshot(&self.node, first, stream)
            .await
            .map_err(|e| Status::internal(format!("receiving a snapshot of group {group}: {e}")))?;
        let snapshot = openraft::Snapshot {
            meta,
            snapshot: data,
        };
        // Admitted only now: receiving the data may take long, installing it does not.
        let (_hold, g) = admit(&self.node, group).await?;
        Ok(reply(g.raft().install_full_snapshot(vote, snapshot).await))
    }

    /// The placement driver's push: adopt the layout if newer, describe this node; and a
    /// peer's question: send this node's layout back if it is newer than the peer's.
    async fn exchange_layout(
        &self,
        req: Request<LayoutExchange>,
    ) -> Result<Response<LayoutExchange>, Status> {
        let req = req.into_inner();
        if !req.layout.is_empty() {
            let layout: Layout = serde_json::from_slice(&req.layout)
                .map_err(|e| Status::invalid_argument(format!("layout does not parse: {e}")))?;
            reconcile::adopt(&self.node, layout)
                .await
                .map_err(|e| Status::internal(format!("adopt layout: {e:#}")))?;
        }
        let mut reply = describe(&self.node);
        if req.newer_than > 0 {
            let layout = self.node.layout();
            if layout.epoch > req.newer_than {
                reply.layout = serde_json::to_vec(&*layout)
                    .expect("layout serializes")
                    .into();
            }
        }
        Ok(Response::new(reply))
    }

    /// Names this node (the caller's own identity was checked and recorded from its header).
    async fn hello(&self, _req: Request<PeerHello>) -> Result<Response<PeerHello>, Status> {
        let identity = self.node.pool.identity();
        Ok(Response::new(PeerHello {
            node_id: identity.id(),
            incarnation: identity.incarnation(),
        }))
    }

    async fn set_voters(
        &self,
        req: Request<SetVotersRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let req = req.into_inner();
        let (_hold, group) = admit(&self.node, req.group_id).await?;
        let voters: Vec<NodeSpec> = req
            .voters
            .into_iter()
            .map(|n| NodeSpec {
                id: n.id,
                client_addr: n.client_addr,
                peer_addr: n.peer_addr,
                phase: NodePhase::Active,
                incarnation: 0,
            })
            .collect();
        self.node.pool.learn_nodes(&voters);
        group
            .set_voters(&voters, CATCH_UP)
            .await
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(AdminReply {}))
    }

    async fn transfer_leadership(
        &self,
        req: Request<TransferLeadershipRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let req = req.into_inner();
        let (_hold, group) = admit(&self.node, req.group_id).await?;
        self.node
            .hand_over_leadership(&group, req.to, TRANSFER_TIMEOUT)
            .await
            .map_err(Status::unavailable)?;
        Ok(Response::new(AdminReply {}))
    }
}
