//! A node moved to new addresses, as after its machine got a new IP: half the time its new
//! addresses are recorded (`node update`) while it still runs at the old ones — its peers then
//! dial it where nothing listens, and it warns — and it is killed after; otherwise it is killed
//! first. It restarts at the new addresses at heal and must learn that they are recorded from its
//! peers (its own stored layout predates the update), rejoin and catch up.
//!
//! The history must stay linearizable (or the set complete) throughout, and the node must not
//! exit once restarted (an exit is reported by the run).

use std::time::Duration;

use rand::Rng;

use super::targets::node_or_leader;
use super::{Cycle, Run};
use crate::history::F;

/// Moves one node (half the time the leader of `shard`) to free ports on its IP.
pub(super) async fn relocate(run: &mut Run<'_>, shard: u64) -> anyhow::Result<Cycle> {
    let target = node_or_leader(run.cluster, run.client, &mut run.rng, shard).await;
    let (client_addr, peer_addr) = run.cluster.nodes.free_addrs(target)?;
    let update_first = run.rng.random_bool(0.5);
    run.record(
        F::Start,
        "move",
        format!("{target} -> {client_addr} / {peer_addr}"),
    );
    // Admin requests wait for a meta leader.
    let client = run.cluster.client(Duration::from_secs(30)).await?;
    let update = || client.update_node(target, Some(&client_addr), Some(&peer_addr));
    let updated = if update_first {
        let updated = update().await;
        run.hold(run.timing.hold / 2).await;
        run.cluster.kill(target)?;
        updated
    } else {
        run.cluster.kill(target)?;
        update().await
    };
    // The node restarts where the cluster records it: a failed update may still have applied.
    let outcome = match updated {
        Ok(_) => {
            run.cluster
                .set_addresses(target, &client_addr, &peer_addr)?;
            format!("{target}: recorded and restarting at {client_addr} / {peer_addr}")
        }
        Err(e) => {
            let map = client.shard_map().await?;
            let recorded = map
                .nodes
                .iter()
                .find(|n| n.id == target)
                .map(|n| (n.client_addr.clone(), n.peer_addr.clone()));
            if let Some((c, p)) = &recorded {
                run.cluster.set_addresses(target, c, p)?;
            }
            format!("{target}: update failed ({e}); restarting at {recorded:?}")
        }
    };
    run.hold(run.timing.hold).await;
    run.cluster.heal()?;
    run.record(F::Stop, "move", outcome);
    Ok(Cycle::Injected)
}
