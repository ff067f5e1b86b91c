//! The client's routing state: the shard map (from any node's `Cluster.GetShardMap`) and which
//! node leads each shard, learned from replies and `NotLeader` hints.

use std::collections::HashMap;

use strata_proto::keyspace::slot_of;
use strata_proto::v1::ShardMap;

/// The cached shard map in the form routing needs.
#[derive(Debug, Clone)]
pub struct RouteTable {
    /// Epoch of the map.
    pub epoch: u64,
    /// Shards ordered by slot range.
    pub shards: Vec<ShardRoute>,
    /// Client address of every node.
    pub nodes: HashMap<u64, String>,
}

/// One shard's routing entry.
#[derive(Debug, Clone)]
pub struct ShardRoute {
    /// Shard id.
    pub id: u64,
    /// First slot.
    pub slot_start: u32,
    /// One past the last slot.
    pub slot_end: u32,
    /// Nodes with a replica.
    pub replicas: Vec<u64>,
    /// Leader reported with the map (0 = unknown).
    pub leader: u64,
}

impl RouteTable {
    /// Builds a table from a wire map, rejecting maps that do not cover every slot.
    pub fn from_map(map: ShardMap) -> Result<RouteTable, String> {
        let mut shards: Vec<ShardRoute> = map
            .shards
            .into_iter()
            .map(|s| ShardRoute {
                id: s.id,
                slot_start: s.slot_start,
                slot_end: s.slot_end,
                replicas: s.replicas,
                leader: s.leader,
            })
            .collect();
        shards.sort_by_key(|s| s.slot_start);
        let mut next = 0;
        for s in &shards {
            if s.slot_start != next || s.slot_end <= s.slot_start || s.replicas.is_empty() {
                return Err(format!(
                    "shard map epoch {} is malformed at shard {}",
                    map.epoch, s.id
                ));
            }
            next = s.slot_end;
        }
        if next != map.slot_count || shards.is_empty() {
            return Err(format!(
                "shard map epoch {} does not cover every slot",
                map.epoch
            ));
        }
        Ok(RouteTable {
            epoch: map.epoch,
            shards,
            nodes: map
                .nodes
                .into_iter()
                .map(|n| (n.id, n.client_addr))
                .collect(),
        })
    }

    /// The shard owning `key`.
    pub fn shard_for_key(&self, key: &[u8]) -> &ShardRoute {
        let slot = slot_of(key);
        let i = self.shards.partition_point(|s| s.slot_end <= slot);
        &self.shards[i.min(self.shards.len() - 1)]
    }

    /// The shard with id `id`.
    pub fn shard(&self, id: u64) -> Option<&ShardRoute> {
        self.shards.iter().find(|s| s.id == id)
    }
}

/// Which node leads which shard, as last learned.
#[derive(Debug, Default)]
pub struct LeaderCache {
    leaders: HashMap<u64, u64>,
}

impl LeaderCache {
    /// The cached leader of `shard`.
    pub fn get(&self, shard: u64) -> Option<u64> {
        self.leaders.get(&shard).copied()
    }

    /// Records `node` as the leader of `shard`.
    pub fn set(&mut self, shard: u64, node: u64) {
        self.leaders.insert(shard, node);
    }

    /// Forgets the leader of `shard`.
    pub fn forget(&mut self, shard: u64) {
        self.leaders.remove(&shard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_proto::v1::{NodeInfo, ShardInfo};

    fn map(ranges: &[(u32, u32)]) -> ShardMap {
        ShardMap {
            epoch: 1,
            slot_count: 4096,
            nodes: vec![NodeInfo {
                id: 1,
                client_addr: "a".into(),
                peer_addr: "b".into(),
            }],
            shards: ranges
                .iter()
                .enumerate()
                .map(|(i, (s, e))| ShardInfo {
                    id: i as u64 + 1,
                    slot_start: *s,
                    slot_end: *e,
                    replicas: vec![1],
                    leader: 0,
                })
                .collect(),
            meta_replicas: vec![1],
        }
    }

    #[test]
    fn routes_keys_by_slot_and_rejects_gaps() {
        let t = RouteTable::from_map(map(&[(0, 2048), (2048, 4096)])).unwrap();
        for key in [&b"a"[..], b"b", b"{x}:1", b"zz"] {
            let s = t.shard_for_key(key);
            let slot = slot_of(key);
            assert!(s.slot_start <= slot && slot < s.slot_end);
        }
        assert!(RouteTable::from_map(map(&[(0, 2000), (2048, 4096)])).is_err());
        assert!(RouteTable::from_map(map(&[(0, 2048)])).is_err());
    }
}
