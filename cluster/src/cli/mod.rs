//! The `strata` commands.
//!
//! - [`dev`]: `strata dev up` / `strata dev restart-node` — a local cluster in the foreground.
//! - [`kv`]: `get`, `put`, `del`, `scan`, `cas`.
//! - [`status`]: `strata status` — nodes, shards, leaders, moves, applied index, placement log.
//! - [`node`]: `strata node add` / `strata node remove` — membership changes.
//! - [`bench`](mod@bench): `strata bench` — a closed-loop load generator with latency percentiles.
//! - [`output`]: table or JSON rendering (`-o table|json`).
//!
//! Conventions (from etcdctl): `--endpoints` or `STRATA_ENDPOINTS`; `-o table|json`; a failure
//! prints one line to stderr and exits non-zero.

pub mod bench;
pub mod dev;
pub mod kv;
pub mod node;
pub mod output;
pub mod status;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use strata_client::{Client, ClientBuilder};

use crate::launcher::ClusterFile;

/// Default local cluster directory (`strata dev up`).
pub const DEFAULT_DATA_DIR: &str = "strata-data";

/// The `strata` command line.
#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Strata: a Raft-replicated, sharded key-value store"
)]
pub struct Cli {
    /// Comma-separated client endpoints (host:port) of any cluster nodes. Default: the nodes of
    /// ./strata-data/cluster.json, else 127.0.0.1:7101.
    #[arg(long, env = "STRATA_ENDPOINTS", global = true, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    pub output: Format,
    /// Deadline of one operation, retries included (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", global = true, value_parser = parse_duration)]
    pub timeout: Duration,
    /// The command.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Output formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Human-readable table.
    Table,
    /// One JSON document.
    Json,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Local development cluster.
    #[command(subcommand)]
    Dev(dev::DevCmd),
    /// Nodes, shards, leaders, replica moves, applied indexes and placement decisions.
    Status,
    /// Add or remove nodes.
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// Read a key.
    Get(kv::GetArgs),
    /// Write a key.
    Put(kv::PutArgs),
    /// Delete a key.
    Del(kv::DelArgs),
    /// List keys by prefix or range, in key order.
    Scan(kv::ScanArgs),
    /// Compare-and-set: write only if the key still has the expected version.
    Cas(kv::CasArgs),
    /// Closed-loop benchmark: ops/s and latency percentiles.
    Bench(bench::BenchArgs),
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Dev(cmd) => dev::run(cmd).await,
        Cmd::Status => status::run(&cli).await,
        Cmd::Node(cmd) => node::run(&cli, cmd).await,
        Cmd::Get(a) => kv::get(&cli, a).await,
        Cmd::Put(a) => kv::put(&cli, a).await,
        Cmd::Del(a) => kv::del(&cli, a).await,
        Cmd::Scan(a) => kv::scan(&cli, a).await,
        Cmd::Cas(a) => kv::cas(&cli, a).await,
        Cmd::Bench(a) => bench::run(&cli, a).await,
    }
}

impl Cli {
    /// The endpoints to use: the flag/env, else the local dev cluster's, else the default.
    pub fn resolved_endpoints(&self) -> anyhow::Result<Vec<String>> {
        if !self.endpoints.is_empty() {
            return Ok(self.endpoints.clone());
        }
        if let Some(file) = ClusterFile::load(&PathBuf::from(DEFAULT_DATA_DIR))? {
            return Ok(file.endpoints());
        }
        Ok(vec!["127.0.0.1:7101".into()])
    }

    /// A client for the resolved endpoints.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let endpoints = self.resolved_endpoints()?;
        ClientBuilder::new(endpoints.clone())
            .deadline(self.timeout)
            .attempt_timeout(self.timeout.min(Duration::from_secs(3)))
            .connect()
            .await
            .with_context(|| format!("connect to {}", endpoints.join(",")))
    }
}

/// Parses `10s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 10s, 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s or m")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
    }
}
