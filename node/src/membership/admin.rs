//! The operator's membership requests, served by the meta leader. Each is validated against the
//! layout (and, for removal, a fresh survey of which nodes answer) before anything is written;
//! a refused request changes nothing. Accepted requests only edit the layout — the placement
//! driver then moves the replicas (none move for an address update).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use strata_proto::address::check_reachable_addr;
use strata_proto::v1::{
    AddNodeRequest, AddNodeResponse, LayoutExchange, RemoveNodeRequest, RemoveNodeResponse,
    UpdateNodeRequest, UpdateNodeResponse,
};

use super::driver::{commit, survey};
use super::meta;
use crate::error::KvError;
use crate::layout::{Layout, NodePhase, NodeSpec};
use crate::service::NodeState;

/// How long the node being added has to answer the probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts when the layout changes between read and write.
const ATTEMPTS: usize = 5;

/// Adds a node that was started with `--join`: checks its addresses and id, probes it, and
/// records it in the layout. With `req.replaces`, the same layout change marks that node as
/// draining (see [`check_replace`]). Returns the new node's id and the layout epoch that has it.
pub async fn add_node(
    node: &Arc<NodeState>,
    req: AddNodeRequest,
) -> Result<AddNodeResponse, KvError> {
    for addr in [&req.client_addr, &req.peer_addr] {
        check_reachable_addr(addr).map_err(KvError::InvalidArgument)?;
    }
    let probe = probe(node, &req.peer_addr).await?;
    for _ in 0..ATTEMPTS {
        let stamped = meta::read(node).await?;
        let spec = check_add(&stamped.layout, &req, &probe)?;
        let mut new = stamped.layout.clone();
        let id = spec.id;
        new.next_node_id = new.next_free_id().max(id + 1);
        new.nodes.push(spec.clone());
        if req.replaces != 0 {
            let alive = survey(node, &stamped.layout).await.alive;
            check_replace(&new, req.replaces, &spec, &alive)?;
            mark_draining(&mut new, req.replaces);
        }
        match commit(node, &stamped, new).await {
            Ok(new) => {
                let replacing = match req.replaces {
                    0 => String::new(),
                    old => format!(" to replace node {old}, which is draining"),
                };
                node.placement_events.push(format!(
                    "node {id} added at {} (peer {}){replacing}",
                    req.client_addr, req.peer_addr
                ));
                return Ok(AddNodeResponse {
                    id,
                    epoch: new.epoch,
                });
            }
            Err(KvError::Unavailable { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(concurrent_change())
}

/// Asks the node at `peer_addr` to describe itself.
async fn probe(node: &NodeState, peer_addr: &str) -> Result<LayoutExchange, KvError> {
    let unreachable = |why: String| {
        KvError::Refused(format!(
            "no strata-node answers at peer address {peer_addr}: {why}"
        ))
    };
    let mut client = node
        .pool
        .client_at(peer_addr)
        .map_err(|e| unreachable(e.to_string()))?;
    let mut req = tonic::Request::new(LayoutExchange::default());
    req.set_timeout(PROBE_TIMEOUT);
    match tokio::time::timeout(PROBE_TIMEOUT, client.exchange_layout(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(unreachable(s.message().to_string())),
        Err(_) => Err(unreachable("timed out".into())),
    }
}

/// Validates an add request against the layout and the probed node; returns the node to add.
pub fn check_add(
    layout: &Layout,
    req: &AddNodeRequest,
    probe: &LayoutExchange,
) -> Result<NodeSpec, KvError> {
    // The node being replaced may share addresses with its replacement: `check_replace` then
    // makes sure it is gone.
    for n in layout.nodes.iter().filter(|n| n.id != req.replaces) {
        if n.client_addr == req.client_addr || n.peer_addr == req.peer_addr {
            return Err(KvError::AlreadyExists(format!(
                "node {} already uses {} / {} (if node {} is gone for good and the new node \
                 takes its place, add it with --replaces {})",
                n.id, n.client_addr, n.peer_addr, n.id, n.id
            )));
        }
    }
    if probe.epoch > 0 {
        return Err(KvError::Refused(format!(
            "the node at {} already belongs to a cluster (node id {}, layout epoch {}); only a \
             node started empty with --join can be added",
            req.peer_addr, probe.node_id, probe.epoch
        )));
    }
    if probe.client_addr != req.client_addr || probe.peer_addr != req.peer_addr {
        return Err(KvError::InvalidArgument(format!(
            "the node at peer address {} listens for clients on {} and for peers on {}; pass \
             those addresses",
            req.peer_addr, probe.client_addr, probe.peer_addr
        )));
    }
    let id = match (req.id, probe.node_id) {
        (0, 0) => layout.next_free_id(),
        (0, started) => started,
        (asked, 0) => asked,
        (asked, started) if asked == started => asked,
        (asked, started) => {
            return Err(KvError::InvalidArgument(format!(
                "the node was started with --id {started}, not {asked}"
            )))
        }
    };
    if id < layout.next_free_id() {
        return Err(KvError::InvalidArgument(format!(
            "node id {id} was already given out (ids are never reused); the next free id is {}",
            layout.next_free_id()
        )));
    }
    Ok(NodeSpec {
        id,
        client_addr: req.client_addr.clone(),
        peer_addr: req.peer_addr.clone(),
        phase: NodePhase::Active,
        incarnation: probe.incarnation,
    })
}

/// Marks a node as draining: the placement driver moves its replicas and leaderships away, then
/// removes it. Refused when that would break availability (see [`check_remove`]).
pub async fn remove_node(
    node: &Arc<NodeState>,
    req: RemoveNodeRequest,
) -> Result<RemoveNodeResponse, KvError> {
    for _ in 0..ATTEMPTS {
        let stamped = meta::read(node).await?;
        let view = survey(node, &stamped.layout).await;
        check_remove(&stamped.layout, req.id, req.force, &view.alive)?;
        let mut new = stamped.layout.clone();
        if !mark_draining(&mut new, req.id) {
            return Ok(RemoveNodeResponse {
                epoch: stamped.layout.epoch,
            });
        }
        match commit(node, &stamped, new).await {
            Ok(new) => {
                node.placement_events.push(format!(
                    "node {} is draining{}",
                    req.id,
                    if req.force { " (forced)" } else { "" }
                ));
                return Ok(RemoveNodeResponse { epoch: new.epoch });
            }
            Err(KvError::Unavailable { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(concurrent_change())
}

/// Records new addresses for a member (`strata node update`). Nothing is probed: the node is
/// restarted at its new addresses after this, and refuses to start at others
/// ([`Layout::check_recorded_addresses`]). Asking for the recorded addresses is answered with the
/// current epoch and writes nothing, so a retried request is harmless.
pub async fn update_node(
    node: &Arc<NodeState>,
    req: UpdateNodeRequest,
) -> Result<UpdateNodeResponse, KvError> {
    for addr in [&req.client_addr, &req.peer_addr] {
        if !addr.is_empty() {
            check_reachable_addr(addr).map_err(KvError::InvalidArgument)?;
        }
    }
    for _ in 0..ATTEMPTS {
        let stamped = meta::read(node).await?;
        let Some(updated) = check_update(&stamped.layout, &req)? else {
            return Ok(UpdateNodeResponse {
                epoch: stamped.layout.epoch,
                changed: false,
            });
        };
        let mut new = stamped.layout.clone();
        *new.node_mut(req.id).expect("checked") = updated.clone();
        match commit(node, &stamped, new).await {
            Ok(new) => {
                node.placement_events.push(format!(
                    "node {} now recorded at {} (peer {})",
                    req.id, updated.client_addr, updated.peer_addr
                ));
                return Ok(UpdateNodeResponse {
                    epoch: new.epoch,
                    changed: true,
                });
            }
            Err(KvError::Unavailable { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(concurrent_change())
}

/// Validates an address update against the layout; returns the node's new record, or `None`
/// when the layout already records those addresses.
pub fn check_update(layout: &Layout, req: &UpdateNodeRequest) -> Result<Option<NodeSpec>, KvError> {
    if req.client_addr.is_empty() && req.peer_addr.is_empty() {
        return Err(KvError::InvalidArgument(
            "give a new client address, a new peer address, or both".into(),
        ));
    }
    let current = layout.node(req.id).ok_or_else(|| {
        KvError::NotFound(format!("node {} is not a member of the cluster", req.id))
    })?;
    let mut updated = current.clone();
    if !req.client_addr.is_empty() {
        updated.client_addr = req.client_addr.clone();
    }
    if !req.peer_addr.is_empty() {
        updated.peer_addr = req.peer_addr.clone();
    }
    if updated.client_addr == updated.peer_addr {
        return Err(KvError::InvalidArgument(format!(
            "the client and peer addresses must differ (both {})",
            updated.client_addr
        )));
    }
    if updated == *current {
        return Ok(None);
    }
    for other in layout.nodes.iter().filter(|n| n.id != req.id) {
        let theirs = [&other.client_addr, &other.peer_addr];
        if let Some(taken) = [&updated.client_addr, &updated.peer_addr]
            .into_iter()
            .find(|a| theirs.contains(a))
        {
            return Err(KvError::AlreadyExists(format!(
                "node {} already uses {taken}",
                other.id
            )));
        }
    }
    Ok(Some(updated))
}

/// Marks node `id` of `layout` as draining; false when it already was. The caller has checked
/// that the node exists.
fn mark_draining(layout: &mut Layout, id: u64) -> bool {
    let spec = layout.node_mut(id).expect("checked");
    let was_active = spec.phase != NodePhase::Draining;
    spec.phase = NodePhase::Draining;
    was_active
}

/// Validates replacing node `old` by `new` (already added to `layout`): `old` must be removable
/// as by a forced removal (a replaced node is typically dead: its disk was lost), and if `new`
/// takes over one of `old`'s addresses, `old` must not answer — two live nodes never share an
/// address. Peers then reach the new node where they look for the old one, and refuse each
/// other's requests by node id (`raft::identity`), so messages meant for `old` change nothing.
pub fn check_replace(
    layout: &Layout,
    old: u64,
    new: &NodeSpec,
    alive: &BTreeSet<u64>,
) -> Result<(), KvError> {
    check_remove(layout, old, true, alive)?;
    let spec = layout.node(old).expect("checked by check_remove");
    let shares = spec.client_addr == new.client_addr || spec.peer_addr == new.peer_addr;
    if shares && alive.contains(&old) {
        return Err(KvError::Refused(format!(
            "node {old} still answers, so the new node cannot take over its addresses {} / {}; \
             stop it first, or give the new node other addresses",
            spec.client_addr, spec.peer_addr
        )));
    }
    Ok(())
}

/// Validates a removal: the node exists; enough active nodes remain for the replication
/// factor; a node that does not answer needs `force`; and every group the node is in keeps a
/// quorum of answering replicas without it (membership changes need one).
pub fn check_remove(
    layout: &Layout,
    id: u64,
    force: bool,
    alive: &BTreeSet<u64>,
) -> Result<(), KvError> {
    let Some(spec) = layout.node(id) else {
        return Err(KvError::NotFound(if id > 0 && id < layout.next_free_id() {
            format!("node {id} is not in the cluster any more (it was removed)")
        } else {
            format!("no node {id} in the cluster")
        }));
    };
    if spec.phase == NodePhase::Draining {
        return Ok(());
    }
    let remaining = layout.active_nodes().filter(|n| n.id != id).count();
    let r = layout.replication();
    if remaining < r {
        return Err(KvError::Refused(format!(
            "removing node {id} would leave {remaining} active node(s), fewer than the \
             replication factor {r}; add a node first, or add one in its place with \
             `strata node add --addr ADDR --replaces {id}`"
        )));
    }
    if !force && !alive.contains(&id) {
        return Err(KvError::Refused(format!(
            "node {id} does not answer, so it cannot hand its replicas over; if it is gone for \
             good, remove it with --force"
        )));
    }
    for g in layout.groups_on(id) {
        let voters = layout.replicas(g).unwrap_or_default();
        let up: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|v| *v != id && alive.contains(v))
            .collect();
        if up.len() < voters.len() / 2 + 1 {
            return Err(KvError::Refused(format!(
                "group {g} has replicas {voters:?} of which only {up:?} answer besides node \
                 {id}: without a quorum its replicas cannot move; bring a replica back first"
            )));
        }
    }
    Ok(())
}

fn concurrent_change() -> KvError {
    KvError::Unavailable {
        shard: crate::layout::META_GROUP,
        reason: "the layout kept changing during the request; retry".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(n: u64) -> Layout {
        let nodes = (1..=n)
            .map(|id| NodeSpec {
                id,
                client_addr: format!("127.0.0.1:{}", 7100 + id),
                peer_addr: format!("127.0.0.1:{}", 7200 + id),
                phase: NodePhase::Active,
                incarnation: 0,
            })
            .collect();
        Layout::initial(nodes, 8, 3)
    }

    fn add(id: u64, port: u64) -> (AddNodeRequest, LayoutExchange) {
        let req = AddNodeRequest {
            id,
            client_addr: format!("127.0.0.1:{}", 7100 + port),
            peer_addr: format!("127.0.0.1:{}", 7200 + port),
            replaces: 0,
        };
        let probe = LayoutExchange {
            client_addr: req.client_addr.clone(),
            peer_addr: req.peer_addr.clone(),
            ..Default::default()
        };
        (req, probe)
    }

    #[test]
    fn updating_addresses_checks_them_against_the_other_members() {
        let l = layout(3);
        let update = |id, client: &str, peer: &str| UpdateNodeRequest {
            id,
            client_addr: client.into(),
            peer_addr: peer.into(),
        };
        let moved = check_update(&l, &update(2, "strata-2.db:7100", ""))
            .unwrap()
            .expect("a change");
        assert_eq!(
            (
                moved.id,
                moved.client_addr.as_str(),
                moved.peer_addr.as_str()
            ),
            (2, "strata-2.db:7100", "127.0.0.1:7202")
        );
        // The recorded addresses again: nothing to write (a retried update).
        assert_eq!(
            check_update(&l, &update(2, "127.0.0.1:7102", "127.0.0.1:7202")).unwrap(),
            None
        );
        let refused = |req: UpdateNodeRequest| check_update(&l, &req).unwrap_err().to_string();
        assert!(refused(update(2, "", "")).contains("give a new client address"));
        assert!(refused(update(9, "h:1", "")).contains("node 9 is not a member"));
        // Another member's address, client or peer, either way round.
        assert!(
            refused(update(2, "127.0.0.1:7103", "")).contains("node 3 already uses 127.0.0.1:7103")
        );
        assert!(
            refused(update(2, "", "127.0.0.1:7101")).contains("node 1 already uses 127.0.0.1:7101")
        );
        assert!(refused(update(2, "h:1", "h:1")).contains("must differ"));
        assert!(refused(update(2, "", "127.0.0.1:7102")).contains("must differ"));
    }

    #[test]
    fn adding_gives_the_next_free_id_and_never_reuses_one() {
        let mut l = layout(3);
        let (req, probe) = add(0, 4);
        assert_eq!(check_add(&l, &req, &probe).unwrap().id, 4);
        // Node 3 was removed: its id stays used.
        l.nodes.retain(|n| n.id != 3);
        l.next_node_id = 4;
        let (req, probe) = add(3, 9);
        let err = check_add(&l, &req, &probe).unwrap_err();
        assert!(matches!(err, KvError::InvalidArgument(_)), "{err}");
        let (req, probe) = add(7, 9);
        assert_eq!(check_add(&l, &req, &probe).unwrap().id, 7);
    }

    #[test]
    fn adding_twice_or_a_member_or_a_mismatch_is_refused() {
        let l = layout(3);
        let (req, probe) = add(0, 2);
        assert!(matches!(
            check_add(&l, &req, &probe),
            Err(KvError::AlreadyExists(_))
        ));
        let (req, mut probe) = add(0, 4);
        probe.epoch = 3;
        probe.node_id = 9;
        assert!(matches!(
            check_add(&l, &req, &probe),
            Err(KvError::Refused(_))
        ));
        let (req, mut probe) = add(5, 4);
        probe.node_id = 6;
        assert!(matches!(
            check_add(&l, &req, &probe),
            Err(KvError::InvalidArgument(_))
        ));
        let (req, mut probe) = add(0, 4);
        probe.client_addr = "127.0.0.1:1".into();
        assert!(matches!(
            check_add(&l, &req, &probe),
            Err(KvError::InvalidArgument(_))
        ));
    }

    #[test]
    fn removal_keeps_the_replication_factor_and_quorums() {
        let all: BTreeSet<u64> = (1..=4).collect();
        let l3 = layout(3);
        assert!(matches!(
            check_remove(&l3, 9, false, &all),
            Err(KvError::NotFound(_))
        ));
        let err = check_remove(&l3, 2, false, &all).unwrap_err();
        assert!(err.to_string().contains("replication factor"), "{err}");
        let l4 = layout(4);
        check_remove(&l4, 2, false, &all).unwrap();
        let without_2: BTreeSet<u64> = [1, 3, 4].into();
        let err = check_remove(&l4, 2, false, &without_2).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        check_remove(&l4, 2, true, &without_2).unwrap();
        // Nodes 2 and 3 both down: shards on both lose their quorum without node 2.
        let only_1_4: BTreeSet<u64> = [1, 4].into();
        let err = check_remove(&l4, 2, true, &only_1_4).unwrap_err();
        assert!(err.to_string().contains("quorum"), "{err}");
    }

    /// Adds `req`'s node to `l` as `add_node` does, then checks replacing `old` by it.
    fn replace(
        l: &Layout,
        req: &AddNodeRequest,
        probe: &LayoutExchange,
        alive: &[u64],
    ) -> Result<(), KvError> {
        let spec = check_add(l, req, probe)?;
        let mut new = l.clone();
        new.nodes.push(spec.clone());
        check_replace(&new, req.replaces, &spec, &alive.iter().copied().collect())
    }

    #[test]
    fn a_dead_node_of_three_is_replaced_at_its_own_addresses() {
        let l3 = layout(3);
        // A fresh node at node 2's addresses, which a plain add refuses.
        let (mut req, probe) = add(0, 2);
        assert!(matches!(
            check_add(&l3, &req, &probe),
            Err(KvError::AlreadyExists(_))
        ));
        req.replaces = 2;
        assert_eq!(check_add(&l3, &req, &probe).unwrap().id, 4);
        // Node 2 dead: it is replaced although three nodes are all the replication factor asks.
        replace(&l3, &req, &probe, &[1, 3, 4]).unwrap();
        // Node 2 answering: two live nodes may not share an address.
        let err = replace(&l3, &req, &probe, &[1, 2, 3, 4]).unwrap_err();
        assert!(err.to_string().contains("still answers"), "{err}");
        // Another member's addresses stay refused.
        req.replaces = 3;
        assert!(matches!(
            check_add(&l3, &req, &probe),
            Err(KvError::AlreadyExists(_))
        ));
    }

    #[test]
    fn replacing_keeps_the_removal_checks() {
        let l3 = layout(3);
        let (mut req, probe) = add(0, 4);
        req.replaces = 9;
        assert!(matches!(
            replace(&l3, &req, &probe, &[1, 2, 3]),
            Err(KvError::NotFound(_))
        ));
        // A live node at other addresses is replaced by draining it.
        req.replaces = 2;
        replace(&l3, &req, &probe, &[1, 2, 3, 4]).unwrap();
        // Nodes 2 and 3 both down: the shards on node 2 would have no quorum to move with.
        let err = replace(&l3, &req, &probe, &[1, 4]).unwrap_err();
        assert!(err.to_string().contains("quorum"), "{err}");
    }
}
