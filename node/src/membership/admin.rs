//! The operator's membership requests, served by the meta leader. Each is validated against the
//! layout (and, for removal, a fresh survey of which nodes answer) before anything is written;
//! a refused request changes nothing. Accepted requests only edit the layout — the placement
//! driver then moves the replicas.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strata_proto::v1::{
    AddNodeRequest, AddNodeResponse, LayoutExchange, RemoveNodeRequest, RemoveNodeResponse,
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
/// records it in the layout. Returns its id and the layout epoch that has it.
pub async fn add_node(
    node: &Arc<NodeState>,
    req: AddNodeRequest,
) -> Result<AddNodeResponse, KvError> {
    for addr in [&req.client_addr, &req.peer_addr] {
        addr.parse::<SocketAddr>().map_err(|e| {
            KvError::InvalidArgument(format!("address {addr:?} is not HOST:PORT: {e}"))
        })?;
    }
    let probe = probe(node, &req.peer_addr).await?;
    for _ in 0..ATTEMPTS {
        let stamped = meta::read(node).await?;
        let spec = check_add(&stamped.layout, &req, &probe)?;
        let mut new = stamped.layout.clone();
        let id = spec.id;
        new.next_node_id = new.next_free_id().max(id + 1);
        new.nodes.push(spec);
        match commit(node, &stamped, new).await {
            Ok(new) => {
                node.placement_events.push(format!(
                    "node {id} added at {} (peer {})",
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
    for n in &layout.nodes {
        if n.client_addr == req.client_addr || n.peer_addr == req.peer_addr {
            return Err(KvError::AlreadyExists(format!(
                "node {} already uses {} / {}",
                n.id, n.client_addr, n.peer_addr
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
        let spec = new
            .nodes
            .iter_mut()
            .find(|n| n.id == req.id)
            .expect("checked");
        if spec.phase == NodePhase::Draining {
            return Ok(RemoveNodeResponse {
                epoch: stamped.layout.epoch,
            });
        }
        spec.phase = NodePhase::Draining;
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
             replication factor {r}; add a node first"
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
            })
            .collect();
        Layout::initial(nodes, 8, 3)
    }

    fn add(id: u64, port: u64) -> (AddNodeRequest, LayoutExchange) {
        let req = AddNodeRequest {
            id,
            client_addr: format!("127.0.0.1:{}", 7100 + port),
            peer_addr: format!("127.0.0.1:{}", 7200 + port),
        };
        let probe = LayoutExchange {
            client_addr: req.client_addr.clone(),
            peer_addr: req.peer_addr.clone(),
            ..Default::default()
        };
        (req, probe)
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
}
