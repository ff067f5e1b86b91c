//! The gRPC services and the node state they share.
//!
//! - [`kv`]: the client API — routing, validation, the three write outcomes.
//! - [`cluster`]: the shard map and status.
//! - [`transport`]: the peer side of the Raft transport.

pub mod cluster;
pub mod kv;
pub mod transport;

use std::sync::Arc;

use crate::error::KvError;
use crate::layout::{GroupId, Layout};
use crate::limits::Limits;
use crate::raft::{Group, Groups};
use crate::storage::Engine;

/// What every service of this node needs.
pub struct NodeState {
    /// This node's id.
    pub id: u64,
    /// The cluster layout this node routes with.
    pub layout: Layout,
    /// The groups hosted here.
    pub groups: Groups,
    /// Input limits.
    pub limits: Limits,
    /// The node's storage, for reads of applied state.
    pub engine: Arc<Engine>,
}

impl NodeState {
    /// The hosted group `shard`, or `WrongShard` when this node has no replica of it.
    pub fn group(&self, shard: GroupId) -> Result<Arc<Group>, KvError> {
        self.groups.get(shard).ok_or(KvError::WrongShard {
            shard,
            epoch: self.layout.epoch,
        })
    }

    /// A `NotLeader` error with the client address of `leader`, when known.
    pub fn not_leader(&self, shard: GroupId, leader: Option<u64>) -> KvError {
        let leader =
            leader.and_then(|id| self.layout.node(id).map(|n| (id, n.client_addr.clone())));
        KvError::NotLeader { shard, leader }
    }
}
