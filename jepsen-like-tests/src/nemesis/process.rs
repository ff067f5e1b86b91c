//! Faults on node processes: kill, pause, bounce and restart one node; crash or cut the power of
//! every node at once.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::targets::node_or_leader;
use super::{Cycle, Nemesis, Run};
use crate::history::F;
use crate::lossy_fs::{Lost, Unsynced};

/// How long a torn power loss waits for fsyncs to be in flight before it cuts anyway.
const SYNC_HOLD_LIMIT: Duration = Duration::from_secs(2);

/// SIGKILLs a node (half the time the leader of `shard`), restarts it at heal.
pub(super) async fn kill(run: &mut Run<'_>, shard: u64) -> anyhow::Result<Cycle> {
    let target = node_or_leader(run.cluster, run.client, &mut run.rng, shard).await;
    run.record(F::Start, "kill", format!("{target}"));
    run.cluster.kill(target)?;
    run.hold(run.timing.hold).await;
    run.cluster.heal()?;
    run.record(F::Stop, "kill", format!("{target}"));
    Ok(Cycle::Injected)
}

/// Stops the leader of `shard` as `kind` says: `pause` (SIGSTOP for the hold, the deposed-leader
/// case), `restart` (SIGTERM, so it hands its leaderships over, restarted after the hold) or
/// `bounce` (SIGKILL and restart at once, a forced election).
pub(super) async fn stop_leader(
    run: &mut Run<'_>,
    kind: Nemesis,
    shard: u64,
) -> anyhow::Result<Cycle> {
    let Some(target) = run.cluster.leader_of(run.client, shard).await else {
        return Ok(Cycle::Skipped);
    };
    let name = match kind {
        Nemesis::Pause => "pause",
        Nemesis::Restart => "restart",
        Nemesis::Bounce => "bounce",
        other => unreachable!("{other:?} does not stop a leader"),
    };
    run.record(
        F::Start,
        name,
        format!("{target} (leader of shard {shard})"),
    );
    match kind {
        Nemesis::Pause => {
            run.cluster.pause(target)?;
            run.hold(run.timing.hold).await;
        }
        Nemesis::Restart => {
            run.cluster.stop(target)?;
            run.hold(run.timing.hold).await;
        }
        _ => run.cluster.kill(target)?,
    }
    run.cluster.heal()?;
    run.record(F::Stop, name, format!("{target}"));
    Ok(Cycle::Injected)
}

/// The power cuts of a run so far, and how they tear.
pub(super) struct PowerCuts {
    /// Torn power losses draw from their own generator, so that a recorded seed makes the same
    /// fault choices as before they existed.
    tear_rng: StdRng,
    count: u64,
}

impl PowerCuts {
    pub(super) fn new(seed: u64) -> PowerCuts {
        PowerCuts {
            tear_rng: StdRng::seed_from_u64(seed ^ 0x74656172),
            count: 0,
        }
    }

    /// What the next power cut does to unsynced writes: alternating, first the most a missing
    /// fsync can lose.
    fn next(&mut self) -> Unsynced {
        let unsynced = if self.count % 2 == 1 {
            Unsynced::Torn {
                seed: self.tear_rng.random(),
            }
        } else {
            Unsynced::Dropped
        };
        self.count += 1;
        unsynced
    }
}

/// SIGKILLs every node at once and restarts them all at heal; with `power`, what they had not
/// fsynced is lost too (the cluster runs on [`crate::lossy_fs`]).
pub(super) async fn crash(run: &mut Run<'_>, power: bool) -> anyhow::Result<Cycle> {
    let name = if power { "power-loss" } else { "crash" };
    let all = run.cluster.healthy();
    let mut targets = all.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    run.record(F::Start, name, targets.clone());
    let mut lost = Lost::default();
    let mut unsynced = None;
    if power {
        let how = run.power_cuts.next();
        if let Unsynced::Torn { .. } = how {
            // The cut lands while fsyncs are in flight (one per node, if they are writing): what
            // they were about to make durable is on the disk in part.
            run.cluster.hold_syncs(all.len(), SYNC_HOLD_LIMIT).await?;
        }
        lost = run.cluster.power_loss(&all, how)?;
        unsynced = Some(how);
    } else {
        for id in &all {
            run.cluster.kill(*id)?;
        }
    }
    run.hold(run.timing.hold).await;
    run.cluster.heal()?;
    targets += &match unsynced {
        None => String::new(),
        Some(Unsynced::Dropped) => format!(
            " ({} files lost their unsynced writes, {} directory entries reverted)",
            lost.files, lost.entries
        ),
        Some(Unsynced::Torn { seed }) => format!(
            " (torn, seed {seed}, {} fsyncs in flight: {} files had unsynced writes, {} of their \
             unsynced sectors kept, {} directory entries reverted)",
            lost.held_syncs, lost.files, lost.kept_sectors, lost.entries
        ),
    };
    run.record(F::Stop, name, targets);
    Ok(Cycle::Injected)
}
