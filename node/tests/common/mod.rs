//! Shared fixture for the multi-node tests: a real cluster of `strata-node` processes on free
//! loopback ports in a temporary directory. Processes are killed and the directory removed when
//! the fixture drops, also when a test panics.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use strata_client::{Client, ClientBuilder, Consistency};
use strata_cluster::launcher::{ClusterSpec, LocalCluster};
use strata_proto::v1::kv_client::KvClient;
use strata_proto::v1::GetRequest;

/// Raft timings for tests: quicker elections than the production defaults.
pub const FAST_RAFT: [&str; 6] = [
    "--heartbeat-ms",
    "50",
    "--election-timeout-min-ms",
    "500",
    "--election-timeout-max-ms",
    "1000",
];

/// One test cluster at a time per test binary: a 2-core machine running several 3-node clusters
/// with short election timeouts would see spurious elections and flaky timings.
static CLUSTER_SLOT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running test cluster.
pub struct TestCluster {
    pub cluster: LocalCluster,
    // Fields drop in order: processes die, then their data goes, then the next test may start.
    _dir: tempfile::TempDir,
    _slot: tokio::sync::MutexGuard<'static, ()>,
}

impl TestCluster {
    /// Starts `nodes` nodes with `shards` shards and waits until every group has a leader.
    pub async fn start(nodes: usize, shards: u32) -> TestCluster {
        TestCluster::start_with(nodes, shards, &[]).await
    }

    /// Like [`TestCluster::start`], with extra `strata-node` flags.
    pub async fn start_with(nodes: usize, shards: u32, node_args: &[&str]) -> TestCluster {
        let slot = CLUSTER_SLOT.lock().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = ClusterSpec {
            nodes,
            shards,
            base_port: None,
            ip: "127.0.0.1".into(),
            ip_per_node: false,
        };
        let mut cluster = LocalCluster::open_or_create(
            dir.path(),
            env!("CARGO_BIN_EXE_strata-node").as_ref(),
            &spec,
        )
        .expect("create cluster")
        .with_node_args(FAST_RAFT.iter().chain(node_args).map(|s| s.to_string()));
        cluster.start_all().expect("start nodes");
        cluster
            .wait_ready(Duration::from_secs(60))
            .await
            .expect("cluster ready");
        TestCluster {
            cluster,
            _dir: dir,
            _slot: slot,
        }
    }

    /// A client with a deadline long enough to ride out a failover.
    pub async fn client(&self) -> Client {
        ClientBuilder::new(self.cluster.endpoints())
            .deadline(Duration::from_secs(20))
            .attempt_timeout(Duration::from_secs(2))
            .connect()
            .await
            .expect("client connects")
    }

    /// The node currently leading `group`, asking every running node.
    pub async fn leader_of(&self, client: &Client, group: u64) -> Option<u64> {
        for n in &self.cluster.file().nodes {
            if n.pid.is_none() {
                continue;
            }
            if let Ok(st) = client.node_status(&n.client_addr).await {
                if st
                    .groups
                    .iter()
                    .any(|g| g.group_id == group && g.role == "leader")
                {
                    return Some(n.id);
                }
            }
        }
        None
    }

    /// Waits until every group replica on node `id` has applied as far as its group's leader.
    pub async fn wait_caught_up(&self, client: &Client, id: u64, timeout: Duration) {
        let until = Instant::now() + timeout;
        let addr = |id: u64| self.client_addr(id);
        loop {
            let mut behind = Vec::new();
            match client.node_status(&addr(id)).await {
                Ok(st) => {
                    for g in &st.groups {
                        let Some(leader) = self.leader_of(client, g.group_id).await else {
                            behind.push(format!("group {} has no leader", g.group_id));
                            continue;
                        };
                        let lst = client.node_status(&addr(leader)).await.unwrap();
                        let lg = lst
                            .groups
                            .iter()
                            .find(|x| x.group_id == g.group_id)
                            .unwrap();
                        if g.applied_index < lg.applied_index {
                            behind.push(format!(
                                "group {}: {} < {}",
                                g.group_id, g.applied_index, lg.applied_index
                            ));
                        }
                    }
                }
                Err(e) => behind.push(e.to_string()),
            }
            if behind.is_empty() {
                return;
            }
            assert!(
                Instant::now() < until,
                "node {id} did not catch up: {behind:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// An acknowledged write: key, version, value.
pub type Acked = (String, u64, String);

impl TestCluster {
    /// Client address of node `id`.
    pub fn client_addr(&self, id: u64) -> String {
        let node = self.cluster.file().nodes.iter().find(|n| n.id == id);
        node.expect("node in cluster").client_addr.clone()
    }

    /// Asserts that node `id` serves every write of `acked` whose shard it hosts from its own
    /// replica (STALE reads, no leader involved). Returns how many keys it checked.
    pub async fn assert_replica_has(&self, client: &Client, id: u64, acked: &[Acked]) -> usize {
        let addr = self.client_addr(id);
        let status = client.node_status(&addr).await.expect("node status");
        let hosted: Vec<u64> = status.groups.iter().map(|g| g.group_id).collect();
        let table = client.route_table().expect("route table");
        let mut kv = KvClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let mut checked = 0;
        for (k, version, v) in acked {
            if !hosted.contains(&table.shard_for_key(k.as_bytes()).id) {
                continue;
            }
            let req = GetRequest {
                key: Bytes::from(k.clone()),
                consistency: Consistency::Stale as i32,
            };
            let r = kv.get(req).await.expect("stale read").into_inner();
            assert!(r.found, "{k} missing on node {id}");
            assert_eq!(
                (r.version, r.value.as_ref()),
                (*version, v.as_bytes()),
                "{k} on node {id}"
            );
            checked += 1;
        }
        checked
    }
}

/// Writes `prefix:0..n` one after another (value `v{i}`) and returns the acknowledged writes.
pub async fn put_all(client: &Client, prefix: &str, n: usize) -> Vec<Acked> {
    let mut acked = Vec::with_capacity(n);
    for i in 0..n {
        let (k, v) = (format!("{prefix}:{i}"), format!("v{i}"));
        let version = client.put(k.clone(), v.clone()).await.expect("put");
        acked.push((k, version, v));
    }
    acked
}

/// Logs a test phase, so a failure shows how far the test got.
pub fn phase(msg: &str) {
    eprintln!("--- {msg}");
}

impl TestCluster {
    /// The newest shard map the nodes report (the client asks them all and keeps the newest
    /// epoch).
    pub async fn newest_map(&self, client: &Client) -> strata_proto::v1::ShardMap {
        client.shard_map().await.expect("shard map")
    }

    /// Polls the newest map until `done` holds (no move under way as well), or panics after
    /// `timeout` showing the last map.
    pub async fn wait_for_map(
        &self,
        client: &Client,
        timeout: Duration,
        what: &str,
        done: impl Fn(&strata_proto::v1::ShardMap) -> bool,
    ) -> strata_proto::v1::ShardMap {
        let until = Instant::now() + timeout;
        loop {
            let map = self.newest_map(client).await;
            let moving = map.meta_moving_to != 0 || map.shards.iter().any(|s| s.moving_to != 0);
            if !moving && done(&map) {
                return map;
            }
            assert!(Instant::now() < until, "{what}: not reached; map {map:#?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Writers that put fresh keys until stopped, recording what was acknowledged and any error the
/// client surfaced.
pub struct Writers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<Acked>, Vec<String>)>>,
}

impl Writers {
    /// Starts `n` writers on `client`, keys `{prefix}{writer}:{i}`.
    pub fn start(client: &Client, prefix: &str, n: usize) -> Writers {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..n)
            .map(|w| {
                let (client, stop) = (client.clone(), stop.clone());
                let prefix = format!("{prefix}{w}");
                tokio::spawn(async move {
                    let (mut acked, mut errors) = (Vec::new(), Vec::new());
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let (k, v) = (format!("{prefix}:{i}"), format!("v{i}"));
                        match client.put(k.clone(), v.clone()).await {
                            Ok(version) => acked.push((k, version, v)),
                            Err(e) => errors.push(format!("{k}: {e}")),
                        }
                        i += 1;
                    }
                    (acked, errors)
                })
            })
            .collect();
        Writers { stop, tasks }
    }

    /// Stops the writers; returns every acknowledged write and every surfaced error.
    pub async fn stop(self) -> (Vec<Acked>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut acked, mut errors) = (Vec::new(), Vec::new());
        for t in self.tasks {
            let (a, e) = t.await.expect("writer task");
            acked.extend(a);
            errors.extend(e);
        }
        (acked, errors)
    }
}

/// Reads every acknowledged write back linearizably and checks its value and version.
pub async fn assert_all_readable(client: &Client, acked: &[Acked]) {
    for (k, version, v) in acked {
        let r = client
            .get(k.clone())
            .await
            .unwrap_or_else(|e| panic!("read {k}: {e}"))
            .unwrap_or_else(|| panic!("acknowledged write {k} lost"));
        assert_eq!(
            (r.version, r.value.as_ref()),
            (*version, v.as_bytes()),
            "{k}"
        );
    }
}

impl TestCluster {
    /// Starts one more, empty node with `--join` and waits until it answers as joining.
    pub async fn start_joining_node(
        &mut self,
        client: &Client,
    ) -> strata_cluster::launcher::NodeEntry {
        let entry = self
            .cluster
            .start_joining_node()
            .expect("start joining node");
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(st) = client.node_status(&entry.client_addr).await {
                assert_eq!(st.membership, "joining");
                return entry;
            }
            assert!(Instant::now() < until, "node {} never answered", entry.id);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
