//! Membership changes on real `strata-node` processes: adding a node and removing one while
//! clients write, removing a dead node, replacing one at its own addresses, moving one to new
//! addresses, and operator mistakes that must change nothing.

mod common;

use std::time::Duration;

use common::{assert_all_readable, phase, Acked, TestCluster, Writers};
use strata_client::Error;

/// How long the placement driver gets to finish a rebalance on this 2-core machine.
const REBALANCE: Duration = Duration::from_secs(90);

fn replicas_on(map: &strata_proto::v1::ShardMap, id: u64) -> usize {
    map.shards
        .iter()
        .filter(|s| s.replicas.contains(&id))
        .count()
}

/// Every shard of `map` has `r` replicas, none on `gone`.
fn fully_replicated_without(map: &strata_proto::v1::ShardMap, r: usize, gone: u64) -> bool {
    map.shards
        .iter()
        .all(|s| s.replicas.len() == r && !s.replicas.contains(&gone))
        && !map.meta_replicas.contains(&gone)
        && !map.nodes.iter().any(|n| n.id == gone)
}

/// Waits until the node at `addr` says it was removed from the cluster and hosts no group.
async fn wait_until_removed(client: &strata_client::Client, addr: &str) {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st = client.node_status(addr).await;
        if st
            .as_ref()
            .is_ok_and(|st| st.membership == "removed" && st.groups.is_empty())
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the node at {addr} never learnt it was removed: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The replicas of each group agree with the layout: every voter set that a replica reports
/// equals the layout's replica list.
async fn assert_raft_membership_matches(
    tc: &TestCluster,
    client: &strata_client::Client,
    map: &strata_proto::v1::ShardMap,
) {
    for n in &map.nodes {
        let st = client.node_status(&n.client_addr).await.expect("status");
        for g in &st.groups {
            let mut want = if g.group_id == 0 {
                map.meta_replicas.clone()
            } else {
                map.shards
                    .iter()
                    .find(|s| s.id == g.group_id)
                    .unwrap()
                    .replicas
                    .clone()
            };
            let mut voters = g.voters.clone();
            want.sort_unstable();
            voters.sort_unstable();
            assert_eq!(voters, want, "group {} on node {}", g.group_id, n.id);
        }
    }
    let _ = tc;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_node_under_write_load_spreads_replicas_to_it() {
    let mut tc = TestCluster::start(3, 8).await;
    let client = tc.client().await;
    let writers = Writers::start(&client, "add", 4);
    tokio::time::sleep(Duration::from_secs(1)).await;

    phase("start an empty node with --join and add it");
    let entry = tc.start_joining_node(&client).await;
    let (id, _) = client
        .add_node(&entry.client_addr, &entry.peer_addr, None)
        .await
        .expect("add node");
    assert_eq!(id, entry.id);

    phase("replicas spread evenly onto it while the writers keep going");
    let map = tc
        .wait_for_map(&client, REBALANCE, "6 replicas per node", |m| {
            (1..=4).all(|n| replicas_on(m, n) == 6)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (acked, errors) = writers.stop().await;
    assert!(
        errors.is_empty(),
        "errors surfaced to the client: {errors:?}"
    );
    assert!(acked.len() > 50, "writers made progress: {}", acked.len());

    phase("every acknowledged write is readable; the new node serves its replicas");
    assert_all_readable(&client, &acked).await;
    tc.wait_caught_up(&client, id, Duration::from_secs(30))
        .await;
    let on_new = tc.assert_replica_has(&client, id, &acked).await;
    assert!(on_new > 0, "the new node holds data");
    assert_raft_membership_matches(&tc, &client, &map).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_under_write_load_drains_it_first() {
    let mut tc = TestCluster::start(4, 8).await;
    let client = tc.client().await;
    let writers = Writers::start(&client, "rm", 4);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Node 1 is a meta replica, so its meta-group replica moves too.
    phase("remove node 1 while clients write");
    client.remove_node(1, false).await.expect("remove node 1");
    let map = tc
        .wait_for_map(&client, REBALANCE, "node 1 drained and removed", |m| {
            fully_replicated_without(m, 3, 1)
        })
        .await;

    phase("stop the removed node: every shard stays available");
    // The other nodes may serve the map without node 1 a moment before node 1 has adopted it.
    wait_until_removed(&client, &tc.client_addr(1)).await;
    tc.cluster.kill_node(1).expect("kill node 1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut acked, errors) = writers.stop().await;
    assert!(
        errors.is_empty(),
        "errors surfaced to the client: {errors:?}"
    );
    acked.extend(common::put_all(&client, "after", 64).await);
    assert_all_readable(&client, &acked).await;
    assert_raft_membership_matches(&tc, &client, &map).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_force_removed_and_its_shards_regain_replicas() {
    let mut tc = TestCluster::start(4, 8).await;
    let client = tc.client().await;
    let before: Vec<Acked> = common::put_all(&client, "dead", 80).await;

    phase("node 2 dies for good");
    tc.cluster.kill_node(2).expect("kill node 2");
    let err = client.remove_node(2, false).await.unwrap_err();
    assert!(
        matches!(&err, Error::Rejected(m) if m.contains("--force")),
        "{err}"
    );

    phase("--force: its replicas are rebuilt on the live nodes");
    client.remove_node(2, true).await.expect("force remove");
    let map = tc
        .wait_for_map(&client, REBALANCE, "every shard back to 3 replicas", |m| {
            fully_replicated_without(m, 3, 2)
        })
        .await;
    assert_all_readable(&client, &before).await;
    assert_raft_membership_matches(&tc, &client, &map).await;
    let after = common::put_all(&client, "dead-after", 32).await;
    assert_all_readable(&client, &after).await;

    phase("node 2 comes back after all: it learns that it was removed and drops its replicas");
    tc.cluster.start_node(2).expect("restart node 2");
    wait_until_removed(&client, &tc.client_addr(2)).await;
    assert_all_readable(&client, &after).await;

    phase("a new node takes a new id, never the dead node's");
    let entry = tc.start_joining_node(&client).await;
    let (id, _) = client
        .add_node(&entry.client_addr, &entry.peer_addr, None)
        .await
        .expect("add node 5");
    assert_eq!(id, 5);

    phase("a node started without --id may not ask for a used id; it gets the next one");
    // It listens on every interface and advertises a host name, as in a container: the cluster
    // records the name, and clients and peers reach the node by it.
    let ports = strata_cluster::launcher::free_ports("127.0.0.1", 2).unwrap();
    let (c, p) = (
        format!("localhost:{}", ports[0]),
        format!("localhost:{}", ports[1]),
    );
    let dir = tempfile::tempdir().unwrap();
    let _node = KillOnDrop::join_without_id(
        &format!("0.0.0.0:{}", ports[0]),
        &format!("0.0.0.0:{}", ports[1]),
        dir.path(),
        &["--advertise-client-addr", &c, "--advertise-peer-addr", &p],
    );
    while client.node_status(&c).await.is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = client.add_node(&c, &p, Some(2)).await.unwrap_err();
    assert!(err.to_string().contains("never reused"), "{err}");
    let (id, _) = client.add_node(&c, &p, None).await.expect("add node");
    assert_eq!(id, 6);
    let map = tc
        .wait_for_map(&client, REBALANCE, "node 6 holds a replica", |m| {
            replicas_on(m, 6) > 0
        })
        .await;
    let recorded = map.nodes.iter().find(|n| n.id == 6).expect("node 6");
    assert_eq!((&recorded.client_addr, &recorded.peer_addr), (&c, &p));
    let st = client.node_status(&c).await.expect("node 6 status");
    assert!(
        st.groups
            .iter()
            .any(|g| g.group_id != 0 && g.applied_index > 0),
        "node 6 caught up a shard over its advertised peer address: {:?}",
        st.groups
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_of_three_is_replaced_by_a_new_node_at_its_addresses() {
    let mut tc = TestCluster::start(3, 4).await;
    let client = tc.client().await;
    let before: Vec<Acked> = common::put_all(&client, "replace", 60).await;

    phase("node 2's disk is lost; with three nodes it cannot simply be removed");
    tc.cluster.kill_node(2).expect("kill node 2");
    let err = client.remove_node(2, true).await.unwrap_err();
    assert!(err.to_string().contains("replication factor"), "{err}");

    phase("its machine comes back empty, with --join and no id, at node 2's addresses");
    let old = tc.cluster.file().nodes[1].clone();
    assert_eq!(old.id, 2);
    let dir = tempfile::tempdir().unwrap();
    let mut fresh = KillOnDrop::join_without_id(&old.client_addr, &old.peer_addr, dir.path(), &[]);
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while !client
        .node_status(&old.client_addr)
        .await
        .is_ok_and(|st| st.membership == "joining")
    {
        assert!(
            tokio::time::Instant::now() < until,
            "the new node never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The leaders keep sending node 2's Raft messages to this address; they are refused here
    // and must not make the waiting node stop (as a wiped node 2 would).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        fresh.0.try_wait().unwrap().is_none(),
        "the waiting node stopped on node 2's messages"
    );

    phase("add it in place of node 2: a new id, node 2's replicas rebuilt on it");
    let (id, _) = client
        .replace_node(2, &old.client_addr, &old.peer_addr)
        .await
        .expect("replace node 2");
    assert_eq!(id, 4);
    let map = tc
        .wait_for_map(&client, REBALANCE, "node 2 replaced by node 4", |m| {
            fully_replicated_without(m, 3, 2) && replicas_on(m, 4) == 4
        })
        .await;
    let st = client.node_status(&old.client_addr).await.expect("status");
    assert_eq!((st.node_id, st.membership.as_str()), (4, "member"));
    let applied: Vec<(u64, u64)> = st
        .groups
        .iter()
        .map(|g| (g.group_id, g.applied_index))
        .collect();
    assert!(
        applied.len() >= 4 && applied.iter().all(|(_, a)| *a > 0),
        "node 4 hosts every shard with data: {applied:?}"
    );
    assert!(fresh.0.try_wait().unwrap().is_none(), "node 4 stopped");
    assert_all_readable(&client, &before).await;
    assert_raft_membership_matches(&tc, &client, &map).await;
    let after = common::put_all(&client, "replace-after", 32).await;
    assert_all_readable(&client, &after).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_moved_to_new_addresses_rejoins_there_once_they_are_recorded() {
    let mut tc = TestCluster::start(3, 4).await;
    let client = tc.client().await;
    let before = common::put_all(&client, "move", 40).await;
    let old = tc.cluster.file().nodes[2].clone();
    // A client that will not hear of the move until a node tells it. Its deadline is short: it
    // must follow the leader's new address at once, not find it by trying everything for seconds.
    let unaware = strata_client::ClientBuilder::new(tc.cluster.endpoints())
        .deadline(Duration::from_secs(3))
        .connect()
        .await
        .expect("client connects");
    unaware.refresh_map().await.expect("map");

    phase("node 3 stops and comes back at new addresses the cluster does not know");
    tc.cluster
        .stop_node(3, Duration::from_secs(10))
        .expect("stop node 3");
    let (client_addr, peer_addr) = tc.cluster.free_addrs(3).expect("free ports");
    tc.cluster
        .set_node_addresses(3, &client_addr, &peer_addr)
        .expect("new addresses");
    tc.cluster.start_node(3).expect("start node 3");
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = tc.cluster.exit_status(3) {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "node 3 runs at addresses nobody dials"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(old.log_path()).expect("node 3's log");
    let expected = format!(
        "its peer address is recorded as {}, not {peer_addr}",
        old.peer_addr
    );
    assert!(log.contains(&expected), "node 3's log lacks {expected:?}");

    phase("a member's address is refused; the new ones are recorded");
    let n1 = tc.cluster.file().nodes[0].clone();
    let err = client
        .update_node(3, Some(&client_addr), Some(&n1.peer_addr))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("node 1 already uses"), "{err}");
    let (epoch, changed) = client
        .update_node(3, Some(&client_addr), Some(&peer_addr))
        .await
        .expect("update node 3");
    assert!(changed);
    let map = tc.newest_map(&client).await;
    assert_eq!(map.epoch, epoch);
    let recorded = map.nodes.iter().find(|n| n.id == 3).expect("node 3");
    assert_eq!(
        (&recorded.client_addr, &recorded.peer_addr),
        (&client_addr, &peer_addr)
    );

    phase("started again there, node 3 learns the new layout from its peers and catches up");
    tc.cluster.start_node(3).expect("start node 3");
    let more = common::put_all(&client, "moved", 40).await;
    tc.wait_caught_up(&client, 3, Duration::from_secs(30)).await;
    let st = client.node_status(&client_addr).await.expect("status");
    assert_eq!((st.node_id, st.membership.as_str()), (3, "member"));
    // Replicated to it at its new peer address, and served at its new client address.
    assert!(tc.assert_replica_has(&client, 3, &more).await > 0);
    assert!(tc.assert_replica_has(&client, 3, &before).await > 0);
    assert_all_readable(&client, &before).await;

    phase("a client with the old map follows node 3 to its new address");
    if tc.leader_of(&client, 1).await != Some(3) {
        client
            .transfer_leader(1, 3)
            .await
            .expect("node 3 leads shard 1");
    }
    let table = unaware.route_table().expect("route table");
    let key = (0..)
        .map(|i| format!("moved-leader:{i}"))
        .find(|k| table.shard_for_key(k.as_bytes()).id == 1)
        .expect("a key of shard 1");
    unaware
        .put(key.clone(), "v")
        .await
        .expect("a put to the moved leader");
}

/// A child process killed when the test ends, also on panic.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    /// Starts an empty `strata-node --join` without `--id` listening at these addresses, with
    /// `extra` flags, as an operator would on a real machine.
    fn join_without_id(
        client_addr: &str,
        peer_addr: &str,
        data_dir: &std::path::Path,
        extra: &[&str],
    ) -> Self {
        KillOnDrop(
            std::process::Command::new(env!("CARGO_BIN_EXE_strata-node"))
                .args(["--join", "--client-addr", client_addr])
                .args(["--peer-addr", peer_addr, "--data-dir"])
                .arg(data_dir)
                .args(common::FAST_RAFT)
                .args(extra)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn strata-node"),
        )
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_membership_requests_are_refused_and_change_nothing() {
    let mut tc = TestCluster::start(3, 4).await;
    let client = tc.client().await;
    let epoch = tc.newest_map(&client).await.epoch;
    let refused = |r: Result<u64, Error>, needle: &str| match r {
        Err(Error::Rejected(m)) if m.contains(needle) => {}
        other => panic!("expected a refusal mentioning {needle:?}, got {other:?}"),
    };

    phase("unknown id, below the replication factor");
    refused(client.remove_node(42, false).await, "no node 42");
    refused(client.remove_node(3, false).await, "replication factor");
    refused(client.remove_node(3, true).await, "replication factor");

    phase("an address nobody answers on");
    let r = client.add_node("127.0.0.1:1", "127.0.0.1:2", None).await;
    refused(r.map(|(id, _)| id), "no strata-node answers");

    phase("a member's addresses, and a node added twice");
    let n1 = &tc.cluster.file().nodes[0].clone();
    let r = client.add_node(&n1.client_addr, &n1.peer_addr, None).await;
    refused(r.map(|(id, _)| id), "already uses");
    assert_eq!(tc.newest_map(&client).await.epoch, epoch, "nothing changed");

    let entry = tc.start_joining_node(&client).await;
    let r = client
        .add_node(&entry.client_addr, "127.0.0.1:3", None)
        .await;
    assert!(
        r.is_err(),
        "a peer address that is not the node's own is refused: {r:?}"
    );
    client
        .add_node(&entry.client_addr, &entry.peer_addr, None)
        .await
        .expect("add once");
    let r = client
        .add_node(&entry.client_addr, &entry.peer_addr, None)
        .await;
    refused(r.map(|(id, _)| id), "already uses");

    phase("the cluster still serves");
    let acked = common::put_all(&client, "still", 16).await;
    assert_all_readable(&client, &acked).await;
}
