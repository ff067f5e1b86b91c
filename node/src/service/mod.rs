//! The gRPC services and the node state they share.
//!
//! - [`kv`]: the client API — routing, validation, the three write outcomes.
//! - [`cluster`]: the shard map, status, and the operator's add/remove node requests.
//! - [`transport`]: the peer side of the Raft transport, plus the placement driver's peer calls.

pub mod cluster;
pub mod kv;
pub mod transport;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::RaftTimings;
use crate::error::KvError;
use crate::layout::{GroupId, Layout};
use crate::limits::Limits;
use crate::membership::placement::EventLog;
use crate::raft::network::PeerPool;
use crate::raft::{Group, Groups};
use crate::storage::Engine;

/// What every service of this node needs.
pub struct NodeState {
    /// The newest layout this node has adopted (see [`crate::membership::reconcile`]).
    layout: RwLock<Arc<Layout>>,
    /// The groups hosted here.
    pub groups: Groups,
    /// Input limits.
    pub limits: Limits,
    /// The node's storage, for reads of applied state.
    pub engine: Arc<Engine>,
    /// Connections to the other nodes' peer services.
    pub pool: PeerPool,
    /// Raft settings every group starts with.
    pub raft_timings: RaftTimings,
    /// Where groups keep their snapshot files.
    pub snapshot_dir: PathBuf,
    /// This node's advertised addresses (its listen addresses unless `--advertise-*` says
    /// otherwise), as the layout records them and as it describes itself to `strata node add`.
    pub client_addr: String,
    /// See `client_addr`.
    pub peer_addr: String,
    /// Serializes layout adoption (group starts and stops).
    pub adopting: tokio::sync::Mutex<()>,
    /// The placement driver's recent decisions (filled while this node leads the meta group).
    pub placement_events: EventLog,
    /// Set once the node has begun stopping its groups: peer requests are refused from then on.
    stopping: AtomicBool,
    /// Held for reading by every peer request being handled, and for writing by the stop, so
    /// the groups are shut down only after those requests were answered: a request cut off
    /// inside a stopping Raft instance only makes it log an error.
    peer_requests: tokio::sync::RwLock<()>,
}

/// Where a node stands with respect to the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Started with `--join`; waits for `strata node add`.
    Joining,
    /// Part of the cluster.
    Member,
    /// Was removed from the cluster; holds no replicas and can be stopped.
    Removed,
}

impl Membership {
    /// The name shown by status.
    pub fn name(self) -> &'static str {
        match self {
            Membership::Joining => "joining",
            Membership::Member => "member",
            Membership::Removed => "removed",
        }
    }
}

/// The parts of a [`NodeState`] fixed at start.
pub struct NodeParts {
    /// The layout to start with.
    pub layout: Layout,
    /// Input limits.
    pub limits: Limits,
    /// Storage.
    pub engine: Arc<Engine>,
    /// Peer connections; its identity holds the node id (0 = joining).
    pub pool: PeerPool,
    /// Raft settings.
    pub raft_timings: RaftTimings,
    /// Snapshot directory.
    pub snapshot_dir: PathBuf,
    /// Advertised client address.
    pub client_addr: String,
    /// Advertised peer address.
    pub peer_addr: String,
}

impl NodeState {
    /// A node state with no groups started yet.
    pub fn new(p: NodeParts) -> NodeState {
        NodeState {
            layout: RwLock::new(Arc::new(p.layout)),
            groups: Groups::default(),
            limits: p.limits,
            engine: p.engine,
            pool: p.pool,
            raft_timings: p.raft_timings,
            snapshot_dir: p.snapshot_dir,
            client_addr: p.client_addr,
            peer_addr: p.peer_addr,
            adopting: tokio::sync::Mutex::new(()),
            placement_events: EventLog::default(),
            stopping: AtomicBool::new(false),
            peer_requests: tokio::sync::RwLock::new(()),
        }
    }

    /// Hands `group`'s leadership to `to` if it can take over at once: heard from recently and
    /// nearly caught up (see [`Group::hand_over_leadership`]), and — asked over the peer port
    /// first — its disk is not slow: a new leader stores its vote before it leads, and the group
    /// would wait for that fsync. `Ok` when another node leads (or this one did not), else why
    /// not. For the moves the operator or the placement driver asks for.
    pub async fn hand_over_leadership(
        &self,
        group: &Group,
        to: u64,
        timeout: Duration,
    ) -> Result<(), String> {
        if group.is_leader() {
            let about = crate::membership::driver::ask(self, to)
                .await
                .map_err(|e| format!("node {to} did not answer: {e}"))?;
            if crate::membership::driver::disk_is_slow(&about) {
                return Err(format!(
                    "node {to}'s disk is slow (a WAL fsync took {} ms within the last 10 s): it is handed no leadership",
                    about.slowest_wal_sync_ms
                ));
            }
        }
        let fresh = self.raft_timings.successor_freshness();
        group.hand_over_leadership(to, fresh, timeout).await
    }

    /// Refuses peer requests from now on and waits up to `timeout` for those being handled to
    /// be answered; false if some were still running then.
    pub(crate) async fn stop_peer_requests(&self, timeout: Duration) -> bool {
        self.stopping.store(true, Ordering::Release);
        tokio::time::timeout(timeout, self.peer_requests.write())
            .await
            .is_ok()
    }

    /// Admits one peer request: a hold that keeps the groups from being shut down until it is
    /// dropped, or `None` once the node is stopping.
    pub(crate) async fn admit_peer_request(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        let hold = self.peer_requests.read().await;
        (!self.is_stopping()).then_some(hold)
    }

    /// Whether the node is stopping its groups (peer requests are refused from then on).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// This node's id (0 while joining).
    pub fn id(&self) -> u64 {
        self.pool.identity().id()
    }

    /// Records the id the cluster gave this node.
    pub(crate) fn set_id(&self, id: u64) {
        self.pool.identity().set_id(id);
    }

    /// The layout this node routes with.
    pub fn layout(&self) -> Arc<Layout> {
        self.layout.read().expect("layout poisoned").clone()
    }

    /// Replaces the layout (adoption only).
    pub(crate) fn set_layout(&self, layout: Arc<Layout>) {
        *self.layout.write().expect("layout poisoned") = layout;
    }

    /// Where this node stands.
    pub fn membership(&self) -> Membership {
        let layout = self.layout();
        if layout.epoch == 0 {
            Membership::Joining
        } else if layout.node(self.id()).is_none() {
            Membership::Removed
        } else {
            Membership::Member
        }
    }

    /// The layout, or `Unavailable` when this node has none (still joining).
    pub fn member_layout(&self) -> Result<Arc<Layout>, KvError> {
        let layout = self.layout();
        if layout.shards.is_empty() {
            return Err(KvError::Unavailable {
                shard: 0,
                reason: format!(
                    "this node is {} and serves no data",
                    self.membership().name()
                ),
            });
        }
        Ok(layout)
    }

    /// The hosted group `shard`, or `WrongShard` when this node has no replica of it.
    pub fn group(&self, shard: GroupId) -> Result<Arc<Group>, KvError> {
        self.groups.get(shard).ok_or_else(|| KvError::WrongShard {
            shard,
            epoch: self.layout().epoch,
        })
    }

    /// A `NotLeader` error with the client address of `leader`, when known.
    pub fn not_leader(&self, shard: GroupId, leader: Option<u64>) -> KvError {
        let layout = self.layout();
        let leader = leader.and_then(|id| layout.node(id).map(|n| (id, n.client_addr.clone())));
        KvError::NotLeader { shard, leader }
    }
}
