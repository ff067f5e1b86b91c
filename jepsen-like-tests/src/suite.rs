//! The CI matrix: a few short scenarios on a 3-node cluster, each with a nemesis, plus the
//! planted-bug scenarios and one without a lease's drift margin, which must come out INVALID — a
//! checker that never fails proves nothing. Prints one line per scenario and ends with
//! `N passed, M failed`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::checker::DEFAULT_BUDGET;
use crate::nemesis::Nemesis;
use crate::runner::{self, RunOptions};
use crate::workload::{ReadLevel, Workload};

/// One scenario of the matrix.
pub struct Scenario {
    /// Name (also the output subdirectory).
    pub name: &'static str,
    /// Workload.
    pub workload: Workload,
    /// Nemesis.
    pub nemesis: Nemesis,
    /// Traffic duration.
    pub secs: u64,
    /// Planted bug to enable (run on the planted binary).
    pub planted_bug: Option<&'static str>,
    /// Reads straight to random nodes.
    pub pinned_reads: bool,
    /// The consistency of reads.
    pub reads: ReadLevel,
    /// Whether a correct Strata passes it (planted-bug scenarios must fail).
    pub expect_valid: bool,
    /// Extra flags for every node.
    pub node_args: &'static [&'static str],
}

/// The CI matrix.
pub fn ci_matrix() -> Vec<Scenario> {
    let s = |name, workload, nemesis, secs| Scenario {
        name,
        workload,
        nemesis,
        secs,
        planted_bug: None,
        pinned_reads: false,
        reads: ReadLevel::Linearizable,
        expect_valid: true,
        node_args: &[],
    };
    vec![
        s("register-kill", Workload::Register, Nemesis::Kill, 20),
        s("register-pause", Workload::Register, Nemesis::Pause, 20),
        s(
            "register-partition",
            Workload::Register,
            Nemesis::Partition,
            20,
        ),
        s("register-latency", Workload::Register, Nemesis::Latency, 20),
        s(
            "register-membership",
            Workload::Register,
            Nemesis::Membership,
            25,
        ),
        s("set-mixed", Workload::Set, Nemesis::Mixed, 20),
        s(
            "register-snapshot",
            Workload::Register,
            Nemesis::Snapshot,
            12,
        ),
        s(
            "register-transfer",
            Workload::Register,
            Nemesis::Transfer,
            12,
        ),
        s("register-restart", Workload::Register, Nemesis::Restart, 12),
        s("register-crash", Workload::Register, Nemesis::Crash, 20),
        s(
            "register-power-loss",
            Workload::Register,
            Nemesis::PowerLoss,
            20,
        ),
        s("set-power-loss", Workload::Set, Nemesis::PowerLoss, 20),
        s(
            "register-disk-full",
            Workload::Register,
            Nemesis::DiskFull,
            15,
        ),
        s(
            "register-slow-disk",
            Workload::Register,
            Nemesis::SlowDisk,
            15,
        ),
        s("register-wipe", Workload::Register, Nemesis::Wipe, 10),
        s("register-move", Workload::Register, Nemesis::Move, 12),
        s(
            "register-duplicate",
            Workload::Register,
            Nemesis::Duplicate,
            12,
        ),
        Scenario {
            pinned_reads: true,
            ..s(
                "register-pinned-reads",
                Workload::Register,
                Nemesis::Pause,
                12,
            )
        },
        Scenario {
            reads: ReadLevel::Lease,
            ..s(
                "register-lease-reads",
                Workload::Register,
                Nemesis::Latency,
                20,
            )
        },
        Scenario {
            pinned_reads: true,
            ..s("register-clock", Workload::Register, Nemesis::Clock, 15)
        },
        Scenario {
            reads: ReadLevel::Lease,
            pinned_reads: true,
            // Allows for the nemesis' slowest clock, a quarter of real time.
            node_args: &["--lease-drift-percent", "80"],
            ..s(
                "register-lease-reads-clock",
                Workload::Register,
                Nemesis::Clock,
                20,
            )
        },
        // Not a planted bug but openraft's own lease, without Strata's allowance for clock drift:
        // a leader whose clock runs slow serves stale reads, and the checker must see them.
        Scenario {
            reads: ReadLevel::Lease,
            pinned_reads: true,
            node_args: &["--lease-drift-percent", "0"],
            expect_valid: false,
            ..s(
                "lease-reads-no-drift-margin",
                Workload::Register,
                Nemesis::Clock,
                20,
            )
        },
        Scenario {
            planted_bug: Some("stale-reads"),
            pinned_reads: true,
            expect_valid: false,
            ..s(
                "planted-stale-reads",
                Workload::Register,
                Nemesis::Pause,
                12,
            )
        },
        Scenario {
            planted_bug: Some("skip-dedup"),
            expect_valid: false,
            ..s(
                "planted-skip-dedup",
                Workload::Register,
                Nemesis::Duplicate,
                12,
            )
        },
        Scenario {
            planted_bug: Some("ack-before-fsync"),
            expect_valid: false,
            ..s(
                "planted-ack-before-fsync",
                Workload::Set,
                Nemesis::Crash,
                15,
            )
        },
        Scenario {
            planted_bug: Some("skip-fsync"),
            expect_valid: false,
            ..s("planted-skip-fsync", Workload::Set, Nemesis::PowerLoss, 15)
        },
        Scenario {
            planted_bug: Some("short-append-timeout"),
            expect_valid: false,
            ..s(
                "planted-short-append-timeout",
                Workload::Register,
                Nemesis::Latency,
                20,
            )
        },
        Scenario {
            planted_bug: Some("skip-dir-fsync"),
            expect_valid: false,
            ..s(
                "planted-skip-dir-fsync",
                Workload::Set,
                Nemesis::PowerLoss,
                10,
            )
        },
        Scenario {
            planted_bug: Some("no-fail-stop"),
            expect_valid: false,
            ..s(
                "planted-no-fail-stop",
                Workload::Register,
                Nemesis::DiskFull,
                10,
            )
        },
        Scenario {
            planted_bug: Some("no-incarnation-check"),
            expect_valid: false,
            ..s(
                "planted-no-incarnation-check",
                Workload::Register,
                Nemesis::Wipe,
                10,
            )
        },
        Scenario {
            planted_bug: Some("blocking-synced-writes"),
            expect_valid: false,
            ..s(
                "planted-blocking-synced-writes",
                Workload::Register,
                Nemesis::SlowDisk,
                10,
            )
        },
    ]
}

/// Runs the matrix; returns `(passed, failed)`.
pub async fn run_ci(
    out: &Path,
    node_bin: &Path,
    planted_bin: Option<&PathBuf>,
    seed: u64,
) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    let in_netns = crate::net::in_private_netns();
    let lossy_fs = crate::lossy_fs::availability();
    for sc in ci_matrix() {
        if sc.nemesis.needs_netns() && !in_netns {
            let why = crate::net::availability()
                .err()
                .unwrap_or_else(|| "the harness is not in its network namespace".into());
            println!("SKIP {:<28} network faults cannot run here: {why}", sc.name);
            continue;
        }
        if let (Nemesis::Clock, Err(why)) = (sc.nemesis, crate::clock::availability()) {
            println!("SKIP {:<28} clock faults cannot run here: {why}", sc.name);
            continue;
        }
        if let (true, Err(why)) = (sc.nemesis.needs_lossy_fs(), &lossy_fs) {
            println!(
                "SKIP {:<28} disk faults cannot run here (FUSE): {why}",
                sc.name
            );
            continue;
        }
        let bin = match (sc.planted_bug, planted_bin) {
            (None, _) => node_bin.to_path_buf(),
            (Some(_), Some(b)) => b.clone(),
            (Some(bug), None) => {
                println!("FAIL {}: no planted-bugs binary to run {bug} with", sc.name);
                failed += 1;
                continue;
            }
        };
        let opts = RunOptions {
            workload: sc.workload,
            nemesis: sc.nemesis,
            nodes: 3,
            shards: 4,
            time_limit: Duration::from_secs(sc.secs),
            rate: 150,
            concurrency: 8,
            seed,
            out: out.join(sc.name),
            node_bin: bin,
            planted_bug: sc.planted_bug.map(String::from),
            pinned_reads: sc.pinned_reads,
            reads: sc.reads,
            lossy_fs: false,
            slow_net: false,
            budget: DEFAULT_BUDGET,
            node_args: sc.node_args.iter().map(|a| a.to_string()).collect(),
            clock_rates: crate::clock::RATES.to_vec(),
        };
        let started = std::time::Instant::now();
        let verdict = match runner::run(opts).await {
            Ok(r) => Ok((r.valid, r.checks.ok, r.faults)),
            Err(e) => Err(format!("{e:#}")),
        };
        let secs = started.elapsed().as_secs();
        match verdict {
            Ok((valid, ok, faults)) if valid == sc.expect_valid => {
                passed += 1;
                println!(
                    "ok   {:<28} {} as expected ({ok} ok ops, {faults} faults, {secs} s)",
                    sc.name,
                    if valid { "valid" } else { "violation found" }
                );
            }
            Ok((valid, _, _)) => {
                failed += 1;
                println!(
                    "FAIL {:<28} {} (expected {}); see {}",
                    sc.name,
                    if valid { "valid" } else { "INVALID" },
                    if sc.expect_valid {
                        "valid"
                    } else {
                        "a violation"
                    },
                    out.join(sc.name).join("report.txt").display()
                );
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {:<28} run error: {e}", sc.name);
            }
        }
    }
    (passed, failed)
}
