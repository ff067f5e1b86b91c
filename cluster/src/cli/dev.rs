//! `strata dev up`: a local cluster of `strata-node` processes in the foreground. The first run
//! creates `<data-dir>/cluster.json`; later runs restart the same cluster with its data. Ctrl-C or
//! SIGTERM stops every node cleanly.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

use crate::launcher::{find_node_binary, ClusterSpec, LocalCluster};

/// `strata dev …`.
#[derive(Subcommand, Debug)]
pub enum DevCmd {
    /// Start (or restart) the local cluster and keep it running until Ctrl-C.
    Up(UpArgs),
    /// Start one node of a running local cluster again (after it was killed).
    RestartNode(RestartArgs),
    /// Start one more, empty node for the local cluster (with `--join`), ready for
    /// `strata node add`. It is recorded in cluster.json, so `dev up` restarts and stops it too.
    AddNode(AddNodeArgs),
}

/// `strata dev add-node`.
#[derive(Args, Debug)]
pub struct AddNodeArgs {
    /// Directory of the cluster.
    #[arg(long, default_value = super::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Start the node at the addresses of this dead node, to be added in its place with
    /// `strata node add --replaces`; the dead node leaves cluster.json (its data directory stays).
    #[arg(long, value_name = "ID")]
    pub replaces: Option<u64>,
}

/// `strata dev up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Number of nodes (first run only).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Number of shards (first run only).
    #[arg(long, default_value_t = 8)]
    pub shards: u32,
    /// Directory of the cluster's data and cluster.json.
    #[arg(long, default_value = super::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Node i listens for clients on base+i and for peers on base+100+i (first run only).
    #[arg(long, default_value_t = 7100)]
    pub base_port: u16,
}

/// `strata dev restart-node`.
#[derive(Args, Debug)]
pub struct RestartArgs {
    /// The node to start.
    #[arg(long)]
    pub id: u64,
    /// Directory of the cluster.
    #[arg(long, default_value = super::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

/// Makes a closed output harmless from here on: writing to it fails instead of killing the
/// process. The CLI otherwise dies quietly on SIGPIPE (`strata status | head`), but `dev up`
/// supervises its nodes: if the `tee` or `grep` it was piped into goes away — Ctrl-C in the
/// terminal ends it too — `dev up` must still get to stopping them.
fn keep_going_without_readers() {
    // SAFETY: installs no handler, only the ignore disposition.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigIgn,
        );
    }
}

/// One line to stdout, ignoring a reader that has gone away (see [`keep_going_without_readers`]).
fn out(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// One line to stderr, ignoring a reader that has gone away.
fn err(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// How long nodes get to stop after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How often `dev up` looks for nodes the cluster removed.
const REMOVAL_CHECK: Duration = Duration::from_secs(2);

/// Runs a `strata dev` command.
pub async fn run(cmd: &DevCmd) -> anyhow::Result<()> {
    match cmd {
        DevCmd::Up(a) => up(a).await,
        DevCmd::RestartNode(a) => restart_node(a).await,
        DevCmd::AddNode(a) => add_node(a).await,
    }
}

/// Opens the existing local cluster in `dir`.
fn existing_cluster(dir: &std::path::Path) -> anyhow::Result<LocalCluster> {
    if crate::launcher::ClusterFile::load(dir)?.is_none() {
        anyhow::bail!("no cluster in {}: run strata dev up first", dir.display());
    }
    let spec = ClusterSpec {
        nodes: 0,
        shards: 0,
        base_port: None,
        ip: "127.0.0.1".into(),
        ip_per_node: false,
    };
    LocalCluster::open_or_create(dir, &find_node_binary()?, &spec)
}

async fn add_node(a: &AddNodeArgs) -> anyhow::Result<()> {
    let mut cluster = existing_cluster(&a.data_dir)?;
    let entry = match a.replaces {
        Some(old) => cluster.start_replacement_node(old)?,
        None => cluster.start_joining_node()?,
    };
    cluster.detach();
    let pid = cluster
        .file()
        .nodes
        .iter()
        .find(|n| n.id == entry.id)
        .and_then(|n| n.pid)
        .unwrap_or(0);
    println!(
        "node {} started empty (pid {pid}), client {}, peer {}, log {}",
        entry.id,
        entry.client_addr,
        entry.peer_addr,
        entry.log_path().display()
    );
    match a.replaces {
        Some(old) => println!(
            "add it in node {old}'s place with: strata node add --addr {} --replaces {old} --wait",
            entry.client_addr
        ),
        None => println!(
            "add it to the cluster with: strata node add --addr {} --wait",
            entry.client_addr
        ),
    }
    Ok(())
}

async fn up(a: &UpArgs) -> anyhow::Result<()> {
    if a.nodes == 0 || a.nodes > 99 {
        anyhow::bail!("--nodes must be between 1 and 99");
    }
    if a.shards == 0 || a.shards > strata_proto::keyspace::SLOT_COUNT {
        anyhow::bail!(
            "--shards must be between 1 and {}",
            strata_proto::keyspace::SLOT_COUNT
        );
    }
    let spec = ClusterSpec {
        nodes: a.nodes,
        shards: a.shards,
        base_port: Some(a.base_port),
        ip: "127.0.0.1".into(),
        ip_per_node: false,
    };
    let bin = find_node_binary()?;
    let mut cluster = LocalCluster::open_or_create(&a.data_dir, &bin, &spec)?;
    cluster.ensure_not_running()?;
    let f = cluster.file().clone();
    if f.nodes.len() != a.nodes || f.shards != a.shards {
        eprintln!(
            "note: restarting the existing cluster in {} ({} nodes, {} shards); --nodes/--shards apply to new clusters only",
            cluster.dir().display(),
            f.nodes.len(),
            f.shards
        );
    }
    keep_going_without_readers();
    // Listen before any node starts, and keep listening: a `ctrl_c()` future made anew on each
    // pass of the loop below would miss a Ctrl-C that lands between two passes.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    err(format_args!(
        "starting {} nodes from {}",
        f.nodes.len(),
        bin.display()
    ));
    cluster.start_all()?;
    if let Err(e) = cluster.wait_ready(Duration::from_secs(60)).await {
        let _ = cluster.stop_all(STOP_GRACE);
        return Err(e).context(format!(
            "see the node logs under {}",
            cluster.dir().display()
        ));
    }
    out(format_args!(
        "Strata dev cluster is up: {} nodes, {} shards",
        f.nodes.len(),
        f.shards
    ));
    for n in &cluster.file().nodes {
        out(format_args!(
            "  node {}  client {}  peer {}  pid {}  log {}",
            n.id,
            n.client_addr,
            n.peer_addr,
            n.pid.unwrap_or(0),
            n.log_path().display()
        ));
    }
    out(format_args!("endpoints: {}", cluster.endpoints().join(",")));
    out(format_args!(
        "cluster file: {}",
        cluster.dir().join(crate::launcher::CLUSTER_FILE).display()
    ));
    out(format_args!("press Ctrl-C to stop all nodes"));

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut removal_check = tokio::time::interval(REMOVAL_CHECK);
    let mut client = None;
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                for (id, status) in cluster.exited_nodes() {
                    err(format_args!("node {id} exited ({status}); restart it with: strata dev restart-node --id {id} --data-dir {}", a.data_dir.display()));
                }
            }
            _ = removal_check.tick() => {
                if client.is_none() {
                    client = cluster.client().await.ok();
                }
                if let Some(client) = &client {
                    if let Err(e) = retire_removed_nodes(&mut cluster, client).await {
                        err(format_args!("could not stop a removed node: {e:#}"));
                    }
                }
            }
        }
    }
    err(format_args!("stopping nodes..."));
    // Reload: a node restarted by `dev restart-node` is recorded there with its new pid.
    let mut cluster = LocalCluster::open_or_create(&a.data_dir, &bin, &spec)?;
    let killed = cluster.stop_all(STOP_GRACE)?;
    if !killed.is_empty() {
        // Their acknowledged writes are safe (fsynced before acknowledging), but a node that
        // ignores SIGTERM is a bug worth a failing exit code.
        anyhow::bail!(
            "nodes {killed:?} did not stop within {STOP_GRACE:?} of SIGTERM and were killed; see their node.log under {}",
            a.data_dir.display()
        );
    }
    err(format_args!(
        "all nodes stopped; run the same command again to restart the cluster with its data"
    ));
    Ok(())
}

/// Stops the nodes of the cluster file that say the cluster removed them (`strata node remove`,
/// or a node removed by force or replaced while it was down, which learns it once restarted) and
/// drops them from the file, so that `dev up` neither keeps them running nor starts them again.
async fn retire_removed_nodes(
    cluster: &mut LocalCluster,
    client: &strata_client::Client,
) -> anyhow::Result<()> {
    cluster.reload()?;
    let running: Vec<(u64, String)> = cluster
        .file()
        .nodes
        .iter()
        .filter(|n| n.pid.is_some_and(crate::launcher::process_alive))
        .map(|n| (n.id, n.client_addr.clone()))
        .collect();
    for (id, addr) in running {
        let removed = client
            .node_status(&addr)
            .await
            .is_ok_and(|st| st.node_id == id && st.membership == "removed");
        if removed {
            cluster.retire_node(id, STOP_GRACE)?;
            err(format_args!(
                "node {id} was removed from the cluster: stopped it and dropped it from {} (its data directory stays)",
                crate::launcher::CLUSTER_FILE
            ));
        }
    }
    Ok(())
}

async fn restart_node(a: &RestartArgs) -> anyhow::Result<()> {
    let mut cluster = existing_cluster(&a.data_dir)?;
    let entry = cluster
        .file()
        .nodes
        .iter()
        .find(|n| n.id == a.id)
        .cloned()
        .with_context(|| {
            format!(
                "the cluster in {} has no node {}",
                a.data_dir.display(),
                a.id
            )
        })?;
    if let Some(pid) = entry.pid.filter(|p| crate::launcher::process_alive(*p)) {
        anyhow::bail!("node {} is already running (pid {pid})", a.id);
    }
    let pid = cluster.start_node(a.id)?;
    // The node must outlive this command: forget the child instead of killing it on drop.
    cluster.detach();
    println!("node {} started (pid {pid})", a.id);
    Ok(())
}
