//! A snapshot install cut short by SIGKILL leaves the replica with its old state or the new one,
//! never a mix, and the replica recovers. The kill is aimed at the moment the follower logs that
//! it starts installing; the state left on disk is then inspected offline, with the node's own
//! storage code (whose open finishes an install cut short, as the node's restart does), before
//! the node is started again.

mod common;

use std::time::{Duration, Instant};

use common::{phase, Acked, TestCluster};
use openraft::storage::RaftStateMachine;
use strata_node::storage::state_machine::scan;
use strata_node::storage::{Engine, StateMachine};

/// Applied index and every `(key, version)` of `group` on the stopped node in `data_dir`.
async fn offline_state(data_dir: &std::path::Path, group: u64) -> (u64, Vec<(String, u64)>) {
    let engine = Engine::open(&data_dir.join("db"), 16 << 20).expect("open stopped node's db");
    let mut sm = StateMachine::open(engine.clone(), group, data_dir.join("snapshots")).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    let (records, _) = scan(&engine, group, b"", b"", usize::MAX).unwrap();
    let keys = records
        .into_iter()
        .map(|(k, r)| (String::from_utf8(k.to_vec()).unwrap(), r.version))
        .collect();
    (applied.map_or(0, |l| l.index()), keys)
}

/// The state is exactly the acknowledged writes of `group` up to `applied`: nothing missing,
/// nothing extra, no version from beyond the applied index.
fn assert_consistent(
    group: u64,
    applied: u64,
    keys: &[(String, u64)],
    acked: &[Acked],
    shard_of: impl Fn(&str) -> u64,
) {
    let mut want: Vec<(String, u64)> = acked
        .iter()
        .filter(|(k, v, _)| shard_of(k) == group && *v <= applied)
        .map(|(k, v, _)| (k.clone(), *v))
        .collect();
    want.sort();
    let mut got = keys.to_vec();
    got.sort();
    assert_eq!(got, want, "group {group} at applied index {applied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_install_killed_midway_leaves_old_or_new_state_and_recovers() {
    let mut tc = TestCluster::start_with(3, 1, &["--snapshot-logs", "40"]).await;
    let client = tc.client().await;
    let table = client.route_table().unwrap();
    let shard_of = |k: &str| table.shard_for_key(k.as_bytes()).id;

    phase("a follower of shard 1 stops; the others take ~24 MiB and compact their logs");
    let leader = tc.leader_of(&client, 1).await.expect("leader");
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let before = common::put_all(&client, "early", 20).await;
    tc.wait_caught_up(&client, follower, Duration::from_secs(20))
        .await;
    tc.cluster.kill_node(follower).unwrap();
    let value = "x".repeat(64 << 10);
    let mut acked: Vec<Acked> = before.clone();
    for i in 0..384 {
        let k = format!("big:{i}");
        let version = client.put(k.clone(), value.clone()).await.expect("put");
        acked.push((k, version, value.clone()));
    }
    let leader_addr = tc.client_addr(leader);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let st = client.node_status(&leader_addr).await.unwrap();
        if st
            .groups
            .iter()
            .any(|g| g.group_id == 1 && g.purged_index > 100)
        {
            break;
        }
        assert!(Instant::now() < until, "leader never compacted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let data_dir = tc
        .cluster
        .file()
        .nodes
        .iter()
        .find(|n| n.id == follower)
        .unwrap()
        .data_dir
        .clone();
    let (old_applied, old_keys) = offline_state(&data_dir, 1).await;
    assert_consistent(1, old_applied, &old_keys, &acked, shard_of);

    phase("restart the follower and SIGKILL it as it starts installing the snapshot");
    let log = data_dir.join("node.log");
    let log_len = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
    tc.cluster.start_node(follower).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read(&log).unwrap_or_default();
        if String::from_utf8_lossy(&text[log_len.min(text.len())..]).contains("installing snapshot")
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "the follower never installed a snapshot"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    tc.cluster.kill_node(follower).unwrap();

    phase("on disk: the old state or the complete new one");
    let (applied, keys) = offline_state(&data_dir, 1).await;
    assert_consistent(1, applied, &keys, &acked, shard_of);
    eprintln!(
        "killed during install: {} (applied {old_applied} -> {applied}, {} -> {} keys)",
        if applied == old_applied {
            "old state kept"
        } else {
            "new state complete"
        },
        old_keys.len(),
        keys.len()
    );

    phase("restarted again, the follower recovers every write");
    tc.cluster.start_node(follower).unwrap();
    tc.wait_caught_up(&client, follower, Duration::from_secs(60))
        .await;
    assert_eq!(
        tc.assert_replica_has(&client, follower, &acked).await,
        acked.len()
    );
}
