//! Node settings. Three sources, one precedence: **command-line flag > `STRATA_*` environment
//! variable > TOML file (`--config`) > built-in default.** Every flag `--foo-bar` has the
//! environment variable `STRATA_FOO_BAR` and the TOML key `foo_bar`.
//!
//! The binary parses [`Args`]; the library only ever sees the resolved [`NodeConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;

use strata_proto::address::check_reachable_addr;

use crate::layout::{NodePhase, NodeSpec};
use crate::limits::Limits;

/// Default of `--snapshot-send-mb-per-sec`: TiKV's default snapshot I/O rate, well below what
/// one disk or a 10 Gbit/s link carries.
const DEFAULT_SNAPSHOT_SEND_MB_PER_SEC: u64 = 100;

/// Real clocks drift by parts per million; 10% also covers a leader whose clock is slowed by a
/// loaded hypervisor, at the price of a lease 10% shorter than openraft's.
const DEFAULT_LEASE_DRIFT_PERCENT: u64 = 10;

/// Command-line flags (each also readable from its `STRATA_*` environment variable).
#[derive(Parser, Debug, Default)]
#[command(name = "strata-node", version, about = "A Strata storage node")]
pub struct Args {
    /// TOML file with settings; flags and environment variables override it.
    #[arg(long, env = "STRATA_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id (> 0, never reused). Optional with `--join`: the cluster then gives the
    /// node the next free id when it is added.
    #[arg(long, env = "STRATA_ID")]
    pub id: Option<u64>,
    /// Start as a new, empty node that waits to be added to a running cluster with
    /// `strata node add --addr <its client address>`. Ignored once the node has joined.
    #[arg(long, env = "STRATA_JOIN")]
    pub join: bool,
    /// Directory of this node's RocksDB and snapshots.
    #[arg(long, env = "STRATA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the client API (Kv, Cluster) listens on, e.g. 127.0.0.1:7101.
    #[arg(long, env = "STRATA_CLIENT_ADDR")]
    pub client_addr: Option<SocketAddr>,
    /// Address the peer (Raft) service listens on; outgoing peer connections bind to its IP.
    #[arg(long, env = "STRATA_PEER_ADDR")]
    pub peer_addr: Option<SocketAddr>,
    /// Address other nodes and clients reach the client API at, if not `--client-addr`: HOST:PORT
    /// with an IP or a DNS name, e.g. `strata-0.strata:7100` for a node listening on
    /// `0.0.0.0:7100` in a container. The cluster records this address for the node.
    #[arg(long, env = "STRATA_ADVERTISE_CLIENT_ADDR")]
    pub advertise_client_addr: Option<String>,
    /// Address other nodes reach the peer service at, if not `--peer-addr` (see
    /// `--advertise-client-addr`).
    #[arg(long, env = "STRATA_ADVERTISE_PEER_ADDR")]
    pub advertise_peer_addr: Option<String>,
    /// The bootstrap membership: `ID=CLIENT_ADDR/PEER_ADDR,...`. Read on first start only; later
    /// starts use the layout stored in the data directory.
    #[arg(long, env = "STRATA_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Number of shards created at bootstrap.
    #[arg(long, env = "STRATA_SHARDS")]
    pub shards: Option<u32>,
    /// Replicas per shard at bootstrap (capped by the number of nodes).
    #[arg(long, env = "STRATA_REPLICATION")]
    pub replication: Option<usize>,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, env = "STRATA_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Lower bound of the randomized election timeout in milliseconds.
    #[arg(long, env = "STRATA_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// Upper bound of the randomized election timeout in milliseconds.
    #[arg(long, env = "STRATA_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// Raft log entries since the last snapshot that trigger a new snapshot (and log compaction).
    #[arg(long, env = "STRATA_SNAPSHOT_LOGS")]
    pub snapshot_logs: Option<u64>,
    /// How much slower, in percent, a leader's clock may run than its followers' without `LEASE`
    /// reads going stale: a leader serves them only while the last quorum acknowledgement is
    /// younger than the maximum election timeout shortened by this share (default 10; 100 makes
    /// every `LEASE` read a ReadIndex read).
    #[arg(long, env = "STRATA_LEASE_DRIFT_PERCENT")]
    pub lease_drift_percent: Option<u64>,
    /// Memory budget for RocksDB memtables and block cache, in MiB, shared by all shards.
    #[arg(long, env = "STRATA_MEMORY_BUDGET_MB")]
    pub memory_budget_mb: Option<usize>,
    /// Most snapshot bytes this node sends per second, in MiB, shared by all snapshots it sends
    /// at once (0: unlimited). Keeps a follower's catch-up from starving the leader's writes.
    #[arg(long, env = "STRATA_SNAPSHOT_SEND_MB_PER_SEC")]
    pub snapshot_send_mb_per_sec: Option<u64>,
    /// Largest accepted key, in bytes.
    #[arg(long, env = "STRATA_MAX_KEY_BYTES")]
    pub max_key_bytes: Option<usize>,
    /// Largest accepted value, in bytes.
    #[arg(long, env = "STRATA_MAX_VALUE_BYTES")]
    pub max_value_bytes: Option<usize>,
    /// Most operations in one batch.
    #[arg(long, env = "STRATA_MAX_BATCH_OPS")]
    pub max_batch_ops: Option<usize>,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "STRATA_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
}

/// The same settings as they appear in the TOML file (all optional).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    join: Option<bool>,
    data_dir: Option<PathBuf>,
    client_addr: Option<SocketAddr>,
    peer_addr: Option<SocketAddr>,
    advertise_client_addr: Option<String>,
    advertise_peer_addr: Option<String>,
    initial_cluster: Option<String>,
    shards: Option<u32>,
    replication: Option<usize>,
    heartbeat_ms: Option<u64>,
    election_timeout_min_ms: Option<u64>,
    election_timeout_max_ms: Option<u64>,
    snapshot_logs: Option<u64>,
    lease_drift_percent: Option<u64>,
    memory_budget_mb: Option<usize>,
    snapshot_send_mb_per_sec: Option<u64>,
    max_key_bytes: Option<usize>,
    max_value_bytes: Option<usize>,
    max_batch_ops: Option<usize>,
    max_message_bytes: Option<usize>,
}

/// Raft timing and compaction settings.
#[derive(Clone, Debug)]
pub struct RaftTimings {
    /// Leader heartbeat period.
    pub heartbeat: Duration,
    /// Election timeout range; each group draws its own timeout from it.
    pub election_min: Duration,
    /// Upper end of the election timeout range.
    pub election_max: Duration,
    /// Log entries since the last snapshot that trigger a snapshot.
    pub snapshot_logs: u64,
    /// The clock-rate difference, in percent, that `LEASE` reads allow for (see
    /// [`RaftTimings::lease_read_age`]).
    pub lease_drift_percent: u64,
}

impl RaftTimings {
    /// The oldest quorum acknowledgement a `LEASE` read may rely on: the maximum election
    /// timeout, shortened by `lease_drift_percent`. A follower that acknowledged the leader
    /// refuses to vote for anyone else for the maximum election timeout by its own clock, and the
    /// leader counts its lease from when it sent what the quorum acknowledged, by its clock; if the
    /// leader's clock runs slower, its full lease would outlast the followers' promise. TiKV
    /// keeps the same margin (a 9 s lease under a 10 s election timeout).
    pub fn lease_read_age(&self) -> Duration {
        self.election_max * (100 - self.lease_drift_percent.min(100)) as u32 / 100
    }

    /// How recently a voter must have acknowledged its leader to be handed the leadership: three
    /// heartbeats, so one late heartbeat does not rule out a live voter.
    pub fn successor_freshness(&self) -> Duration {
        self.heartbeat * 3
    }
}

/// The resolved settings of one node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id; 0 for a joining node that takes the id the cluster gives it.
    pub id: u64,
    /// Wait to be added to a running cluster instead of bootstrapping one.
    pub join: bool,
    /// RocksDB and snapshot directory.
    pub data_dir: PathBuf,
    /// Client API listen address.
    pub client_addr: SocketAddr,
    /// Peer (Raft) listen address.
    pub peer_addr: SocketAddr,
    /// The client address the cluster records for this node and clients connect to.
    pub advertise_client_addr: String,
    /// The peer address the cluster records for this node and other nodes connect to.
    pub advertise_peer_addr: String,
    /// Bootstrap membership (used only when the data directory holds no layout yet).
    pub initial_cluster: Vec<NodeSpec>,
    /// Shards created at bootstrap.
    pub shards: u32,
    /// Replicas per shard at bootstrap.
    pub replication: usize,
    /// Raft timings.
    pub raft: RaftTimings,
    /// RocksDB memory budget in bytes.
    pub memory_budget_bytes: usize,
    /// Most snapshot bytes sent per second (0: unlimited).
    pub snapshot_send_bytes_per_sec: u64,
    /// Input limits.
    pub limits: Limits,
}

impl NodeConfig {
    /// Resolves flags/env (already merged by clap) over the TOML file over the defaults, and
    /// validates the result.
    pub fn resolve(args: Args) -> anyhow::Result<NodeConfig> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parse config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let defaults = Limits::default();
        let join = args.join || file.join.unwrap_or(false);
        let id = match args.id.or(file.id) {
            Some(0) => bail!("node id must be > 0"),
            Some(id) => id,
            None if join => 0,
            None => bail!("missing node id: pass --id or STRATA_ID (or --join to be given one)"),
        };
        // Defaults derived from the id exist only when there is an id.
        let derived = |what: &str, port_base: u16| {
            if id == 0 {
                bail!("--join without --id needs an explicit --{what}");
            }
            let port = u16::try_from(u64::from(port_base) + id).map_err(|_| {
                anyhow::anyhow!(
                    "node id {id} has no default --{what} ({port_base} + id is no port)"
                )
            })?;
            Ok(SocketAddr::from(([127, 0, 0, 1], port)))
        };
        let client_addr = match args.client_addr.or(file.client_addr) {
            Some(a) => a,
            None => derived("client-addr", 7100)?,
        };
        let peer_addr = match args.peer_addr.or(file.peer_addr) {
            Some(a) => a,
            None => derived("peer-addr", 7200)?,
        };
        let initial_cluster = match args.initial_cluster.or(file.initial_cluster) {
            Some(_) if join => bail!("--join and --initial-cluster exclude each other"),
            Some(spec) => {
                let nodes = parse_initial_cluster(&spec)?;
                if !nodes.iter().any(|n| n.id == id) {
                    bail!("--initial-cluster does not list this node's id {id}");
                }
                Some(nodes)
            }
            None => None,
        };
        let own_entry = initial_cluster
            .as_ref()
            .and_then(|nodes| nodes.iter().find(|n| n.id == id));
        let advertise_client_addr = advertised_addr(
            "client",
            args.advertise_client_addr.or(file.advertise_client_addr),
            client_addr,
            own_entry.map(|n| &n.client_addr),
        )?;
        let advertise_peer_addr = advertised_addr(
            "peer",
            args.advertise_peer_addr.or(file.advertise_peer_addr),
            peer_addr,
            own_entry.map(|n| &n.peer_addr),
        )?;
        let initial_cluster = match initial_cluster {
            Some(nodes) => nodes,
            None if join => Vec::new(),
            None => vec![NodeSpec {
                id,
                client_addr: advertise_client_addr.clone(),
                peer_addr: advertise_peer_addr.clone(),
                phase: NodePhase::Active,
                incarnation: 0,
            }],
        };
        let data_dir = match args.data_dir.or(file.data_dir) {
            Some(d) => d,
            None if id == 0 => bail!("--join without --id needs an explicit --data-dir"),
            None => PathBuf::from(format!("strata-data/node-{id}")),
        };
        let config = NodeConfig {
            id,
            join,
            data_dir,
            client_addr,
            peer_addr,
            advertise_client_addr,
            advertise_peer_addr,
            initial_cluster,
            shards: args.shards.or(file.shards).unwrap_or(8),
            replication: args.replication.or(file.replication).unwrap_or(3),
            raft: RaftTimings {
                heartbeat: ms(args.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(100)),
                election_min: ms(args
                    .election_timeout_min_ms
                    .or(file.election_timeout_min_ms)
                    .unwrap_or(1000)),
                election_max: ms(args
                    .election_timeout_max_ms
                    .or(file.election_timeout_max_ms)
                    .unwrap_or(2000)),
                snapshot_logs: args.snapshot_logs.or(file.snapshot_logs).unwrap_or(20_000),
                lease_drift_percent: args
                    .lease_drift_percent
                    .or(file.lease_drift_percent)
                    .unwrap_or(DEFAULT_LEASE_DRIFT_PERCENT),
            },
            memory_budget_bytes: args
                .memory_budget_mb
                .or(file.memory_budget_mb)
                .unwrap_or(64)
                << 20,
            snapshot_send_bytes_per_sec: args
                .snapshot_send_mb_per_sec
                .or(file.snapshot_send_mb_per_sec)
                .unwrap_or(DEFAULT_SNAPSHOT_SEND_MB_PER_SEC)
                .checked_mul(1 << 20)
                .context("snapshot-send-mb-per-sec is too large")?,
            limits: Limits {
                max_key_bytes: args
                    .max_key_bytes
                    .or(file.max_key_bytes)
                    .unwrap_or(defaults.max_key_bytes),
                max_value_bytes: args
                    .max_value_bytes
                    .or(file.max_value_bytes)
                    .unwrap_or(defaults.max_value_bytes),
                max_batch_ops: args
                    .max_batch_ops
                    .or(file.max_batch_ops)
                    .unwrap_or(defaults.max_batch_ops),
                max_message_bytes: args
                    .max_message_bytes
                    .or(file.max_message_bytes)
                    .unwrap_or(defaults.max_message_bytes),
            },
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.shards == 0 || self.shards > strata_proto::keyspace::SLOT_COUNT {
            bail!(
                "shards must be in 1..={}",
                strata_proto::keyspace::SLOT_COUNT
            );
        }
        if self.replication == 0 {
            bail!("replication must be >= 1");
        }
        if self.raft.election_min <= self.raft.heartbeat * 3 {
            bail!("election timeout min must exceed 3 heartbeats");
        }
        if self.raft.election_max <= self.raft.election_min {
            bail!("election timeout max must exceed min");
        }
        if self.raft.lease_drift_percent > 100 {
            bail!(
                "lease-drift-percent must be in 0..=100, not {}",
                self.raft.lease_drift_percent
            );
        }
        if self.memory_budget_bytes < 8 << 20 {
            bail!("memory budget must be at least 8 MiB");
        }
        Ok(())
    }
}

/// The address the cluster records for this node's `kind` (`client` or `peer`) service, which
/// others connect to: the `--advertise-*` setting, else the node's own entry of the initial
/// cluster, else the listen address. An explicit setting must agree with the initial cluster,
/// since that is what the peers record for the node.
fn advertised_addr(
    kind: &str,
    setting: Option<String>,
    listen: SocketAddr,
    initial_entry: Option<&String>,
) -> anyhow::Result<String> {
    let flag = format!("--advertise-{kind}-addr");
    let addr = match (setting, initial_entry) {
        (Some(given), Some(entry)) if &given != entry => bail!(
            "{flag} {given} differs from this node's --initial-cluster entry {entry}; the \
             peers record the initial cluster's address"
        ),
        (Some(given), _) => given,
        (None, Some(entry)) => return Ok(entry.clone()),
        (None, None) => {
            let addr = listen.to_string();
            check_reachable_addr(&addr).map_err(|e| {
                anyhow::anyhow!(
                    "--{kind}-addr: {e} (or give {flag}, the address others connect to)"
                )
            })?;
            return Ok(addr);
        }
    };
    check_reachable_addr(&addr).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
    Ok(addr)
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Parses `ID=CLIENT_ADDR/PEER_ADDR,...`.
pub fn parse_initial_cluster(spec: &str) -> anyhow::Result<Vec<NodeSpec>> {
    let mut nodes: Vec<NodeSpec> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addrs) = item
            .split_once('=')
            .with_context(|| format!("initial cluster entry {item:?}: expected ID=CLIENT/PEER"))?;
        let (client, peer) = addrs
            .split_once('/')
            .with_context(|| format!("initial cluster entry {item:?}: expected ID=CLIENT/PEER"))?;
        let id: u64 = id
            .parse()
            .with_context(|| format!("initial cluster entry {item:?}: bad node id"))?;
        if id == 0 {
            bail!("initial cluster entry {item:?}: node id must be > 0");
        }
        for addr in [client, peer] {
            check_reachable_addr(addr)
                .map_err(|e| anyhow::anyhow!("initial cluster entry {item:?}: {e}"))?;
        }
        if nodes.iter().any(|n| n.id == id) {
            bail!("initial cluster lists node id {id} twice");
        }
        nodes.push(NodeSpec {
            id,
            client_addr: client.to_string(),
            peer_addr: peer.to_string(),
            phase: NodePhase::Active,
            incarnation: 0,
        });
    }
    if nodes.is_empty() {
        bail!("initial cluster is empty");
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "id = 2\nshards = 4\nheartbeat_ms = 50\nelection_timeout_min_ms = 500\nelection_timeout_max_ms = 900\n").unwrap();
        let args = Args {
            config: Some(path),
            shards: Some(16),
            initial_cluster: Some("2=127.0.0.1:1/127.0.0.1:2".into()),
            ..Default::default()
        };
        let c = NodeConfig::resolve(args).unwrap();
        assert_eq!(c.id, 2, "from file");
        assert_eq!(c.shards, 16, "flag wins over file");
        assert_eq!(c.raft.heartbeat, Duration::from_millis(50));
        assert_eq!(c.replication, 3, "default");
        assert_eq!(c.snapshot_send_bytes_per_sec, 100 << 20, "default");
    }

    #[test]
    fn the_snapshot_send_rate_is_in_mib_and_zero_is_unlimited() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "id = 1\nsnapshot_send_mb_per_sec = 0\n").unwrap();
        let from_file = Args {
            config: Some(path),
            ..Default::default()
        };
        let c = NodeConfig::resolve(from_file).unwrap();
        assert_eq!(c.snapshot_send_bytes_per_sec, 0);
        let c = NodeConfig::resolve(Args {
            id: Some(1),
            snapshot_send_mb_per_sec: Some(40),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.snapshot_send_bytes_per_sec, 40 << 20);
        let err = NodeConfig::resolve(Args {
            id: Some(1),
            snapshot_send_mb_per_sec: Some(u64::MAX),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn a_lease_read_relies_on_acknowledgements_younger_than_the_shortened_election_timeout() {
        let resolve = |percent| {
            NodeConfig::resolve(Args {
                id: Some(1),
                election_timeout_max_ms: Some(2000),
                lease_drift_percent: percent,
                ..Default::default()
            })
        };
        let age = |percent| resolve(percent).unwrap().raft.lease_read_age();
        assert_eq!(age(None), Duration::from_millis(1800), "default: 10%");
        assert_eq!(
            age(Some(0)),
            Duration::from_millis(2000),
            "openraft's own lease"
        );
        assert_eq!(age(Some(75)), Duration::from_millis(500));
        assert_eq!(
            age(Some(100)),
            Duration::ZERO,
            "every lease read a ReadIndex read"
        );
        let err = resolve(Some(101)).unwrap_err().to_string();
        assert!(
            err.contains("lease-drift-percent must be in 0..=100"),
            "{err}"
        );
    }

    #[test]
    fn join_mode_needs_addresses_without_an_id() {
        let err = NodeConfig::resolve(Args {
            join: true,
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("--client-addr"), "{err:#}");
        let c = NodeConfig::resolve(Args {
            join: true,
            client_addr: Some("127.0.0.1:7104".parse().unwrap()),
            peer_addr: Some("127.0.0.1:7204".parse().unwrap()),
            data_dir: Some("/tmp/x".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((c.id, c.join), (0, true));
        assert!(c.initial_cluster.is_empty());
        let err = NodeConfig::resolve(Args {
            join: true,
            id: Some(4),
            initial_cluster: Some("4=127.0.0.1:1/127.0.0.1:2".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("exclude"), "{err:#}");
        // A joining node is recorded at the addresses it listens on: every interface is not one.
        let err = NodeConfig::resolve(Args {
            join: true,
            client_addr: Some("0.0.0.0:7104".parse().unwrap()),
            peer_addr: Some("127.0.0.1:7204".parse().unwrap()),
            data_dir: Some("/tmp/x".into()),
            ..Default::default()
        })
        .unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("--client-addr")
                && err.contains("own IP")
                && err.contains("--advertise-client-addr"),
            "{err}"
        );
        // With an initial cluster that names this node's address, it may listen on every one.
        NodeConfig::resolve(Args {
            id: Some(1),
            client_addr: Some("0.0.0.0:7101".parse().unwrap()),
            initial_cluster: Some("1=127.0.0.1:7101/127.0.0.1:7201".into()),
            ..Default::default()
        })
        .unwrap();
    }

    #[test]
    fn advertised_addresses_default_to_the_initial_cluster_entry_then_the_listen_address() {
        let join = |client: &str, advertise: Option<&str>| {
            NodeConfig::resolve(Args {
                join: true,
                client_addr: Some(client.parse().unwrap()),
                peer_addr: Some("0.0.0.0:7204".parse().unwrap()),
                advertise_client_addr: advertise.map(str::to_string),
                advertise_peer_addr: Some("strata-4.strata:7204".into()),
                data_dir: Some("/tmp/x".into()),
                ..Default::default()
            })
        };
        // In a container: listen on every interface, be recorded under a DNS name.
        let c = join("0.0.0.0:7104", Some("strata-4.strata:7104")).unwrap();
        assert_eq!(c.advertise_client_addr, "strata-4.strata:7104");
        assert_eq!(c.advertise_peer_addr, "strata-4.strata:7204");
        assert_eq!(
            c.peer_addr.to_string(),
            "0.0.0.0:7204",
            "still listens there"
        );
        let c = join("10.0.0.4:7104", None).unwrap();
        assert_eq!(
            c.advertise_client_addr, "10.0.0.4:7104",
            "the listen address"
        );
        for (bad, needle) in [
            ("0.0.0.0:7104", "connect to"),
            ("strata-4.strata:0", "connect to"),
            ("strata_4:7104", "bad host"),
        ] {
            let err = format!("{:#}", join("0.0.0.0:7104", Some(bad)).unwrap_err());
            assert!(
                err.contains("--advertise-client-addr") && err.contains(needle),
                "{bad}: {err}"
            );
        }

        // With an initial cluster, the node's entry is what peers record: it is the default,
        // and an explicit advertised address must agree with it.
        let initial = |advertise: Option<&str>| {
            NodeConfig::resolve(Args {
                id: Some(2),
                client_addr: Some("0.0.0.0:7100".parse().unwrap()),
                advertise_client_addr: advertise.map(str::to_string),
                initial_cluster: Some(
                    "1=strata-1:7100/strata-1:7200,2=strata-2:7100/strata-2:7200".into(),
                ),
                ..Default::default()
            })
        };
        let c = initial(None).unwrap();
        assert_eq!(
            (
                c.advertise_client_addr.as_str(),
                c.advertise_peer_addr.as_str()
            ),
            ("strata-2:7100", "strata-2:7200")
        );
        initial(Some("strata-2:7100")).unwrap();
        let err = format!("{:#}", initial(Some("strata-9:7100")).unwrap_err());
        assert!(
            err.contains("differs from this node's --initial-cluster entry strata-2:7100"),
            "{err}"
        );

        // A node without an initial cluster bootstraps alone, recorded at its advertised address.
        let c = NodeConfig::resolve(Args {
            id: Some(1),
            client_addr: Some("0.0.0.0:7101".parse().unwrap()),
            advertise_client_addr: Some("db.example.com:7101".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.initial_cluster[0].client_addr, "db.example.com:7101");
        assert_eq!(c.initial_cluster[0].peer_addr, "127.0.0.1:7201");
    }

    #[test]
    fn default_addresses_derive_from_the_id_without_wrapping() {
        let c = NodeConfig::resolve(Args {
            id: Some(2),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.client_addr.to_string(), c.peer_addr.to_string()),
            ("127.0.0.1:7102".into(), "127.0.0.1:7202".into())
        );
        let err = NodeConfig::resolve(Args {
            id: Some(60_000),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("no default --client-addr"),
            "{err:#}"
        );
    }

    #[test]
    fn unknown_toml_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "id = 1\nshard = 4\n").unwrap();
        let err = NodeConfig::resolve(Args {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("shard"), "{err:#}");
    }

    #[test]
    fn initial_cluster_is_validated() {
        let ok = parse_initial_cluster(
            "1=127.0.0.1:7101/127.0.0.1:7201,2=127.0.0.1:7102/127.0.0.1:7202",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].peer_addr, "127.0.0.1:7202");
        let named = parse_initial_cluster("1=strata-1.strata:7100/strata-1.strata:7200").unwrap();
        assert_eq!(named[0].client_addr, "strata-1.strata:7100");
        for bad in [
            "",
            "1=a/b",
            "x=127.0.0.1:1/127.0.0.1:2",
            "1=127.0.0.1:1",
            "0=127.0.0.1:1/127.0.0.1:2",
            "1=127.0.0.1:1/127.0.0.1:2,1=127.0.0.1:3/127.0.0.1:4",
            "1=0.0.0.0:7101/127.0.0.1:7201",
            "1=127.0.0.1:7101/[::]:7201",
            "1=127.0.0.1:0/127.0.0.1:7201",
            "1=strata_1:7100/127.0.0.1:7201",
        ] {
            assert!(parse_initial_cluster(bad).is_err(), "{bad:?} accepted");
        }
    }
}
