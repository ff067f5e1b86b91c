//! Cluster control on real `strata-node` processes, through [`strata_cluster::launcher`]: start,
//! SIGKILL or a graceful stop (SIGTERM), restart with the same data directory, SIGSTOP / SIGCONT,
//! leaders per shard, membership changes. Dropping a [`Cluster`] resumes paused nodes and kills every process it started (the
//! launcher kills its children on drop), also when the run panics; its temporary directory goes
//! with it unless the caller keeps it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::Signal;
use strata_client::{Client, ClientBuilder};
use strata_cluster::launcher::{ClusterSpec, LocalCluster, NodeEntry, NodeExited, NODE_LOG};

use crate::lossy_fs::{LossyFs, Lost, Unsynced};
use crate::slow_net::{Delay, SlowNet};

/// How long a node may take to stop after SIGTERM (it hands its leaderships over and drains its
/// calls first) before the stop counts as failed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Raft settings for chaos runs: elections within ~1 s so faults resolve inside short runs, and
/// frequent snapshots with a short kept log tail (25 entries), so followers that fall behind
/// catch up by snapshot as well as by log.
pub const FAST_RAFT: [&str; 8] = [
    "--heartbeat-ms",
    "50",
    "--election-timeout-min-ms",
    "500",
    "--election-timeout-max-ms",
    "1000",
    "--snapshot-logs",
    "100",
];

/// A running chaos cluster.
pub struct Cluster {
    /// The launched processes.
    pub nodes: LocalCluster,
    /// Nodes currently SIGSTOPped.
    paused: BTreeSet<u64>,
    /// Nodes currently down — SIGKILLed or stopped — to be restarted.
    down: BTreeSet<u64>,
    /// Nodes gone for good (their data directory was wiped): never restarted, never a target.
    retired: BTreeSet<u64>,
    /// Partition rules are in place.
    partitioned: bool,
    /// Nodes running with their clock at another rate ([`Cluster::skew_clock`]).
    skewed: BTreeSet<u64>,
    /// The proxy that delays links between nodes, when the run has slow links.
    slow_net: Option<SlowNet>,
    /// The in-memory file system holding the nodes' data, for power losses. Declared after
    /// `nodes` so that it is unmounted only once every node process is gone.
    lossy: Option<LossyFs>,
}

impl Cluster {
    /// Starts `nodes` nodes with `shards` shards under `dir`, from `node_bin`, and waits until
    /// every group has a leader. With `lossy`, `dir` is first mounted as a [`LossyFs`], so that
    /// [`Cluster::power_loss`] can drop what the nodes wrote without fsync. With `slow`, every
    /// connection between nodes runs through a [`SlowNet`] proxy, so that [`Cluster::slow`] can
    /// delay links (needs the harness' network namespace).
    pub async fn start(
        dir: &Path,
        node_bin: &Path,
        nodes: usize,
        shards: u32,
        extra_args: &[String],
        lossy: bool,
        slow: bool,
    ) -> anyhow::Result<Cluster> {
        let lossy = if lossy {
            std::fs::create_dir_all(dir)?;
            Some(LossyFs::mount(dir)?)
        } else {
            None
        };
        // Before the nodes start, so that every connection between them goes through it.
        let slow_net = if slow {
            anyhow::ensure!(
                crate::net::in_private_netns(),
                "slow links need the harness inside its private network namespace"
            );
            Some(
                SlowNet::start()
                    .await
                    .context("start the slow-network proxy")?,
            )
        } else {
            None
        };
        let spec = ClusterSpec {
            nodes,
            shards,
            base_port: None,
            ip: "127.0.0.1".into(),
            // Inside the harness' network namespace every node gets its own address, so
            // partitions can cut links between nodes.
            ip_per_node: crate::net::in_private_netns(),
        };
        let mut launched = LocalCluster::open_or_create(dir, node_bin, &spec)?.with_node_args(
            FAST_RAFT
                .iter()
                .map(|s| s.to_string())
                .chain(extra_args.iter().cloned()),
        );
        launched.start_all()?;
        launched
            .wait_ready(Duration::from_secs(60))
            .await
            .context("cluster did not become ready")?;
        Ok(Cluster {
            nodes: launched,
            paused: BTreeSet::new(),
            down: BTreeSet::new(),
            retired: BTreeSet::new(),
            partitioned: false,
            skewed: BTreeSet::new(),
            slow_net,
            lossy,
        })
    }

    /// A client over every node, with a deadline suited to operations under faults.
    pub async fn client(&self, deadline: Duration) -> anyhow::Result<Client> {
        Ok(ClientBuilder::new(self.nodes.endpoints())
            .deadline(deadline)
            .attempt_timeout(Duration::from_millis(500).min(deadline))
            .connect()
            .await?)
    }

    /// Ids of the nodes in the cluster file (members or not).
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.file().nodes.iter().map(|n| n.id).collect()
    }

    /// Node `id` as the cluster file records it.
    fn entry(&self, id: u64) -> Option<&NodeEntry> {
        self.nodes.file().nodes.iter().find(|n| n.id == id)
    }

    /// Client address of node `id`.
    pub fn addr(&self, id: u64) -> Option<String> {
        self.entry(id).map(|n| n.client_addr.clone())
    }

    /// Nodes neither down nor paused.
    pub fn healthy(&self) -> Vec<u64> {
        self.ids()
            .into_iter()
            .filter(|id| {
                !self.paused.contains(id) && !self.down.contains(id) && !self.retired.contains(id)
            })
            .collect()
    }

    /// SIGKILLs node `id`.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        if self.paused.remove(&id) {
            let _ = self.nodes.signal(id, Signal::SIGCONT);
        }
        self.nodes.kill_node(id)?;
        self.down.insert(id);
        Ok(())
    }

    /// Deletes the Raft state of node `id`, which must be down — its database and snapshots, as
    /// a replaced disk would — and starts it again with its old flags.
    pub fn wipe_and_restart(&mut self, id: u64) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.down.contains(&id),
            "node {id} must be down to be wiped"
        );
        let data_dir = self.entry(id).context("no such node")?.data_dir.clone();
        for state in ["db", "snapshots"] {
            let path = data_dir.join(state);
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("wipe {}", path.display()));
                }
                _ => {}
            }
        }
        self.nodes.start_node(id)?;
        self.down.remove(&id);
        Ok(())
    }

    /// Records where node `id`, which must be down, is started from now on (the addresses the
    /// cluster records for it after `node update`).
    pub fn set_addresses(
        &mut self,
        id: u64,
        client_addr: &str,
        peer_addr: &str,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.down.contains(&id),
            "node {id} must be down to be moved"
        );
        self.nodes.set_node_addresses(id, client_addr, peer_addr)
    }

    /// Gives node `id` up for good: it is not restarted at heal and no fault picks it.
    pub fn retire(&mut self, id: u64) {
        self.down.remove(&id);
        self.paused.remove(&id);
        self.retired.insert(id);
    }

    /// Whether the nodes run on the lossy file system, so that [`Cluster::power_loss`] works.
    pub fn on_lossy_fs(&self) -> bool {
        self.lossy.is_some()
    }

    /// Holds every fsync the nodes ask for from now on, unanswered, until the next
    /// [`power_loss`](Self::power_loss) (see [`LossyFs::hold_syncs`]). Returns once `count`
    /// fsyncs are held, or after `timeout` (an idle cluster asks for none).
    pub async fn hold_syncs(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let fs = self.lossy_fs()?;
        fs.hold_syncs();
        let until = tokio::time::Instant::now() + timeout;
        while fs.held_syncs() < count && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Cuts the power of nodes `ids` at once: SIGKILLs them, then drops every directory change
    /// in their data directories that was not fsynced, and all or (`Unsynced::Torn`) part of
    /// their unsynced writes, as a power cut of their machines would (their log files are kept,
    /// for the report). Fsyncs held by [`hold_syncs`](Self::hold_syncs) are never carried out;
    /// fsyncs are answered at once again afterwards. Needs a cluster started with `lossy`.
    pub fn power_loss(&mut self, ids: &[u64], unsynced: Unsynced) -> anyhow::Result<Lost> {
        self.lossy_fs()?;
        let cut = (|| {
            // Signal them all before any held fsync fails, so no node lives to see that failure.
            for id in ids {
                self.nodes.signal(*id, Signal::SIGKILL)?;
            }
            let mut lost = Lost {
                held_syncs: self.lossy_fs()?.fail_held_syncs(),
                ..Lost::default()
            };
            for id in ids {
                // Reaped first: a dying node may still have a write in flight.
                self.kill(*id)?;
                let node_dir = self.node_dir_on_lossy_fs(*id)?;
                lost += self
                    .lossy_fs()?
                    .power_loss(&node_dir, &[Path::new(NODE_LOG)], unsynced)?;
            }
            Ok(lost)
        })();
        // Only if the cut failed half-way can fsyncs still be held.
        self.lossy_fs()?.answer_held_syncs();
        cut
    }

    /// Fills node `id`'s disk: every write to its data directory fails with `ENOSPC` (its log
    /// is spared) until the next [`heal`](Self::heal). Needs a cluster started with `lossy`.
    pub fn fill_disk(&mut self, id: u64) -> anyhow::Result<()> {
        let node_dir = self.node_dir_on_lossy_fs(id)?;
        self.lossy_fs()?.fill(&node_dir, &[Path::new(NODE_LOG)])
    }

    /// Slows node `id`'s disk down: every fsync in its data directory is answered `by` late
    /// until the next [`heal`](Self::heal). Needs a cluster started with `lossy`.
    pub fn slow_disk(&mut self, id: u64, by: Duration) -> anyhow::Result<()> {
        let node_dir = self.node_dir_on_lossy_fs(id)?;
        self.lossy_fs()?.slow_down(&node_dir, by)
    }

    /// Node `id`'s data directory as the lossy file system names it: relative to the cluster
    /// directory, where it is mounted.
    fn node_dir_on_lossy_fs(&self, id: u64) -> anyhow::Result<PathBuf> {
        let data_dir = self
            .entry(id)
            .map(|n| n.data_dir.clone())
            .with_context(|| format!("node {id} is not in the cluster file"))?;
        Ok(data_dir.strip_prefix(self.nodes.dir())?.to_path_buf())
    }

    /// How many writes the full disks have refused since the last heal.
    pub fn refused_writes(&self) -> usize {
        self.lossy.as_ref().map_or(0, LossyFs::refused)
    }

    /// Waits up to `timeout` for node `id` to exit on its own. Its exit status, if it did: it
    /// counts as down from then on, so the next [`heal`](Self::heal) restarts it.
    pub async fn wait_exit(
        &mut self,
        id: u64,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.nodes.exit_status(id) {
                self.mark_down(id);
                return Some(status);
            }
            if tokio::time::Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lossy_fs(&self) -> anyhow::Result<&LossyFs> {
        self.lossy
            .as_ref()
            .context("disk faults need the cluster on the lossy file system (--lossy-fs)")
    }

    /// Stops node `id` as an operator would before a restart: SIGTERM, and it must exit on its own
    /// within 10 s (`STOP_GRACE`).
    pub fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        if self.nodes.stop_node(id, STOP_GRACE)? {
            anyhow::bail!("node {id} did not stop within {STOP_GRACE:?} of SIGTERM and was killed");
        }
        self.down.insert(id);
        Ok(())
    }

    /// Restarts node `id` (stopped as an operator would) with its clock running at `rate` times
    /// real time (see [`crate::clock`]); the next [`heal`](Self::heal) kills it and restarts it
    /// with the true clock.
    pub fn skew_clock(&mut self, id: u64, rate: f64) -> anyhow::Result<()> {
        let env = crate::clock::env(rate)?;
        self.stop(id)?;
        self.nodes.set_node_env(id, env);
        self.skewed.insert(id);
        self.down.remove(&id);
        self.nodes.start_node(id)?;
        Ok(())
    }

    /// SIGSTOPs node `id`.
    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        self.nodes.signal(id, Signal::SIGSTOP)?;
        self.paused.insert(id);
        Ok(())
    }

    /// Loopback addresses of nodes `ids`, in that order.
    fn ips(&self, ids: &[u64]) -> Vec<String> {
        ids.iter()
            .filter_map(|id| self.addr(*id))
            .map(|a| {
                a.rsplit_once(':')
                    .map_or(a.clone(), |(ip, _)| ip.to_string())
            })
            .collect()
    }

    /// Drops `percent` % of the packets between any two nodes.
    pub fn lossy(&mut self, percent: u32) -> anyhow::Result<()> {
        let ips = self.ips(&self.ids());
        self.partitioned = true;
        crate::net::lossy(&ips, percent)
    }

    /// Cuts the links between nodes `ids` that `connected` (over positions in `ids`) does not
    /// allow. Returns a description of the cut.
    pub fn partition(
        &mut self,
        ids: &[u64],
        connected: impl Fn(usize, usize) -> bool,
    ) -> anyhow::Result<String> {
        let ips = self.ips(ids);
        self.partitioned = true;
        let cut = crate::net::partition(&ips, connected)?;
        Ok(cut
            .iter()
            .map(|(a, b)| format!("{a}-x-{b}"))
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// Whether links between nodes can be slowed ([`Cluster::slow`]).
    pub fn on_slow_net(&self) -> bool {
        self.slow_net.is_some()
    }

    /// Delays the links `(from, to, delay)` between nodes. Returns a description.
    pub fn slow(&mut self, links: &[(u64, u64, Delay)]) -> anyhow::Result<String> {
        let net = self
            .slow_net
            .as_ref()
            .context("slow links need the cluster started with its slow-network proxy")?;
        let mut described = Vec::new();
        for (from, to, delay) in links {
            let ips = self.ips(&[*from, *to]);
            let [a, b] = ips.as_slice() else {
                anyhow::bail!("node {from} or {to} has no address");
            };
            net.set(a.parse()?, b.parse()?, *delay);
            described.push(format!("{from}->{to} {delay}"));
        }
        Ok(described.join(", "))
    }

    /// Nodes whose process exited on its own since the last call: it panicked, or a restart
    /// could not open its data. One line each, with the exit status and the end of the node's
    /// log. They count as down from now on, so the next [`heal`](Self::heal) restarts them.
    pub fn exited_on_their_own(&mut self) -> Vec<String> {
        let exited = self.nodes.exited_nodes();
        exited
            .into_iter()
            .map(|(id, status)| {
                self.mark_down(id);
                NodeExited {
                    id,
                    status,
                    log_tail: self.nodes.log_tail(id, 3),
                }
                .to_string()
            })
            .collect()
    }

    /// Waits until every shard has a leader again after the last heal. A node that exits
    /// meanwhile is not an error of the run but a finding: it is counted down, the others must
    /// still get ready, and it is returned like [`exited_on_their_own`](Self::exited_on_their_own).
    pub async fn wait_recovered(&mut self, timeout: Duration) -> anyhow::Result<Vec<String>> {
        let mut exits = Vec::new();
        loop {
            match self.nodes.wait_ready(timeout).await {
                Ok(()) => return Ok(exits),
                Err(e) => match e.downcast::<NodeExited>() {
                    Ok(exit) => {
                        self.mark_down(exit.id);
                        exits.push(exit.to_string());
                    }
                    Err(e) => return Err(e.context("cluster did not recover after healing")),
                },
            }
        }
    }

    fn mark_down(&mut self, id: u64) {
        self.paused.remove(&id);
        self.down.insert(id);
    }

    /// Restarts nodes that are down, resumes paused ones, removes partitions and delays, frees
    /// full disks, and restarts nodes whose clock was skewed with the true clock.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        if let Some(fs) = &self.lossy {
            fs.free_space();
            fs.restore_speed();
        }
        if std::mem::take(&mut self.partitioned) {
            crate::net::heal()?;
        }
        if let Some(net) = &self.slow_net {
            net.clear();
        }
        for id in std::mem::take(&mut self.paused) {
            self.nodes.signal(id, Signal::SIGCONT)?;
        }
        for id in std::mem::take(&mut self.skewed) {
            self.nodes.set_node_env(id, Vec::new());
            // Killed, not stopped: a slow clock stretches a graceful stop past `STOP_GRACE`.
            if !self.down.contains(&id) {
                self.kill(id)?;
            }
        }
        for id in std::mem::take(&mut self.down) {
            self.nodes.start_node(id)?;
        }
        Ok(())
    }

    /// The node leading `group`, asking the healthy nodes.
    pub async fn leader_of(&self, client: &Client, group: u64) -> Option<u64> {
        for id in self.healthy() {
            let Some(addr) = self.addr(id) else { continue };
            if let Ok(st) = client.node_status(&addr).await {
                if st
                    .groups
                    .iter()
                    .any(|g| g.group_id == group && g.role == "leader")
                {
                    return Some(id);
                }
            }
        }
        None
    }

    /// Starts one more node with `--join` — at the addresses of node `at` when given (a dead
    /// node it is to replace), else on free ports — and returns its id and addresses.
    pub fn start_joining(&mut self, at: Option<u64>) -> anyhow::Result<(u64, String, String)> {
        let addrs = match at {
            Some(id) => {
                let old = self.entry(id).context("no such node")?;
                Some((old.client_addr.clone(), old.peer_addr.clone()))
            }
            None => None,
        };
        let e = self.nodes.start_joining_node_at(addrs)?;
        Ok((e.id, e.client_addr, e.peer_addr))
    }

    /// The directory of the cluster (logs live under it).
    pub fn dir(&self) -> PathBuf {
        self.nodes.dir().to_path_buf()
    }

    /// Copies the node logs out of the lossy file system, which goes with the cluster, to the
    /// directory `<cluster dir>-logs` beside it.
    fn save_logs(&self) {
        let mut to = self.nodes.dir().as_os_str().to_owned();
        to.push("-logs");
        let to = PathBuf::from(to);
        let _ = std::fs::create_dir_all(&to);
        for node in &self.nodes.file().nodes {
            let log = node.log_path();
            let _ = std::fs::copy(&log, to.join(format!("node-{}.log", node.id)));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.partitioned {
            let _ = crate::net::heal();
        }
        // A stopped process ignores SIGTERM; resume it so the launcher's teardown works.
        for id in std::mem::take(&mut self.paused) {
            let _ = self.nodes.signal(id, Signal::SIGCONT);
        }
        if self.lossy.is_some() {
            self.save_logs();
        }
    }
}
