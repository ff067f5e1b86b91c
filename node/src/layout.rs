//! The cluster layout: which nodes exist, which shards exist, which slots each shard owns, which
//! nodes replicate it, and which replica move is under way. The meta group holds the
//! authoritative copy (written by bootstrap and then only by the placement driver); every node
//! keeps the newest copy it has seen in its data directory, so restarts never depend on flags.

use serde::{Deserialize, Serialize};
use strata_proto::keyspace::{slot_of, slot_ranges};

/// Raft group id. `META_GROUP` is the meta group; shards are `1..=shards`.
pub type GroupId = u64;

/// The meta group's id.
pub const META_GROUP: GroupId = 0;

/// How logs and messages name a group: "shard N", or "meta group".
pub fn group_name(group: GroupId) -> String {
    if group == META_GROUP {
        "meta group".into()
    } else {
        format!("shard {group}")
    }
}

/// Meta group size cap: the meta group lives on at most this many nodes.
const META_REPLICAS: usize = 3;

/// One node's identity and addresses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Node id, > 0, never reused.
    pub id: u64,
    /// Client API address (`Kv`, `Cluster`).
    pub client_addr: String,
    /// Peer (Raft transport) address.
    pub peer_addr: String,
    /// Whether the node takes replicas or is being drained for removal.
    #[serde(default)]
    pub phase: NodePhase,
    /// The incarnation of the node's data directory when it was added (`raft::identity`); 0 for
    /// the nodes of the initial cluster. A joining node finds itself in the layout by it, not
    /// by its addresses, which a node it replaces may share.
    #[serde(default)]
    pub incarnation: u64,
}

/// A node's place in the cluster's life cycle.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodePhase {
    /// Holds replicas and receives new ones.
    #[default]
    Active,
    /// `strata node remove` was asked: its replicas and leaderships move away, then it leaves.
    Draining,
}

impl NodePhase {
    /// The lower-case name shown by status.
    pub fn name(self) -> &'static str {
        match self {
            NodePhase::Active => "active",
            NodePhase::Draining => "draining",
        }
    }
}

/// A replica move owned by the placement driver: `to` gets a replica, then `from` (if any) loses
/// its replica, in one joint-consensus change.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    /// The replica that leaves (`None`: a replica is only added).
    pub from: Option<u64>,
    /// The node that receives a replica.
    pub to: u64,
}

/// One shard: a Raft group owning a contiguous slot range.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ShardSpec {
    /// The shard's Raft group id (1-based).
    pub id: GroupId,
    /// First slot owned.
    pub slot_start: u32,
    /// One past the last slot owned.
    pub slot_end: u32,
    /// Nodes holding a voting replica.
    pub replicas: Vec<u64>,
    /// The replica move under way, if any.
    #[serde(default)]
    pub moving: Option<Move>,
}

/// The whole cluster layout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Increases on every layout change; clients and nodes compare epochs to detect stale maps.
    pub epoch: u64,
    /// Every node of the cluster.
    pub nodes: Vec<NodeSpec>,
    /// Every shard, ordered by slot range.
    pub shards: Vec<ShardSpec>,
    /// Nodes of the meta group.
    pub meta_replicas: Vec<u64>,
    /// The meta-group replica move under way, if any.
    #[serde(default)]
    pub meta_moving: Option<Move>,
    /// Target number of replicas per shard.
    #[serde(default)]
    pub replication: usize,
    /// Every id below this one has been given out; ids are never reused.
    #[serde(default)]
    pub next_node_id: u64,
}

impl Layout {
    /// The bootstrap layout: `shards` shards of `min(replication, nodes)` replicas, placed
    /// round-robin so that replicas and preferred leaders spread evenly over the nodes.
    pub fn initial(mut nodes: Vec<NodeSpec>, shards: u32, replication: usize) -> Layout {
        nodes.sort_by_key(|n| n.id);
        let n = nodes.len();
        let r = replication.min(n).max(1);
        let shards = slot_ranges(shards)
            .into_iter()
            .enumerate()
            .map(|(i, (slot_start, slot_end))| ShardSpec {
                id: i as GroupId + 1,
                slot_start,
                slot_end,
                replicas: (0..r).map(|j| nodes[(i + j) % n].id).collect(),
                moving: None,
            })
            .collect();
        let meta_replicas = nodes.iter().take(META_REPLICAS).map(|n| n.id).collect();
        let next_node_id = nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        Layout {
            epoch: 1,
            nodes,
            shards,
            meta_replicas,
            meta_moving: None,
            replication: r,
            next_node_id,
        }
    }

    /// The layout of a node that has not joined a cluster yet (epoch 0: every real layout is
    /// newer).
    pub fn empty() -> Layout {
        Layout {
            epoch: 0,
            nodes: Vec::new(),
            shards: Vec::new(),
            meta_replicas: Vec::new(),
            meta_moving: None,
            replication: 0,
            next_node_id: 1,
        }
    }

    /// Target replicas per shard (layouts written before the field existed: the largest shard).
    pub fn replication(&self) -> usize {
        if self.replication > 0 {
            return self.replication;
        }
        self.shards
            .iter()
            .map(|s| s.replicas.len())
            .max()
            .unwrap_or(1)
    }

    /// The id the next added node gets unless it asks for a larger one.
    pub fn next_free_id(&self) -> u64 {
        let max = self.nodes.iter().map(|n| n.id).max().unwrap_or(0);
        self.next_node_id.max(max + 1)
    }

    /// The node added with data directory `incarnation` (never one of the initial cluster).
    pub fn node_with_incarnation(&self, incarnation: u64) -> Option<&NodeSpec> {
        self.nodes
            .iter()
            .find(|n| n.incarnation != 0 && n.incarnation == incarnation)
    }

    /// The meta group's target size: up to 3 active nodes.
    pub fn meta_target(&self) -> usize {
        self.active_nodes().count().min(META_REPLICAS)
    }

    /// Nodes that take replicas.
    pub fn active_nodes(&self) -> impl Iterator<Item = &NodeSpec> {
        self.nodes.iter().filter(|n| n.phase == NodePhase::Active)
    }

    /// Every group id: the meta group, then the shards.
    pub fn group_ids(&self) -> impl Iterator<Item = GroupId> + '_ {
        std::iter::once(META_GROUP).chain(self.shards.iter().map(|s| s.id))
    }

    /// The move under way in `group`, if any.
    pub fn moving(&self, group: GroupId) -> Option<Move> {
        if group == META_GROUP {
            self.meta_moving
        } else {
            self.shard(group).and_then(|s| s.moving)
        }
    }

    /// Sets the move under way in `group`.
    pub fn set_moving(&mut self, group: GroupId, mv: Option<Move>) {
        if group == META_GROUP {
            self.meta_moving = mv;
        } else if let Some(s) = self.shards.iter_mut().find(|s| s.id == group) {
            s.moving = mv;
        }
    }

    /// Completes the move under way in `group`: `to` replaces `from` in the replica list.
    pub fn finish_move(&mut self, group: GroupId) {
        let Some(mv) = self.moving(group) else {
            return;
        };
        let replicas = if group == META_GROUP {
            &mut self.meta_replicas
        } else {
            match self.shards.iter_mut().find(|s| s.id == group) {
                Some(s) => &mut s.replicas,
                None => return,
            }
        };
        *replicas = mv.voters_after(replicas);
        self.set_moving(group, None);
    }

    /// The shard that owns `key`.
    pub fn shard_for_key(&self, key: &[u8]) -> &ShardSpec {
        let slot = slot_of(key);
        let i = self.shards.partition_point(|s| s.slot_end <= slot);
        &self.shards[i]
    }

    /// The shard with group id `id`, if any.
    pub fn shard(&self, id: GroupId) -> Option<&ShardSpec> {
        self.shards.iter().find(|s| s.id == id)
    }

    /// The node with id `id`, if any.
    pub fn node(&self, id: u64) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The node with id `id`, if any, to edit.
    pub fn node_mut(&mut self, id: u64) -> Option<&mut NodeSpec> {
        self.nodes.iter_mut().find(|n| n.id == id)
    }

    /// Checks that node `id` runs at the addresses the layout records for it, the ones its
    /// peers and clients dial; if not, says which differ ("its peer address is recorded as …,
    /// not …"). A node the layout does not list passes (it was removed).
    pub fn check_recorded_addresses(
        &self,
        id: u64,
        client_addr: &str,
        peer_addr: &str,
    ) -> Result<(), String> {
        let Some(recorded) = self.node(id) else {
            return Ok(());
        };
        let differences: Vec<String> = [
            ("client", &recorded.client_addr, client_addr),
            ("peer", &recorded.peer_addr, peer_addr),
        ]
        .into_iter()
        .filter(|(_, recorded, given)| recorded.as_str() != *given)
        .map(|(kind, recorded, given)| {
            format!("its {kind} address is recorded as {recorded}, not {given}")
        })
        .collect();
        if differences.is_empty() {
            Ok(())
        } else {
            Err(differences.join("; "))
        }
    }

    /// Replicas of group `group` (the meta group or a shard).
    pub fn replicas(&self, group: GroupId) -> Option<&[u64]> {
        if group == META_GROUP {
            Some(&self.meta_replicas)
        } else {
            self.shard(group).map(|s| s.replicas.as_slice())
        }
    }

    /// Every group `node` must host, meta group first: those it replicates, plus those it is
    /// receiving a replica of.
    pub fn groups_on(&self, node: u64) -> Vec<GroupId> {
        self.group_ids()
            .filter(|g| {
                let replica = self.replicas(*g).is_some_and(|r| r.contains(&node));
                replica || self.moving(*g).is_some_and(|m| m.to == node)
            })
            .collect()
    }

    /// Voting replicas of shards on `node` (the meta group not counted).
    pub fn shard_count_on(&self, node: u64) -> usize {
        self.shards
            .iter()
            .filter(|s| s.replicas.contains(&node))
            .count()
    }
}

impl Move {
    /// The voter set after the move, keeping the order of `voters` (`to` takes `from`'s place).
    pub fn voters_after(&self, voters: &[u64]) -> Vec<u64> {
        let mut out: Vec<u64> = voters
            .iter()
            .map(|v| if Some(*v) == self.from { self.to } else { *v })
            .collect();
        if !out.contains(&self.to) {
            out.push(self.to);
        }
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: u64) -> Vec<NodeSpec> {
        (1..=n)
            .map(|id| NodeSpec {
                id,
                client_addr: format!("127.0.0.1:{}", 7100 + id),
                peer_addr: format!("127.0.0.1:{}", 7200 + id),
                phase: NodePhase::Active,
                incarnation: 0,
            })
            .collect()
    }

    #[test]
    fn a_node_must_start_at_its_recorded_addresses() {
        let l = Layout::initial(nodes(3), 8, 3);
        assert_eq!(
            l.check_recorded_addresses(2, "127.0.0.1:7102", "127.0.0.1:7202"),
            Ok(())
        );
        // Not listed any more: removed, nothing to check.
        assert_eq!(l.check_recorded_addresses(9, "a:1", "b:2"), Ok(()));
        let err = l
            .check_recorded_addresses(2, "127.0.0.1:7102", "127.0.0.1:9202")
            .unwrap_err();
        assert!(
            err.contains("its peer address is recorded as 127.0.0.1:7202, not 127.0.0.1:9202"),
            "{err}"
        );
        assert!(!err.contains("client address"), "{err}");
        let err = l
            .check_recorded_addresses(2, "h:7102", "127.0.0.1:9202")
            .unwrap_err();
        assert!(err.contains("client address is recorded as 127.0.0.1:7102, not h:7102"));
    }

    #[test]
    fn initial_layout_spreads_replicas_and_leaders_evenly() {
        let l = Layout::initial(nodes(3), 8, 3);
        assert_eq!(l.shards.len(), 8);
        for s in &l.shards {
            assert_eq!(s.replicas.len(), 3);
        }
        let mut leaders = [0; 3];
        for s in &l.shards {
            leaders[s.replicas[0] as usize - 1] += 1;
        }
        assert_eq!(
            leaders.iter().max().unwrap() - leaders.iter().min().unwrap(),
            1
        );
        assert_eq!(l.meta_replicas, vec![1, 2, 3]);
    }

    #[test]
    fn replication_is_capped_by_node_count() {
        let l = Layout::initial(nodes(2), 4, 3);
        assert!(l.shards.iter().all(|s| s.replicas.len() == 2));
        let l = Layout::initial(nodes(5), 10, 3);
        assert!(l.shards.iter().all(|s| s.replicas.len() == 3));
        assert_eq!(l.meta_replicas.len(), 3);
        // With 5 nodes every node carries 6 of the 30 replicas.
        for n in 1..=5 {
            let c = l.shards.iter().filter(|s| s.replicas.contains(&n)).count();
            assert_eq!(c, 6, "node {n}");
        }
    }

    #[test]
    fn routing_follows_slot_ranges() {
        let l = Layout::initial(nodes(3), 8, 3);
        for key in [&b"a"[..], b"user:1", b"{user:42}:cart", b"zzzz", b""] {
            let slot = slot_of(key);
            let s = l.shard_for_key(key);
            assert!(s.slot_start <= slot && slot < s.slot_end, "{key:?}");
        }
        assert_eq!(l.shard_for_key(b"{u}:a").id, l.shard_for_key(b"{u}:b").id);
        assert_eq!(l.groups_on(1)[0], META_GROUP);
        assert!(l.shard(9).is_none());
    }

    #[test]
    fn a_move_replaces_one_replica_and_is_hosted_by_its_target_meanwhile() {
        let mut l = Layout::initial(nodes(4), 4, 3);
        let s = l.shards[0].clone();
        assert_eq!(s.replicas, vec![1, 2, 3]);
        assert!(!l.groups_on(4).contains(&s.id));
        l.set_moving(
            s.id,
            Some(Move {
                from: Some(2),
                to: 4,
            }),
        );
        assert!(l.groups_on(4).contains(&s.id), "target hosts the group");
        assert!(l.groups_on(2).contains(&s.id), "source keeps it until done");
        l.finish_move(s.id);
        assert_eq!(l.shard(s.id).unwrap().replicas, vec![1, 4, 3]);
        assert!(l.shard(s.id).unwrap().moving.is_none());
        assert!(!l.groups_on(2).contains(&s.id));
        // Adding only.
        l.set_moving(META_GROUP, Some(Move { from: None, to: 4 }));
        l.finish_move(META_GROUP);
        assert_eq!(l.meta_replicas, vec![1, 2, 3, 4]);
    }

    #[test]
    fn old_layouts_without_new_fields_still_parse() {
        let json = r#"{"epoch":3,"nodes":[{"id":1,"client_addr":"a","peer_addr":"b"}],
            "shards":[{"id":1,"slot_start":0,"slot_end":4096,"replicas":[1]}],"meta_replicas":[1]}"#;
        let l: Layout = serde_json::from_str(json).unwrap();
        assert_eq!(l.replication(), 1);
        assert_eq!(l.nodes[0].phase, NodePhase::Active);
    }
}
