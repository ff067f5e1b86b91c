//! `strata-jepsen`: run a chaos scenario, re-check a stored history, or run the CI matrix.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use strata_jepsen::checker::DEFAULT_BUDGET;
use strata_jepsen::nemesis::Nemesis;
use strata_jepsen::net;
use strata_jepsen::runner::{self, RunOptions};
use strata_jepsen::workload::{ReadLevel, Workload};

#[derive(Parser)]
#[command(name = "strata-jepsen", about = "Jepsen-style chaos testing of Strata")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario and check it.
    Run(RunArgs),
    /// Re-check a stored run directory (its history.jsonl).
    Check {
        /// The run's output directory.
        dir: PathBuf,
    },
    /// The CI matrix (ends with `N passed, M failed`).
    Ci {
        /// Where each scenario writes its directory.
        #[arg(long, default_value = "jepsen-out")]
        out: PathBuf,
        /// strata-node binary (default: next to this one).
        #[arg(long)]
        node_bin: Option<PathBuf>,
        /// strata-node built with `--features planted-bugs`, for the planted-bug scenarios.
        #[arg(long)]
        planted_bin: Option<PathBuf>,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, value_enum, default_value = "register")]
    workload: Workload,
    #[arg(long, value_enum, default_value = "kill")]
    nemesis: Nemesis,
    /// 3 or 5.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 30)]
    time_limit: u64,
    /// Operations per second over all workers.
    #[arg(long, default_value_t = 150)]
    rate: u32,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "jepsen-out/run")]
    out: PathBuf,
    /// strata-node binary (default: next to this one).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Enable a planted bug (stale-reads, skip-dedup, ack-before-fsync, skip-fsync); needs a
    /// planted-bugs build of the node.
    #[arg(long)]
    planted_bug: Option<String>,
    /// Send reads straight to random nodes.
    #[arg(long)]
    pinned_reads: bool,
    /// Consistency of the register workload's reads (both are checked for linearizability).
    #[arg(long, value_enum, default_value = "linearizable")]
    reads: ReadLevel,
    /// Run the cluster on the in-memory lossy file system (needs FUSE), so that `mixed` also
    /// cuts power, fills disks and slows them down; implied by `--nemesis power-loss`,
    /// `disk-full` and `slow-disk`.
    #[arg(long)]
    lossy_fs: bool,
    /// Run every connection between nodes through the harness' delaying proxy (needs a network
    /// namespace), so that `mixed` also slows links; implied by `--nemesis latency`.
    #[arg(long)]
    slow_net: bool,
    /// An extra flag for every node, e.g. `--node-arg=--lease-drift-percent=80` (repeatable).
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    node_args: Vec<String>,
    /// The clock rates clock faults draw from, comma-separated (default 0.25,0.5,2,4).
    #[arg(long, value_delimiter = ',', value_parser = clock_rate)]
    clock_rates: Vec<f64>,
}

/// A clock rate: a positive multiple of real time.
fn clock_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "a clock rate is a positive number (0.5 = half speed), not {s:?}"
        )),
    }
}

fn node_bin(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => Ok(p),
        None => strata_cluster::launcher::find_node_binary(),
    }
}

async fn main_async(cli: Cli) -> anyhow::Result<bool> {
    match cli.cmd {
        Cmd::Run(a) => {
            if ![3, 5].contains(&a.nodes) {
                anyhow::bail!("--nodes must be 3 or 5");
            }
            if a.rate == 0 || a.concurrency == 0 || a.time_limit == 0 {
                anyhow::bail!("--rate, --concurrency and --time-limit must be > 0");
            }
            let opts = RunOptions {
                workload: a.workload,
                nemesis: a.nemesis,
                nodes: a.nodes,
                shards: a.shards,
                time_limit: Duration::from_secs(a.time_limit),
                rate: a.rate,
                concurrency: a.concurrency,
                seed: a.seed,
                out: a.out.clone(),
                node_bin: node_bin(a.node_bin)?,
                planted_bug: a.planted_bug,
                pinned_reads: a.pinned_reads,
                reads: a.reads,
                lossy_fs: a.lossy_fs,
                slow_net: a.slow_net,
                budget: DEFAULT_BUDGET,
                node_args: a.node_args,
                clock_rates: if a.clock_rates.is_empty() {
                    strata_jepsen::clock::RATES.to_vec()
                } else {
                    a.clock_rates
                },
            };
            let r = runner::run(opts).await?;
            print!("{}", std::fs::read_to_string(a.out.join("report.txt"))?);
            Ok(r.valid)
        }
        Cmd::Check { dir } => {
            let r = runner::recheck(&dir, DEFAULT_BUDGET)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(r.valid)
        }
        Cmd::Ci {
            out,
            node_bin: bin,
            planted_bin,
            seed,
        } => {
            let bin = node_bin(bin)?;
            let (passed, failed) =
                strata_jepsen::suite::run_ci(&out, &bin, planted_bin.as_ref(), seed).await;
            println!("{passed} passed, {failed} failed");
            Ok(failed == 0)
        }
    }
}

/// Whether the command needs the private network namespace (partitions, slow links), or can
/// use it (`mixed`, and `clock`, which cuts off a node whose clock runs slow).
fn wants_netns(cmd: &Cmd) -> bool {
    match cmd {
        Cmd::Run(a) => {
            a.slow_net
                || a.nemesis.needs_netns()
                || matches!(a.nemesis, Nemesis::Mixed | Nemesis::Clock)
        }
        Cmd::Ci { .. } => true,
        Cmd::Check { .. } => false,
    }
}

fn main() {
    let cli = Cli::parse();
    // Partitions need the whole run (cluster and harness) inside a private network namespace:
    // re-execute there when the machine allows it; otherwise carry on, and partition scenarios
    // are skipped loudly (or refused, for `run --nemesis partition`).
    if wants_netns(&cli.cmd) && !net::in_private_netns() {
        match net::availability() {
            Ok(()) => {
                let err = net::reexec_in_netns();
                eprintln!("strata-jepsen: {err:#}; partitions and slow links are skipped");
            }
            Err(why) => eprintln!(
                "strata-jepsen: network faults (partitions, slow links) cannot run here: {why}"
            ),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(main_async(cli)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("strata-jepsen: {e:#}");
            std::process::exit(2);
        }
    }
}
