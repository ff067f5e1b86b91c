//! Disk faults on one node (the cluster runs on [`crate::lossy_fs`]).
//!
//! - A full disk: every write to the node's data directory fails with `ENOSPC`. The node must
//!   stop on its own and cleanly — exit status 1, having said why — as soon as a write of its
//!   fails, rather than run on with Raft groups that no longer append, vote or apply while it
//!   still answers peers and clients. Restarted once the space is back, it must recover its data
//!   and catch up.
//! - A slow disk: every fsync in the node's data directory is answered seconds late, the gray
//!   failure of a wearing SSD or a noisy neighbour. Two of three replicas are fast, so every
//!   write can still commit at its usual speed; the cluster must keep serving writes without a
//!   stall from the moment the disk turns slow — while the slow node still leads shards, hands
//!   its leaderships over, and stores Raft votes.
//!
//! The history must stay linearizable throughout.

use std::time::Duration;

use rand::Rng;

use super::probe::{longest_silence, probe_writes, serving, BASELINE_WAIT};
use super::targets::{node_or_leader, replicas_of, shard_count};
use super::{Cycle, Run};
use crate::history::F;

/// How long a node may run on after its disk refused a write.
const FAIL_STOP_LIMIT: Duration = Duration::from_secs(5);

/// The exit status of a node that stopped because of a failure it reported (see
/// `strata_node::server::run`).
pub(super) const FAIL_STOP_EXIT_CODE: i32 = 1;

/// Fills the disk of a node (half the time the leader of `shard`), waits for it to stop, keeps
/// it down for the hold, then frees the space and restarts it.
pub(super) async fn disk_full(run: &mut Run<'_>, shard: u64) -> anyhow::Result<Cycle> {
    let target = node_or_leader(run.cluster, run.client, &mut run.rng, shard).await;
    run.record(F::Start, "disk-full", format!("{target}"));
    run.cluster.fill_disk(target)?;
    // Every node appends what its groups replicate, so traffic reaches its disk at once.
    let exit = run
        .cluster
        .wait_exit(target, run.timing.hold + FAIL_STOP_LIMIT)
        .await;
    let refused = run.cluster.refused_writes();
    let outcome = match exit {
        Some(status) if status.code() == Some(FAIL_STOP_EXIT_CODE) => {
            format!("{target}: stopped on its own ({status}) after {refused} refused writes")
        }
        Some(status) => {
            let problem = format!(
                "node {target} on a full disk exited with {status}, not a clean stop (exit status {FAIL_STOP_EXIT_CODE})"
            );
            run.exits.push(problem.clone());
            problem
        }
        None if refused > 0 => {
            let problem = format!(
                "node {target} still ran {FAIL_STOP_LIMIT:?} after its full disk refused {refused} writes"
            );
            run.stalls.push(problem.clone());
            run.cluster.kill(target)?;
            problem
        }
        None => format!("{target}: wrote nothing while its disk was full"),
    };
    run.hold(run.timing.hold).await;
    run.cluster.heal()?;
    run.record(F::Stop, "disk-full", outcome);
    Ok(Cycle::Injected)
}

/// How late a slow disk answers each fsync: longer than an election timeout, so that a node
/// which waits for its disk where it must not (its heartbeats, say) loses its leaderships.
const SLOW_FSYNC: Duration = Duration::from_secs(2);

/// How long the nodes get to notice a slow disk (an fsync under way for 500 ms marks it slow)
/// before leaderships are moved.
const SLOW_DISK_NOTICED: Duration = Duration::from_millis(1500);

/// The longest a probe write may wait, and the slow node may leave its status calls unanswered,
/// while one disk is slow. A write needs a majority's fsyncs, and two of three disks are fast:
/// only a node that stalls on its slow disk, or a leadership handed to it, makes a write wait
/// this long; and a node that answers nothing for this long has its threads waiting for the
/// disk — a gray failure turned into a freeze, which a leadership or an election on it would
/// turn into stalled writes.
const SLOW_DISK_STALL_LIMIT: Duration = Duration::from_secs(1);

/// Slows the disk of a node (half the time the leader of `shard`). From that moment on, for
/// [`SLOW_DISK_NOTICED`] and the hold, probe writes check that no write waits longer than
/// [`SLOW_DISK_STALL_LIMIT`], and status calls that the slow node never goes that long without
/// answering one — while the placement driver moves the node's leaderships away, and
/// while, once the nodes had [`SLOW_DISK_NOTICED`] to notice, the nemesis asks for a leadership
/// to be moved to the node (which must be refused) and makes it store a Raft vote (a leadership
/// moved between the other two replicas of a shard it follows).
pub(super) async fn slow_disk(run: &mut Run<'_>, shard: u64) -> anyhow::Result<Cycle> {
    let target = node_or_leader(run.cluster, run.client, &mut run.rng, shard).await;
    let served_before = serving(run.client).await;
    run.cluster.slow_disk(target, SLOW_FSYNC)?;
    run.record(
        F::Start,
        "slow-disk",
        format!("{target}: fsyncs answered {SLOW_FSYNC:?} late"),
    );
    let (client, stop, probed_for) = (run.client, run.stop, SLOW_DISK_NOTICED + run.timing.hold);
    let addr = run
        .cluster
        .addr(target)
        .ok_or_else(|| anyhow::anyhow!("node {target} has no client address"))?;
    let probing = probe_writes(client, probed_for, stop);
    let answering = longest_silence(client, &addr, probed_for, stop);
    let moves = async {
        run.hold(SLOW_DISK_NOTICED).await;
        let refused = leadership_to(run, target).await;
        let vote = election_around(run, target).await;
        (refused, vote)
    };
    let (probes, silence, (refused, vote)) = tokio::join!(probing, answering, moves);
    run.cluster.heal()?;
    let outcome = if !served_before {
        format!("not checked for stalls: no write served in the {BASELINE_WAIT:?} before")
    } else {
        if probes.full_hold {
            if probes.slowest > SLOW_DISK_STALL_LIMIT {
                run.stalls.push(format!(
                    "a write waited {:?} while node {target}'s disk was slow (limit {SLOW_DISK_STALL_LIMIT:?})",
                    probes.slowest
                ));
            }
            if silence > SLOW_DISK_STALL_LIMIT {
                run.stalls.push(format!(
                    "node {target} answered nothing for {silence:?} while its disk was slow (limit {SLOW_DISK_STALL_LIMIT:?})"
                ));
            }
        }
        format!(
            "{refused}; {vote}; {} probe writes served from the start, the slowest in {:?} (sent {:?} into the probes); node {target} silent for at most {silence:?}",
            probes.served, probes.slowest, probes.slowest_sent
        )
    };
    run.record(F::Stop, "slow-disk", outcome);
    Ok(Cycle::Injected)
}

/// The shards `node` follows: (shard, its leader, its third replica if it has one).
async fn followed_by(run: &Run<'_>, node: u64) -> Vec<(u64, u64, Option<u64>)> {
    let mut followed = Vec::new();
    for shard in 1..=shard_count(run.client) {
        let Some(leader) = run.cluster.leader_of(run.client, shard).await else {
            continue;
        };
        let replicas = replicas_of(run.client, shard).await.unwrap_or_default();
        if leader == node || !replicas.contains(&node) {
            continue;
        }
        let third = replicas
            .iter()
            .copied()
            .find(|r| *r != leader && *r != node);
        followed.push((shard, leader, third));
    }
    followed
}

/// Moves the leadership of a random shard that `node` follows to its third replica, so that
/// `node` takes part in an election and stores its vote. Says what it did.
async fn election_around(run: &mut Run<'_>, node: u64) -> String {
    let moves: Vec<(u64, u64, u64)> = followed_by(run, node)
        .await
        .into_iter()
        .filter_map(|(shard, leader, third)| Some((shard, leader, third?)))
        .collect();
    if moves.is_empty() {
        return format!("node {node} follows no shard with a third replica to elect");
    }
    let (shard, from, to) = moves[run.rng.random_range(0..moves.len())];
    move_leadership(run, shard, from, to).await
}

/// Asks for the leadership of a random shard that `node` follows to be moved to `node`, which
/// its slow disk should make the leader refuse. Says what came of it.
async fn leadership_to(run: &mut Run<'_>, node: u64) -> String {
    let followed = followed_by(run, node).await;
    if followed.is_empty() {
        return format!("node {node} follows no shard to be handed");
    }
    let (shard, from, _) = followed[run.rng.random_range(0..followed.len())];
    move_leadership(run, shard, from, node).await
}

/// Moves `shard`'s leadership from `from` to `to` (`Cluster.TransferLeader`). Says what came of
/// it.
async fn move_leadership(run: &Run<'_>, shard: u64, from: u64, to: u64) -> String {
    match run.client.transfer_leader(shard, to).await {
        Ok(()) => format!("shard {shard}'s leadership moved {from} -> {to}"),
        Err(e) => format!("shard {shard}'s leadership not moved {from} -> {to}: {e}"),
    }
}
