//! `cluster.json`: what a local cluster is made of (ids, addresses, data dirs, pids), written
//! so that a power cut leaves the old file or the new one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::host::process_alive;

/// The file describing a local cluster, inside its directory.
pub const CLUSTER_FILE: &str = "cluster.json";

/// One node of a local cluster, as recorded in `cluster.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NodeEntry {
    /// Node id.
    pub id: u64,
    /// Client API address.
    pub client_addr: String,
    /// Peer address.
    pub peer_addr: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Process id while running.
    pub pid: Option<u32>,
    /// Started after bootstrap with `--join` (it joins with `strata node add`, not through
    /// `--initial-cluster`).
    #[serde(default)]
    pub joined: bool,
}

/// fsyncs directory `dir`, making the names created, renamed or deleted in it durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and its parents) if missing, fsynced into its parent: a node's data directory,
/// or the cluster's, must not vanish at a power cut. (The node does the same for what it creates.)
pub(super) fn create_dir_durable(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// A node's log file, in its data directory.
pub const NODE_LOG: &str = "node.log";

impl NodeEntry {
    /// Where the node's output goes.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join(NODE_LOG)
    }
}

/// The content of `cluster.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ClusterFile {
    /// Shards created at bootstrap.
    pub shards: u32,
    /// Every node.
    pub nodes: Vec<NodeEntry>,
    /// Each node has its own loopback address ([`super::node_ip`]).
    #[serde(default)]
    pub ip_per_node: bool,
}

impl ClusterFile {
    /// Reads `dir/cluster.json`, if present.
    pub fn load(dir: &Path) -> anyhow::Result<Option<ClusterFile>> {
        let path = dir.join(CLUSTER_FILE);
        match std::fs::read(&path) {
            Ok(raw) => Ok(Some(
                serde_json::from_slice(&raw)
                    .with_context(|| format!("parse {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    /// Writes `dir/cluster.json` atomically.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        // Written aside, fsynced, renamed over the old file and the rename fsynced: a power cut
        // leaves the old file or the new one, never a torn or empty one.
        let tmp = dir.join(format!("{CLUSTER_FILE}.tmp"));
        let mut out = File::create(&tmp)?;
        out.write_all(&serde_json::to_vec_pretty(self)?)?;
        out.sync_all()?;
        std::fs::rename(&tmp, dir.join(CLUSTER_FILE))?;
        sync_dir(dir)?;
        Ok(())
    }

    /// Client endpoints of every node.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client_addr.clone()).collect()
    }

    /// Fails when a node recorded here (the cluster in `dir`) is still running: another launcher
    /// owns it, and its data dirs must not be reused or wiped.
    pub fn ensure_not_running(&self, dir: &Path) -> anyhow::Result<()> {
        for n in &self.nodes {
            if let Some(pid) = n.pid.filter(|pid| process_alive(*pid)) {
                bail!(
                    "node {} of the cluster in {} is already running (pid {pid}); stop it first",
                    n.id,
                    dir.display()
                );
            }
        }
        Ok(())
    }

    /// The `--initial-cluster` value for this cluster: its bootstrap nodes.
    pub(super) fn initial_cluster(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| !n.joined)
            .map(|n| format!("{}={}/{}", n.id, n.client_addr, n.peer_addr))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_with_a_live_node_process_counts_as_running() {
        let node = |pid| NodeEntry {
            id: 1,
            client_addr: "127.0.0.1:1".into(),
            peer_addr: "127.0.0.1:2".into(),
            data_dir: PathBuf::from("/nonexistent"),
            pid,
            joined: false,
        };
        let file = |pid| ClusterFile {
            shards: 1,
            nodes: vec![node(pid)],
            ip_per_node: false,
        };
        let dir = Path::new("/tmp/somewhere");
        assert!(file(None).ensure_not_running(dir).is_ok());
        let err = file(Some(std::process::id()))
            .ensure_not_running(dir)
            .unwrap_err();
        assert!(err.to_string().contains("already running"), "{err}");
    }
}
