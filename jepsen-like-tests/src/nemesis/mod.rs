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
//! - `disk-full`: every write to one node's data directory fails with `ENOSPC` (the cluster
//!   runs on [`crate::lossy_fs`]): the node must stop on its own, cleanly, and once restarted
//!   with space recover and catch up;
//! - `slow-disk`: every fsync in one node's data directory is answered 2 s late (the lossy file
//!   system again); once the node can have noticed, a leadership is moved between the other two
//!   replicas of a shard it follows, so that it stores a vote, and another is asked to move to
//!   it (to be refused): no probe write may wait longer than 1 s meanwhile;
//! - `wipe`: kill a node (half the time a shard leader), delete its Raft state and start it again
//!   under its old id, as after a replaced disk: it must stop on its own within 10 s, saying why;
//!   then a fresh node is added and the wiped one force-removed;
//! - `move`: move a node (half the time a shard leader) to new ports: its new addresses are
//!   recorded with `node update`, half the time while it still runs at the old ones; it is killed
//!   and restarted at the new ones at heal, where it must rejoin (not in `mixed`: it needs the
//!   node update to succeed, which other faults may stop);
//! - `mixed`: any of kill, pause, membership, bounce, restart, transfer, snapshot, crash (and
//!   power loss, full and slow disks with `--lossy-fs`, partition where it can run, latency with
//!   `--slow-net`, clock where libfaketime is installed), chosen per cycle.
//!
//! - `partition`: cut links between nodes (see [`crate::net`]): isolate one node, isolate a shard
//!   leader, majority / minority, random packet loss, and with 5 nodes the majorities ring and the
//!   bridge; needs the
//!   harness inside its private network namespace (`strata-jepsen` re-executes itself there);
//! - `latency`: slow links between nodes (see [`crate::slow_net`]): every link of one node (half
//!   the time a shard leader) both ways, longer than an election timeout or not; one direction of
//!   one link; or every link with jitter, as between distant sites. Same namespace.
//!
//! Modules, one per kind of fault, each driven through `Run`: `process` (kill, pause, bounce,
//! restart, crash, power loss), `disk` (full and slow disks), `raft` (leadership transfer, forced
//! snapshot), `network` (partitions, slow links), `skew` (clocks), `membership`, `wipe`,
//! `relocate` (move), `duplicate`;
//! `targets` picks nodes and shards; `probe` writes probe keys to check that writes are served.

mod disk;
mod duplicate;
mod membership;
mod network;
mod probe;
mod process;
mod raft;
mod relocate;
mod skew;
mod targets;
mod wipe;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_client::Client;

use crate::control::Cluster;
use crate::history::{Event, Kind, Recorder, F};

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
    /// A node's disk is full: every write to its data directory fails with ENOSPC; it must stop
    /// on its own, and recover once restarted with space (needs FUSE: the cluster runs on the
    /// harness' in-memory lossy file system).
    DiskFull,
    /// A node's disk turns slow: every fsync in its data directory is answered late (needs
    /// FUSE: the cluster runs on the harness' in-memory lossy file system). Writes must keep
    /// their usual latency once the cluster has had time to notice.
    SlowDisk,
    /// A node's disk is replaced: killed, its Raft state deleted, started again under its old
    /// id. It must stop on its own; then it is replaced by a fresh node.
    Wipe,
    /// A node moved to new ports: recorded with `node update` (half the time while it still runs
    /// at the old ones), killed, restarted at the new ones.
    Move,
    /// One of kill, pause, membership, bounce, restart, transfer, snapshot, crash (and power loss,
    /// full and slow disks on the lossy file system, partition where it can run, latency with the
    /// delaying proxy, clock where libfaketime is installed) per cycle.
    Mixed,
}

impl Nemesis {
    /// Whether it works on the network between nodes, and so needs the harness inside its
    /// private network namespace (see [`crate::net`]).
    pub fn needs_netns(self) -> bool {
        matches!(self, Nemesis::Partition | Nemesis::Latency)
    }

    /// Whether it works on the nodes' disks, and so needs the cluster on the lossy file system
    /// (see [`crate::lossy_fs`]).
    pub fn needs_lossy_fs(self) -> bool {
        matches!(
            self,
            Nemesis::PowerLoss | Nemesis::DiskFull | Nemesis::SlowDisk
        )
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

/// Whether a cycle injected its fault: it skips one without a target (a shard with no leader at
/// the moment, say), and a skipped cycle is not counted.
#[derive(Debug, PartialEq, Eq)]
enum Cycle {
    Injected,
    Skipped,
}

/// One nemesis run: what every fault works with, the seeded choices, and what was seen so far.
struct Run<'a> {
    cluster: &'a mut Cluster,
    client: &'a Client,
    recorder: &'a Recorder,
    timing: Timing,
    stop: &'a AtomicBool,
    /// Every choice of fault, target and shape.
    rng: StdRng,
    /// The rates a clock fault picks from.
    clock_rates: Vec<f64>,
    /// The cluster's power cuts so far.
    power_cuts: process::PowerCuts,
    /// See [`Outcome::stalls`].
    stalls: Vec<String>,
    /// See [`Outcome::exits`].
    exits: Vec<String>,
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
    if nemesis.needs_netns() && !crate::net::in_private_netns() {
        anyhow::bail!(
            "the {nemesis:?} nemesis needs the harness inside its private network namespace"
        );
    }
    if nemesis == Nemesis::Latency && !cluster.on_slow_net() {
        anyhow::bail!("the latency nemesis needs the cluster started with its delaying proxy");
    }
    anyhow::ensure!(
        !draws.clock_rates.is_empty(),
        "the clock nemesis needs at least one rate"
    );
    let mut run = Run {
        cluster,
        client,
        recorder,
        timing: draws.timing,
        stop: &stop,
        rng: StdRng::seed_from_u64(draws.seed ^ 0x6e656d65),
        clock_rates: draws.clock_rates,
        power_cuts: process::PowerCuts::new(draws.seed),
        stalls: Vec::new(),
        exits: Vec::new(),
    };
    let mut faults = 0;
    while !run.stopped() && nemesis != Nemesis::None {
        run.hold(run.timing.quiet).await;
        // Nodes restarted at the last heal have had the quiet time to open their data.
        run.record_exits();
        if run.stopped() {
            break;
        }
        let kind = run.choose(nemesis);
        let shard = run.rng.random_range(1..=targets::shard_count(client));
        if run.inject(kind, shard, faults as u64).await? == Cycle::Injected {
            faults += 1;
        }
    }
    run.record_exits();
    run.cluster.heal()?;
    Ok(Outcome {
        faults,
        stalls: run.stalls,
        exits: run.exits,
    })
}

impl Run<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Waits `d`, or less when the run stops meanwhile.
    async fn hold(&self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < until && !self.stopped() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Records a nemesis event: `name` and its real targets.
    fn record(&self, f: F, name: &str, targets: String) {
        self.recorder.record(event(f, name, targets));
    }

    /// The fault of this cycle: `nemesis` itself, or for `mixed` one of those that can run here.
    fn choose(&mut self, nemesis: Nemesis) -> Nemesis {
        if nemesis != Nemesis::Mixed {
            return nemesis;
        }
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
        // Only where they can run; appended so that a recorded seed without them still makes the
        // same choices.
        if self.cluster.on_lossy_fs() {
            kinds.push(Nemesis::PowerLoss);
        }
        if crate::net::in_private_netns() {
            kinds.push(Nemesis::Partition);
        }
        if self.cluster.on_slow_net() {
            kinds.push(Nemesis::Latency);
        }
        if crate::clock::availability().is_ok() {
            kinds.push(Nemesis::Clock);
        }
        if self.cluster.on_lossy_fs() {
            kinds.push(Nemesis::DiskFull);
            kinds.push(Nemesis::SlowDisk);
        }
        kinds[self.rng.random_range(0..kinds.len())]
    }

    /// Injects one fault of `kind` (about `shard` where it picks one), holds it and heals it.
    /// `n` numbers the faults of the run.
    async fn inject(&mut self, kind: Nemesis, shard: u64, n: u64) -> anyhow::Result<Cycle> {
        match kind {
            Nemesis::Kill => process::kill(self, shard).await,
            Nemesis::Pause | Nemesis::Bounce | Nemesis::Restart => {
                process::stop_leader(self, kind, shard).await
            }
            Nemesis::Crash => process::crash(self, false).await,
            Nemesis::PowerLoss => process::crash(self, true).await,
            Nemesis::Transfer => raft::transfer(self, shard).await,
            Nemesis::Snapshot => raft::snapshot(self, shard).await,
            Nemesis::Partition => network::partition(self, shard).await,
            Nemesis::Latency => network::slow_links(self, shard).await,
            Nemesis::Clock => skew::clock(self, shard).await,
            Nemesis::DiskFull => disk::disk_full(self, shard).await,
            Nemesis::SlowDisk => disk::slow_disk(self, shard).await,
            Nemesis::Membership => membership::replace_node(self).await,
            Nemesis::Wipe => wipe::wipe(self, shard).await,
            Nemesis::Move => relocate::relocate(self, shard).await,
            Nemesis::Duplicate => {
                duplicate::duplicate(self.client, self.recorder, n).await?;
                Ok(Cycle::Injected)
            }
            Nemesis::None | Nemesis::Mixed => unreachable!("not a fault of its own"),
        }
    }

    /// Adds the nodes that exited on their own to the exits, each recorded in the history.
    fn record_exits(&mut self) {
        for exit in self.cluster.exited_on_their_own() {
            self.record(F::Stop, "node-exited", exit.clone());
            self.exits.push(exit);
        }
    }
}
