//! Nemeses: faults injected on a seeded schedule (`--seed` reproduces the choices), each recorded
//! in the history with its real targets as a `start` and a `stop` event.
//!
//! A cycle is: wait, inject one fault, hold it, heal it. Faults:
//! - `kill`: SIGKILL a node (half the time the leader of a random shard), restart it at heal;
//! - `pause`: SIGSTOP the leader of a random shard for longer than an election timeout, then
//!   SIGCONT (the deposed-leader case);
//! - `membership`: add a fresh node (`--join` + `node add`), then drain and remove an old one,
//!   keeping the cluster at its size;
//! - `bounce`: kill a shard's leader and restart it at once — a forced election and leadership
//!   change with almost no outage;
//! - `transfer`: move a shard's leadership to another replica (`Cluster.TransferLeader`);
//! - `snapshot`: pause a follower of a shard, force a snapshot (and log compaction) on the other
//!   replicas, resume the follower — it must catch up by snapshot;
//! - `duplicate`: the network delivers a write twice: the nemesis writes a key with an explicit
//!   request id, another write overwrites it, then the first request is delivered again and the
//!   key is read — the duplicate must change nothing;
//! - `crash`: SIGKILL every node at once (a whole-cluster crash) and restart them all at heal:
//!   every acknowledged write must have reached the disk before it was acknowledged;
//! - `power-loss`: the same, and what the nodes had not fsynced is lost (the cluster runs on
//!   [`crate::lossy_fs`]): every acknowledged write must have been fsynced. The first power loss
//!   of a run drops every unsynced write, the next cuts the power while fsyncs are in flight and
//!   tears them (a random part of the unsynced sectors reaches the disk: torn tails, holes,
//!   zeros), and so on, alternating; a node must recover from either;
//! - `clock`: restart a node (half the time a shard leader) with its clock running at 0.25, 0.5,
//!   2 or 4 times real time (see [`crate::clock`]). A slow one is handed the leadership of its
//!   shards and, where partitions can run, cut off from the other nodes (not from clients) for
//!   the hold and 2 s more: a leader whose clock runs slow believes its lease lasts longer than
//!   its followers wait before electing another. A fast one only runs fast (its timers fire
//!   early). At heal it restarts with the true clock;
//! - `mixed`: any of kill, pause, membership, bounce, restart, transfer, snapshot, crash (and
//!   power loss with `--lossy-fs`, partition where it can run, latency with `--slow-net`, clock
//!   where libfaketime is installed), chosen per cycle.
//!
//! - `partition`: cut links between nodes (see [`crate::net`]): isolate one node, isolate a shard
//!   leader, majority / minority, random packet loss, and with 5 nodes the majorities ring and the
//!   bridge; needs the
//!   harness inside its private network namespace (`strata-jepsen` re-executes itself there);
//! - `latency`: slow links between nodes (see [`crate::slow_net`]): every link of one node (half
//!   the time a shard leader) both ways, longer than an election timeout or not; one direction of
//!   one link; or every link with jitter, as between distant sites. Same namespace.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_client::Client;

use strata_proto::v1::kv_client::KvClient;
use strata_proto::v1::{PutRequest, RequestId};

use crate::control::Cluster;
use crate::history::{Event, Kind, Recorder, F};
use crate::lossy_fs::{Lost, Unsynced};
use crate::slow_net::Delay;
use crate::workload::write_error_kind;

/// Which faults to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Nemesis {
    /// No faults (a baseline run).
    None,
    /// SIGKILL and restart.
    Kill,
    /// SIGSTOP and SIGCONT of a leader.
    Pause,
    /// Add a fresh node, remove an old one.
    Membership,
    /// A shard leader killed and restarted at once (a forced election).
    Bounce,
    /// A shard leader stopped gracefully (SIGTERM: it hands its leaderships over first), then
    /// restarted: one step of a rolling restart.
    Restart,
    /// Writes delivered twice with the same request id.
    Duplicate,
    /// A shard's leadership moved to another replica.
    Transfer,
    /// A forced snapshot while a follower is paused.
    Snapshot,
    /// Every node SIGKILLed at once, then all restarted.
    Crash,
    /// A power cut of every node at once: SIGKILLed, and every write of their data directories
    /// that was not fsynced dropped, then all restarted (needs FUSE: the cluster runs on the
    /// harness' in-memory lossy file system).
    PowerLoss,
    /// Network partitions (needs a private network namespace and iptables).
    Partition,
    /// Slow links between nodes (needs a private network namespace and iptables: every
    /// connection between nodes runs through the harness' delaying proxy).
    Latency,
    /// A node's clock runs slower or faster than its peers' (needs libfaketime); a slow one is
    /// given leaderships, then, where partitions can run, cut off from its peers (not from
    /// clients) while its clock is skewed.
    Clock,
    /// One of kill, pause, membership, bounce, restart, transfer, snapshot, crash (and power loss
    /// on the lossy file system, partition where it can run, latency with the delaying proxy,
    /// clock where libfaketime is installed) per cycle.
    Mixed,
}

impl Nemesis {
    /// Whether it works on the network between nodes, and so needs the harness inside its
    /// private network namespace (see [`crate::net`]).
    pub fn needs_netns(self) -> bool {
        matches!(self, Nemesis::Partition | Nemesis::Latency)
    }
}

/// Timing of a nemesis cycle.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Quiet time before each fault.
    pub quiet: Duration,
    /// How long a fault is held.
    pub hold: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            quiet: Duration::from_secs(3),
            hold: Duration::from_secs(3),
        }
    }
}

/// How a nemesis run draws its faults.
#[derive(Clone, Debug)]
pub struct Draws {
    /// Seed of every choice: a recorded seed repeats the same faults.
    pub seed: u64,
    /// Timing of each cycle.
    pub timing: Timing,
    /// The clock rates a clock fault picks from ([`crate::clock::RATES`] unless a scenario
    /// needs others, such as rates inside the nodes' lease drift margin).
    pub clock_rates: Vec<f64>,
}

fn event(f: F, name: &str, targets: String) -> Event {
    let mut e = Event::new(Kind::Nemesis, 0, f);
    e.key = Some(name.to_string());
    e.node = Some(targets);
    e
}

/// What a nemesis run did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Faults injected.
    pub faults: usize,
    /// Faults the cluster had to serve through and did not (slow links that stopped every
    /// write, say). Empty when it served through all of them.
    pub stalls: Vec<String>,
    /// Node processes that exited when no fault stopped them: a panic, or a restart after a
    /// crash or power loss that could not open its data. Empty when there were none.
    pub exits: Vec<String>,
}

/// Runs `nemesis` until `stop`, then heals everything.
pub async fn run(
    nemesis: Nemesis,
    cluster: &mut Cluster,
    client: &Client,
    recorder: &Recorder,
    draws: Draws,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Outcome> {
    let Draws {
        seed,
        timing,
        clock_rates,
    } = draws;
    anyhow::ensure!(
        !clock_rates.is_empty(),
        "the clock nemesis needs at least one rate"
    );
    if nemesis.needs_netns() && !crate::net::in_private_netns() {
        anyhow::bail!(
            "the {nemesis:?} nemesis needs the harness inside its private network namespace"
        );
    }
    if nemesis == Nemesis::Latency && !cluster.on_slow_net() {
        anyhow::bail!("the latency nemesis needs the cluster started with its delaying proxy");
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e656d65);
    // Torn power losses draw from their own generator, so that a recorded seed makes the same
    // fault choices as before they existed.
    let mut tear_rng = StdRng::seed_from_u64(seed ^ 0x74656172);
    let mut power_losses = 0u64;
    let mut faults = 0;
    let mut stalls = Vec::new();
    let mut exits = Vec::new();
    let sleep = |d: Duration, stop: &Arc<AtomicBool>| {
        let stop = stop.clone();
        async move {
            let until = tokio::time::Instant::now() + d;
            while tokio::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    while !stop.load(Ordering::Relaxed) && nemesis != Nemesis::None {
        sleep(timing.quiet, &stop).await;
        // Nodes restarted at the last heal have had the quiet time to open their data.
        record_exits(cluster, recorder, &mut exits);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let kind = match nemesis {
            Nemesis::Mixed => {
                let mut kinds = vec![
                    Nemesis::Kill,
                    Nemesis::Pause,
                    Nemesis::Membership,
                    Nemesis::Bounce,
                    Nemesis::Restart,
                    Nemesis::Transfer,
                    Nemesis::Snapshot,
                    Nemesis::Crash,
                ];
                // Only where they can run; appended so that a recorded seed without them still
                // makes the same choices.
                if cluster.on_lossy_fs() {
                    kinds.push(Nemesis::PowerLoss);
                }
                if crate::net::in_private_netns() {
                    kinds.push(Nemesis::Partition);
                }
                if cluster.on_slow_net() {
                    kinds.push(Nemesis::Latency);
                }
                if crate::clock::availability().is_ok() {
                    kinds.push(Nemesis::Clock);
                }
                kinds[rng.random_range(0..kinds.len())]
            }
            other => other,
        };
        let shard = rng.random_range(1..=shard_count(client));
        match kind {
            Nemesis::Kill => {
                let target = node_or_leader(cluster, client, &mut rng, shard).await;
                recorder.record(event(F::Start, "kill", format!("{target}")));
                cluster.kill(target)?;
                sleep(timing.hold, &stop).await;
                cluster.heal()?;
                recorder.record(event(F::Stop, "kill", format!("{target}")));
            }
            Nemesis::Pause => {
                let Some(target) = cluster.leader_of(client, shard).await else {
                    continue;
                };
                recorder.record(event(
                    F::Start,
                    "pause",
                    format!("{target} (leader of shard {shard})"),
                ));
                cluster.pause(target)?;
                sleep(timing.hold, &stop).await;
                cluster.heal()?;
                recorder.record(event(F::Stop, "pause", format!("{target}")));
            }
            Nemesis::Bounce => {
                let Some(target) = cluster.leader_of(client, shard).await else {
                    continue;
                };
                recorder.record(event(
                    F::Start,
                    "bounce",
                    format!("{target} (leader of shard {shard})"),
                ));
                cluster.kill(target)?;
                cluster.heal()?;
                recorder.record(event(F::Stop, "bounce", format!("{target}")));
            }
            Nemesis::Restart => {
                let Some(target) = cluster.leader_of(client, shard).await else {
                    continue;
                };
                recorder.record(event(
                    F::Start,
                    "restart",
                    format!("{target} (leader of shard {shard})"),
                ));
                cluster.stop(target)?;
                sleep(timing.hold, &stop).await;
                cluster.heal()?;
                recorder.record(event(F::Stop, "restart", format!("{target}")));
            }
            Nemesis::Crash | Nemesis::PowerLoss => {
                let power = kind == Nemesis::PowerLoss;
                let name = if power { "power-loss" } else { "crash" };
                let all = cluster.healthy();
                let mut targets = all.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
                recorder.record(event(F::Start, name, targets.clone()));
                // Alternating, first the most a missing fsync can lose.
                let unsynced = if power && power_losses % 2 == 1 {
                    Unsynced::Torn {
                        seed: tear_rng.random(),
                    }
                } else {
                    Unsynced::Dropped
                };
                power_losses += u64::from(power);
                let mut lost = Lost::default();
                if power {
                    if let Unsynced::Torn { .. } = unsynced {
                        // The cut lands while fsyncs are in flight (one per node, if they are
                        // writing): what they were about to make durable is on the disk in part.
                        cluster.hold_syncs(all.len(), SYNC_HOLD_LIMIT).await?;
                    }
                    lost = cluster.power_loss(&all, unsynced)?;
                } else {
                    for id in &all {
                        cluster.kill(*id)?;
                    }
                }
                sleep(timing.hold, &stop).await;
                cluster.heal()?;
                if power {
                    targets += &match unsynced {
                        Unsynced::Dropped => format!(
                            " ({} files lost their unsynced writes, {} directory entries \
                             reverted)",
                            lost.files, lost.entries
                        ),
                        Unsynced::Torn { seed } => format!(
                            " (torn, seed {seed}, {} fsyncs in flight: {} files had unsynced \
                             writes, {} of their unsynced sectors kept, {} directory entries \
                             reverted)",
                            lost.held_syncs, lost.files, lost.kept_sectors, lost.entries
                        ),
                    };
                }
                recorder.record(event(F::Stop, name, targets));
            }
            Nemesis::Duplicate => duplicate(client, recorder, faults as u64).await?,
            Nemesis::Transfer => {
                let Some(from) = cluster.leader_of(client, shard).await else {
                    continue;
                };
                let replicas = replicas_of(client, shard).await?;
                let others: Vec<u64> = replicas.into_iter().filter(|r| *r != from).collect();
                if others.is_empty() {
                    continue;
                }
                let to = others[rng.random_range(0..others.len())];
                recorder.record(event(
                    F::Start,
                    "transfer",
                    format!("shard {shard}: {from} -> {to}"),
                ));
                let r = client.transfer_leader(shard, to).await;
                recorder.record(event(F::Stop, "transfer", format!("{r:?}")));
            }
            Nemesis::Snapshot => {
                let Some(leader) = cluster.leader_of(client, shard).await else {
                    continue;
                };
                let replicas = replicas_of(client, shard).await?;
                let Some(&lagging) = replicas.iter().find(|r| **r != leader) else {
                    continue;
                };
                recorder.record(event(
                    F::Start,
                    "snapshot",
                    format!("shard {shard}: follower {lagging} paused, others snapshot"),
                ));
                cluster.pause(lagging)?;
                sleep(timing.hold, &stop).await;
                let mut indexes = Vec::new();
                for r in replicas.iter().filter(|r| **r != lagging) {
                    if let Some(addr) = cluster.addr(*r) {
                        indexes.push((*r, client.snapshot_replica(&addr, shard).await));
                    }
                }
                sleep(Duration::from_secs(1), &stop).await;
                cluster.heal()?;
                recorder.record(event(F::Stop, "snapshot", format!("{indexes:?}")));
            }
            Nemesis::Partition => {
                let members = members(client).await;
                let (name, connected) =
                    partition_plan(cluster, client, &members, &mut rng, shard).await;
                let cut = if name.starts_with("random-loss") {
                    cluster.lossy(30)?;
                    "30% of packets between every two nodes".to_string()
                } else {
                    cluster.partition(&members, connected)?
                };
                recorder.record(event(F::Start, &name, cut));
                sleep(timing.hold, &stop).await;
                cluster.heal()?;
                recorder.record(event(F::Stop, &name, String::new()));
            }
            Nemesis::Latency => {
                let members = members(client).await;
                let plan = latency_plan(cluster, client, &members, &mut rng, shard).await;
                // The stall check is fair only if the cluster served writes before the links
                // slowed down: after a crash in `mixed`, say, it may still be electing leaders.
                let served_before = if plan.must_serve {
                    Some(serving(client).await)
                } else {
                    None
                };
                let slowed = cluster.slow(&plan.links)?;
                recorder.record(event(F::Start, &plan.name, slowed));
                let probes = if served_before == Some(true) {
                    Some(probe_writes(client, timing.hold, &stop).await)
                } else {
                    sleep(timing.hold, &stop).await;
                    None
                };
                cluster.heal()?;
                let outcome = match probes {
                    Some(Probes { served, full_hold }) => {
                        if served == 0 && full_hold {
                            stalls.push(format!(
                                "{}: no write served in {:?} while every link was slowed ({})",
                                plan.name, timing.hold, plan.links[0].2
                            ));
                        }
                        format!("{served} probe writes served while slowed")
                    }
                    None if served_before == Some(false) => format!(
                        "not checked for stalls: no write served in the {BASELINE_WAIT:?} before"
                    ),
                    None => String::new(),
                };
                recorder.record(event(F::Stop, &plan.name, outcome));
            }
            Nemesis::Clock => {
                let target = node_or_leader(cluster, client, &mut rng, shard).await;
                let rate = clock_rates[rng.random_range(0..clock_rates.len())];
                cluster.skew_clock(target, rate)?;
                let mut what = format!("node {target} at {rate}x");
                // A slow clock is the one that stretches a lease: make the node lead, then cut
                // it off from its followers, which elect another leader once their promise not
                // to has run out by their own clocks. Its clients still reach it.
                let slow = rate < 1.0;
                if slow {
                    what += &lead_everything(cluster, client, target).await;
                    if crate::net::in_private_netns() {
                        let members = members(client).await;
                        if let Some(victim) = members.iter().position(|m| *m == target) {
                            let cut =
                                cluster.partition(&members, |a, b| a != victim && b != victim)?;
                            what += &format!("; cut off: {cut}");
                        }
                    }
                }
                recorder.record(event(F::Start, "clock", what));
                let hold = if slow {
                    timing.hold + SLOW_LEADER_EXTRA_HOLD
                } else {
                    timing.hold
                };
                sleep(hold, &stop).await;
                cluster.heal()?;
                recorder.record(event(F::Stop, "clock", format!("{target}")));
            }
            Nemesis::Membership => {
                // A membership change refused or timed out under other faults is recorded, not
                // fatal: safety is what the run checks.
                if let Err(e) = membership(cluster, recorder, &mut rng).await {
                    recorder.record(event(F::Stop, "membership-error", format!("{e:#}")));
                }
            }
            Nemesis::None | Nemesis::Mixed => unreachable!(),
        }
        faults += 1;
    }
    record_exits(cluster, recorder, &mut exits);
    cluster.heal()?;
    Ok(Outcome {
        faults,
        stalls,
        exits,
    })
}

/// Adds the nodes that exited on their own to `exits`, each recorded in the history.
fn record_exits(cluster: &mut Cluster, recorder: &Recorder, exits: &mut Vec<String>) {
    for exit in cluster.exited_on_their_own() {
        recorder.record(event(F::Stop, "node-exited", exit.clone()));
        exits.push(exit);
    }
}

/// How long a torn power loss waits for fsyncs to be in flight before it cuts anyway.
const SYNC_HOLD_LIMIT: Duration = Duration::from_secs(2);

/// How long [`serving`] waits for a probe write.
const BASELINE_WAIT: Duration = Duration::from_secs(5);

/// Whether the cluster acknowledges a probe write within [`BASELINE_WAIT`].
async fn serving(client: &Client) -> bool {
    let put = client.put("nemesis-probe:before", "probe");
    matches!(tokio::time::timeout(BASELINE_WAIT, put).await, Ok(Ok(_)))
}

/// What [`probe_writes`] saw.
struct Probes {
    /// Writes acknowledged within the hold.
    served: usize,
    /// The hold ran its whole length (the run did not stop during it).
    full_hold: bool,
}

/// Writes probe keys one after the other for `hold`, counting those acknowledged in time. The
/// keys are outside the workload's, and the writes are not part of the history.
async fn probe_writes(client: &Client, hold: Duration, stop: &AtomicBool) -> Probes {
    let until = tokio::time::Instant::now() + hold;
    let mut served = 0;
    let mut n = 0u64;
    while tokio::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
        n += 1;
        let put = client.put(format!("nemesis-probe:{n}"), "probe");
        match tokio::time::timeout_at(until, put).await {
            Ok(Ok(_)) => served += 1,
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => break,
        }
    }
    Probes {
        served,
        full_hold: !stop.load(Ordering::Relaxed),
    }
}

/// A connectivity graph over node positions (in the members' order) and its name.
type Plan = (String, Box<dyn Fn(usize, usize) -> bool + Send>);

/// The cluster's current members (nodes removed by the membership nemesis keep running, idle,
/// and are left out of partitions).
async fn members(client: &Client) -> Vec<u64> {
    let _ = client.refresh_map().await;
    client
        .route_table()
        .map(|t| {
            let mut ids: Vec<u64> = t.nodes.keys().copied().collect();
            ids.sort_unstable();
            ids
        })
        .unwrap_or_default()
}

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

/// The replicas of `shard` in the current shard map.
/// A healthy node: half the time the leader of `shard` (when it has one), else a random one.
async fn node_or_leader(cluster: &Cluster, client: &Client, rng: &mut StdRng, shard: u64) -> u64 {
    let leader = if rng.random_bool(0.5) {
        cluster.leader_of(client, shard).await
    } else {
        None
    };
    let healthy = cluster.healthy();
    leader.unwrap_or(healthy[rng.random_range(0..healthy.len())])
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

async fn replicas_of(client: &Client, shard: u64) -> anyhow::Result<Vec<u64>> {
    let table = client.refresh_map().await?;
    Ok(table
        .shard(shard)
        .map(|s| s.replicas.clone())
        .unwrap_or_default())
}

fn shard_count(client: &Client) -> u64 {
    client
        .route_table()
        .map_or(1, |t| t.shards.len() as u64)
        .max(1)
}

/// Adds a fresh node, waits for it to hold replicas, then removes a random old member and waits
/// for it to leave.
async fn membership(
    cluster: &mut Cluster,
    recorder: &Recorder,
    rng: &mut StdRng,
) -> anyhow::Result<()> {
    // Admin requests wait for a meta leader through other faults.
    let client = &cluster.client(Duration::from_secs(30)).await?;
    let (id, client_addr, peer_addr) = cluster.start_joining()?;
    // The new process needs a moment to listen.
    for _ in 0..100 {
        if client.node_status(&client_addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    recorder.record(event(F::Start, "add-node", format!("{id}")));
    client.add_node(&client_addr, &peer_addr, Some(id)).await?;
    wait_map(client, Duration::from_secs(60), |m| {
        m.shards.iter().any(|s| s.replicas.contains(&id))
            && m.shards.iter().all(|s| s.moving_to == 0)
    })
    .await;
    recorder.record(event(F::Stop, "add-node", format!("{id}")));

    let map = client.shard_map().await?;
    let members: Vec<u64> = map
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|n| *n != id && cluster.healthy().contains(n))
        .collect();
    let victim = members[rng.random_range(0..members.len())];
    recorder.record(event(F::Start, "remove-node", format!("{victim}")));
    client.remove_node(victim, false).await?;
    wait_map(client, Duration::from_secs(90), |m| {
        !m.nodes.iter().any(|n| n.id == victim)
    })
    .await;
    recorder.record(event(F::Stop, "remove-node", format!("{victim}")));
    Ok(())
}

/// Polls the shard map until `done` or `timeout`.
async fn wait_map(
    client: &Client,
    timeout: Duration,
    done: impl Fn(&strata_proto::v1::ShardMap) -> bool,
) {
    let until = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < until {
        let _ = client.refresh_map().await;
        if let Ok(m) = client.shard_map().await {
            if done(&m) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Process ids of the duplicate nemesis' own operations (workers count up from 0).
const DUPLICATE_PROCESS: u64 = 1 << 40;

/// One duplicated delivery: write `A` with request id `R`, overwrite with `B`, deliver `R`
/// again, read. Each step is recorded as an operation of the nemesis' process (the re-delivery as
/// a nemesis event), so the checker sees `A` then `B` acknowledged and judges the read.
async fn duplicate(client: &Client, recorder: &Recorder, n: u64) -> anyhow::Result<()> {
    let key = format!("dup:{n}");
    let process = DUPLICATE_PROCESS + n;
    let id = RequestId {
        client_id: rand::random::<u64>() | 1,
        sequence: 1,
        // Nothing is acknowledged yet: the server must keep this request's outcome.
        acked_below: 0,
    };
    let first = format!("d{n}a");
    let mut e = Event::new(Kind::Invoke, process, F::Write);
    e.key = Some(key.clone());
    e.value = Some(first.clone());
    let invoked = recorder.record(e);
    let mut done = invoked.clone();
    match raw_put(client, &key, &first, id).await {
        Ok(version) => {
            done.kind = Kind::Ok;
            done.version = Some(version);
            recorder.record(done);
        }
        Err(err) => {
            // Unknown outcome: give up on this round (the checker handles the info write).
            done.kind = Kind::Info;
            done.error = Some(err);
            recorder.record(done);
            return Ok(());
        }
    }
    let second = format!("d{n}b");
    let mut e = Event::new(Kind::Invoke, process, F::Write);
    e.key = Some(key.clone());
    e.value = Some(second.clone());
    let invoked = recorder.record(e);
    let mut done = invoked.clone();
    match client.put(key.clone(), second).await {
        Ok(v) => {
            done.kind = Kind::Ok;
            done.version = Some(v);
        }
        Err(err) => {
            done.kind = write_error_kind(&err);
            done.error = Some(err.to_string());
        }
    }
    let second_ok = done.kind == Kind::Ok;
    recorder.record(done);
    if !second_ok {
        return Ok(());
    }
    recorder.record(event(
        F::Start,
        "duplicate",
        format!("request {}/{} for {key}", id.client_id, id.sequence),
    ));
    let redelivered = raw_put(client, &key, &first, id).await;
    recorder.record(event(
        F::Stop,
        "duplicate",
        format!("answered {redelivered:?}"),
    ));
    let mut e = Event::new(Kind::Invoke, process + (1 << 20), F::Read);
    e.key = Some(key.clone());
    let invoked = recorder.record(e);
    let mut done = invoked;
    match client.get(key).await {
        Ok(r) => {
            done.kind = Kind::Ok;
            done.value = r
                .as_ref()
                .map(|r| String::from_utf8_lossy(&r.value).to_string());
            done.version = r.map(|r| r.version);
        }
        Err(err) => {
            done.kind = Kind::Fail;
            done.error = Some(err.to_string());
        }
    }
    recorder.record(done);
    Ok(())
}

/// A put with an explicit request id, sent to the replicas of the key's shard until the leader
/// takes it.
async fn raw_put(client: &Client, key: &str, value: &str, id: RequestId) -> Result<u64, String> {
    let table = client.refresh_map().await.map_err(|e| e.to_string())?;
    let shard = table.shard_for_key(key.as_bytes()).clone();
    let mut last = String::new();
    for _ in 0..20 {
        for node in &shard.replicas {
            let Some(addr) = table.nodes.get(node) else {
                continue;
            };
            let Ok(mut kv) = KvClient::connect(format!("http://{addr}")).await else {
                continue;
            };
            let req = PutRequest {
                key: key.to_string().into(),
                value: value.to_string().into(),
                request_id: Some(id),
            };
            match kv.put(req).await {
                Ok(r) => return Ok(r.into_inner().version),
                Err(s) => last = s.message().to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}
