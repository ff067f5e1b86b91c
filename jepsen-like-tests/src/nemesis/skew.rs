//! Clock faults: a node restarted with its clock at another rate (see [`crate::clock`]).

use std::time::Duration;

use rand::Rng;
use strata_client::Client;

use super::targets::{members, node_or_leader};
use super::{Cycle, Run};
use crate::control::Cluster;
use crate::history::F;

/// Restarts a node (half the time the leader of `shard`) with its clock at one of the run's
/// rates. A slow clock is the one that stretches a lease: the node is made to lead, then cut
/// off from its followers, which elect another leader once their promise not to has run out by
/// their own clocks. Its clients still reach it. A fast one only runs fast. At heal it restarts
/// with the true clock.
pub(super) async fn clock(run: &mut Run<'_>, shard: u64) -> anyhow::Result<Cycle> {
    let target = node_or_leader(run.cluster, run.client, &mut run.rng, shard).await;
    let rate = run.clock_rates[run.rng.random_range(0..run.clock_rates.len())];
    run.cluster.skew_clock(target, rate)?;
    let mut what = format!("node {target} at {rate}x");
    let slow = rate < 1.0;
    if slow {
        what += &lead_everything(run.cluster, run.client, target).await;
        if crate::net::in_private_netns() {
            let members = members(run.client).await;
            if let Some(victim) = members.iter().position(|m| *m == target) {
                let cut = run
                    .cluster
                    .partition(&members, |a, b| a != victim && b != victim)?;
                what += &format!("; cut off: {cut}");
            }
        }
    }
    run.record(F::Start, "clock", what);
    let hold = if slow {
        run.timing.hold + SLOW_LEADER_EXTRA_HOLD
    } else {
        run.timing.hold
    };
    run.hold(hold).await;
    run.cluster.heal()?;
    run.record(F::Stop, "clock", format!("{target}"));
    Ok(Cycle::Injected)
}

/// Hands node `target` the leadership of every shard it replicates, once its groups have
/// leaders again after its restart (at most [`READY_WAIT`]), asking again for the shards it does
/// not lead yet (a transfer to a replica still catching up does not take) until it leads them all
/// or [`LEAD_WAIT`] has passed. Returns, for the history, the shards it leads: `, leads shards
/// [..]`.
async fn lead_everything(cluster: &mut Cluster, client: &Client, target: u64) -> String {
    if let Err(e) = cluster.nodes.wait_ready(READY_WAIT).await {
        return format!(", not ready for leaderships: {e:#}");
    }
    let replicated: Vec<u64> = match client.refresh_map().await {
        Ok(table) => table
            .shards
            .iter()
            .filter(|s| s.replicas.contains(&target))
            .map(|s| s.id)
            .collect(),
        Err(e) => return format!(", no shard map for leaderships: {e}"),
    };
    let until = tokio::time::Instant::now() + LEAD_WAIT;
    let mut led = Vec::new();
    loop {
        for shard in replicated.iter().filter(|s| !led.contains(*s)) {
            let _ = client.transfer_leader(*shard, target).await;
        }
        // A transfer is answered once it has started: give the elections time to finish.
        tokio::time::sleep(Duration::from_millis(300)).await;
        led.clear();
        for shard in &replicated {
            if cluster.leader_of(client, *shard).await == Some(target) {
                led.push(*shard);
            }
        }
        if led.len() == replicated.len() || tokio::time::Instant::now() >= until {
            return format!(", leads shards {led:?}");
        }
    }
}

/// How long [`lead_everything`] keeps asking.
const LEAD_WAIT: Duration = Duration::from_secs(3);

/// How much longer a slow node stays cut off than other faults last: its followers first wait
/// out their promise not to vote (one maximum election timeout, 1 s in chaos runs) and then their
/// own election timeout (up to another 1 s), so with the usual hold the new leader would serve
/// for only about a second before the heal.
const SLOW_LEADER_EXTRA_HOLD: Duration = Duration::from_secs(2);

/// How long a node restarted by a fault may take before its groups have leaders again.
const READY_WAIT: Duration = Duration::from_secs(20);
