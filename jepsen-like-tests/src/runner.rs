//! One chaos run: start a cluster, run a workload and a nemesis together for the time limit,
//! heal, then check liveness (every shard takes a write), take the set workload's final reads,
//! check that replicas converged (every replica of a shard holds the same data), and check the
//! history. Writes `history.jsonl`, `results.json` and `report.txt` into the output directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use strata_client::{Client, Consistency, ScanOptions};
use strata_cluster::launcher::ClusterFile;
use strata_proto::v1::kv_client::KvClient;
use strata_proto::v1::ScanRequest;

use crate::checker::{self, Results};
use crate::control::Cluster;
use crate::history::{Event, Kind, Recorder, F};
use crate::nemesis::{self, Draws, Nemesis, Timing};
use crate::report;
use crate::workload::{self, ReadLevel, Settings, Workload};

/// Everything a run needs.
#[derive(Clone, Debug, Serialize)]
pub struct RunOptions {
    /// Workload.
    pub workload: Workload,
    /// Nemesis.
    pub nemesis: Nemesis,
    /// Nodes (3 or 5).
    pub nodes: usize,
    /// Shards.
    pub shards: u32,
    /// Traffic duration.
    pub time_limit: Duration,
    /// Operations per second.
    pub rate: u32,
    /// Workers.
    pub concurrency: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Output directory.
    pub out: PathBuf,
    /// The `strata-node` binary.
    pub node_bin: PathBuf,
    /// A planted bug to enable in the nodes (needs a binary built with `planted-bugs`).
    pub planted_bug: Option<String>,
    /// Send reads straight to random nodes.
    pub pinned_reads: bool,
    /// The consistency of the register workload's reads.
    pub reads: ReadLevel,
    /// Run the cluster on the lossy file system (always so for the power-loss nemesis).
    pub lossy_fs: bool,
    /// Run every connection between nodes through the delaying proxy (always so for the latency
    /// nemesis).
    pub slow_net: bool,
    /// Search budget per key.
    pub budget: u64,
    /// Extra flags for every node (after the chaos suite's Raft settings, so they override
    /// them), e.g. `--lease-drift-percent 80`.
    pub node_args: Vec<String>,
    /// The rates a clock fault draws from (see [`crate::clock::RATES`]).
    pub clock_rates: Vec<f64>,
}

/// What a run concluded.
#[derive(Serialize, Debug)]
pub struct RunResult {
    /// The options, for the record.
    pub options: RunOptions,
    /// Faults injected.
    pub faults: usize,
    /// Every shard took a write after healing.
    pub live: bool,
    /// Faults the cluster should have served through and did not (see
    /// [`crate::nemesis::Outcome::stalls`]).
    pub stalls: Vec<String>,
    /// Nodes that exited when no fault stopped them (see
    /// [`crate::nemesis::Outcome::exits`]).
    pub exits: Vec<String>,
    /// Shards whose replicas disagree after healing (empty = converged).
    pub diverged: Vec<u64>,
    /// The history check.
    pub checks: Results,
    /// The overall verdict.
    pub valid: bool,
}

/// Runs one scenario.
pub async fn run(opts: RunOptions) -> anyhow::Result<RunResult> {
    std::fs::create_dir_all(&opts.out)?;
    let cluster_dir = opts.out.join("cluster");
    crate::lossy_fs::detach_if_dead(&cluster_dir);
    // Another run still using this `--out` would lose its nodes' data dirs from under them.
    if let Some(previous) = ClusterFile::load(&cluster_dir)? {
        previous
            .ensure_not_running(&cluster_dir)
            .context("another run uses this --out; stop it or choose another directory")?;
    }
    let _ = std::fs::remove_dir_all(&cluster_dir);
    if let Some(bug) = &opts.planted_bug {
        // Inherited by the node processes started below.
        std::env::set_var("STRATA_PLANTED_BUG", bug);
    } else {
        std::env::remove_var("STRATA_PLANTED_BUG");
    }
    let lossy = opts.lossy_fs || opts.nemesis.needs_lossy_fs();
    let slow = opts.slow_net || opts.nemesis == Nemesis::Latency;
    let mut cluster = Cluster::start(
        &cluster_dir,
        &opts.node_bin,
        opts.nodes,
        opts.shards,
        &opts.node_args,
        lossy,
        slow,
    )
    .await
    .context("start cluster")?;
    let client = cluster.client(Duration::from_secs(5)).await?;
    let recorder = Arc::new(Recorder::create(&opts.out.join("history.jsonl"))?);

    let settings = Settings {
        workload: opts.workload,
        rate: opts.rate,
        concurrency: opts.concurrency,
        keys: 8,
        ops_per_key: 150,
        pinned_reads: opts.pinned_reads,
        reads: opts.reads,
        node_addrs: cluster
            .ids()
            .into_iter()
            .filter_map(|id| cluster.addr(id).map(|a| (id, a)))
            .collect(),
        seed: opts.seed,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let workers = tokio::spawn(workload::run(
        client.clone(),
        settings,
        recorder.clone(),
        stop.clone(),
    ));
    let timer = {
        let (stop, limit, recorder) = (stop.clone(), opts.time_limit, recorder.clone());
        tokio::spawn(async move {
            let until = Instant::now() + limit;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(500)).await;
                recorder.flush();
            }
            stop.store(true, Ordering::Relaxed);
        })
    };
    let faults = nemesis::run(
        opts.nemesis,
        &mut cluster,
        &client,
        &recorder,
        Draws {
            seed: opts.seed,
            timing: Timing::default(),
            clock_rates: opts.clock_rates.clone(),
        },
        stop.clone(),
    )
    .await;
    // Whatever the nemesis did, traffic stops at the time limit and the cluster heals.
    let _ = timer.await;
    let _ = workers.await;
    cluster.heal()?;
    let nemesis::Outcome {
        faults,
        mut stalls,
        mut exits,
    } = faults?;
    let recovered = match cluster.wait_recovered(Duration::from_secs(60)).await {
        Ok(exited) => {
            exits.extend(exited);
            true
        }
        // A finding, not an error of the run: the history up to here is still checked (a planted
        // `skip-fsync` can lose a group's whole state in a power loss, and with it its leader).
        Err(e) => {
            stalls.push(format!("{e:#}"));
            false
        }
    };

    // A cluster that did not recover can take no final write or read, and its replicas cannot
    // converge: waiting for each of those to time out would only make the run longer.
    let live = recovered && liveness(&client).await;
    if recovered && opts.workload == Workload::Set {
        final_reads(&client, &recorder).await;
    }
    let diverged = if recovered {
        convergence(&client, Duration::from_secs(30)).await
    } else {
        Vec::new()
    };
    let events = recorder.finish()?;
    let checks = checker::check(&events, opts.budget);
    let valid =
        checks.valid && live && stalls.is_empty() && exits.is_empty() && diverged.is_empty();
    let result = RunResult {
        options: opts.clone(),
        faults,
        live,
        stalls,
        exits,
        diverged,
        checks,
        valid,
    };
    std::fs::write(
        opts.out.join("results.json"),
        serde_json::to_vec_pretty(&result)?,
    )?;
    std::fs::write(
        opts.out.join("report.txt"),
        report::render(&result, &events),
    )?;
    Ok(result)
}

/// Every shard serves a write within the deadline after healing.
async fn liveness(client: &Client) -> bool {
    let Ok(table) = client.refresh_map().await else {
        return false;
    };
    let mut keys: BTreeMap<u64, String> = BTreeMap::new();
    for i in 0.. {
        if keys.len() == table.shards.len() || i > 100_000 {
            break;
        }
        let k = format!("live:{i}");
        keys.entry(table.shard_for_key(k.as_bytes()).id)
            .or_insert(k);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for key in keys.values() {
        loop {
            if client.put(key.clone(), "alive").await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    }
    true
}

/// The set workload's final reads: the whole set, twice, linearizably. A read pages through the
/// set (a scan page is bounded); the pages are read at different moments, which is sound because
/// every worker has stopped by now.
async fn final_reads(client: &Client, recorder: &Recorder) {
    for _ in 0..2 {
        let e = recorder.record({
            let mut e = Event::new(Kind::Invoke, u64::MAX, F::ReadAll);
            e.key = Some("set:".into());
            e
        });
        let mut done = e.clone();
        match read_whole_set(client).await {
            Ok(values) => {
                done.kind = Kind::Ok;
                done.values = Some(values);
            }
            Err(err) => {
                done.kind = Kind::Fail;
                done.error = Some(err.to_string());
            }
        }
        recorder.record(done);
    }
}

/// Every element of the set, page by page until a page says nothing more follows.
async fn read_whole_set(client: &Client) -> Result<Vec<String>, strata_client::Error> {
    let mut values = Vec::new();
    let mut start = Bytes::new();
    loop {
        let page = client
            .scan(ScanOptions {
                prefix: Bytes::from_static(b"set:"),
                start: start.clone(),
                limit: 10_000,
                consistency: Consistency::Linearizable,
                ..Default::default()
            })
            .await?;
        values.extend(
            page.records
                .iter()
                .map(|r| String::from_utf8_lossy(&r.value).to_string()),
        );
        match page.next_start() {
            Some(next) => start = next,
            None => return Ok(values),
        }
    }
}

/// Shards whose replicas still disagree after `timeout`: each replica's data (read locally,
/// `STALE`) must be identical.
async fn convergence(client: &Client, timeout: Duration) -> Vec<u64> {
    let until = Instant::now() + timeout;
    loop {
        let mut diverged = Vec::new();
        if let Ok(map) = client.shard_map().await {
            let addr = |id: u64| {
                map.nodes
                    .iter()
                    .find(|n| n.id == id)
                    .map(|n| n.client_addr.clone())
            };
            for s in &map.shards {
                let mut digests = Vec::new();
                for r in &s.replicas {
                    let d = match addr(*r) {
                        Some(a) => replica_digest(&a, s.id).await,
                        None => None,
                    };
                    digests.push(d);
                }
                if digests.iter().any(Option::is_none) || digests.windows(2).any(|w| w[0] != w[1]) {
                    diverged.push(s.id);
                }
            }
        }
        if diverged.is_empty() || Instant::now() > until {
            return diverged;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A digest of everything replica `addr` holds for `shard` (keys, values, versions).
async fn replica_digest(addr: &str, shard: u64) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut kv = KvClient::connect(format!("http://{addr}")).await.ok()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut start = Bytes::new();
    loop {
        let r = kv
            .scan(ScanRequest {
                shard_id: shard,
                start: start.clone(),
                limit: 10_000,
                consistency: Consistency::Stale as i32,
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner();
        for item in &r.items {
            (&item.key[..], &item.value[..], item.version).hash(&mut hasher);
        }
        match r.items.last() {
            Some(last) if r.more => {
                let mut next = last.key.to_vec();
                next.push(0);
                start = Bytes::from(next);
            }
            _ => return Some(hasher.finish()),
        }
    }
}

/// Re-checks a stored run directory.
pub fn recheck(dir: &Path, budget: u64) -> anyhow::Result<Results> {
    let events = crate::history::load(&dir.join("history.jsonl"))?;
    Ok(checker::check(&events, budget))
}
