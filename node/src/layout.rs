//! The cluster layout: which nodes exist, which shards exist, which slots each shard owns and which
//! nodes replicate it. A node computes the initial layout once, at bootstrap, from the
//! `--initial-cluster` list, stores it in its data directory, and writes it into the meta group;
//! every later start reads it back, so restarts never depend on flags.

use serde::{Deserialize, Serialize};
use strata_proto::keyspace::{slot_of, slot_ranges};

/// Raft group id. `META_GROUP` is the meta group; shards are `1..=shards`.
pub type GroupId = u64;

/// The meta group's id.
pub const META_GROUP: GroupId = 0;

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
    /// Nodes holding a replica; the first is the preferred leader.
    pub replicas: Vec<u64>,
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
            })
            .collect();
        let meta_replicas = nodes.iter().take(META_REPLICAS).map(|n| n.id).collect();
        Layout {
            epoch: 1,
            nodes,
            shards,
            meta_replicas,
        }
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

    /// Replicas of group `group` (the meta group or a shard).
    pub fn replicas(&self, group: GroupId) -> Option<&[u64]> {
        if group == META_GROUP {
            Some(&self.meta_replicas)
        } else {
            self.shard(group).map(|s| s.replicas.as_slice())
        }
    }

    /// Every group with a replica on `node`, meta group first.
    pub fn groups_on(&self, node: u64) -> Vec<GroupId> {
        let meta = self.meta_replicas.contains(&node).then_some(META_GROUP);
        meta.into_iter()
            .chain(
                self.shards
                    .iter()
                    .filter(|s| s.replicas.contains(&node))
                    .map(|s| s.id),
            )
            .collect()
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
            })
            .collect()
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
}
