//! `strata bench`: a closed-loop load generator. `--clients` workers each issue one request at a
//! time for `--duration`; every latency goes into an HDR histogram. Reports ops/s, p50/p99/p999
//! and errors (a benchmark, not a test: nothing here asserts a speed).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use strata_client::{Client, Consistency};
use tonic::transport::{Channel, Endpoint};

use crate::etcd;
use crate::etcd::kv_client::KvClient;

use super::kv::ConsistencyArg;
use super::output::{json, table};
use super::{parse_duration, Cli, Format};

/// What the workers do.
#[derive(ValueEnum, Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Puts of random keys.
    Put,
    /// Gets of preloaded keys, at `--consistency`.
    Get,
    /// Half puts, half gets.
    Mixed,
}

/// What is measured.
#[derive(ValueEnum, Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A Strata cluster (the `--endpoints`).
    Strata,
    /// An etcd v3 cluster at `--endpoints`, driven by the same harness for side-by-side figures.
    Etcd,
}

/// `strata bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The system under test.
    #[arg(long, value_enum, default_value = "strata")]
    pub target: Target,
    /// Consistency of the gets. Against etcd, `linearizable` is a linearizable `Range` and
    /// `stale` a serializable one; etcd has no lease reads.
    #[arg(long, value_enum, default_value = "linearizable")]
    pub consistency: ConsistencyArg,
    /// Shorthand for `--consistency stale`.
    #[arg(long, conflicts_with = "consistency")]
    pub stale_reads: bool,
    /// Operation mix.
    #[arg(long, value_enum, default_value = "put")]
    pub workload: Workload,
    /// Concurrent workers (each with one request in flight).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// How long to run (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Client instances the workers share (round-robin). One client, as a backend service would
    /// use, lets concurrent puts to a shard share batches.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
}

/// The report.
#[derive(Serialize, Debug)]
pub struct BenchReport {
    /// System measured.
    pub target: Target,
    /// Workload run.
    pub workload: Workload,
    /// Consistency of the gets.
    pub consistency: ConsistencyArg,
    /// Workers.
    pub clients: usize,
    /// Measured seconds.
    pub duration_s: f64,
    /// Successful operations.
    pub ops: u64,
    /// Failed operations.
    pub errors: u64,
    /// Successful operations per second.
    pub ops_per_sec: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest operation.
    pub max_ms: f64,
    /// Value size in bytes.
    pub value_size: usize,
    /// Distinct keys.
    pub keys: u64,
    /// One failed operation's error (the first one worker saw), if any failed.
    pub sample_error: Option<String>,
}

fn key(i: u64) -> Bytes {
    Bytes::from(format!("bench:{i:08}"))
}

/// One connection to the system under test.
#[derive(Clone)]
enum Store {
    Strata(Client, Consistency),
    Etcd(KvClient<Channel>, bool),
}

impl BenchArgs {
    /// The gets' consistency, `--stale-reads` folded in.
    fn reads(&self) -> ConsistencyArg {
        if self.stale_reads {
            ConsistencyArg::Stale
        } else {
            self.consistency
        }
    }
}

impl Store {
    async fn connect(cli: &Cli, a: &BenchArgs, i: usize) -> anyhow::Result<Store> {
        Ok(match a.target {
            Target::Strata => Store::Strata(cli.client().await?, a.reads().into()),
            Target::Etcd => {
                let endpoints = cli.resolved_endpoints()?;
                let addr = &endpoints[i % endpoints.len()];
                let ch = Endpoint::from_shared(format!("http://{addr}"))?
                    .tcp_nodelay(true)
                    .connect()
                    .await?;
                Store::Etcd(KvClient::new(ch), a.reads() == ConsistencyArg::Stale)
            }
        })
    }

    /// Writes `key`; an error comes back as its one-line description.
    async fn put(&self, key: Bytes, value: Bytes) -> Result<(), String> {
        match self {
            Store::Strata(c, _) => c.put(key, value).await.map(drop).map_err(|e| e.to_string()),
            Store::Etcd(c, _) => c
                .clone()
                .put(etcd::PutRequest { key, value })
                .await
                .map(drop)
                .map_err(|e| e.message().to_string()),
        }
    }

    /// Reads `key`; an error comes back as its one-line description.
    async fn get(&self, key: Bytes) -> Result<(), String> {
        match self {
            Store::Strata(c, consistency) => c
                .get_with(key, *consistency)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Store::Etcd(c, serializable) => c
                .clone()
                .range(etcd::RangeRequest {
                    key,
                    serializable: *serializable,
                })
                .await
                .map(drop)
                .map_err(|e| e.message().to_string()),
        }
    }
}

/// Runs `strata bench`.
pub async fn run(cli: &Cli, a: &BenchArgs) -> anyhow::Result<()> {
    if a.clients == 0 || a.keys == 0 || a.connections == 0 {
        anyhow::bail!("--clients, --keys and --connections must be at least 1");
    }
    if a.target == Target::Etcd && a.reads() == ConsistencyArg::Lease {
        anyhow::bail!("--consistency lease: etcd has no lease reads (use linearizable or stale)");
    }
    let mut clients = Vec::new();
    for i in 0..a.connections {
        clients.push(Store::connect(cli, a, i).await?);
    }
    let value = Bytes::from(vec![b'x'; a.value_size]);
    if a.workload != Workload::Put {
        preload(&clients, a.keys, &value).await?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let bar = if cli.output == Format::Table {
        ProgressBar::new(a.duration.as_secs().max(1))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len}s {msg}")?);
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..a.clients {
        let client = clients[w % clients.len()].clone();
        let (stop, done, value) = (stop.clone(), done.clone(), value.clone());
        let (workload, keys) = (a.workload, a.keys);
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut errors = 0u64;
            let mut first_error = None;
            let mut rng = rand::rngs::StdRng::from_os_rng();
            while !stop.load(Ordering::Relaxed) {
                let k = key(rng.random_range(0..keys));
                let write = match workload {
                    Workload::Put => true,
                    Workload::Get => false,
                    Workload::Mixed => rng.random_bool(0.5),
                };
                let t = Instant::now();
                let result = if write {
                    client.put(k, value.clone()).await
                } else {
                    client.get(k).await
                };
                match result {
                    Ok(()) => {
                        hist.saturating_record(t.elapsed().as_micros() as u64);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (hist, errors, first_error)
        }));
    }
    while start.elapsed() < a.duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let secs = start.elapsed().as_secs_f64();
        bar.set_position(secs as u64);
        bar.set_message(format!(
            "{:.0} ops/s",
            done.load(Ordering::Relaxed) as f64 / secs
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    let mut sample_error = None;
    for w in workers {
        let (h, e, first) = w.await?;
        hist.add(h)?;
        errors += e;
        sample_error = sample_error.or(first);
    }
    let elapsed = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    // Nothing succeeded: a report of zeros would hide why (an oversized value, say).
    if hist.is_empty() {
        match &sample_error {
            Some(e) => anyhow::bail!("all {errors} operations failed, for example: {e}"),
            None => anyhow::bail!("no operation completed within {:?}", a.duration),
        }
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let report = BenchReport {
        target: a.target,
        workload: a.workload,
        consistency: a.reads(),
        clients: a.clients,
        duration_s: elapsed,
        ops: hist.len(),
        errors,
        ops_per_sec: hist.len() as f64 / elapsed,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
        value_size: a.value_size,
        keys: a.keys,
        sample_error,
    };
    match cli.output {
        Format::Json => json(&report),
        Format::Table => {
            table(
                &[
                    "TARGET", "WORKLOAD", "READS", "CLIENTS", "OPS/S", "P50 ms", "P99 ms",
                    "P999 ms", "MAX ms", "OPS", "ERRORS",
                ],
                &[vec![
                    format!("{:?}", report.target).to_lowercase(),
                    format!("{:?}", report.workload).to_lowercase(),
                    format!("{:?}", report.consistency).to_lowercase(),
                    report.clients.to_string(),
                    format!("{:.0}", report.ops_per_sec),
                    format!("{:.2}", report.p50_ms),
                    format!("{:.2}", report.p99_ms),
                    format!("{:.2}", report.p999_ms),
                    format!("{:.2}", report.max_ms),
                    report.ops.to_string(),
                    report.errors.to_string(),
                ]],
            );
            if let Some(e) = &report.sample_error {
                eprintln!("{} operations failed, for example: {e}", report.errors);
            }
            Ok(())
        }
    }
}

/// Writes every key once so reads find them (64 writes in flight).
async fn preload(clients: &[Store], keys: u64, value: &Bytes) -> anyhow::Result<()> {
    use futures::StreamExt;
    let bar = ProgressBar::new(keys);
    bar.set_style(ProgressStyle::with_template(
        "preloading {bar:40} {pos}/{len}",
    )?);
    let mut results = futures::stream::iter(0..keys)
        .map(|i| {
            let (client, value) = (clients[i as usize % clients.len()].clone(), value.clone());
            async move { client.put(key(i), value).await }
        })
        .buffer_unordered(64);
    while let Some(result) = results.next().await {
        if let Err(e) = result {
            anyhow::bail!("preload write failed: {e}");
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}
