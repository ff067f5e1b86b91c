//! Membership changes: a fresh node added, an old one drained and removed.

use std::time::Duration;

use rand::Rng;
use strata_client::Client;

use super::{Cycle, Run};
use crate::history::F;

/// Replaces a node, keeping the cluster at its size. A change refused or timed out under other
/// faults is recorded, not fatal: safety is what the run checks.
pub(super) async fn replace_node(run: &mut Run<'_>) -> anyhow::Result<Cycle> {
    if let Err(e) = add_then_remove(run).await {
        run.record(F::Stop, "membership-error", format!("{e:#}"));
    }
    Ok(Cycle::Injected)
}

/// Adds a fresh node, waits for it to hold replicas, then removes a random old member and waits
/// for it to leave.
async fn add_then_remove(run: &mut Run<'_>) -> anyhow::Result<()> {
    // Admin requests wait for a meta leader through other faults.
    let client = &run.cluster.client(Duration::from_secs(30)).await?;
    let id = add_fresh_node(run, client).await?;

    let map = client.shard_map().await?;
    let members: Vec<u64> = map
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|n| *n != id && run.cluster.healthy().contains(n))
        .collect();
    let victim = members[run.rng.random_range(0..members.len())];
    remove_node(run, client, victim, false).await
}

/// Starts a fresh node with `--join`, adds it, and waits until it holds replicas and no replica
/// move is left. Returns its id.
pub(super) async fn add_fresh_node(run: &mut Run<'_>, client: &Client) -> anyhow::Result<u64> {
    let (id, client_addr, peer_addr) = run.cluster.start_joining(None)?;
    wait_answers(client, &client_addr).await;
    run.record(F::Start, "add-node", format!("{id}"));
    client.add_node(&client_addr, &peer_addr, Some(id)).await?;
    wait_map(client, Duration::from_secs(60), |m| {
        m.shards.iter().any(|s| s.replicas.contains(&id))
            && m.shards.iter().all(|s| s.moving_to == 0)
    })
    .await;
    run.record(F::Stop, "add-node", format!("{id}"));
    Ok(id)
}

/// Starts a fresh node with `--join` at the addresses of dead node `old`, adds it in `old`'s
/// place (`node add --replaces`), and waits until `old` has left the map. Returns the new id.
pub(super) async fn replace_in_place(
    run: &mut Run<'_>,
    client: &Client,
    old: u64,
) -> anyhow::Result<u64> {
    let (id, client_addr, peer_addr) = run.cluster.start_joining(Some(old))?;
    wait_answers(client, &client_addr).await;
    run.record(F::Start, "replace-node", format!("{old} -> {id}"));
    client.replace_node(old, &client_addr, &peer_addr).await?;
    wait_map(client, Duration::from_secs(90), |m| {
        !m.nodes.iter().any(|n| n.id == old) && m.shards.iter().all(|s| s.moving_to == 0)
    })
    .await;
    run.record(F::Stop, "replace-node", format!("{old} -> {id}"));
    Ok(id)
}

/// Waits (up to 10 s) until a node answers at `client_addr`: a new process needs a moment to
/// listen.
async fn wait_answers(client: &Client, client_addr: &str) {
    for _ in 0..100 {
        if client.node_status(client_addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes node `victim` (drained, or at once with `force` for a node that is gone) and waits
/// until the map no longer lists it.
pub(super) async fn remove_node(
    run: &Run<'_>,
    client: &Client,
    victim: u64,
    force: bool,
) -> anyhow::Result<()> {
    run.record(F::Start, "remove-node", format!("{victim}"));
    client.remove_node(victim, force).await?;
    wait_map(client, Duration::from_secs(90), |m| {
        !m.nodes.iter().any(|n| n.id == victim)
    })
    .await;
    run.record(F::Stop, "remove-node", format!("{victim}"));
    Ok(())
}

/// Polls the shard map until `done` or `timeout`.
async fn wait_map(
    client: &Client,
    timeout: Duration,
    done: impl Fn(&strata_proto::v1::ShardMap) -> bool,
) {
    let until = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < until {
        let _ = client.refresh_map().await;
        if let Ok(m) = client.shard_map().await {
            if done(&m) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
