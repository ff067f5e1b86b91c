//! The placement driver: a loop on every node that acts only while the node leads the meta group.
//! Each round it reads the layout (linearizably), surveys every node — pushing the layout to it
//! and learning whether it answers and which groups it leads — asks [`placement::next_action`]
//! for one step, and performs it. Decisions go to the event log shown by `strata status`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use strata_proto::v1::{LayoutExchange, NodeInfo, SetVotersRequest, TransferLeadershipRequest};
use tokio::sync::watch;

use super::meta::{self, Stamped};
use super::placement::{self, Action, View};
use super::reconcile;
use crate::error::KvError;
use crate::layout::{group_name, GroupId, Layout, NodeSpec, META_GROUP};
use crate::raft::hand_over::close_enough_to_lead;
use crate::service::NodeState;
use crate::storage::engine::SLOW_SYNC;

/// Pause between two rounds.
const ROUND: Duration = Duration::from_millis(500);
/// How long a node has to answer the survey before it counts as down.
const SURVEY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a new replica may take to catch up (log or streamed snapshot) before its move is
/// retried.
pub const CATCH_UP: Duration = Duration::from_secs(120);
/// How long a leadership transfer may take.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the driver until `stop` turns true.
pub async fn run(node: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let mut leading = false;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(ROUND) => {}
        }
        let is_leader = node
            .groups
            .get(META_GROUP)
            .is_some_and(|meta| meta.is_leader());
        if is_leader != leading {
            leading = is_leader;
            if leading {
                node.placement_events
                    .push(format!("node {} runs the placement driver", node.id()));
            }
        }
        if !is_leader {
            continue;
        }
        if let Err(e) = round(&node).await {
            tracing::debug!("placement round: {e}");
        }
    }
}

/// One round: read, survey, decide, act.
async fn round(node: &Arc<NodeState>) -> Result<(), String> {
    let stamped = meta::read(node).await.map_err(|e| e.to_string())?;
    // The meta leader follows the layout like every other node.
    reconcile::adopt(node, stamped.layout.clone())
        .await
        .map_err(|e| e.to_string())?;
    let view = survey(node, &stamped.layout).await;
    let Some(action) = placement::next_action(&view) else {
        return Ok(());
    };
    execute(node, &stamped, &view, action).await
}

/// What this node tells the driver about itself.
pub fn describe(node: &NodeState) -> LayoutExchange {
    LayoutExchange {
        layout: Default::default(),
        node_id: node.id(),
        epoch: node.layout().epoch,
        peer_addr: node.peer_addr.clone(),
        client_addr: node.client_addr.clone(),
        groups: node.groups.all().iter().map(|g| g.status()).collect(),
        slowest_wal_sync_ms: node.engine.slowest_recent_sync().as_millis() as u64,
        incarnation: node.pool.identity().incarnation(),
        newer_than: 0,
    }
}

/// Whether a node that described itself as `about` has a slow disk now (see
/// [`Engine::slowest_recent_sync`](crate::storage::Engine::slowest_recent_sync)).
pub fn disk_is_slow(about: &LayoutExchange) -> bool {
    Duration::from_millis(about.slowest_wal_sync_ms) >= SLOW_SYNC
}

/// Asks node `target` to describe itself, without pushing a layout.
pub async fn ask(node: &NodeState, target: u64) -> Result<LayoutExchange, String> {
    exchange(node, target, LayoutExchange::default()).await
}

/// Pushes `layout` to every node of it and collects who answers and who leads what.
pub async fn survey(node: &Arc<NodeState>, layout: &Layout) -> View {
    let payload = bytes::Bytes::from(serde_json::to_vec(layout).expect("layout serializes"));
    let me = node.id();
    let calls = layout.nodes.iter().filter(|n| n.id != me).map(|n| {
        let payload = payload.clone();
        async move { (n.id, push(node, n.id, payload).await.ok()) }
    });
    let mut replies = futures::future::join_all(calls).await;
    replies.push((me, Some(describe(node))));

    let mut alive = BTreeSet::new();
    let mut slow_disks = BTreeSet::new();
    // Every replica's report: (group, node) -> (term, last log index).
    let mut reports: BTreeMap<(GroupId, u64), (u64, u64)> = BTreeMap::new();
    // group -> (term, leader): the highest term wins over a stale leader's claim.
    let mut leaders: BTreeMap<GroupId, (u64, u64)> = BTreeMap::new();
    for (id, reply) in replies {
        let Some(reply) = reply else { continue };
        alive.insert(id);
        if disk_is_slow(&reply) {
            slow_disks.insert(id);
        }
        for g in &reply.groups {
            reports.insert((g.group_id, id), (g.term, g.last_log_index));
            if g.role != "leader" {
                continue;
            }
            let e = leaders.entry(g.group_id).or_insert((g.term, id));
            if g.term > e.0 {
                *e = (g.term, id);
            }
        }
    }
    View {
        lagging: lagging_replicas(layout, &alive, &leaders, &reports),
        layout: layout.clone(),
        alive,
        leaders: leaders.into_iter().map(|(g, (_, l))| (g, l)).collect(),
        slow_disks,
    }
}

/// The live replicas that could not take their group's leadership now (see
/// [`View::lagging`](placement::View::lagging)): no report of the group in its leader's term, or
/// a log more than `MAX_SUCCESSOR_LAG` entries behind the leader's.
fn lagging_replicas(
    layout: &Layout,
    alive: &BTreeSet<u64>,
    leaders: &BTreeMap<GroupId, (u64, u64)>,
    reports: &BTreeMap<(GroupId, u64), (u64, u64)>,
) -> BTreeSet<(GroupId, u64)> {
    let mut lagging = BTreeSet::new();
    for (&group, &(term, leader)) in leaders {
        let Some(&(_, leader_log)) = reports.get(&(group, leader)) else {
            continue;
        };
        let replicas = layout.replicas(group).unwrap_or_default();
        for &r in replicas
            .iter()
            .filter(|r| **r != leader && alive.contains(r))
        {
            let ready = reports
                .get(&(group, r))
                .is_some_and(|&(t, log)| t == term && close_enough_to_lead(log, leader_log));
            if !ready {
                lagging.insert((group, r));
            }
        }
    }
    lagging
}

/// Sends `layout` (JSON) to node `target`; returns its self-description.
async fn push(
    node: &NodeState,
    target: u64,
    layout: bytes::Bytes,
) -> Result<LayoutExchange, String> {
    let req = LayoutExchange {
        layout,
        ..Default::default()
    };
    exchange(node, target, req).await
}

/// Sends `req` to node `target`'s `ExchangeLayout`; returns the answer, which must come from
/// `target`.
pub async fn exchange(
    node: &NodeState,
    target: u64,
    req: LayoutExchange,
) -> Result<LayoutExchange, String> {
    let mut client = node.pool.peer(target)?;
    let mut req = tonic::Request::new(req);
    req.set_timeout(SURVEY_TIMEOUT);
    let call = client.exchange_layout(req);
    match tokio::time::timeout(SURVEY_TIMEOUT, call).await {
        // Another node at `target`'s address (it replaced `target` there) is not `target`.
        Ok(Ok(r)) if r.get_ref().node_id != target => Err(format!(
            "node {} answers at node {target}'s address",
            r.get_ref().node_id
        )),
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Writes `new` over `old`, adopts it here and pushes it to every node of either layout (a node
/// that was just removed learns it too).
pub async fn commit(node: &Arc<NodeState>, old: &Stamped, new: Layout) -> Result<Layout, KvError> {
    let new = meta::replace(node, old, new).await?;
    if let Err(e) = reconcile::adopt(node, new.clone()).await {
        tracing::warn!("adopt layout {}: {e:#}", new.epoch);
    }
    let payload = bytes::Bytes::from(serde_json::to_vec(&new).expect("layout serializes"));
    let me = node.id();
    let mut targets: BTreeSet<u64> = new.nodes.iter().map(|n| n.id).collect();
    targets.extend(old.layout.nodes.iter().map(|n| n.id));
    targets.remove(&me);
    let pushes = targets.into_iter().map(|t| push(node, t, payload.clone()));
    futures::future::join_all(pushes).await;
    Ok(new)
}

async fn execute(
    node: &Arc<NodeState>,
    stamped: &Stamped,
    view: &View,
    action: Action,
) -> Result<(), String> {
    let layout = &stamped.layout;
    match action {
        Action::StartMove { group, mv, why } => {
            let mut new = layout.clone();
            new.set_moving(group, Some(mv));
            commit(node, stamped, new)
                .await
                .map_err(|e| e.to_string())?;
            let from = mv.from.map_or("-".to_string(), |f| f.to_string());
            node.placement_events.push(format!(
                "{}: move replica {from} -> {} ({why})",
                group_name(group),
                mv.to
            ));
        }
        Action::ContinueMove { group } => continue_move(node, stamped, view, group).await?,
        Action::TransferLeader {
            group,
            from,
            to,
            why,
        } => {
            transfer_at(node, from, group, to).await?;
            node.placement_events.push(format!(
                "{}: leadership {from} -> {to} ({why})",
                group_name(group)
            ));
        }
        Action::Retire { node: id } => {
            let mut new = layout.clone();
            new.nodes.retain(|n| n.id != id);
            commit(node, stamped, new)
                .await
                .map_err(|e| e.to_string())?;
            node.placement_events
                .push(format!("node {id} drained and removed from the cluster"));
        }
    }
    Ok(())
}

/// Drives the move recorded for `group`: moves the leadership off the leaving replica, makes the
/// group's voters the new set at its leader, then records the result. A move whose target was
/// removed meanwhile is rolled back instead.
async fn continue_move(
    node: &Arc<NodeState>,
    stamped: &Stamped,
    view: &View,
    group: GroupId,
) -> Result<(), String> {
    let layout = &stamped.layout;
    let mv = layout.moving(group).ok_or("no move under way")?;
    let replicas = layout.replicas(group).unwrap_or_default().to_vec();
    let target_ok = layout
        .node(mv.to)
        .is_some_and(|n| n.phase == crate::layout::NodePhase::Active);
    let voters = if target_ok {
        mv.voters_after(&replicas)
    } else {
        replicas.clone()
    };
    let leader = *view
        .leaders
        .get(&group)
        .ok_or_else(|| format!("{} has no leader; waiting", group_name(group)))?;
    if target_ok && Some(leader) == mv.from {
        let to = voters
            .iter()
            .copied()
            .find(|v| {
                *v != leader && *v != mv.to && view.alive.contains(v) && view.can_lead(group, *v)
            })
            .ok_or("no replica to hand the leadership to")?;
        transfer_at(node, leader, group, to).await?;
        node.placement_events.push(format!(
            "{}: leadership {leader} -> {to} (its replica moves away)",
            group_name(group)
        ));
        return Ok(());
    }
    let specs: Vec<NodeSpec> = voters
        .iter()
        .map(|id| {
            layout
                .node(*id)
                .cloned()
                .ok_or_else(|| format!("node {id} is not in the layout"))
        })
        .collect::<Result<_, _>>()?;
    set_voters_at(node, leader, group, &specs).await?;
    let mut new = layout.clone();
    if target_ok {
        new.finish_move(group);
    } else {
        new.set_moving(group, None);
    }
    let new = commit(node, stamped, new)
        .await
        .map_err(|e| e.to_string())?;
    node.placement_events.push(format!(
        "{}: {} (replicas now {:?})",
        group_name(group),
        if target_ok {
            format!("replica moved to {}", mv.to)
        } else {
            format!("move to removed node {} rolled back", mv.to)
        },
        new.replicas(group).unwrap_or_default()
    ));
    Ok(())
}

/// Makes `group`'s voters `voters`, at its leader `target` (locally when that is this node).
async fn set_voters_at(
    node: &NodeState,
    target: u64,
    group: GroupId,
    voters: &[NodeSpec],
) -> Result<(), String> {
    if target == node.id() {
        let g = node.group(group).map_err(|e| e.to_string())?;
        return g.set_voters(voters, CATCH_UP).await;
    }
    let mut client = node.pool.peer(target)?;
    let mut req = tonic::Request::new(SetVotersRequest {
        group_id: group,
        voters: voters.iter().map(node_info).collect(),
    });
    req.set_timeout(CATCH_UP + Duration::from_secs(60));
    client.set_voters(req).await.map(|_| ()).map_err(|s| {
        format!(
            "set voters of group {group} at node {target}: {}",
            s.message()
        )
    })
}

/// Asks `target`, the leader of `group`, to hand the leadership to `to`.
async fn transfer_at(node: &NodeState, target: u64, group: GroupId, to: u64) -> Result<(), String> {
    if target == node.id() {
        let g = node.group(group).map_err(|e| e.to_string())?;
        return g
            .hand_over_leadership(
                to,
                node.raft_timings.successor_freshness(),
                TRANSFER_TIMEOUT,
            )
            .await;
    }
    let mut client = node.pool.peer(target)?;
    let mut req = tonic::Request::new(TransferLeadershipRequest {
        group_id: group,
        to,
    });
    req.set_timeout(TRANSFER_TIMEOUT + Duration::from_secs(1));
    client
        .transfer_leadership(req)
        .await
        .map(|_| ())
        .map_err(|s| s.message().to_string())
}

/// The wire form of a node.
pub fn node_info(n: &NodeSpec) -> NodeInfo {
    NodeInfo {
        id: n.id,
        client_addr: n.client_addr.clone(),
        peer_addr: n.peer_addr.clone(),
        state: n.phase.name().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::NodePhase;
    use crate::raft::hand_over::MAX_SUCCESSOR_LAG;

    fn layout() -> Layout {
        let node = |id: u64| NodeSpec {
            id,
            client_addr: format!("c{id}"),
            peer_addr: format!("p{id}"),
            phase: NodePhase::Active,
            incarnation: 0,
        };
        Layout::initial((1..=3).map(node).collect(), 1, 3)
    }

    #[test]
    fn replicas_behind_or_in_an_old_term_or_silent_are_lagging() {
        let layout = layout();
        let alive: BTreeSet<u64> = [1, 2, 3].into();
        // Shard 1, led by node 1 in term 5 at log index 1 000.
        let leaders = BTreeMap::from([(1, (5, 1))]);
        let mut reports = BTreeMap::from([
            ((1, 1), (5, 1_000)),
            ((1, 2), (5, 1_000 - MAX_SUCCESSOR_LAG)),
            ((1, 3), (5, 990)),
        ]);
        let lagging = |reports: &_| lagging_replicas(&layout, &alive, &leaders, reports);
        assert!(lagging(&reports).is_empty());
        reports.insert((1, 2), (5, 1_000 - MAX_SUCCESSOR_LAG - 1));
        assert_eq!(lagging(&reports), [(1, 2)].into());
        // A replica whose Raft instance stopped keeps reporting its old term.
        reports.insert((1, 2), (5, 1_000));
        reports.insert((1, 3), (4, 1_000));
        assert_eq!(lagging(&reports), [(1, 3)].into());
        // A replica that does not report the group at all (not started yet).
        reports.remove(&(1, 3));
        assert_eq!(lagging(&reports), [(1, 3)].into());
        // A node that did not answer is not alive, which the view says on its own.
        let alive: BTreeSet<u64> = [1, 2].into();
        assert!(lagging_replicas(&layout, &alive, &leaders, &reports).is_empty());
    }

    #[test]
    fn a_fsync_of_half_a_second_is_slow() {
        let about = |ms| LayoutExchange {
            slowest_wal_sync_ms: ms,
            ..Default::default()
        };
        assert!(!disk_is_slow(&about(20)));
        assert!(disk_is_slow(&about(SLOW_SYNC.as_millis() as u64)));
    }
}
