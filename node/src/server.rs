//! Starts a node — storage, groups, services — serves until told to stop (or until one of its
//! Raft groups fails: fail-stop), then stops cleanly:
//! leaderships move to live replicas, listeners close (no new requests) and the client calls in
//! flight are answered, new peer requests are refused and those in progress finish, every Raft
//! group shuts down, the peer transport stops, storage closes.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use strata_proto::v1::cluster_server::ClusterServer;
use strata_proto::v1::kv_server::KvServer;
use strata_proto::v1::raft_server::RaftServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

use crate::config::NodeConfig;
use crate::layout::{Layout, META_GROUP};
use crate::membership::meta::{self, LAYOUT_META_KEY};
use crate::membership::{driver, follow, reconcile};
use crate::raft::identity::PeerIdentity;
use crate::raft::network::PeerPool;
use crate::service::cluster::ClusterService;
use crate::service::kv::KvService;
use crate::service::transport::TransportService;
use crate::service::{NodeParts, NodeState};
use crate::storage::state_machine::get;
use crate::storage::{snapshot, Engine};

/// Largest peer (Raft) message: AppendEntries carries up to 128 entries of up to 1 MiB each.
pub const PEER_MESSAGE_BYTES: usize = 256 << 20;

/// How long a stopping node waits for the client calls in flight to be answered.
const CLIENT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stopping node waits for the peer requests being handled to be answered.
const PEER_REQUEST_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a stopping node waits, in all, for its leaderships to move.
const LEADERSHIP_HANDOVER_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a node until `shutdown` resolves.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let engine = Engine::open(&config.data_dir.join("db"), config.memory_budget_bytes)
        .with_context(|| format!("open storage in {}", config.data_dir.display()))?;
    let (id, layout, first_boot) = identity(&config, &engine).await?;
    tracing::info!(
        node = id,
        first_boot,
        joining = layout.is_none(),
        "starting"
    );

    let snapshot_dir = config.data_dir.join("snapshots");
    snapshot::remove_staged(&snapshot_dir)
        .with_context(|| format!("clear staged snapshots in {}", snapshot_dir.display()))?;

    let bind_ip = Some(config.peer_addr.ip()).filter(|ip| !ip.is_unspecified());
    let identity = PeerIdentity::open(engine.clone(), id)
        .await
        .context("open this node's identity")?;
    let node = Arc::new(NodeState::new(NodeParts {
        layout: Layout::empty(),
        limits: config.limits.clone(),
        engine: engine.clone(),
        pool: PeerPool::new(
            identity.clone(),
            &[],
            bind_ip,
            PEER_MESSAGE_BYTES,
            config.snapshot_send_bytes_per_sec,
            config.raft.election_min,
        ),
        raft_timings: config.raft.clone(),
        snapshot_dir,
        client_addr: config.advertise_client_addr.clone(),
        peer_addr: config.advertise_peer_addr.clone(),
    }));
    if let Some(stored) = layout {
        let layout = follow::confirm_recorded_addresses(&node, id, stored).await?;
        reconcile::adopt(&node, layout).await?;
    }

    let client_listener = TcpListener::bind(config.client_addr)
        .await
        .with_context(|| format!("listen for clients on {}", config.client_addr))?;
    let peer_listener = TcpListener::bind(config.peer_addr)
        .await
        .with_context(|| format!("listen for peers on {}", config.peer_addr))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let max_msg = config.limits.max_message_bytes;
    let client_server = tonic::transport::Server::builder()
        .add_service(KvServer::new(KvService::new(node.clone())).max_decoding_message_size(max_msg))
        .add_service(ClusterServer::new(ClusterService::new(node.clone())))
        .serve_with_incoming_shutdown(incoming(client_listener), stopped(stop_rx.clone()));
    let peer_server = tonic::transport::Server::builder()
        .add_service(InterceptedService::new(
            RaftServer::new(TransportService::new(node.clone()))
                .max_decoding_message_size(PEER_MESSAGE_BYTES)
                .max_encoding_message_size(PEER_MESSAGE_BYTES),
            {
                let identity = identity.clone();
                move |request: tonic::Request<()>| {
                    identity.check(request.metadata())?;
                    Ok(request)
                }
            },
        ))
        .serve_with_incoming_shutdown(incoming(peer_listener), stopped(stop_rx.clone()));
    let mut client_task = tokio::spawn(client_server);
    let peer_task = tokio::spawn(peer_server);

    if first_boot {
        bootstrap(&node).await?;
    }
    let driver = tokio::spawn(driver::run(node.clone(), stop_rx.clone()));
    let follower = tokio::spawn(follow::run(node.clone(), stop_rx.clone()));
    tracing::info!(
        node = node.id(),
        client = %config.client_addr,
        peer = %config.peer_addr,
        advertised_client = %config.advertise_client_addr,
        advertised_peer = %config.advertise_peer_addr,
        membership = node.membership().name(),
        "serving"
    );

    // A group that failed on its own stops the whole node (see `Groups::failed`), the same way
    // as a signal, but the node then exits with an error.
    // So does a peer that knows this node by another data directory (see `raft::identity`).
    let failure = tokio::select! {
        _ = shutdown => None,
        why = node.groups.failed() => Some(format!(
            "{why}; stopping the node (fix the cause, e.g. free disk space, then restart it with its data directory)"
        )),
        why = identity.lost() => Some(format!("{why}; stopping the node")),
    };
    match &failure {
        None => tracing::info!(node = node.id(), "shutting down"),
        Some(why) => tracing::error!(node = node.id(), "{why}"),
    }
    hand_over_leaderships(&node).await;
    let _ = stop_tx.send(true);
    // Client calls are unary: the client server stops once those in flight are answered.
    if tokio::time::timeout(CLIENT_DRAIN_TIMEOUT, &mut client_task)
        .await
        .is_err()
    {
        tracing::warn!(
            node = node.id(),
            "client calls still running; dropping them"
        );
        client_task.abort();
    }
    let _ = driver.await;
    let _ = follower.await;
    if !node.stop_peer_requests(PEER_REQUEST_DRAIN_TIMEOUT).await {
        tracing::warn!(
            node = node.id(),
            "peer requests still running; stopping anyway"
        );
    }
    for g in node.groups.all() {
        g.shutdown().await;
    }
    // The peer server is stopped, not drained: each peer keeps its replication stream into this
    // node open for as long as its own groups run, and peers stopping at the same time wait for
    // ours in the same way, so waiting for those streams to end would never finish. With every
    // group shut down nothing they carry is used any more.
    peer_task.abort();
    tracing::info!(node = node.id(), "stopped");
    match failure {
        None => Ok(()),
        Some(why) => bail!("stopped because {why}"),
    }
}

/// This node's id and the layout to start with: the stored ones after a restart; at first
/// start, the bootstrap layout from `--initial-cluster`, or none for a node started with
/// `--join` (it waits for `strata node add`). Returns whether this is a bootstrap.
async fn identity(
    config: &NodeConfig,
    engine: &Engine,
) -> anyhow::Result<(u64, Option<Layout>, bool)> {
    let stored_id = engine.load_node_id()?;
    if let Some(layout) = engine.load_layout()? {
        // Clusters bootstrapped before ids were stored have the flag id only.
        let id = stored_id.unwrap_or(config.id);
        if config.id != 0 && config.id != id {
            bail!(
                "this data directory belongs to node {id}, but --id {} was given",
                config.id
            );
        }
        return Ok((id, Some(layout), false));
    }
    if config.join {
        return Ok((config.id, None, false));
    }
    let layout = Layout::initial(
        config.initial_cluster.clone(),
        config.shards,
        config.replication,
    );
    engine.save_identity(config.id, &layout).await?;
    Ok((config.id, Some(layout), true))
}

/// Before a planned stop, moves the leadership of every group this node leads to another replica,
/// so clients of those shards wait for a hand-over (milliseconds) rather than for an election
/// timeout. Best effort, bounded by [`LEADERSHIP_HANDOVER_TIMEOUT`] in all: a group with no live
/// successor, or whose hand-over does not finish in time, is left to elect. Groups this node
/// comes to lead meanwhile (a peer stopping at the same time handed them here) get a turn too.
async fn hand_over_leaderships(node: &NodeState) {
    let deadline = tokio::time::Instant::now() + LEADERSHIP_HANDOVER_TIMEOUT;
    let fresh = node.raft_timings.successor_freshness();
    let mut handled = HashSet::new();
    loop {
        let led: Vec<_> = node
            .groups
            .all()
            .into_iter()
            .filter(|g| g.is_leader() && handled.insert(g.id))
            .collect();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if led.is_empty() || left.is_zero() {
            return;
        }
        let handovers = led.iter().map(|g| async move {
            let outcome = g
                .hand_over_to_successor(fresh, left, |to| node.pool.peer_down(to))
                .await;
            tracing::info!(group = g.id, ?outcome, "leadership hand-over");
        });
        futures::future::join_all(handovers).await;
    }
}

/// Accepted connections with Nagle off: replies are small and latency-bound, and Nagle plus
/// delayed ACKs would hold them back by tens of milliseconds.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// First start of a fresh cluster: each group is initialized by its first replica (so initial
/// leaders spread like the preferred leaders), and the meta replicas record the layout in the
/// meta group.
async fn bootstrap(node: &Arc<NodeState>) -> anyhow::Result<()> {
    let layout = node.layout();
    for g in node.groups.all() {
        let replicas = layout.replicas(g.id).unwrap_or_default();
        if replicas.first() != Some(&node.id()) {
            continue;
        }
        let members: Vec<_> = replicas.iter().filter_map(|id| layout.node(*id)).collect();
        g.initialize(&members)
            .await
            .with_context(|| format!("initialize group {}", g.id))?;
    }
    if layout.meta_replicas.contains(&node.id()) {
        let node = node.clone();
        tokio::spawn(async move { record_layout(&node).await });
    }
    Ok(())
}

/// Writes the bootstrap layout into the meta group. Every meta replica runs this on first start:
/// whichever leads the meta group writes it (a compare-and-set on "absent", so it happens once),
/// and each stops once its own replica has a layout.
async fn record_layout(node: &NodeState) {
    let Some(meta) = node.groups.get(META_GROUP) else {
        return;
    };
    let layout = node.layout();
    for _ in 0..600 {
        if matches!(get(&node.engine, META_GROUP, LAYOUT_META_KEY), Ok(Some(_))) {
            return;
        }
        if meta.is_leader() {
            match meta::record_initial(node, &layout).await {
                Ok(()) => {
                    tracing::info!("layout recorded in the meta group");
                    return;
                }
                Err(e) => tracing::debug!("record layout: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::warn!(
        "the layout is not in the meta group after 2 minutes: the meta group has no leader"
    );
}
