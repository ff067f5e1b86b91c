//! Faults through Raft itself: a leadership moved to another replica, and a follower made to
//! catch up by snapshot.

use std::time::Duration;

use rand::Rng;

use super::targets::replicas_of;
use super::{Cycle, Run};
use crate::history::F;

/// Moves the leadership of `shard` to another replica (`Cluster.TransferLeader`).
pub(super) async fn transfer(run: &mut Run<'_>, shard: u64) -> anyhow::Result<Cycle> {
    let Some(from) = run.cluster.leader_of(run.client, shard).await else {
        return Ok(Cycle::Skipped);
    };
    let replicas = replicas_of(run.client, shard).await?;
    let others: Vec<u64> = replicas.into_iter().filter(|r| *r != from).collect();
    if others.is_empty() {
        return Ok(Cycle::Skipped);
    }
    let to = others[run.rng.random_range(0..others.len())];
    run.record(
        F::Start,
        "transfer",
        format!("shard {shard}: {from} -> {to}"),
    );
    let r = run.client.transfer_leader(shard, to).await;
    run.record(F::Stop, "transfer", format!("{r:?}"));
    Ok(Cycle::Injected)
}

/// Pauses a follower of `shard`, forces a snapshot (and log compaction) on the other replicas,
/// resumes the follower: it must catch up by snapshot.
pub(super) async fn snapshot(run: &mut Run<'_>, shard: u64) -> anyhow::Result<Cycle> {
    let Some(leader) = run.cluster.leader_of(run.client, shard).await else {
        return Ok(Cycle::Skipped);
    };
    let replicas = replicas_of(run.client, shard).await?;
    let Some(&lagging) = replicas.iter().find(|r| **r != leader) else {
        return Ok(Cycle::Skipped);
    };
    run.record(
        F::Start,
        "snapshot",
        format!("shard {shard}: follower {lagging} paused, others snapshot"),
    );
    run.cluster.pause(lagging)?;
    run.hold(run.timing.hold).await;
    let mut indexes = Vec::new();
    for r in replicas.iter().filter(|r| **r != lagging) {
        if let Some(addr) = run.cluster.addr(*r) {
            indexes.push((*r, run.client.snapshot_replica(&addr, shard).await));
        }
    }
    run.hold(Duration::from_secs(1)).await;
    run.cluster.heal()?;
    run.record(F::Stop, "snapshot", format!("{indexes:?}"));
    Ok(Cycle::Injected)
}
