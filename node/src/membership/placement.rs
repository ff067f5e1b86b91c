//! The placement rules: from the layout and what the last survey saw (which nodes answer, who
//! leads each group), the single next action. Pure, so every rule is unit-tested; the driver
//! executes one action per round and asks again, which keeps moves serialized and makes a
//! crashed or replaced driver resume from the layout alone.
//!
//! Priorities, first match wins:
//! 1. finish a move that is under way;
//! 2. retire a draining node that holds nothing any more;
//! 3. meta group: move its replica off a draining node, or grow it to `min(3, active nodes)`;
//! 4. shards: move replicas off draining nodes, then bring shards up to the replication factor;
//! 5. spread replicas: move one from the most loaded to the least loaded node while they differ
//!    by more than one;
//! 6. leaderships: move them off draining nodes and off nodes whose disk is slow, then (once
//!    every group has a known leader) spread them the same way.
//!
//! Only nodes that answered the survey receive replicas or leaderships.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::layout::{GroupId, Layout, Move, NodePhase, META_GROUP};

/// What the driver knows about the cluster in one round.
#[derive(Clone, Debug)]
pub struct View {
    /// The authoritative layout.
    pub layout: Layout,
    /// Nodes that answered the survey.
    pub alive: BTreeSet<u64>,
    /// The leader of each group, as its leader reported.
    pub leaders: BTreeMap<GroupId, u64>,
    /// Replicas (group, node) that cannot take their group's leadership now: they did not report
    /// the group in its leader's term, or are far behind the leader's log (catching up after a
    /// restart, say). A leadership handed to one would stall the group until an election.
    pub lagging: BTreeSet<(GroupId, u64)>,
    /// Nodes whose disk is slow now (a WAL fsync of [`SLOW_SYNC`] or more lately). They lead
    /// nothing: a new leader stores its vote before it leads, so the group would wait for that
    /// fsync; and a leader whose disk stalls its node's threads stalls its groups' writes,
    /// although two fast followers could commit them.
    ///
    /// [`SLOW_SYNC`]: crate::storage::engine::SLOW_SYNC
    pub slow_disks: BTreeSet<u64>,
}

/// One step of the placement driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Drive the move recorded for `group` to its end.
    ContinueMove {
        /// The group.
        group: GroupId,
    },
    /// Record a new move for `group`.
    StartMove {
        /// The group.
        group: GroupId,
        /// The move.
        mv: Move,
        /// Why, for the event log.
        why: &'static str,
    },
    /// Move `group`'s leadership.
    TransferLeader {
        /// The group.
        group: GroupId,
        /// Current leader.
        from: u64,
        /// New leader.
        to: u64,
        /// Why, for the event log.
        why: &'static str,
    },
    /// Remove a drained node from the layout.
    Retire {
        /// The node.
        node: u64,
    },
}

impl View {
    fn draining(&self, node: u64) -> bool {
        self.layout
            .node(node)
            .is_some_and(|n| n.phase == NodePhase::Draining)
    }

    /// Active nodes that answered, least loaded first (shard replicas, then id).
    fn targets(&self, exclude: &[u64]) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .layout
            .active_nodes()
            .map(|n| n.id)
            .filter(|id| self.alive.contains(id) && !exclude.contains(id))
            .collect();
        v.sort_by_key(|id| (self.layout.shard_count_on(*id), *id));
        v
    }

    /// Whether `node` could take `group`'s leadership now (see [`View::lagging`] and
    /// [`View::slow_disks`]).
    pub fn can_lead(&self, group: GroupId, node: u64) -> bool {
        !self.lagging.contains(&(group, node)) && !self.slow_disks.contains(&node)
    }

    fn leader_count(&self, node: u64) -> usize {
        self.leaders
            .iter()
            .filter(|(g, l)| **g != META_GROUP && **l == node)
            .count()
    }
}

/// The next action, or `None` when the cluster is where it should be.
pub fn next_action(v: &View) -> Option<Action> {
    let l = &v.layout;
    if let Some(group) = l.group_ids().find(|g| l.moving(*g).is_some()) {
        return Some(Action::ContinueMove { group });
    }
    for n in l.nodes.iter().filter(|n| n.phase == NodePhase::Draining) {
        if l.groups_on(n.id).is_empty() {
            return Some(Action::Retire { node: n.id });
        }
    }
    meta_action(v)
        .or_else(|| repair_action(v))
        .or_else(|| balance_action(v))
        .or_else(|| leader_action(v))
}

fn start(group: GroupId, from: Option<u64>, to: u64, why: &'static str) -> Action {
    Action::StartMove {
        group,
        mv: Move { from, to },
        why,
    }
}

fn meta_action(v: &View) -> Option<Action> {
    let meta = &v.layout.meta_replicas;
    let target = v.targets(meta).first().copied();
    if let Some(d) = meta.iter().copied().find(|r| v.draining(*r)) {
        return target.map(|t| start(META_GROUP, Some(d), t, "drain"));
    }
    if meta.len() < v.layout.meta_target() {
        return target.map(|t| start(META_GROUP, None, t, "meta group below 3 replicas"));
    }
    None
}

fn repair_action(v: &View) -> Option<Action> {
    let l = &v.layout;
    for s in &l.shards {
        if let Some(d) = s.replicas.iter().copied().find(|r| v.draining(*r)) {
            if let Some(t) = v.targets(&s.replicas).first() {
                return Some(start(s.id, Some(d), *t, "drain"));
            }
        }
    }
    for s in l
        .shards
        .iter()
        .filter(|s| s.replicas.len() < l.replication())
    {
        if let Some(t) = v.targets(&s.replicas).first() {
            return Some(start(s.id, None, *t, "shard below replication factor"));
        }
    }
    None
}

fn balance_action(v: &View) -> Option<Action> {
    let l = &v.layout;
    let nodes = v.targets(&[]);
    let (&least, &most) = (nodes.first()?, nodes.last()?);
    if l.shard_count_on(most) <= l.shard_count_on(least) + 1 {
        return None;
    }
    // Prefer a shard the loaded node does not lead: no leadership has to move first.
    let movable =
        |s: &&crate::layout::ShardSpec| s.replicas.contains(&most) && !s.replicas.contains(&least);
    let shard = l
        .shards
        .iter()
        .filter(movable)
        .min_by_key(|s| v.leaders.get(&s.id) == Some(&most))?;
    Some(start(shard.id, Some(most), least, "balance"))
}

fn leader_action(v: &View) -> Option<Action> {
    let l = &v.layout;
    let replicas_of = |g: GroupId| l.replicas(g).unwrap_or_default();
    let mut by_leaders = v.targets(&[]);
    by_leaders.sort_by_key(|n| (v.leader_count(*n), *n));
    for (&g, &leader) in &v.leaders {
        let why = if v.draining(leader) {
            "drain"
        } else if v.slow_disks.contains(&leader) {
            "slow disk"
        } else {
            continue;
        };
        if let Some(&to) = by_leaders
            .iter()
            .find(|n| replicas_of(g).contains(n) && v.can_lead(g, **n))
        {
            return Some(Action::TransferLeader {
                group: g,
                from: leader,
                to,
                why,
            });
        }
    }
    // Spreading needs every leader known: during elections the counts are transient and a
    // transfer made from them would be undone next round.
    if l.group_ids().any(|g| !v.leaders.contains_key(&g)) {
        return None;
    }
    let most = *by_leaders.last()?;
    for &least in &by_leaders {
        if v.leader_count(most) <= v.leader_count(least) + 1 {
            break;
        }
        let shard = l.shards.iter().find(|s| {
            v.leaders.get(&s.id) == Some(&most)
                && s.replicas.contains(&least)
                && v.can_lead(s.id, least)
        });
        if let Some(s) = shard {
            return Some(Action::TransferLeader {
                group: s.id,
                from: most,
                to: least,
                why: "balance leaders",
            });
        }
    }
    None
}

/// Most decisions kept for status.
const EVENT_LOG_LEN: usize = 32;

/// The placement driver's recent decisions, newest last, each stamped with UTC time.
#[derive(Default)]
pub struct EventLog {
    events: Mutex<VecDeque<String>>,
}

impl EventLog {
    /// Records a decision (also logged).
    pub fn push(&self, event: String) {
        tracing::info!(target: "strata::placement", "{event}");
        let mut events = self.events.lock().expect("events poisoned");
        if events.len() == EVENT_LOG_LEN {
            events.pop_front();
        }
        events.push_back(format!("{} {event}", utc_clock()));
    }

    /// The recorded decisions, oldest first.
    pub fn snapshot(&self) -> Vec<String> {
        self.events
            .lock()
            .expect("events poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

/// `HH:MM:SS` of the current UTC time.
fn utc_clock() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::NodeSpec;

    /// An active node with made-up addresses.
    fn node(id: u64) -> NodeSpec {
        NodeSpec {
            id,
            client_addr: format!("c{id}"),
            peer_addr: format!("p{id}"),
            phase: NodePhase::Active,
            incarnation: 0,
        }
    }

    fn layout(nodes: u64, shards: u32) -> Layout {
        Layout::initial((1..=nodes).map(node).collect(), shards, 3)
    }

    fn view(layout: Layout) -> View {
        let alive = layout.nodes.iter().map(|n| n.id).collect();
        let leaders = layout
            .group_ids()
            .map(|g| (g, layout.replicas(g).unwrap()[0]))
            .collect();
        View {
            layout,
            alive,
            leaders,
            lagging: BTreeSet::new(),
            slow_disks: BTreeSet::new(),
        }
    }

    /// Applies actions the way the driver would (moves complete at once) until none is left.
    fn settle(v: &mut View) -> Vec<Action> {
        let mut done = Vec::new();
        while let Some(a) = next_action(v) {
            assert!(done.len() < 200, "placement does not converge: {done:?}");
            match &a {
                Action::StartMove { group, mv, .. } => v.layout.set_moving(*group, Some(*mv)),
                Action::ContinueMove { group } => {
                    let mv = v.layout.moving(*group).unwrap();
                    if v.leaders.get(group) == mv.from.as_ref() {
                        v.leaders.insert(*group, mv.to);
                    }
                    v.layout.finish_move(*group);
                }
                Action::TransferLeader { group, to, .. } => {
                    v.leaders.insert(*group, *to);
                }
                Action::Retire { node } => v.layout.nodes.retain(|n| n.id != *node),
            }
            done.push(a);
        }
        done
    }

    #[test]
    fn a_balanced_cluster_needs_nothing() {
        assert_eq!(next_action(&view(layout(3, 8))), None);
    }

    #[test]
    fn a_new_node_receives_an_even_share_of_replicas_and_leaders() {
        let mut l = layout(3, 8);
        l.nodes.push(node(4));
        let mut v = view(l);
        let actions = settle(&mut v);
        for n in 1..=4 {
            assert_eq!(v.layout.shard_count_on(n), 6, "node {n}: {actions:?}");
            assert_eq!(v.leader_count(n), 2, "node {n} leaders");
        }
        assert!(v.layout.shards.iter().all(|s| s.replicas.len() == 3));
    }

    #[test]
    fn a_draining_node_is_emptied_then_retired() {
        let mut l = layout(4, 8);
        l.nodes[0].phase = NodePhase::Draining; // node 1: a meta replica and leader
        let mut v = view(l);
        let actions = settle(&mut v);
        assert!(v.layout.node(1).is_none(), "{actions:?}");
        assert!(v.layout.groups_on(1).is_empty());
        assert_eq!(v.layout.meta_replicas.len(), 3);
        assert!(v.layout.shards.iter().all(|s| s.replicas.len() == 3));
        assert!(v.leaders.values().all(|l| *l != 1));
    }

    #[test]
    fn a_lagging_replica_is_not_given_a_leadership() {
        // Node 3 leads nothing (as after a restart): its leaderships went to nodes 1 and 2.
        let mut v = view(layout(3, 8));
        for (g, leader) in v.leaders.iter_mut().filter(|(_, l)| **l == 3) {
            *leader = if g % 2 == 0 { 1 } else { 2 };
        }
        let to_node_3 = |v: &View| match next_action(v) {
            Some(Action::TransferLeader { group, to: 3, .. }) => Some(group),
            other => panic!("expected a leadership for node 3, got {other:?}"),
        };
        let first = to_node_3(&v).unwrap();
        // While that replica catches up, another shard's leadership goes to node 3 instead;
        // while all of node 3's replicas do, none.
        v.lagging.insert((first, 3));
        let second = to_node_3(&v).unwrap();
        assert_ne!(first, second);
        v.lagging = v.layout.group_ids().map(|g| (g, 3)).collect();
        assert_eq!(next_action(&v), None);
    }

    #[test]
    fn a_node_whose_disk_turns_slow_leads_nothing_until_it_is_fast_again() {
        let mut v = view(layout(3, 8));
        assert!(v.leader_count(2) > 0);
        v.slow_disks.insert(2);
        let actions = settle(&mut v);
        assert!(v.leaders.values().all(|l| *l != 2), "{:?}", v.leaders);
        assert!(
            actions.iter().all(|a| matches!(
                a,
                Action::TransferLeader {
                    from: 2,
                    why: "slow disk",
                    ..
                }
            )),
            "{actions:?}"
        );
        // Healed: it gets its share back.
        v.slow_disks.clear();
        settle(&mut v);
        for n in 1..=3 {
            assert!((2..=3).contains(&v.leader_count(n)), "{:?}", v.leaders);
        }
        // With every disk slow, no node is better placed to lead: nothing moves.
        v.slow_disks = [1, 2, 3].into();
        assert_eq!(next_action(&v), None);
    }

    #[test]
    fn a_draining_leader_hands_over_only_to_a_replica_that_can_lead() {
        let mut l = layout(3, 8);
        l.nodes[0].phase = NodePhase::Draining;
        let mut v = view(l);
        // Node 1 leads shard 1 only; its other replicas are 2 and 3.
        for (g, leader) in v.leaders.iter_mut() {
            *leader = if *g == 1 { 1 } else { 2 };
        }
        let drain_to = |v: &View| match leader_action(v) {
            Some(Action::TransferLeader {
                group: 1,
                from: 1,
                to,
                why: "drain",
            }) => Some(to),
            _ => None,
        };
        assert_eq!(drain_to(&v), Some(3), "the one with fewer leaderships");
        v.lagging.insert((1, 3));
        assert_eq!(drain_to(&v), Some(2));
        v.lagging.insert((1, 2));
        assert_eq!(drain_to(&v), None, "nobody can take over: wait");
    }

    #[test]
    fn a_dead_node_gets_no_replicas() {
        let mut l = layout(3, 8);
        l.nodes.push(node(4));
        let mut v = view(l);
        v.alive.remove(&4);
        assert_eq!(next_action(&v), None);
    }

    #[test]
    fn a_force_removed_dead_node_is_replaced_on_live_nodes() {
        let mut l = layout(4, 8);
        l.nodes[1].phase = NodePhase::Draining; // node 2, dead
        let mut v = view(l);
        v.alive.remove(&2);
        v.leaders.retain(|_, l| *l != 2);
        settle(&mut v);
        assert!(v.layout.node(2).is_none());
        assert!(v
            .layout
            .shards
            .iter()
            .all(|s| s.replicas.len() == 3 && !s.replicas.contains(&2)));
    }

    #[test]
    fn a_move_under_way_comes_first() {
        let mut l = layout(4, 8);
        l.set_moving(
            5,
            Some(Move {
                from: Some(1),
                to: 4,
            }),
        );
        assert_eq!(
            next_action(&view(l)),
            Some(Action::ContinueMove { group: 5 })
        );
    }
}
