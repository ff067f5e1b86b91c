//! `strata status`: asks every node for its view and merges them — which nodes answer, which node
//! leads each shard, and how far each replica has applied.

use std::collections::BTreeMap;

use serde::Serialize;

use super::output::{json, table};
use super::{Cli, Format};

#[derive(Serialize)]
struct NodeOut {
    id: u64,
    client_addr: String,
    peer_addr: String,
    up: bool,
    leads: usize,
}

#[derive(Serialize)]
struct ShardOut {
    /// Group id (0 = meta group).
    id: u64,
    slots: String,
    replicas: Vec<u64>,
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
}

/// Runs `strata status`.
pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    let client = cli.client().await?;
    let table_ = client.route_table().expect("connected client has a map");
    // The map as the first answering node has it: meta replicas and peer addresses.
    let map = client.shard_map().await?;
    let mut shards: BTreeMap<u64, ShardOut> = BTreeMap::new();
    shards.insert(
        0,
        ShardOut {
            id: 0,
            slots: "meta".into(),
            replicas: map.meta_replicas.clone(),
            leader: None,
            term: 0,
            applied: BTreeMap::new(),
            snapshot: BTreeMap::new(),
            purged: BTreeMap::new(),
        },
    );
    for s in &table_.shards {
        shards.insert(
            s.id,
            ShardOut {
                id: s.id,
                slots: format!("{}..{}", s.slot_start, s.slot_end),
                replicas: s.replicas.clone(),
                leader: None,
                term: 0,
                applied: BTreeMap::new(),
                snapshot: BTreeMap::new(),
                purged: BTreeMap::new(),
            },
        );
    }
    let mut nodes = Vec::new();
    let mut ids: Vec<_> = table_.nodes.keys().copied().collect();
    ids.sort_unstable();
    for id in ids {
        let addr = &table_.nodes[&id];
        let status = client.node_status(addr).await;
        let mut leads = 0;
        if let Ok(st) = &status {
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
                    leads += 1;
                }
            }
        }
        nodes.push(NodeOut {
            id,
            client_addr: addr.clone(),
            peer_addr: map
                .nodes
                .iter()
                .find(|n| n.id == id)
                .map(|n| n.peer_addr.clone())
                .unwrap_or_default(),
            up: status.is_ok(),
            leads,
        });
    }
    let out = StatusOut {
        epoch: table_.epoch,
        nodes,
        shards: shards.into_values().collect(),
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
                if n.up { "up" } else { "DOWN" }.into(),
                n.leads.to_string(),
            ]
        })
        .collect();
    table(&["NODE", "CLIENT", "PEER", "STATUS", "LEADS"], &rows);
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
            "LEADER",
            "TERM",
            "APPLIED (node:index)",
        ],
        &rows,
    );
    Ok(())
}
