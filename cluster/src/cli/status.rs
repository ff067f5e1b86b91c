//! `strata status`: asks every node for its view and merges them — which nodes answer, which node
//! leads each shard, which replica moves are under way, how far each replica has applied, and the
//! placement driver's recent decisions.

use std::collections::BTreeMap;

use serde::Serialize;

use super::output::{json, table};
use super::{Cli, Format};

#[derive(Serialize)]
struct NodeOut {
    id: u64,
    client_addr: String,
    peer_addr: String,
    /// "active" or "draining".
    state: String,
    up: bool,
    /// Shard replicas placed on the node.
    replicas: usize,
    leads: usize,
}

#[derive(Serialize)]
struct ShardOut {
    /// Group id (0 = meta group).
    id: u64,
    slots: String,
    replicas: Vec<u64>,
    /// Replica move under way: "from->to" ("-" as from when only adding).
    moving: Option<String>,
    leader: Option<u64>,
    term: u64,
    /// Applied index per answering replica.
    applied: BTreeMap<u64, u64>,
    /// Last index covered by each replica's snapshot.
    snapshot: BTreeMap<u64, u64>,
    /// Last index compacted out of each replica's log.
    purged: BTreeMap<u64, u64>,
}

#[derive(Serialize)]
struct StatusOut {
    epoch: u64,
    nodes: Vec<NodeOut>,
    shards: Vec<ShardOut>,
    /// The node running the placement driver (the meta leader).
    placement_driver: Option<u64>,
    /// Its recent decisions, oldest first.
    placement_events: Vec<String>,
}

fn moving(from: u64, to: u64) -> Option<String> {
    (to != 0).then(|| {
        let from = if from == 0 {
            "-".into()
        } else {
            from.to_string()
        };
        format!("{from}->{to}")
    })
}

/// Runs `strata status`.
pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    let client = cli.client().await?;
    // The newest map any node has: replicas, moves, node states, peer addresses.
    let map = client.shard_map().await?;
    let mut shards: BTreeMap<u64, ShardOut> = BTreeMap::new();
    let empty = || (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let (applied, snapshot, purged) = empty();
    shards.insert(
        0,
        ShardOut {
            id: 0,
            slots: "meta".into(),
            replicas: map.meta_replicas.clone(),
            moving: moving(map.meta_moving_from, map.meta_moving_to),
            leader: None,
            term: 0,
            applied,
            snapshot,
            purged,
        },
    );
    for s in &map.shards {
        let (applied, snapshot, purged) = empty();
        shards.insert(
            s.id,
            ShardOut {
                id: s.id,
                slots: format!("{}..{}", s.slot_start, s.slot_end),
                replicas: s.replicas.clone(),
                moving: moving(s.moving_from, s.moving_to),
                leader: None,
                term: 0,
                applied,
                snapshot,
                purged,
            },
        );
    }
    let mut nodes = Vec::new();
    let mut placement_driver = None;
    let mut placement_events = Vec::new();
    let mut specs = map.nodes.clone();
    specs.sort_by_key(|n| n.id);
    for spec in specs {
        let id = spec.id;
        // Only the node itself counts: after a replacement at the same address, another node
        // answers there.
        let status = client
            .node_status(&spec.client_addr)
            .await
            .ok()
            .filter(|st| st.node_id == id);
        let mut leads = 0;
        if let Some(st) = &status {
            if st.placement_driver {
                placement_driver = Some(id);
                placement_events = st.placement_events.clone();
            }
            for g in &st.groups {
                let Some(s) = shards.get_mut(&g.group_id) else {
                    continue;
                };
                s.applied.insert(id, g.applied_index);
                s.snapshot.insert(id, g.snapshot_index);
                s.purged.insert(id, g.purged_index);
                if g.role == "leader" && g.term >= s.term {
                    s.leader = Some(id);
                    s.term = g.term;
                    if g.group_id != 0 {
                        leads += 1;
                    }
                }
            }
        }
        nodes.push(NodeOut {
            id,
            client_addr: spec.client_addr.clone(),
            peer_addr: spec.peer_addr.clone(),
            state: spec.state.clone(),
            up: status.is_some(),
            replicas: map
                .shards
                .iter()
                .filter(|s| s.replicas.contains(&id))
                .count(),
            leads,
        });
    }
    let out = StatusOut {
        epoch: map.epoch,
        nodes,
        shards: shards.into_values().collect(),
        placement_driver,
        placement_events,
    };
    if cli.output == Format::Json {
        return json(&out);
    }
    println!("cluster epoch {}", out.epoch);
    println!();
    let rows: Vec<Vec<String>> = out
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                n.client_addr.clone(),
                n.peer_addr.clone(),
                n.state.clone(),
                if n.up { "up" } else { "DOWN" }.into(),
                n.replicas.to_string(),
                n.leads.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NODE", "CLIENT", "PEER", "STATE", "STATUS", "REPLICAS", "LEADS",
        ],
        &rows,
    );
    println!();
    let rows: Vec<Vec<String>> = out
        .shards
        .iter()
        .map(|s| {
            vec![
                if s.id == 0 {
                    "meta".into()
                } else {
                    s.id.to_string()
                },
                s.slots.clone(),
                s.replicas
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                s.moving.clone().unwrap_or_else(|| "-".into()),
                s.leader.map_or("NONE".into(), |l| l.to_string()),
                s.term.to_string(),
                s.applied
                    .iter()
                    .map(|(n, a)| format!("{n}:{a}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect();
    table(
        &[
            "SHARD",
            "SLOTS",
            "REPLICAS",
            "MOVING",
            "LEADER",
            "TERM",
            "APPLIED (node:index)",
        ],
        &rows,
    );
    println!();
    match out.placement_driver {
        Some(id) => println!("placement driver: node {id} (the meta leader); recent decisions:"),
        None => println!("placement driver: no meta leader answered"),
    }
    let recent = out.placement_events.len().saturating_sub(10);
    for e in &out.placement_events[recent..] {
        println!("  {e}");
    }
    Ok(())
}
