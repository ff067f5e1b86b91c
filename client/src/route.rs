//! The client's routing state: the shard map (from any node's `Cluster.GetShardMap`) and which
//! node leads each shard, learned from replies and `NotLeader` hints.

use std::collections::HashMap;
use std::time::{Duration, Instant};

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
    /// Nodes of the meta group (they serve membership requests).
    pub meta_replicas: Vec<u64>,
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
            meta_replicas: map.meta_replicas,
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

/// How long a node that failed at the transport level is avoided.
const SUSPECT_FOR: Duration = Duration::from_secs(1);

/// Which node leads which shard, as last learned, and which nodes just failed to answer.
#[derive(Debug, Default)]
pub struct LeaderCache {
    leaders: HashMap<u64, u64>,
    /// Nodes whose connection failed or timed out, and when. During a failover, followers keep
    /// naming the dead leader until they elect a new one; avoiding it for a moment sends the
    /// retries to live replicas instead.
    suspects: HashMap<u64, Instant>,
}

impl LeaderCache {
    /// The cached leader of `shard`.
    pub fn get(&self, shard: u64) -> Option<u64> {
        self.leaders.get(&shard).copied()
    }

    /// Records `node` as the leader of `shard`, unless the node just failed to answer.
    pub fn set(&mut self, shard: u64, node: u64) {
        if !self.is_suspect(node) {
            self.leaders.insert(shard, node);
        }
    }

    /// Follows a `NotLeader` answer from node `from` for `shard` naming `hint` as its leader.
    /// Returns whether the hint is worth trying at once: it names another node that has not just
    /// failed. Otherwise the shard's leader is forgotten and the caller backs off before the next
    /// try — retrying at once would only ask the same replicas again, and during a failover they
    /// keep naming the dead leader until they elect a new one.
    pub fn follow_hint(&mut self, shard: u64, from: u64, hint: Option<u64>) -> bool {
        match hint {
            Some(l) if l != from && !self.is_suspect(l) => {
                self.leaders.insert(shard, l);
                true
            }
            _ => {
                self.forget(shard);
                false
            }
        }
    }

    /// The node to try for `shard` on attempt `attempt`: the cached leader, else the replicas in
    /// turn, skipping nodes that just failed (unless all of them did).
    pub fn pick(&self, shard: u64, replicas: &[u64], attempt: usize) -> u64 {
        if let Some(l) = self.get(shard).filter(|l| !self.is_suspect(*l)) {
            return l;
        }
        let n = replicas.len();
        (0..n)
            .map(|i| replicas[(attempt + i) % n])
            .find(|r| !self.is_suspect(*r))
            .unwrap_or(replicas[attempt % n])
    }

    /// Marks `node` as failing at the transport level.
    pub fn suspect(&mut self, node: u64) {
        self.suspects.insert(node, Instant::now());
        self.leaders.retain(|_, l| *l != node);
    }

    /// Clears `node`'s suspicion after it answered.
    pub fn answered(&mut self, node: u64) {
        self.suspects.remove(&node);
    }

    fn is_suspect(&self, node: u64) -> bool {
        self.suspects
            .get(&node)
            .is_some_and(|t| t.elapsed() < SUSPECT_FOR)
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
                ..Default::default()
            }],
            shards: ranges
                .iter()
                .enumerate()
                .map(|(i, (s, e))| ShardInfo {
                    id: i as u64 + 1,
                    slot_start: *s,
                    slot_end: *e,
                    replicas: vec![1],
                    ..Default::default()
                })
                .collect(),
            meta_replicas: vec![1],
            ..Default::default()
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

    #[test]
    fn a_hint_is_followed_at_once_only_when_it_names_another_live_node() {
        let mut c = LeaderCache::default();
        assert!(
            c.follow_hint(1, 2, Some(3)),
            "a fresh hint is tried at once"
        );
        assert_eq!(c.get(1), Some(3));
        assert!(!c.follow_hint(1, 3, Some(3)), "a node naming itself");
        assert_eq!(c.get(1), None);
        assert!(!c.follow_hint(1, 2, None), "no leader known");
        c.suspect(3);
        // A follower still naming a leader that just failed to answer: without a pause, the
        // client asked the same follower again and again (61 342 attempts in one 10 s deadline).
        assert!(
            !c.follow_hint(1, 2, Some(3)),
            "a hint naming a failing node"
        );
        assert_eq!(c.get(1), None);
    }

    #[test]
    fn suspect_nodes_are_skipped_and_not_cached_as_leader() {
        let mut c = LeaderCache::default();
        c.set(1, 2);
        assert_eq!(c.pick(1, &[1, 2, 3], 0), 2);
        c.suspect(2);
        assert_eq!(c.get(1), None, "a failing leader is forgotten");
        c.set(1, 2);
        assert_eq!(c.get(1), None, "hints naming a failing node are ignored");
        assert_eq!(
            c.pick(1, &[2, 3, 1], 0),
            3,
            "replicas in turn, skipping the suspect"
        );
        c.answered(2);
        c.set(1, 2);
        assert_eq!(c.pick(1, &[1, 2, 3], 0), 2);
    }
}
