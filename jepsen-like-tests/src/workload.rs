//! Workloads: concurrent workers issuing operations at a global rate and recording each one as
//! `invoke` then `ok` / `fail` / `info`.
//!
//! - **register**: reads, writes of unique values and compare-and-sets over a rotating set of
//!   keys spread across all shards. A CAS compares versions on the wire; the worker expects the
//!   version it last observed for the key together with its value, and since every value is
//!   written once, "version matches" is "value matches" — the history records the value.
//! - **set**: adds of unique elements (one key each, across all shards); the final reads happen
//!   after the run (see [`crate::runner`]).
//!
//! Error classification follows `docs/testing.md`: a read that errs is `fail`; a write is `fail`
//! only when the client proves it was not applied, else `info`, and the worker then continues as
//! a new process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_client::{Client, Consistency, Error};
use strata_proto::v1::kv_client::KvClient;
use strata_proto::v1::GetRequest;

use crate::history::{Event, Kind, Recorder, F};

/// Which workload to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Per-key read / write / CAS, checked for linearizability.
    Register,
    /// Unique adds, checked for lost / stale / duplicated elements.
    Set,
}

/// The consistency level of the register workload's reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadLevel {
    /// ReadIndex: the leader confirms its leadership with a quorum round before each batch of
    /// reads.
    #[default]
    Linearizable,
    /// openraft's lease read: no quorum round while the leader's lease holds. The checker holds
    /// these reads to linearizability too.
    Lease,
}

impl ReadLevel {
    fn consistency(self) -> Consistency {
        match self {
            ReadLevel::Linearizable => Consistency::Linearizable,
            ReadLevel::Lease => Consistency::Lease,
        }
    }
}

/// Settings shared by the workers.
#[derive(Clone)]
pub struct Settings {
    /// Workload.
    pub workload: Workload,
    /// Operations per second over all workers.
    pub rate: u32,
    /// Number of workers.
    pub concurrency: usize,
    /// Keys in play at a time (register).
    pub keys: usize,
    /// Operations per key before it is retired for a fresh one (keeps the search small).
    pub ops_per_key: u64,
    /// Send linearizable reads straight to a random node instead of through the client's leader
    /// routing (a node that does not lead answers `NotLeader`, recorded as `fail`). Exposes nodes
    /// that serve reads they must not.
    pub pinned_reads: bool,
    /// The consistency of reads (register).
    pub reads: ReadLevel,
    /// Client addresses of the nodes, for pinned reads.
    pub node_addrs: Vec<(u64, String)>,
    /// Seed of the workers' choices.
    pub seed: u64,
}

/// Shared counters of the run.
#[derive(Default)]
pub struct Counters {
    next_process: AtomicU64,
    next_value: AtomicU64,
    ops: AtomicU64,
}

impl Counters {
    fn process(&self) -> u64 {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }
    fn value(&self) -> u64 {
        self.next_value.fetch_add(1, Ordering::Relaxed)
    }
}

/// Runs the workers until `stop`.
pub async fn run(
    client: Client,
    settings: Settings,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> Arc<Counters> {
    let counters = Arc::new(Counters::default());
    let mut tasks = Vec::new();
    for w in 0..settings.concurrency {
        let (client, settings, recorder, stop, counters) = (
            client.clone(),
            settings.clone(),
            recorder.clone(),
            stop.clone(),
            counters.clone(),
        );
        tasks.push(tokio::spawn(async move {
            worker(w, client, settings, recorder, stop, counters).await
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    counters
}

/// The key for op number `n`: `keys` live keys, each replaced after `ops_per_key` operations.
fn key_for(rng: &mut StdRng, settings: &Settings, n: u64) -> String {
    let generation = n / (settings.ops_per_key * settings.keys as u64).max(1);
    format!("r{generation}:{}", rng.random_range(0..settings.keys))
}

async fn worker(
    w: usize,
    client: Client,
    settings: Settings,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    let mut rng = StdRng::seed_from_u64(settings.seed.wrapping_add(w as u64));
    let mut process = counters.process();
    // What this worker last saw of each key: (value, version).
    let mut seen: HashMap<String, (Option<String>, u64)> = HashMap::new();
    let pause = Duration::from_secs_f64(settings.concurrency as f64 / settings.rate.max(1) as f64);
    let mut next = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        next += pause;
        tokio::time::sleep_until(next).await;
        let n = counters.ops.fetch_add(1, Ordering::Relaxed);
        let unknown = match settings.workload {
            Workload::Set => add(&client, &recorder, process, &counters).await,
            Workload::Register => {
                let key = key_for(&mut rng, &settings, n);
                match rng.random_range(0..10) {
                    0..5 => {
                        read(
                            &client, &settings, &mut rng, &recorder, process, &key, &mut seen,
                        )
                        .await
                    }
                    5..8 => write(&client, &recorder, process, &key, &counters, &mut seen).await,
                    _ => cas(&client, &recorder, process, &key, &counters, &mut seen).await,
                }
            }
        };
        if unknown {
            // The op may still take effect: its process can have nothing else in flight.
            process = counters.process();
        }
    }
}

/// The invocation event of operation `f` on `key` by `process`, naming the key's shard.
pub(crate) fn invoke(client: &Client, process: u64, f: F, key: &str) -> Event {
    let mut e = Event::new(Kind::Invoke, process, f);
    e.key = Some(key.to_string());
    e.shard = client
        .route_table()
        .map(|t| t.shard_for_key(key.as_bytes()).id);
    e
}

/// Outcome kind of a failed write: `fail` only when the client proves it was not applied.
pub(crate) fn write_error_kind(e: &Error) -> Kind {
    if e.may_have_applied() {
        Kind::Info
    } else {
        Kind::Fail
    }
}

fn complete(recorder: &Recorder, mut e: Event, kind: Kind, error: Option<String>) -> bool {
    e.kind = kind;
    e.error = error;
    recorder.record(e);
    kind == Kind::Info
}

async fn read(
    client: &Client,
    settings: &Settings,
    rng: &mut StdRng,
    recorder: &Recorder,
    process: u64,
    key: &str,
    seen: &mut HashMap<String, (Option<String>, u64)>,
) -> bool {
    let mut e = invoke(client, process, F::Read, key);
    let pinned = settings
        .pinned_reads
        .then(|| settings.node_addrs[rng.random_range(0..settings.node_addrs.len())].clone());
    e.node = pinned.as_ref().map(|(id, _)| id.to_string());
    let e = recorder.record(e);
    let result = match &pinned {
        Some((_, addr)) => pinned_get(addr, key, settings.reads.consistency()).await,
        None => client
            .get_with(key.to_string(), settings.reads.consistency())
            .await
            .map(|r| r.map(|r| (String::from_utf8_lossy(&r.value).to_string(), r.version)))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(found) => {
            let mut done = e.clone();
            done.value = found.as_ref().map(|(v, _)| v.clone());
            done.version = found.as_ref().map(|(_, ver)| *ver);
            seen.insert(
                key.to_string(),
                found.map_or((None, 0), |(v, ver)| (Some(v), ver)),
            );
            complete(recorder, done, Kind::Ok, None)
        }
        // A read changes nothing: any error is a fail.
        Err(err) => complete(recorder, e, Kind::Fail, Some(err)),
    }
}

/// A get sent to one node, no retries.
async fn pinned_get(
    addr: &str,
    key: &str,
    consistency: Consistency,
) -> Result<Option<(String, u64)>, String> {
    let mut kv = KvClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(GetRequest {
        key: Bytes::from(key.to_string()),
        consistency: consistency as i32,
    });
    req.set_timeout(Duration::from_secs(1));
    let r = kv
        .get(req)
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    Ok(r.found
        .then(|| (String::from_utf8_lossy(&r.value).to_string(), r.version)))
}

async fn write(
    client: &Client,
    recorder: &Recorder,
    process: u64,
    key: &str,
    counters: &Counters,
    seen: &mut HashMap<String, (Option<String>, u64)>,
) -> bool {
    let value = format!("w{}", counters.value());
    let mut e = invoke(client, process, F::Write, key);
    e.value = Some(value.clone());
    let e = recorder.record(e);
    match client.put(key.to_string(), value.clone()).await {
        Ok(version) => {
            let mut done = e;
            done.version = Some(version);
            seen.insert(key.to_string(), (Some(value), version));
            complete(recorder, done, Kind::Ok, None)
        }
        Err(err) => complete(recorder, e, write_error_kind(&err), Some(err.to_string())),
    }
}

async fn cas(
    client: &Client,
    recorder: &Recorder,
    process: u64,
    key: &str,
    counters: &Counters,
    seen: &mut HashMap<String, (Option<String>, u64)>,
) -> bool {
    let (expected, version) = seen.get(key).cloned().unwrap_or((None, 0));
    let value = format!("c{}", counters.value());
    let mut e = invoke(client, process, F::Cas, key);
    e.value = Some(value.clone());
    e.expected = expected;
    e.version = Some(version);
    let e = recorder.record(e);
    match client
        .cas(key.to_string(), version, Some(Bytes::from(value.clone())))
        .await
    {
        Ok(out) if out.succeeded => {
            let mut done = e;
            done.version = Some(out.version);
            seen.insert(key.to_string(), (Some(value), out.version));
            complete(recorder, done, Kind::Ok, None)
        }
        // The comparison failed when it applied: nothing was written.
        Ok(out) => {
            seen.insert(
                key.to_string(),
                (
                    out.current_value
                        .map(|v| String::from_utf8_lossy(&v).to_string()),
                    out.version,
                ),
            );
            complete(recorder, e, Kind::Fail, Some("version mismatch".into()))
        }
        Err(err) => complete(recorder, e, write_error_kind(&err), Some(err.to_string())),
    }
}

async fn add(client: &Client, recorder: &Recorder, process: u64, counters: &Counters) -> bool {
    let element = format!("e{}", counters.value());
    let key = format!("set:{element}");
    let mut e = invoke(client, process, F::Add, &key);
    e.value = Some(element.clone());
    let e = recorder.record(e);
    match client.put(key, element).await {
        Ok(version) => {
            let mut done = e;
            done.version = Some(version);
            complete(recorder, done, Kind::Ok, None)
        }
        Err(err) => complete(recorder, e, write_error_kind(&err), Some(err.to_string())),
    }
}
