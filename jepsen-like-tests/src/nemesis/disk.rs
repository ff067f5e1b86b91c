//! A full disk: every write to one node's data directory fails with `ENOSPC` (the cluster runs on
//! [`crate::lossy_fs`]). The node must stop on its own and cleanly — exit status 1, having said
//! why — as soon as a write of its fails, rather than run on with Raft groups that no longer
//! append, vote or apply while it still answers peers and clients. Restarted once the space is
//! back, it must recover its data and catch up; the history must stay linearizable throughout.

use std::time::Duration;

use super::targets::node_or_leader;
use super::{Cycle, Run};
use crate::history::F;

/// How long a node may run on after its disk refused a write.
const FAIL_STOP_LIMIT: Duration = Duration::from_secs(5);

/// The exit status of a node that stopped because of a failure it reported (see
/// `strata_node::server::run`).
const FAIL_STOP_EXIT_CODE: i32 = 1;

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
