//! Faults on the network between nodes (needs the harness inside its private network namespace,
//! see [`crate::net`]): partitions and packet loss, and slow links through the harness' delaying
//! proxy ([`crate::slow_net`]).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use strata_client::Client;

use super::probe::{probe_writes, serving, Probes, BASELINE_WAIT};
use super::targets::members;
use super::{Cycle, Run};
use crate::control::Cluster;
use crate::history::F;
use crate::slow_net::Delay;

/// Cuts links between nodes as [`partition_plan`] chooses, for the hold.
pub(super) async fn partition(run: &mut Run<'_>, shard: u64) -> anyhow::Result<Cycle> {
    let members = members(run.client).await;
    let (name, connected) =
        partition_plan(run.cluster, run.client, &members, &mut run.rng, shard).await;
    let cut = if name.starts_with("random-loss") {
        run.cluster.lossy(30)?;
        "30% of packets between every two nodes".to_string()
    } else {
        run.cluster.partition(&members, connected)?
    };
    run.record(F::Start, &name, cut);
    run.hold(run.timing.hold).await;
    run.cluster.heal()?;
    run.record(F::Stop, &name, String::new());
    Ok(Cycle::Injected)
}

/// Slows links as [`latency_plan`] chooses, for the hold. Where the plan says the cluster must
/// serve through it, probe writes check that it does; a hold without one is a stall.
pub(super) async fn slow_links(run: &mut Run<'_>, shard: u64) -> anyhow::Result<Cycle> {
    let members = members(run.client).await;
    let plan = latency_plan(run.cluster, run.client, &members, &mut run.rng, shard).await;
    // The stall check is fair only if the cluster served writes before the links slowed down:
    // after a crash in `mixed`, say, it may still be electing leaders.
    let served_before = if plan.must_serve {
        Some(serving(run.client).await)
    } else {
        None
    };
    let slowed = run.cluster.slow(&plan.links)?;
    run.record(F::Start, &plan.name, slowed);
    let probes = if served_before == Some(true) {
        Some(probe_writes(run.client, run.timing.hold, run.stop).await)
    } else {
        run.hold(run.timing.hold).await;
        None
    };
    run.cluster.heal()?;
    let outcome = match probes {
        Some(Probes {
            served, full_hold, ..
        }) => {
            if served == 0 && full_hold {
                run.stalls.push(format!(
                    "{}: no write served in {:?} while every link was slowed ({})",
                    plan.name, run.timing.hold, plan.links[0].2
                ));
            }
            format!("{served} probe writes served while slowed")
        }
        None if served_before == Some(false) => {
            format!("not checked for stalls: no write served in the {BASELINE_WAIT:?} before")
        }
        None => String::new(),
    };
    run.record(F::Stop, &plan.name, outcome);
    Ok(Cycle::Injected)
}

/// A connectivity graph over node positions (in the members' order) and its name.
type Plan = (String, Box<dyn Fn(usize, usize) -> bool + Send>);

/// Chooses a partition of `ids`: isolate a node, isolate a shard's leader, majority / minority,
/// random loss, and with 5 nodes the majorities ring or the bridge.
async fn partition_plan(
    cluster: &Cluster,
    client: &Client,
    ids: &[u64],
    rng: &mut StdRng,
    shard: u64,
) -> Plan {
    let n = ids.len();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let choice = rng.random_range(0..if n >= 5 { 6 } else { 4 });
    match choice {
        0 | 1 => {
            let leader = if choice == 1 {
                cluster.leader_of(client, shard).await
            } else {
                None
            };
            let victim = leader
                .and_then(|l| ids.iter().position(|i| *i == l))
                .unwrap_or(order[0]);
            let name = match leader {
                Some(l) => format!("isolate-leader (node {l}, shard {shard})"),
                None => format!("isolate-node {}", ids[victim]),
            };
            (name, Box::new(move |a, b| a != victim && b != victim))
        }
        2 => {
            let minority: Vec<usize> = order[..n / 2].to_vec();
            let name = format!(
                "majority-minority (minority {:?})",
                minority.iter().map(|p| ids[*p]).collect::<Vec<_>>()
            );
            (
                name,
                Box::new(move |a, b| minority.contains(&a) == minority.contains(&b)),
            )
        }
        3 => (
            "random-loss 30% between all nodes".into(),
            Box::new(|_, _| true),
        ),
        4 => {
            // Each node sees its two neighbours on a ring: every node is in a majority, and no
            // two majorities are the same.
            let pos: Vec<usize> = (0..n)
                .map(|p| order.iter().position(|o| *o == p).unwrap())
                .collect();
            let name = format!(
                "majorities-ring {:?}",
                order.iter().map(|p| ids[*p]).collect::<Vec<_>>()
            );
            (
                name,
                Box::new(move |a, b| {
                    let d = pos[a].abs_diff(pos[b]);
                    d == 1 || d == n - 1
                }),
            )
        }
        _ => {
            // Two halves that only the bridge node connects.
            let (left, bridge) = (order[..n / 2].to_vec(), order[n / 2]);
            let name = format!(
                "bridge (node {} between {:?} and the rest)",
                ids[bridge],
                left.iter().map(|p| ids[*p]).collect::<Vec<_>>()
            );
            (
                name,
                Box::new(move |a, b| {
                    a == bridge || b == bridge || left.contains(&a) == left.contains(&b)
                }),
            )
        }
    }
}

/// Links to slow down, how much, and what the cluster owes meanwhile.
struct SlowPlan {
    name: String,
    links: Vec<(u64, u64, Delay)>,
    /// Every round trip stays below an election timeout: the cluster must keep taking writes,
    /// only slower.
    must_serve: bool,
}

/// Chooses links among `ids` to slow down and how much. Elections in chaos runs time out after
/// 0.5–1 s (see [`crate::control::FAST_RAFT`]), heartbeats go every 50 ms: a delay around the
/// election timeout makes followers give up on a leader that is still alive, a delay of a few
/// heartbeats must not.
async fn latency_plan(
    cluster: &Cluster,
    client: &Client,
    ids: &[u64],
    rng: &mut StdRng,
    shard: u64,
) -> SlowPlan {
    let ms = |lo: u64, hi: u64, rng: &mut StdRng| Duration::from_millis(rng.random_range(lo..hi));
    let random_node = |rng: &mut StdRng| ids[rng.random_range(0..ids.len())];
    match rng.random_range(0..4) {
        choice @ (0 | 1) => {
            // Every link of one node, both ways.
            let leader = if choice == 1 {
                cluster.leader_of(client, shard).await
            } else {
                None
            };
            let victim = leader.unwrap_or_else(|| random_node(rng));
            let delay = Delay {
                base: ms(200, 1500, rng),
                jitter: ms(0, 300, rng),
            };
            let name = match leader {
                Some(l) => format!("slow-leader (node {l}, shard {shard})"),
                None => format!("slow-node {victim}"),
            };
            let links = ids
                .iter()
                .filter(|o| **o != victim)
                .flat_map(|o| [(victim, *o, delay), (*o, victim, delay)])
                .collect();
            SlowPlan {
                name,
                links,
                must_serve: false,
            }
        }
        2 => {
            // One direction only: what one side sends arrives late, what it hears does not.
            let from = random_node(rng);
            let others: Vec<u64> = ids.iter().copied().filter(|o| *o != from).collect();
            let to = others[rng.random_range(0..others.len())];
            let delay = Delay {
                base: ms(500, 2000, rng),
                jitter: Duration::ZERO,
            };
            SlowPlan {
                name: format!("slow-one-way {from}->{to}"),
                links: vec![(from, to, delay)],
                must_serve: false,
            }
        }
        _ => {
            // Every link, with jitter as large as the delay, as between distant sites: at most
            // 200 ms each way, so a round trip stays below the 500 ms election timeout.
            let base = ms(20, 100, rng);
            let delay = Delay { base, jitter: base };
            let links = ids
                .iter()
                .flat_map(|a| {
                    ids.iter()
                        .filter(move |b| *b != a)
                        .map(move |b| (*a, *b, delay))
                })
                .collect();
            SlowPlan {
                name: "slow-all".to_string(),
                links,
                must_serve: true,
            }
        }
    }
}
