//! A replaced disk: a node (half the time a shard leader) is killed, its Raft state deleted, and
//! it is started again with its old flags — the operator's mistake of bringing a machine back
//! under its old id after its disk was swapped or its data directory removed. With an empty log it
//! must not take part: a vote from it could elect a replica that lacks acknowledged writes. It
//! must stop on its own, saying why; the nemesis then does what the operator should have done —
//! adds a fresh node in its place, at its addresses (`node add --replaces`), or elsewhere before
//! force-removing it — so the cluster is whole again.
//!
//! The history must stay linearizable (or the set complete) throughout.

use std::time::Duration;

use rand::Rng;

use super::disk::FAIL_STOP_EXIT_CODE;
use super::membership::{add_fresh_node, remove_node, replace_in_place};
use super::targets::node_or_leader;
use super::{Cycle, Run};
use crate::history::F;

/// How long a wiped node may run before its peers' first messages have made it stop: they
/// heartbeat it every 50 ms in chaos runs, so a second is plenty.
const WIPED_STOP_LIMIT: Duration = Duration::from_secs(10);

/// What the wiped node's log must say.
const WIPED_LOG_LINE: &str = "by another data directory";

/// Wipes and restarts a node, checks that it stops, then replaces it.
pub(super) async fn wipe(run: &mut Run<'_>, shard: u64) -> anyhow::Result<Cycle> {
    let target = node_or_leader(run.cluster, run.client, &mut run.rng, shard).await;
    run.record(F::Start, "wipe", format!("{target}"));
    run.cluster.kill(target)?;
    run.cluster.wipe_and_restart(target)?;
    let exit = run.cluster.wait_exit(target, WIPED_STOP_LIMIT).await;
    let log = run.cluster.nodes.log_tail(target, 5);
    let outcome = match exit {
        Some(status)
            if status.code() == Some(FAIL_STOP_EXIT_CODE) && log.contains(WIPED_LOG_LINE) =>
        {
            format!("{target}: stopped on its own ({status})")
        }
        Some(status) => {
            let problem = format!(
                "node {target}, restarted with a wiped data directory, exited with {status} without saying its data directory was not the one its peers knew: {log}"
            );
            run.exits.push(problem.clone());
            problem
        }
        None => {
            let problem = format!(
                "node {target}, restarted with a wiped data directory, still ran {WIPED_STOP_LIMIT:?} later: it took part under its old id with an empty log"
            );
            run.stalls.push(problem.clone());
            run.cluster.kill(target)?;
            problem
        }
    };
    run.cluster.retire(target);
    run.record(F::Stop, "wipe", outcome);
    // Replaced as an operator would, either way half the time: a new node at the lost one's
    // addresses added in its place in one change, or a fresh node elsewhere first (the
    // replication factor needs it) and the lost one then removed without draining. Refusals
    // under other faults are recorded.
    let in_place = run.rng.random_bool(0.5);
    let replaced = async {
        let client = &run.cluster.client(Duration::from_secs(30)).await?;
        if in_place {
            replace_in_place(run, client, target).await.map(drop)
        } else {
            add_fresh_node(run, client).await?;
            remove_node(run, client, target, true).await
        }
    };
    if let Err(e) = replaced.await {
        run.record(F::Stop, "membership-error", format!("{e:#}"));
    }
    Ok(Cycle::Injected)
}
