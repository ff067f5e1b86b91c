//! Layout adoption. Every node keeps the newest layout it has seen (pushed by the placement
//! driver, or read at start) and makes its groups match it: a group it now hosts is started
//! (empty, if it is receiving a replica: the leader fills it), a group it no longer hosts is shut
//! down and its data deleted. The layout is saved before any group changes, so a restart resumes
//! from the same decision.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::layout::{GroupId, Layout};
use crate::raft::Group;
use crate::service::NodeState;
use crate::storage::snapshot::SnapshotFile;

/// Delay between starting two groups, so their election timers do not tick in lockstep.
const GROUP_START_STAGGER: Duration = Duration::from_millis(15);

/// Adopts `layout` if it is newer than this node's. Returns whether it was adopted.
pub async fn adopt(node: &Arc<NodeState>, layout: Layout) -> anyhow::Result<bool> {
    let _serial = node.adopting.lock().await;
    let previous = node.layout();
    if layout.epoch <= previous.epoch {
        return Ok(false);
    }
    let mut id = node.id();
    if id == 0 {
        // A joining node finds itself by its data directory's incarnation, recorded when it was
        // added: a layout that lists a node it replaces at the same addresses is not about it.
        match layout.node_with_incarnation(node.pool.identity().incarnation()) {
            Some(me) => id = me.id,
            None => return Ok(false),
        }
    }
    let stored_id = node.engine.load_node_id()?;
    if layout.node(id).is_none() && previous.epoch == 0 && stored_id != Some(id) {
        // Not about this node: it was never a member of that cluster.
        return Ok(false);
    }
    if layout.node(id).is_some() && stored_id != Some(id) {
        node.engine.save_identity(id, &layout).await?;
        tracing::info!(
            node = id,
            epoch = layout.epoch,
            "this node is a cluster member"
        );
    } else {
        node.engine.save_layout(&layout).await?;
    }
    node.set_id(id);
    node.pool.adopt_nodes(&layout.nodes);
    let was_recorded_here = previous
        .check_recorded_addresses(id, &node.client_addr, &node.peer_addr)
        .is_ok();
    if let (true, Err(why)) = (
        was_recorded_here,
        layout.check_recorded_addresses(id, &node.client_addr, &node.peer_addr),
    ) {
        // `strata node update` while this node runs: it is the operator's turn to restart it.
        tracing::warn!(
            epoch = layout.epoch,
            "the cluster now records this node at other addresses ({why}); peers and clients \
             look for it there: restart it at those addresses"
        );
    }
    let hosted = layout.groups_on(id);
    let layout = Arc::new(layout);
    node.set_layout(layout.clone());

    for g in node.groups.all() {
        if !hosted.contains(&g.id) {
            leave_group(node, g.id).await?;
        }
    }
    if previous.epoch == 0 {
        // First adoption in this process: delete leftovers of groups this node left just
        // before a crash.
        for g in layout.group_ids().filter(|g| !hosted.contains(g)) {
            if node.engine.holds_group(g) {
                drop_state(node, g).await?;
            }
        }
    }
    let was_hosted = previous.groups_on(id);
    for g in hosted {
        if node.groups.get(g).is_some() {
            continue;
        }
        if previous.epoch > 0 && !was_hosted.contains(&g) && node.engine.holds_group(g) {
            // State from an earlier stay on this node: the new replica starts empty.
            drop_state(node, g).await?;
        }
        let group = Group::start(
            g,
            id,
            node.engine.clone(),
            node.pool.clone(),
            &node.raft_timings,
            node.snapshot_dir.clone(),
        )
        .await
        .with_context(|| format!("start group {g}"))?;
        node.groups.insert(group);
        tracing::info!(group = g, epoch = layout.epoch, "hosting group");
        tokio::time::sleep(GROUP_START_STAGGER).await;
    }
    if layout.node(id).is_none() {
        tracing::info!(
            node = id,
            epoch = layout.epoch,
            "removed from the cluster; this process holds no data and can be stopped"
        );
    }
    Ok(true)
}

/// Stops group `g` on this node and deletes its state.
async fn leave_group(node: &NodeState, g: GroupId) -> anyhow::Result<()> {
    if let Some(group) = node.groups.remove(g) {
        group.shutdown().await;
    }
    drop_state(node, g).await?;
    tracing::info!(group = g, "left group; its data on this node is deleted");
    Ok(())
}

async fn drop_state(node: &NodeState, g: GroupId) -> anyhow::Result<()> {
    node.engine.drop_group(g).await?;
    let files = SnapshotFile::new(node.snapshot_dir.clone(), g);
    crate::storage::on_blocking_thread(move || files.remove()).await?;
    Ok(())
}
