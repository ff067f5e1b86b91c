//! `strata-jepsen`: a Jepsen-style chaos suite for Strata on real `strata-node` processes.
//!
//! Module map, in the order a run uses them:
//!
//! - [`control`]: start the cluster, SIGKILL / SIGTERM / restart / SIGSTOP / SIGCONT nodes,
//!   leaders.
//! - [`net`]: the private network namespace and iptables partitions.
//! - [`slow_net`]: a delaying TCP proxy on every link between nodes, for slow networks.
//! - [`lossy_fs`]: an in-memory FUSE file system that drops un-fsynced writes at a power loss.
//! - [`clock`]: a node's own clock, running slower or faster than real time (libfaketime).
//! - [`history`]: the JSON-lines history (`invoke` / `ok` / `fail` / `info` / nemesis events).
//! - [`workload`]: register (read / write / CAS) and set (unique adds) workers.
//! - [`nemesis`]: seeded fault schedules — kill, pause, membership, leader bounce, graceful
//!   restart, whole-cluster crash and power loss, partitions, slow links, clock rates, mixed, and
//!   request duplication.
//! - [`checker`]: per-key linearizability (Wing & Gong with memoization) and the set check.
//! - [`runner`]: one scenario end to end: traffic + faults, heal, liveness, convergence, check.
//! - [`report`]: the readable report of a run.
//! - [`suite`]: the CI matrix, including the planted-bug scenarios that must fail.

#![warn(missing_docs)]

pub mod checker;
pub mod clock;
pub mod control;
pub mod history;
pub mod lossy_fs;
pub mod nemesis;
pub mod net;
pub mod report;
pub mod runner;
pub mod slow_net;
pub mod suite;
pub mod workload;
