//! The `Cluster` service: the shard map clients route with, and this node's view of its groups.

use std::sync::Arc;

use strata_proto::v1::cluster_server::Cluster;
use strata_proto::v1::{
    NodeInfo, ShardInfo, ShardMap, ShardMapRequest, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use super::NodeState;

/// The `Cluster` gRPC service.
pub struct ClusterService {
    node: Arc<NodeState>,
}

impl ClusterService {
    /// A cluster service over `node`.
    pub fn new(node: Arc<NodeState>) -> Self {
        ClusterService { node }
    }

    /// The layout as a wire shard map, with the leaders this node knows of.
    fn shard_map(&self) -> ShardMap {
        let layout = &self.node.layout;
        ShardMap {
            epoch: layout.epoch,
            slot_count: strata_proto::keyspace::SLOT_COUNT,
            nodes: layout
                .nodes
                .iter()
                .map(|n| NodeInfo {
                    id: n.id,
                    client_addr: n.client_addr.clone(),
                    peer_addr: n.peer_addr.clone(),
                })
                .collect(),
            shards: layout
                .shards
                .iter()
                .map(|s| ShardInfo {
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
                })
                .collect(),
            meta_replicas: layout.meta_replicas.clone(),
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn get_shard_map(
        &self,
        _: Request<ShardMapRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        Ok(Response::new(self.shard_map()))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            node_id: self.node.id,
            map: Some(self.shard_map()),
            groups: self.node.groups.all().iter().map(|g| g.status()).collect(),
        }))
    }
}
