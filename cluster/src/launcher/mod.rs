//! Launches and controls a local cluster of real `strata-node` processes: `strata dev up` uses it,
//! and so do the tests that kill and restart nodes.
//!
//! A cluster lives in one directory: `cluster.json` (ids, addresses, data dirs, pids) and one
//! `node-<id>/` folder per node holding its data and its `node.log`. Running the launcher again on
//! the same directory restarts the same cluster with its data.
//!
//! Modules: `file` (`cluster.json`), `host` (processes, free ports, the node binary); the
//! launcher itself, [`LocalCluster`], is here.

mod file;
mod host;

pub use file::{ClusterFile, NodeEntry, CLUSTER_FILE, NODE_LOG};
pub use host::{find_node_binary, free_ports, process_alive};

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use strata_client::Client;

use file::create_dir_durable;

/// A node process that exited when it should have been running (it could not open its data
/// directory, say).
#[derive(Debug, thiserror::Error)]
#[error("node {id} exited ({status}): {log_tail}")]
pub struct NodeExited {
    /// The node.
    pub id: u64,
    /// How its process ended.
    pub status: std::process::ExitStatus,
    /// The last lines of its log, and where the log is.
    pub log_tail: String,
}

/// How to lay out a new local cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Number of nodes.
    pub nodes: usize,
    /// Number of shards.
    pub shards: u32,
    /// First client port (node i gets `base + i`, its peer port `base + 100 + i`); `None` picks
    /// free ports.
    pub base_port: Option<u16>,
    /// IP every node binds to.
    pub ip: String,
    /// Give node *i* its own loopback address `127.0.0.(10+i)` instead of `ip` (inside a private
    /// network namespace, so a partition is a firewall rule between two addresses).
    pub ip_per_node: bool,
}

/// The (client, peer) ports of nodes 1..=`nodes` from `--base-port`: node i gets `base + i` and
/// `base + 100 + i`. Refused when they would leave the unprivileged port range.
fn base_ports(base: u16, nodes: usize) -> anyhow::Result<Vec<(u16, u16)>> {
    let last_peer = u32::from(base) + 100 + nodes as u32;
    if base < 1024 || last_peer > u32::from(u16::MAX) {
        bail!(
            "--base-port {base} does not fit {nodes} nodes: their ports run from {} to \
             {last_peer}, which must lie within 1025..=65535",
            u32::from(base) + 1
        );
    }
    Ok((1..=nodes as u16)
        .map(|i| (base + i, base + 100 + i))
        .collect())
}

/// The (client, peer) addresses of the nodes of a new cluster of `spec`.
fn new_cluster_addresses(spec: &ClusterSpec) -> anyhow::Result<Vec<(String, String)>> {
    if spec.nodes == 0 {
        bail!("a cluster needs at least one node");
    }
    let ips: Vec<String> = (1..=spec.nodes as u64)
        .map(|id| {
            if spec.ip_per_node {
                node_ip(id)
            } else {
                spec.ip.clone()
            }
        })
        .collect();
    let ports: Vec<(u16, u16)> = match spec.base_port {
        Some(base) => base_ports(base, spec.nodes)?,
        // Each address has its own port space; one shared address needs distinct ports.
        None if spec.ip_per_node => ips
            .iter()
            .map(|ip| free_ports(ip, 2).map(|p| (p[0], p[1])))
            .collect::<anyhow::Result<_>>()?,
        None => free_ports(&spec.ip, spec.nodes * 2)?
            .chunks(2)
            .map(|p| (p[0], p[1]))
            .collect(),
    };
    Ok(ips
        .iter()
        .zip(ports)
        .map(|(ip, (client, peer))| (format!("{ip}:{client}"), format!("{ip}:{peer}")))
        .collect())
}

/// The loopback address of node `id` in a cluster with one address per node.
pub fn node_ip(id: u64) -> String {
    format!("127.0.0.{}", 10 + id)
}

/// A running (or stopped) local cluster.
pub struct LocalCluster {
    dir: PathBuf,
    node_bin: PathBuf,
    file: ClusterFile,
    /// Children started by this launcher, by node id. Killed on drop.
    children: Vec<(u64, Child)>,
    /// Extra arguments for every node (tests shorten timeouts with these).
    extra_args: Vec<String>,
    /// Extra environment of single nodes (the chaos suite runs a node's clock at another rate
    /// with these), by node id.
    node_env: HashMap<u64, Vec<(String, String)>>,
}

impl LocalCluster {
    /// Opens the cluster in `dir`, creating its layout from `spec` when `dir` has none. A refused
    /// spec or a missing node binary leaves nothing behind, not even the directory.
    pub fn open_or_create(
        dir: &Path,
        node_bin: &Path,
        spec: &ClusterSpec,
    ) -> anyhow::Result<LocalCluster> {
        if !node_bin.exists() {
            bail!("strata-node binary not found at {}", node_bin.display());
        }
        let existing = ClusterFile::load(dir)?;
        // Addresses are chosen (and the spec checked) before anything is written.
        let addresses = match existing {
            Some(_) => Vec::new(),
            None => new_cluster_addresses(spec)?,
        };
        create_dir_durable(dir).with_context(|| format!("create {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let file = match existing {
            Some(f) => f,
            None => {
                let file = ClusterFile {
                    shards: spec.shards,
                    nodes: addresses
                        .into_iter()
                        .enumerate()
                        .map(|(i, (client_addr, peer_addr))| NodeEntry {
                            id: i as u64 + 1,
                            client_addr,
                            peer_addr,
                            data_dir: dir.join(format!("node-{}", i + 1)),
                            pid: None,
                            joined: false,
                        })
                        .collect(),
                    ip_per_node: spec.ip_per_node,
                };
                file.save(&dir)?;
                file
            }
        };
        Ok(LocalCluster {
            dir,
            node_bin: node_bin.to_path_buf(),
            file,
            children: Vec::new(),
            extra_args: Vec::new(),
            node_env: HashMap::new(),
        })
    }

    /// Adds arguments passed to every node started from now on.
    pub fn with_node_args<I: IntoIterator<Item = String>>(mut self, args: I) -> Self {
        self.extra_args.extend(args);
        self
    }

    /// Sets the extra environment node `id` gets from its next start on (empty: none).
    pub fn set_node_env(&mut self, id: u64, env: Vec<(String, String)>) {
        if env.is_empty() {
            self.node_env.remove(&id);
        } else {
            self.node_env.insert(id, env);
        }
    }

    /// The cluster directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The recorded cluster description.
    pub fn file(&self) -> &ClusterFile {
        &self.file
    }

    /// Client endpoints of every node.
    pub fn endpoints(&self) -> Vec<String> {
        self.file.endpoints()
    }

    /// Fails when a node recorded in `cluster.json` is still running (another launcher owns it).
    pub fn ensure_not_running(&self) -> anyhow::Result<()> {
        self.file.ensure_not_running(&self.dir)
    }

    /// Starts every node. Fails before starting any if one of their ports is taken (another
    /// cluster may be running there; its answers must not be mistaken for ours).
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for n in &self.file.nodes {
            for addr in [&n.client_addr, &n.peer_addr] {
                if let Err(e) = TcpListener::bind(addr.as_str()) {
                    bail!(
                        "node {} cannot listen on {addr}: {e} (is another cluster running?)",
                        n.id
                    );
                }
            }
        }
        let ids: Vec<u64> = self.file.nodes.iter().map(|n| n.id).collect();
        for id in ids {
            self.start_node(id)?;
        }
        Ok(())
    }

    /// Starts node `id` with its data directory; its output goes to `node-<id>/node.log`.
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<u32> {
        let initial = self.file.initial_cluster();
        let shards = self.file.shards;
        let entry = self.entry_mut(id)?.clone();
        create_dir_durable(&entry.data_dir)?;
        let log_path = entry.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new(&self.node_bin);
        cmd.arg("--id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&entry.data_dir)
            .arg("--client-addr")
            .arg(&entry.client_addr)
            .arg("--peer-addr")
            .arg(&entry.peer_addr);
        if entry.joined {
            // Ignored once the node has joined: it restarts from its stored layout.
            cmd.arg("--join");
        } else {
            cmd.arg("--initial-cluster")
                .arg(&initial)
                .arg("--shards")
                .arg(shards.to_string());
        }
        let child = cmd
            .args(&self.extra_args)
            .envs(self.node_env.get(&id).into_iter().flatten().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.node_bin.display()))?;
        let pid = child.id();
        self.children.retain(|(n, _)| *n != id);
        self.children.push((id, child));
        // Read-modify-write: other `strata` processes may have updated other nodes' pids.
        self.reload()?;
        self.entry_mut(id)?.pid = Some(pid);
        self.file.save(&self.dir)?;
        Ok(pid)
    }

    /// Creates one more node entry (next id, free ports on the cluster's IP, its own data
    /// directory) and starts it with `--join`: it waits for `strata node add`.
    pub fn start_joining_node(&mut self) -> anyhow::Result<NodeEntry> {
        self.start_joining_node_at(None)
    }

    /// Like [`start_joining_node`](Self::start_joining_node), at the client and peer addresses
    /// `addrs` when given (those of a dead node it is to replace) instead of free ports.
    pub fn start_joining_node_at(
        &mut self,
        addrs: Option<(String, String)>,
    ) -> anyhow::Result<NodeEntry> {
        self.reload()?;
        let id = self.file.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let (client_addr, peer_addr) = match addrs {
            Some(addrs) => addrs,
            None => self.free_addrs(id)?,
        };
        let entry = NodeEntry {
            id,
            client_addr,
            peer_addr,
            data_dir: self.dir.join(format!("node-{id}")),
            pid: None,
            joined: true,
        };
        self.file.nodes.push(entry.clone());
        self.file.save(&self.dir)?;
        self.start_node(id)?;
        Ok(entry)
    }

    /// Starts an empty node with `--join` at the addresses of node `old`, whose process must be
    /// gone, to be added in its place (`strata node add --replaces`). `old` leaves the cluster
    /// file, so that it is not started again (its data directory stays on disk).
    pub fn start_replacement_node(&mut self, old: u64) -> anyhow::Result<NodeEntry> {
        self.reload()?;
        self.ensure_stopped(old, "replacing")?;
        let entry = self.entry_mut(old)?.clone();
        let new = self.start_joining_node_at(Some((entry.client_addr, entry.peer_addr)))?;
        self.file.nodes.retain(|n| n.id != old);
        self.file.save(&self.dir)?;
        Ok(new)
    }

    /// Records new client and peer addresses for node `id`, whose process must be gone, in the
    /// cluster file: it is started there from now on. The cluster must be told with `strata node
    /// update` first, or the node refuses to start at them.
    pub fn set_node_addresses(
        &mut self,
        id: u64,
        client_addr: &str,
        peer_addr: &str,
    ) -> anyhow::Result<()> {
        self.reload()?;
        self.ensure_stopped(id, "moving")?;
        let entry = self.entry_mut(id)?;
        entry.client_addr = client_addr.to_string();
        entry.peer_addr = peer_addr.to_string();
        self.file.save(&self.dir)
    }

    /// Client and peer addresses for node `id` (a new one, or one to move): free ports on its IP.
    pub fn free_addrs(&self, id: u64) -> anyhow::Result<(String, String)> {
        let ip = if self.file.ip_per_node {
            node_ip(id)
        } else {
            self.file
                .nodes
                .first()
                .and_then(|n| n.client_addr.rsplit_once(':'))
                .map_or("127.0.0.1".to_string(), |(ip, _)| ip.to_string())
        };
        let ports = free_ports(&ip, 2)?;
        Ok((format!("{ip}:{}", ports[0]), format!("{ip}:{}", ports[1])))
    }

    /// Rereads the cluster file: other `strata` processes (`dev add-node`, `dev restart-node`)
    /// may have added nodes or recorded new pids since this launcher last read it.
    pub fn reload(&mut self) -> anyhow::Result<()> {
        if let Some(current) = ClusterFile::load(&self.dir)? {
            self.file = current;
        }
        Ok(())
    }

    /// Refuses `doing` (what the caller is about to do) to node `id` while its process runs.
    fn ensure_stopped(&mut self, id: u64, doing: &str) -> anyhow::Result<()> {
        if let Some(pid) = self.entry_mut(id)?.pid.filter(|p| process_alive(*p)) {
            bail!("node {id} is still running (pid {pid}); stop it before {doing} it");
        }
        Ok(())
    }

    fn entry_mut(&mut self, id: u64) -> anyhow::Result<&mut NodeEntry> {
        self.file
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id} in this cluster"))
    }

    /// Sends `signal` to node `id`.
    pub fn signal(&mut self, id: u64, signal: Signal) -> anyhow::Result<()> {
        let pid = self
            .entry_mut(id)?
            .pid
            .with_context(|| format!("node {id} is not running"))?;
        kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("signal node {id}"))?;
        Ok(())
    }

    /// SIGKILLs node `id` and reaps it.
    pub fn kill_node(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, Signal::SIGKILL)?;
        self.reap(id, Duration::from_secs(10))
    }

    /// Stops node `id` gracefully: SIGTERM, then SIGKILL if it is still running after `grace`.
    /// Returns whether it had to be killed.
    pub fn stop_node(&mut self, id: u64, grace: Duration) -> anyhow::Result<bool> {
        let Some(pid) = self.entry_mut(id)?.pid else {
            return Ok(false);
        };
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if self.reap(id, grace).is_ok() {
            return Ok(false);
        }
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        self.reap(id, Duration::from_secs(5))?;
        Ok(true)
    }

    /// Stops node `id`, which the cluster removed, and drops it from the cluster file so that it
    /// is not started again (its data directory stays on disk). Returns whether it had to be
    /// killed.
    pub fn retire_node(&mut self, id: u64, grace: Duration) -> anyhow::Result<bool> {
        self.reload()?;
        let killed = self.stop_node(id, grace)?;
        self.file.nodes.retain(|n| n.id != id);
        self.file.save(&self.dir)?;
        Ok(killed)
    }

    /// Stops every node gracefully, including ones started by an earlier launcher. Returns the
    /// ids of the nodes that did not stop within `grace` of SIGTERM and were killed.
    pub fn stop_all(&mut self, grace: Duration) -> anyhow::Result<Vec<u64>> {
        self.reload()?;
        let ids: Vec<u64> = self
            .file
            .nodes
            .iter()
            .filter(|n| n.pid.is_some())
            .map(|n| n.id)
            .collect();
        for id in &ids {
            if let Some(pid) = self.entry_mut(*id)?.pid {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        let mut killed = Vec::new();
        for id in ids {
            if self.stop_node(id, grace)? {
                killed.push(id);
            }
        }
        Ok(killed)
    }

    /// Waits for node `id`'s process to exit, then clears its pid.
    fn reap(&mut self, id: u64, timeout: Duration) -> anyhow::Result<()> {
        let pid = self.entry_mut(id)?.pid;
        let until = Instant::now() + timeout;
        loop {
            let exited = match self.children.iter_mut().find(|(n, _)| *n == id) {
                Some((_, child)) => child.try_wait()?.is_some(),
                None => pid.is_none_or(|p| !process_alive(p)),
            };
            if exited {
                self.children.retain(|(n, _)| *n != id);
                if let Some(p) = pid {
                    self.record_exit(id, p)?;
                }
                return Ok(());
            }
            if Instant::now() >= until {
                bail!("node {id} did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ids of nodes started by this launcher whose process has exited, with their exit status.
    pub fn exited_nodes(&mut self) -> Vec<(u64, std::process::ExitStatus)> {
        let ids: Vec<u64> = self.children.iter().map(|(id, _)| *id).collect();
        ids.into_iter()
            .filter_map(|id| Some((id, self.exit_status(id)?)))
            .collect()
    }

    /// The exit status of node `id`, started by this launcher, if its process has exited (it
    /// is reaped and its pid cleared); `None` while it runs or if this launcher did not start it.
    pub fn exit_status(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let (_, child) = self.children.iter_mut().find(|(n, _)| *n == id)?;
        let status = child.try_wait().ok()??;
        let pid = child.id();
        self.children.retain(|(n, _)| *n != id);
        let _ = self.record_exit(id, pid);
        Some(status)
    }

    /// Records in `cluster.json` that process `pid` of node `id` is gone. Re-reads the file
    /// first: another `strata` process (`dev restart-node`) may have started the node again
    /// meanwhile, and its new pid must not be erased.
    fn record_exit(&mut self, id: u64, pid: u32) -> anyhow::Result<()> {
        self.reload()?;
        let entry = self.entry_mut(id)?;
        if entry.pid == Some(pid) {
            entry.pid = None;
            self.file.save(&self.dir)?;
        }
        Ok(())
    }

    /// Waits until every shard and the meta group have a leader known to a running node. Fails
    /// at once with a [`NodeExited`] if a node started by this launcher exits meanwhile.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + timeout;
        let mut last = String::from("no node answered");
        // One client for all polls, created once a node answers.
        let mut client: Option<Client> = None;
        while Instant::now() < until {
            if let Some((id, status)) = self.exited_nodes().into_iter().next() {
                return Err(NodeExited {
                    id,
                    status,
                    log_tail: self.log_tail(id, 3),
                }
                .into());
            }
            if client.is_none() {
                match strata_client::ClientBuilder::new(self.endpoints())
                    .attempt_timeout(Duration::from_millis(500))
                    .connect()
                    .await
                {
                    Ok(c) => client = Some(c),
                    Err(e) => last = e.to_string(),
                }
            }
            if let Some(c) = &client {
                if self.leaders_known(c).await {
                    return Ok(());
                }
                last = "some shards have no leader yet".into();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("cluster not ready after {timeout:?}: {last}")
    }

    /// Whether the running nodes together report a leader for every group.
    async fn leaders_known(&self, client: &Client) -> bool {
        let running: Vec<&String> = self
            .file
            .nodes
            .iter()
            .filter(|n| n.pid.is_some())
            .map(|n| &n.client_addr)
            .collect();
        let shards = self.file.shards as usize;
        let mut led = std::collections::BTreeSet::new();
        for addr in running {
            if let Ok(status) = client.node_status(addr).await {
                for g in status.groups {
                    if g.role == "leader" {
                        led.insert(g.group_id);
                    }
                }
            }
        }
        led.len() == shards + 1
    }

    /// The last `n` lines of node `id`'s log, on one line.
    pub fn log_tail(&self, id: u64, n: usize) -> String {
        let path = match self.file.nodes.iter().find(|e| e.id == id) {
            Some(e) => e.log_path(),
            None => return String::new(),
        };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
        format!("{tail} (log: {})", path.display())
    }

    /// Leaves the started processes running when the launcher is dropped.
    pub fn detach(&mut self) {
        self.children.clear();
    }

    /// A client connected to the running nodes.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(self.endpoints()).await?)
    }
}

impl Drop for LocalCluster {
    /// Children still running when the launcher goes away (a failing test) are killed, so no
    /// process outlives its test.
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{base_ports, ClusterSpec, LocalCluster};

    #[test]
    fn base_ports_stay_in_the_unprivileged_range() {
        assert_eq!(
            base_ports(7100, 3).unwrap(),
            [(7101, 7201), (7102, 7202), (7103, 7203)]
        );
        assert_eq!(base_ports(65_432, 3).unwrap()[2], (65_435, 65_535));
        for (base, nodes) in [(65_500, 3), (65_433, 3), (0, 3), (1000, 1)] {
            let err = base_ports(base, nodes).unwrap_err().to_string();
            assert!(err.contains("must lie within 1025..=65535"), "{err}");
        }
    }

    #[test]
    fn a_refused_spec_leaves_no_directory_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cluster");
        let any_file = std::env::current_exe().unwrap();
        let spec = |nodes, base_port| ClusterSpec {
            nodes,
            shards: 8,
            base_port,
            ip: "127.0.0.1".into(),
            ip_per_node: false,
        };
        for bad in [spec(3, Some(65_500)), spec(0, None)] {
            assert!(LocalCluster::open_or_create(&dir, &any_file, &bad).is_err());
            assert!(!dir.exists(), "{bad:?} created {}", dir.display());
        }
        let missing_bin = tmp.path().join("no-such-strata-node");
        assert!(LocalCluster::open_or_create(&dir, &missing_bin, &spec(3, None)).is_err());
        assert!(!dir.exists());
        // A good spec creates the directory and its cluster.json.
        LocalCluster::open_or_create(&dir, &any_file, &spec(3, Some(7100))).unwrap();
        assert!(dir.join("cluster.json").exists());
    }
}
