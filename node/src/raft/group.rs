//! One Raft group on this node, and the registry of all of them.
//!
//! [`Group`] is the only surface the services use: write a command, linearize a read, ask who
//! leads, report status. It also classifies openraft's errors into the three write outcomes:
//! rejected before proposing (definitely not applied), applied, or unknown.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::stop_reason::StopReason;
use openraft::error::{ClientWriteError, Fatal, RaftError};
use openraft::raft::linearizable_read::LinearizerOption;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use openraft::{BasicNode, ChangeMembers, Config, ReadPolicy, ServerState, SnapshotPolicy};
use openraft_multi::GroupNetworkFactory;
use strata_proto::v1::GroupStatus;

use super::network::{NetworkFactory, PeerPool};
use super::read_batch::{linearize_once, ReadBatcher};
use super::types::{Command, Outcome, TypeConfig};
use crate::config::RaftTimings;
use crate::layout::{group_name, GroupId, NodeSpec};
use crate::storage::install::Installs;
use crate::storage::log_store::VoteInFlight;
use crate::storage::{Engine, LogStore, StateMachine};

/// Longest wait for one membership change (joint + final configuration) to commit.
const MEMBERSHIP_CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The openraft instance of one group.
pub type StrataRaft = openraft::Raft<TypeConfig, StateMachine>;

/// Why a write did not return an outcome.
#[derive(Debug)]
pub enum WriteError {
    /// Rejected before proposing: this node is not the leader (hint: leader id).
    NotLeader(Option<u64>),
    /// Proposed, fate unknown.
    Unknown(String),
}

/// Why a linearizable read could not be served.
#[derive(Debug, Clone)]
pub enum ReadError {
    /// This node is not the leader (hint: leader id).
    NotLeader(Option<u64>),
    /// Leadership could not be confirmed (no quorum, shutting down).
    Unavailable(String),
}

/// One Raft group hosted on this node.
pub struct Group {
    /// The group id (0 = meta group, shards 1..).
    pub id: GroupId,
    raft: StrataRaft,
    /// Shares ReadIndex rounds between concurrent linearizable reads.
    reads: Arc<ReadBatcher>,
    /// Snapshot installs (the state machine makes them; reads must not overlap one).
    snapshot_installs: Arc<Installs>,
    /// The oldest quorum acknowledgement a `LEASE` read may rely on
    /// ([`RaftTimings::lease_read_age`]).
    lease_read_age: Duration,
    /// Whom this node is voting for while the vote is being stored (shared with the log store).
    vote_in_flight: VoteInFlight,
}

/// Openraft settings for every group, sized for a busy 2-core machine.
fn raft_config(t: &RaftTimings) -> anyhow::Result<Arc<Config>> {
    let config = Config {
        cluster_name: "strata".into(),
        heartbeat_interval: t.heartbeat.as_millis() as u64,
        election_timeout_min: t.election_min.as_millis() as u64,
        election_timeout_max: t.election_max.as_millis() as u64,
        enable_pre_vote: Some(true),
        // A leader restarted with its committed vote must not resume leading without an
        // election. Applies are not synced (the log is the durable record) and the commit index
        // is not stored, so after a crash its state machine can be behind writes it had already
        // acknowledged; a restored leader's read index is its old term's first entry, which that
        // stale state machine already covers, so it would serve those writes' old values. A new
        // election appends a new no-op, and reads wait until it is applied.
        enable_leader_restore: Some(false),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_logs),
        // Entries kept behind a snapshot so a briefly lagging follower catches up from the log
        // rather than by a full snapshot.
        max_in_snapshot_log_to_keep: (t.snapshot_logs / 4).min(1000),
        purge_batch_size: (t.snapshot_logs / 4).clamp(1, 256),
        // Entries per AppendEntries: with values up to 1 MiB this bounds a message to what the
        // peer transport accepts (see `server::PEER_MESSAGE_BYTES`).
        max_payload_entries: 128,
        // A snapshot transfer gets a minute plus time in proportion to its size (see
        // `network`): small timeouts cause endless retries.
        install_snapshot_timeout: 60_000,
        ..Default::default()
    };
    Ok(Arc::new(config.validate()?))
}

impl Group {
    /// Opens the group's storage and starts its Raft instance.
    pub async fn start(
        id: GroupId,
        node_id: u64,
        engine: Arc<Engine>,
        pool: PeerPool,
        timings: &RaftTimings,
        snapshot_dir: PathBuf,
    ) -> anyhow::Result<Group> {
        let log = LogStore::new(engine.clone(), id);
        let vote_in_flight = log.vote_in_flight();
        let sm = StateMachine::open(engine, id, snapshot_dir)?;
        let snapshot_installs = sm.installs();
        let network: NetworkFactory = GroupNetworkFactory::new(pool, id);
        let raft = StrataRaft::new(node_id, raft_config(timings)?, network, log, sm).await?;
        let reads = ReadBatcher::new(raft.clone());
        Ok(Group {
            id,
            raft,
            reads,
            snapshot_installs,
            lease_read_age: timings.lease_read_age(),
            vote_in_flight,
        })
    }

    /// Forms the group with `members` as voters. Called once, at bootstrap, on one member.
    pub async fn initialize(&self, members: &[&NodeSpec]) -> anyhow::Result<()> {
        let nodes: std::collections::BTreeMap<u64, BasicNode> = members
            .iter()
            .map(|n| (n.id, BasicNode::new(&n.peer_addr)))
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(e)) => {
                // Already initialized (a restart during bootstrap): nothing to do.
                tracing::info!(group = self.id, "initialize skipped: {e}");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The openraft handle, for the peer transport.
    pub fn raft(&self) -> &StrataRaft {
        &self.raft
    }

    /// Whether this node currently leads the group: openraft says so, and it is not storing a
    /// vote for another node (see [`VoteInFlight`]).
    pub fn is_leader(&self) -> bool {
        self.raft.is_leader() && self.voting_for_another().is_none()
    }

    /// The leader this node knows of: the node it is voting for while that vote is stored, else
    /// openraft's.
    pub fn leader(&self) -> Option<u64> {
        self.voting_for_another()
            .or_else(|| self.raft.metrics().borrow_watched().current_leader)
    }

    /// The other node named by the vote being stored, if any.
    fn voting_for_another(&self) -> Option<u64> {
        let me = *self.raft.node_id();
        self.vote_in_flight.node().filter(|n| *n != me)
    }

    /// Proposes `cmd` and waits for its outcome.
    pub async fn write(&self, cmd: Command) -> Result<Outcome, WriteError> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok(resp.data),
            // Rejected before its entry was appended: definitely not applied.
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader(f.leader_id))
            }
            // Appended, then discarded locally — but another leader may still commit it.
            Err(RaftError::APIError(e)) => Err(WriteError::Unknown(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(WriteError::Unknown(e.to_string())),
        }
    }

    /// Waits until this node may serve a linearizable read: leadership confirmed (ReadIndex or
    /// lease) and the state machine applied up to the read index.
    /// ReadIndex reads of concurrent callers share one quorum round (see [`ReadBatcher`]). A
    /// lease read relies on a quorum acknowledgement at most [`RaftTimings::lease_read_age`] old;
    /// when there is none, the leader sends heartbeats at once and the read waits for their
    /// acknowledgement, as a ReadIndex read would, instead of failing.
    pub async fn linearize(&self, policy: ReadPolicy) -> Result<(), ReadError> {
        match policy {
            ReadPolicy::ReadIndex => self.reads.linearize().await,
            ReadPolicy::LeaseRead => {
                let lease = LinearizerOption::new(Some(self.lease_read_age), true);
                linearize_once(&self.raft, lease).await
            }
        }
    }

    /// Runs `read` on this replica's applied state and returns its result, or why not (retryable):
    /// while a snapshot install replaces the data, a read could see part of the old state and part
    /// of the new.
    pub fn read_applied<T>(&self, read: impl FnOnce() -> T) -> Result<T, String> {
        self.snapshot_installs.read(read).map_err(String::from)
    }

    /// The group's state as this node sees it.
    pub fn status(&self) -> GroupStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        GroupStatus {
            group_id: self.id,
            role: role.into(),
            term: m.current_term,
            leader: m.current_leader.unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index()),
            snapshot_index: m.snapshot.map_or(0, |l| l.index()),
            purged_index: m.purged.map_or(0, |l| l.index()),
            snapshots_installed: self.snapshot_installs.completed(),
            voters: m.membership_config.membership().voter_ids().collect(),
        }
    }

    /// Waits up to `timeout` for the group to know a leader.
    pub async fn wait_for_leader(&self, timeout: Duration) -> bool {
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "leader known")
            .await
            .is_ok()
    }

    /// Makes the voters exactly `voters`, on the leader: each new node is added as a learner and
    /// given up to `catch_up` to receive the log (or a snapshot), then one membership change
    /// replaces the voter set (openraft proposes the joint configuration, then the final one);
    /// finally learners that are not voters are dropped. Idempotent: a repeated call after a
    /// partial run finishes the job.
    pub async fn set_voters(&self, voters: &[NodeSpec], catch_up: Duration) -> Result<(), String> {
        if !self.is_leader() {
            return Err(format!(
                "node {} does not lead group {}",
                self.raft.node_id(),
                self.id
            ));
        }
        let want: BTreeSet<u64> = voters.iter().map(|n| n.id).collect();
        let membership = || {
            self.raft
                .metrics()
                .borrow_watched()
                .membership_config
                .clone()
        };
        let known: BTreeSet<u64> = membership().nodes().map(|(id, _)| *id).collect();
        for n in voters.iter().filter(|n| !known.contains(&n.id)) {
            let add = self
                .raft
                .add_learner(n.id, BasicNode::new(&n.peer_addr), true);
            tokio::time::timeout(catch_up, add)
                .await
                .map_err(|_| format!("node {} did not catch up within {catch_up:?}", n.id))?
                .map_err(|e| format!("add node {} as learner: {e}", n.id))?;
        }
        let m = membership();
        let voters_now: BTreeSet<u64> = m.membership().voter_ids().collect();
        let joint = m.membership().get_joint_config().len() > 1;
        if voters_now != want || joint {
            let change = self
                .raft
                .change_membership(ChangeMembers::ReplaceAllVoters(want.clone()), false);
            tokio::time::timeout(MEMBERSHIP_CHANGE_TIMEOUT, change)
                .await
                .map_err(|_| "membership change did not commit in time".to_string())?
                .map_err(|e| format!("change voters to {want:?}: {e}"))?;
        }
        let extra: BTreeSet<u64> = membership()
            .membership()
            .learner_ids()
            .filter(|l| !want.contains(l))
            .collect();
        if !extra.is_empty() {
            let change = self
                .raft
                .change_membership(ChangeMembers::RemoveNodes(extra.clone()), false);
            tokio::time::timeout(MEMBERSHIP_CHANGE_TIMEOUT, change)
                .await
                .map_err(|_| "learner removal did not commit in time".to_string())?
                .map_err(|e| format!("remove learners {extra:?}: {e}"))?;
        }
        Ok(())
    }

    /// Builds a snapshot now (openraft then purges the log behind it) and waits up to `timeout`
    /// for it; returns the last index it covers.
    pub async fn snapshot_now(&self, timeout: Duration) -> Result<u64, String> {
        let applied = self
            .raft
            .metrics()
            .borrow_watched()
            .last_applied
            .map_or(0, |l| l.index());
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| e.to_string())?;
        let m = self
            .raft
            .wait(Some(timeout))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index() >= applied),
                "snapshot built",
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(m.snapshot.map_or(0, |s| s.index()))
    }

    /// Stops the Raft instance.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(group = self.id, "raft shutdown: {e}");
        }
    }
}

/// Every group hosted on this node, by id.
#[derive(Default)]
pub struct Groups {
    /// A `std` lock: held only to clone an `Arc`, never across an await.
    map: RwLock<HashMap<GroupId, Arc<Group>>>,
    /// Why the first group to fail stopped (see [`Groups::failed`]).
    failure: StopReason,
}

impl Groups {
    /// Registers a started group and starts watching it for a failure.
    pub fn insert(&self, group: Group) -> Arc<Group> {
        let g = Arc::new(group);
        self.map
            .write()
            .expect("groups poisoned")
            .insert(g.id, g.clone());
        tokio::spawn(report_failure(g.id, g.raft.metrics(), self.failure.clone()));
        g
    }

    /// Resolves once a hosted group's Raft instance has stopped on its own — a storage error
    /// (a full disk, a failing device) or a panic — with a one-line reason. Such a group no
    /// longer votes, appends or applies, yet its node would go on answering clients, peers and
    /// the placement driver's survey as if it were fine; the node stops instead (fail-stop, as
    /// etcd and TiKV do), so that the cluster routes around it and the operator sees it down.
    pub async fn failed(&self) -> String {
        self.failure.wait().await
    }

    /// Unregisters group `id` (the caller shuts it down).
    pub fn remove(&self, id: GroupId) -> Option<Arc<Group>> {
        self.map.write().expect("groups poisoned").remove(&id)
    }

    /// The group `id`, if hosted here.
    pub fn get(&self, id: GroupId) -> Option<Arc<Group>> {
        self.map.read().expect("groups poisoned").get(&id).cloned()
    }

    /// All hosted groups, ordered by id.
    pub fn all(&self) -> Vec<Arc<Group>> {
        let mut v: Vec<_> = self
            .map
            .read()
            .expect("groups poisoned")
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|g| g.id);
        v
    }
}

/// Watches group `id`'s metrics until its Raft instance stops; a stop other than a requested
/// shutdown is recorded in `failure` (the first one wins).
async fn report_failure(
    id: GroupId,
    mut metrics: openraft::type_config::alias::WatchReceiverOf<
        TypeConfig,
        openraft::RaftMetrics<TypeConfig>,
    >,
    failure: StopReason,
) {
    loop {
        let state = metrics.borrow_watched().running_state.clone();
        match state {
            Ok(()) => {}
            Err(Fatal::Stopped) => return,
            Err(_) if crate::planted::active(crate::planted::Bug::NoFailStop) => return,
            Err(e) => {
                let why = format!("the Raft group of {} stopped: {e}", group_name(id));
                failure.report(why);
                return;
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
