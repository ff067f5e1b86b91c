//! A member asking its peers for layout changes it missed.
//!
//! The placement driver pushes every layout to the nodes it lists, and a layout change also to
//! the nodes it dropped, so a member that is up hears of each change within a survey round. A
//! node that was down or cut off when it was *removed* — `strata node remove --force` of a dead
//! node, or a replacement by `node add --replaces` — is in no later layout and is never pushed
//! one: started again, it would keep its stale layout, believe it still hosts its old replicas
//! and run their groups (harmlessly, as no voter set lists it, but forever). So every member
//! asks one peer of its layout at a time, in turn, for a newer layout, and adopts it: a removed
//! node then learns that it was removed, deletes its replicas and idles as `removed`, as a node
//! drained by `node remove` does.

use std::sync::Arc;
use std::time::Duration;

use strata_proto::v1::LayoutExchange;
use tokio::sync::watch;

use super::driver::exchange;
use super::reconcile;
use crate::layout::Layout;
use crate::service::{Membership, NodeState};

/// Pause between two questions (each to the next peer of the layout).
const ASK_EVERY: Duration = Duration::from_secs(2);

/// Asks the peers in turn until `stop` turns true or this node learns that it was removed.
pub async fn run(node: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let mut turn = 0usize;
    loop {
        match node.membership() {
            Membership::Removed => return,
            Membership::Joining => {}
            Membership::Member => {
                // Only the question is given up for a stop; an adoption under way finishes.
                let newer = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    newer = ask_next(&node, &mut turn) => newer,
                };
                if let Some((peer, newer)) = newer {
                    let epoch = newer.epoch;
                    match reconcile::adopt(&node, newer).await {
                        Ok(true) => tracing::info!(epoch, from = peer, "learnt a missed layout"),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(epoch, "adopt layout from node {peer}: {e:#}"),
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(ASK_EVERY) => {}
        }
    }
}

/// Asks the peer whose turn it is for its layout if newer than this node's; returns the peer
/// and that layout.
async fn ask_next(node: &NodeState, turn: &mut usize) -> Option<(u64, Layout)> {
    let layout = node.layout();
    let peers: Vec<u64> = layout
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| *id != node.id())
        .collect();
    if peers.is_empty() {
        return None;
    }
    let peer = peers[*turn % peers.len()];
    *turn = turn.wrapping_add(1);
    let question = LayoutExchange {
        newer_than: layout.epoch,
        ..Default::default()
    };
    let answer = exchange(node, peer, question).await.ok()?;
    if answer.layout.is_empty() {
        return None;
    }
    match serde_json::from_slice::<Layout>(&answer.layout) {
        Ok(newer) => Some((peer, newer)),
        Err(e) => {
            tracing::warn!("node {peer} sent a layout that does not parse: {e}");
            None
        }
    }
}
