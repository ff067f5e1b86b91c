//! Choosing what a fault hits: members, shards, replicas, leaders.

use rand::rngs::StdRng;
use rand::Rng;
use strata_client::Client;

use crate::control::Cluster;

/// The cluster's current members (nodes removed by the membership nemesis keep running, idle,
/// and are left out of partitions).
pub(super) async fn members(client: &Client) -> Vec<u64> {
    let _ = client.refresh_map().await;
    client
        .route_table()
        .map(|t| {
            let mut ids: Vec<u64> = t.nodes.keys().copied().collect();
            ids.sort_unstable();
            ids
        })
        .unwrap_or_default()
}

/// A healthy node: half the time the leader of `shard` (when it has one), else a random one.
pub(super) async fn node_or_leader(
    cluster: &Cluster,
    client: &Client,
    rng: &mut StdRng,
    shard: u64,
) -> u64 {
    let leader = if rng.random_bool(0.5) {
        cluster.leader_of(client, shard).await
    } else {
        None
    };
    let healthy = cluster.healthy();
    leader.unwrap_or(healthy[rng.random_range(0..healthy.len())])
}

/// The replicas of `shard` in the current shard map.
pub(super) async fn replicas_of(client: &Client, shard: u64) -> anyhow::Result<Vec<u64>> {
    let table = client.refresh_map().await?;
    Ok(table
        .shard(shard)
        .map(|s| s.replicas.clone())
        .unwrap_or_default())
}

/// How many shards the cached map has (at least 1).
pub(super) fn shard_count(client: &Client) -> u64 {
    client
        .route_table()
        .map_or(1, |t| t.shards.len() as u64)
        .max(1)
}
