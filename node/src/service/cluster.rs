//! The `Cluster` service: the shard map clients route with, this node's view of its groups, and
//! the operator's add/remove node requests (served by the meta leader).

use std::sync::Arc;

use strata_proto::v1::cluster_server::Cluster;
use strata_proto::v1::{
    AddNodeRequest, AddNodeResponse, RemoveNodeRequest, RemoveNodeResponse, ShardInfo, ShardMap,
    ShardMapRequest, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
    TransferLeaderRequest, TransferLeaderResponse, UpdateNodeRequest, UpdateNodeResponse,
};
use tonic::{Request, Response, Status};

use super::NodeState;
use crate::error::KvError;
use crate::layout::{Move, META_GROUP};
use crate::membership::admin;
use crate::membership::driver::node_info;

/// The `Cluster` gRPC service.
pub struct ClusterService {
    node: Arc<NodeState>,
}

/// How long a leadership transfer or a snapshot may take before the request fails.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `(from, to)` of a move on the wire (0 = none).
fn move_ids(mv: Option<Move>) -> (u64, u64) {
    mv.map_or((0, 0), |m| (m.from.unwrap_or(0), m.to))
}

impl ClusterService {
    /// A cluster service over `node`.
    pub fn new(node: Arc<NodeState>) -> Self {
        ClusterService { node }
    }

    /// The layout as a wire shard map, with the leaders this node knows of.
    fn shard_map(&self) -> ShardMap {
        let layout = self.node.layout();
        let (meta_moving_from, meta_moving_to) = move_ids(layout.meta_moving);
        ShardMap {
            epoch: layout.epoch,
            slot_count: strata_proto::keyspace::SLOT_COUNT,
            nodes: layout.nodes.iter().map(node_info).collect(),
            shards: layout
                .shards
                .iter()
                .map(|s| {
                    let (moving_from, moving_to) = move_ids(s.moving);
                    ShardInfo {
                        id: s.id,
                        slot_start: s.slot_start,
                        slot_end: s.slot_end,
                        replicas: s.replicas.clone(),
                        leader: self
                            .node
                            .groups
                            .get(s.id)
                            .and_then(|g| g.leader())
                            .unwrap_or(0),
                        moving_from,
                        moving_to,
                    }
                })
                .collect(),
            meta_replicas: layout.meta_replicas.clone(),
            replication: layout.replication() as u32,
            meta_moving_from,
            meta_moving_to,
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn get_shard_map(
        &self,
        _: Request<ShardMapRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        self.node.member_layout()?;
        if self.node.membership() == super::Membership::Removed {
            return Err(KvError::Unavailable {
                shard: 0,
                reason: "this node was removed from the cluster; ask another node".into(),
            }
            .into());
        }
        Ok(Response::new(self.shard_map()))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let node = &self.node;
        let placement_driver = node.groups.get(META_GROUP).is_some_and(|g| g.is_leader());
        Ok(Response::new(StatusResponse {
            node_id: node.id(),
            map: (node.layout().epoch > 0).then(|| self.shard_map()),
            groups: node.groups.all().iter().map(|g| g.status()).collect(),
            peer_addr: node.peer_addr.clone(),
            client_addr: node.client_addr.clone(),
            membership: node.membership().name().into(),
            placement_driver,
            placement_events: if placement_driver {
                node.placement_events.snapshot()
            } else {
                Vec::new()
            },
        }))
    }

    async fn add_node(
        &self,
        req: Request<AddNodeRequest>,
    ) -> Result<Response<AddNodeResponse>, Status> {
        Ok(Response::new(
            admin::add_node(&self.node, req.into_inner()).await?,
        ))
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        Ok(Response::new(
            admin::remove_node(&self.node, req.into_inner()).await?,
        ))
    }

    async fn update_node(
        &self,
        req: Request<UpdateNodeRequest>,
    ) -> Result<Response<UpdateNodeResponse>, Status> {
        Ok(Response::new(
            admin::update_node(&self.node, req.into_inner()).await?,
        ))
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let req = req.into_inner();
        let group = self.node.group(req.shard_id)?;
        if !group.is_leader() {
            return Err(self.node.not_leader(req.shard_id, group.leader()).into());
        }
        let layout = self.node.layout();
        let replicas = layout.replicas(req.shard_id).unwrap_or_default();
        if req.to == self.node.id() || !replicas.contains(&req.to) {
            return Err(KvError::InvalidArgument(format!(
                "node {} is not another replica of shard {} (replicas {replicas:?})",
                req.to, req.shard_id
            ))
            .into());
        }
        if let Err(reason) = self
            .node
            .hand_over_leadership(&group, req.to, ADMIN_TIMEOUT)
            .await
        {
            return Err(KvError::Unavailable {
                shard: req.shard_id,
                reason,
            }
            .into());
        }
        Ok(Response::new(TransferLeaderResponse {}))
    }

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
        let shard = req.into_inner().shard_id;
        let group = self.node.group(shard)?;
        let snapshot_index = group
            .snapshot_now(ADMIN_TIMEOUT)
            .await
            .map_err(|reason| KvError::Unavailable { shard, reason })?;
        Ok(Response::new(SnapshotResponse { snapshot_index }))
    }
}
