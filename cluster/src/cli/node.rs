//! `strata node add` / `strata node remove`: membership changes. Both only record the request
//! in the meta group; the placement driver then moves replicas. `--wait` follows the moves with
//! a progress bar until the cluster is balanced (add) or the node is gone (remove).
//! `strata node update` records new addresses for a member, which is then restarted at them.

use std::time::Duration;

use anyhow::bail;
use clap::{ArgGroup, Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use strata_client::Client;
use strata_proto::address::check_reachable_addr;
use strata_proto::v1::ShardMap;
use tokio::time::Instant;

use super::output::json;
use super::{parse_duration, Cli, Format};

/// Membership commands.
#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Add a node that was started empty with `strata-node --join`; replicas then move to it.
    Add(AddArgs),
    /// Drain a node (move its replicas and leaderships away), then remove it from the cluster.
    Remove(RemoveArgs),
    /// Record new addresses for a node; then restart it at them (it refuses to start at
    /// addresses the cluster does not record).
    Update(UpdateArgs),
}

/// `strata node add`.
#[derive(Args, Debug)]
pub struct AddArgs {
    /// Client address (HOST:PORT, an IP or a DNS name) of the new node.
    #[arg(long)]
    pub addr: String,
    /// Id to give the node (default: the one it was started with, else the next free id).
    #[arg(long)]
    pub id: Option<u64>,
    /// Add the node in place of this node, which starts draining in the same change (as with
    /// `node remove --force`). The new node may use the replaced node's addresses if that one
    /// no longer answers — a machine back with an empty disk. Works with as few nodes as the
    /// replication factor, where `node remove` is refused.
    #[arg(long, value_name = "ID", conflicts_with = "id")]
    pub replaces: Option<u64>,
    /// Wait until replicas have spread to the node (and the replaced node is gone), showing
    /// progress.
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub wait_timeout: Duration,
}

/// `strata node remove`.
#[derive(Args, Debug)]
pub struct RemoveArgs {
    /// Id of the node to remove.
    #[arg(long)]
    pub id: u64,
    /// Remove a node that no longer answers (dead for good): its replicas are rebuilt from the
    /// other replicas instead of being handed over.
    #[arg(long)]
    pub force: bool,
    /// Wait until the node has left the cluster, showing progress.
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub wait_timeout: Duration,
}

/// `strata node update`.
#[derive(Args, Debug)]
#[command(group(
    ArgGroup::new("addresses")
        .required(true)
        .multiple(true)
        .args(["client_addr", "peer_addr"])
))]
pub struct UpdateArgs {
    /// Id of the node.
    #[arg(long)]
    pub id: u64,
    /// Its new client address (HOST:PORT, an IP or a DNS name).
    #[arg(long)]
    pub client_addr: Option<String>,
    /// Its new peer address (HOST:PORT).
    #[arg(long)]
    pub peer_addr: Option<String>,
}

#[derive(Serialize)]
struct Outcome {
    node: u64,
    epoch: u64,
    action: &'static str,
    done: bool,
}

/// Runs a `strata node` command.
pub async fn run(cli: &Cli, cmd: &NodeCmd) -> anyhow::Result<()> {
    let client = cli.client().await?;
    match cmd {
        NodeCmd::Add(a) => add(cli, &client, a).await,
        NodeCmd::Remove(a) => remove(cli, &client, a).await,
        NodeCmd::Update(a) => update(cli, &client, a).await,
    }
}

async fn add(cli: &Cli, client: &Client, a: &AddArgs) -> anyhow::Result<()> {
    if a.id == Some(0) {
        bail!("--id must be > 0");
    }
    check_reachable_addr(&a.addr).map_err(|e| anyhow::anyhow!("--addr: {e}"))?;
    let st = client
        .node_status(&a.addr)
        .await
        .map_err(|e| anyhow::anyhow!("no strata-node answers at {}: {e}", a.addr))?;
    if st.membership != "joining" {
        bail!(
            "the node at {} is not waiting to join (it is {}, node id {}); start a new node \
             with an empty --data-dir and --join",
            a.addr,
            st.membership,
            st.node_id
        );
    }
    let (id, epoch) = match a.replaces {
        Some(0) => bail!("--replaces must be > 0"),
        Some(old) => {
            client
                .replace_node(old, &st.client_addr, &st.peer_addr)
                .await?
        }
        None => {
            client
                .add_node(&st.client_addr, &st.peer_addr, a.id)
                .await?
        }
    };
    let done = if a.wait {
        // Each move of a replacement both fills the new node and drains the old one.
        wait_for(client, a.wait_timeout, |map| {
            spread_to(map, id).max(a.replaces.map_or(0, |old| drained(map, old)))
        })
        .await?
    } else {
        false
    };
    report(
        cli,
        Outcome {
            node: id,
            epoch,
            action: "added",
            done,
        },
        || {
            let replacing = a
                .replaces
                .map_or(String::new(), |old| format!(" in place of node {old}"));
            format!(
                "node {id} added at {}{replacing} (epoch {epoch}); {}",
                st.client_addr,
                match (done, a.replaces) {
                    (true, None) => "replicas have spread to it".to_string(),
                    (true, Some(old)) => format!("node {old} is drained and removed"),
                    (false, None) =>
                        "replicas move to it in the background (watch `strata status`)".into(),
                    (false, Some(old)) => format!(
                        "node {old} is draining: its replicas are rebuilt in the background \
                         (watch `strata status`)"
                    ),
                }
            )
        },
    )
}

async fn remove(cli: &Cli, client: &Client, a: &RemoveArgs) -> anyhow::Result<()> {
    let epoch = client.remove_node(a.id, a.force).await?;
    let id = a.id;
    let done = if a.wait {
        wait_for(client, a.wait_timeout, |map| drained(map, id)).await?
    } else {
        false
    };
    report(
        cli,
        Outcome {
            node: id,
            epoch,
            action: "removed",
            done,
        },
        || {
            if done {
                format!("node {id} drained and removed; its process can be stopped")
            } else {
                format!(
                    "node {id} is draining (epoch {epoch}): its replicas move away, then it \
                     leaves the cluster (watch `strata status`)"
                )
            }
        },
    )
}

async fn update(cli: &Cli, client: &Client, a: &UpdateArgs) -> anyhow::Result<()> {
    if a.id == 0 {
        bail!("--id must be > 0");
    }
    for (flag, addr) in [
        ("--client-addr", &a.client_addr),
        ("--peer-addr", &a.peer_addr),
    ] {
        if let Some(addr) = addr {
            check_reachable_addr(addr).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
        }
    }
    let (epoch, changed) = client
        .update_node(a.id, a.client_addr.as_deref(), a.peer_addr.as_deref())
        .await?;
    let id = a.id;
    report(
        cli,
        Outcome {
            node: id,
            epoch,
            action: if changed { "updated" } else { "unchanged" },
            done: true,
        },
        || {
            if changed {
                format!(
                    "node {id}'s new addresses are recorded (epoch {epoch}); restart it at them: \
                     until then its peers and clients cannot reach it"
                )
            } else {
                format!("node {id} already has these addresses (epoch {epoch}); nothing changed")
            }
        },
    )
}

fn report(cli: &Cli, out: Outcome, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    if cli.output == Format::Json {
        return json(&out);
    }
    println!("{}", text());
    Ok(())
}

/// Polls the newest shard map until `remaining` (replica moves still needed) is 0 and no move
/// is under way. The bar's length is the most moves seen remaining.
async fn wait_for(
    client: &Client,
    timeout: Duration,
    remaining: impl Fn(&ShardMap) -> u64,
) -> anyhow::Result<bool> {
    let bar = ProgressBar::new(1);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{bar:30}] {pos}/{len} replica moves  {msg}",
    )?);
    let deadline = Instant::now() + timeout;
    let mut most = 0;
    loop {
        // The client asks every node and keeps the newest epoch.
        let map = client.shard_map().await?;
        let left = remaining(&map);
        most = most.max(left);
        bar.set_length(most.max(1));
        bar.set_position(most - left);
        let moving = moves(&map);
        bar.set_message(match &moving {
            Some(m) => format!("epoch {}: {m}", map.epoch),
            None => format!("epoch {}", map.epoch),
        });
        if left == 0 && moving.is_none() {
            bar.finish();
            return Ok(true);
        }
        if Instant::now() >= deadline {
            bar.abandon();
            bail!(
                "gave up waiting after {timeout:?}; the placement driver keeps going (watch \
                 `strata status`)"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The move under way, as text.
pub fn moves(map: &ShardMap) -> Option<String> {
    if map.meta_moving_to != 0 {
        return Some(format!(
            "meta group: replica {} -> {}",
            map.meta_moving_from, map.meta_moving_to
        ));
    }
    map.shards.iter().find(|s| s.moving_to != 0).map(|s| {
        format!(
            "shard {}: replica {} -> {}",
            s.id, s.moving_from, s.moving_to
        )
    })
}

fn replicas_on(map: &ShardMap, id: u64) -> u64 {
    map.shards
        .iter()
        .filter(|s| s.replicas.contains(&id))
        .count() as u64
}

/// Add: replicas the node still lacks to hold its share (the average over active nodes,
/// rounded down).
fn spread_to(map: &ShardMap, id: u64) -> u64 {
    let active = map.nodes.iter().filter(|n| n.state == "active").count() as u64;
    let total: u64 = map.shards.iter().map(|s| s.replicas.len() as u64).sum();
    let share = total / active.max(1);
    share.saturating_sub(replicas_on(map, id))
}

/// Remove: replicas still on the node, plus one while it is in the map.
fn drained(map: &ShardMap, id: u64) -> u64 {
    let present = map.nodes.iter().any(|n| n.id == id);
    replicas_on(map, id) + u64::from(map.meta_replicas.contains(&id)) + u64::from(present)
}
