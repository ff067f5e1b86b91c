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
//!
//! At start, a node also makes sure it runs at the addresses the cluster records for it
//! ([`confirm_recorded_addresses`]), asking its peers in case they were changed while it was
//! down.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures::future::join_all;
use strata_proto::v1::LayoutExchange;
use tokio::sync::watch;
use tokio::time::Instant;

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
    let peers = peers_of(&layout, node.id());
    if peers.is_empty() {
        return None;
    }
    let peer = peers[*turn % peers.len()];
    *turn = turn.wrapping_add(1);
    ask(node, peer, layout.epoch)
        .await
        .map(|newer| (peer, newer))
}

/// The nodes of `layout` other than `me`.
fn peers_of(layout: &Layout, me: u64) -> Vec<u64> {
    layout
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| *id != me)
        .collect()
}

/// Asks node `peer` for its layout if newer than `epoch`.
async fn ask(node: &NodeState, peer: u64, epoch: u64) -> Option<Layout> {
    let question = LayoutExchange {
        newer_than: epoch,
        ..Default::default()
    };
    let answer = exchange(node, peer, question).await.ok()?;
    if answer.layout.is_empty() {
        return None;
    }
    match serde_json::from_slice::<Layout>(&answer.layout) {
        Ok(newer) => Some(newer),
        Err(e) => {
            tracing::warn!("node {peer} sent a layout that does not parse: {e}");
            None
        }
    }
}

/// How long a node started at other addresses than its stored layout records asks its peers for
/// a layout that records them before it refuses to start.
const CONFIRM_ADDRESSES_FOR: Duration = Duration::from_secs(10);

/// At start, before node `id` adopts its `stored` layout: makes sure the cluster records it at
/// the addresses it was started with (`node.client_addr`, `node.peer_addr`). Started at others,
/// it would run where nobody looks for it. The stored layout may predate a `strata node update`
/// made while the node was down, so on a difference the peers are asked for a newer layout, for
/// up to 10 s. Returns the layout to adopt; fails when the difference stands, naming it.
pub async fn confirm_recorded_addresses(
    node: &NodeState,
    id: u64,
    stored: Layout,
) -> anyhow::Result<Layout> {
    let deadline = Instant::now() + CONFIRM_ADDRESSES_FOR;
    let mut layout = stored;
    loop {
        let Err(why) = layout.check_recorded_addresses(id, &node.client_addr, &node.peer_addr)
        else {
            return Ok(layout);
        };
        node.pool.adopt_nodes(&layout.nodes);
        let answers = join_all(
            peers_of(&layout, id)
                .into_iter()
                .map(|peer| ask(node, peer, layout.epoch)),
        )
        .await;
        if let Some(newer) = answers.into_iter().flatten().max_by_key(|l| l.epoch) {
            layout = newer;
            continue;
        }
        if Instant::now() >= deadline {
            bail!(
                "node {id} is not at the addresses the cluster records for it: {why}. Start it \
                 at the recorded addresses (--client-addr/--peer-addr, or the --advertise-* \
                 flags), or record the new ones first with `strata node update --id {id}`"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
