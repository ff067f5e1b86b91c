//! Multi-node tests on real `strata-node` processes: routing to every shard, leader failover
//! without losing acknowledged writes, catch-up after restart, reads after every node was killed
//! at once, lease reads without a lease, exactly-once retries, bad input that must change
//! nothing, and a node whose data directory was wiped.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{assert_all_readable, phase, put_all, Acked, TestCluster};
use strata_client::{BatchOp, Consistency, Error, ScanOptions};
use strata_proto::v1::kv_client::KvClient;
use strata_proto::v1::{
    batch_result, get_result, BatchOp as PbBatchOp, BatchRequest, GetRequest, MultiBatchRequest,
    MultiGetRequest, PutRequest, RequestId, ScanRequest,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_writes_survive_leader_kill_and_restarted_node_catches_up() {
    let mut tc = TestCluster::start(3, 8).await;
    let client = tc.client().await;

    phase("write 200 keys: every shard receives writes");
    let mut acked: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for i in 0..200 {
        let (k, v) = (format!("user:{i}"), format!("v{i}"));
        let version = client.put(k.clone(), v.clone()).await.expect("put");
        acked.insert(k, (version, v));
    }
    let table = client.route_table().unwrap();
    let mut per_shard = BTreeMap::new();
    for k in acked.keys() {
        *per_shard
            .entry(table.shard_for_key(k.as_bytes()).id)
            .or_insert(0) += 1;
    }
    assert_eq!(per_shard.len(), 8, "every shard got writes: {per_shard:?}");

    phase("SIGKILL the leader of shard 1 while a writer keeps writing");
    let victim = tc
        .leader_of(&client, 1)
        .await
        .expect("shard 1 has a leader");
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut worst_gap = Duration::ZERO;
            let mut last_ok = Instant::now();
            for i in 0..300 {
                let (k, v) = (format!("during:{i}"), format!("d{i}"));
                match client.put(k.clone(), v.clone()).await {
                    Ok(version) => {
                        worst_gap = worst_gap.max(last_ok.elapsed());
                        last_ok = Instant::now();
                        acked.push((k, version, v));
                    }
                    Err(e) => assert!(
                        e.may_have_applied() || matches!(e, Error::Unavailable(_)),
                        "{e}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (acked, worst_gap)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    tc.cluster.kill_node(victim).expect("kill leader");
    let (during, worst_gap) = writer.await.expect("writer");
    eprintln!(
        "writes acknowledged during failover: {}; longest gap between acks: {worst_gap:?}",
        during.len()
    );
    assert!(
        during.len() >= 250,
        "writes resumed after failover ({} of 300 acked)",
        during.len()
    );

    phase("every acknowledged write is readable with its version");
    let new_leader = tc
        .leader_of(&client, 1)
        .await
        .expect("shard 1 elected a new leader");
    assert_ne!(new_leader, victim);
    for (k, (version, v)) in acked.iter() {
        let r = client
            .get(k.clone())
            .await
            .expect("get")
            .expect("acked key present");
        assert_eq!(
            (r.version, r.value.as_ref()),
            (*version, v.as_bytes()),
            "{k}"
        );
    }
    for (k, version, v) in &during {
        let r = client
            .get(k.clone())
            .await
            .expect("get")
            .expect("acked key present");
        assert_eq!(
            (r.version, r.value.as_ref()),
            (*version, v.as_bytes()),
            "{k}"
        );
    }

    phase("restart the killed node from its data dir: it catches up");
    tc.cluster.start_node(victim).expect("restart");
    client
        .put("after-restart", "x")
        .await
        .expect("write after restart");
    tc.wait_caught_up(&client, victim, Duration::from_secs(30))
        .await;

    phase("stale reads served by the restarted node see the data");
    let acked: Vec<Acked> = acked.into_iter().map(|(k, (ver, v))| (k, ver, v)).collect();
    assert!(tc.assert_replica_has(&client, victim, &acked).await > 0);
    assert!(tc.assert_replica_has(&client, victim, &during).await > 0);
}

/// Regression test for a stale read found by the chaos suite's `crash` nemesis: after every node
/// was killed, a leader that resumed its leadership without an election served reads from a state
/// machine that had lost its newest (unsynced) applies, so the last acknowledged writes read back
/// with their old values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_writes_read_back_after_every_node_is_killed_at_once() {
    let mut tc = TestCluster::start(3, 2).await;
    let client = tc.client().await;
    let ids: Vec<u64> = tc.cluster.file().nodes.iter().map(|n| n.id).collect();
    for round in 0..3 {
        phase(&format!(
            "round {round}: overwrite 20 keys, then SIGKILL every node"
        ));
        let mut acked = Vec::new();
        for i in 0..20 {
            let (k, v) = (format!("crash:{i}"), format!("round{round}"));
            let version = client.put(k.clone(), v.clone()).await.expect("put");
            acked.push((k, version, v));
        }
        for id in &ids {
            tc.cluster.kill_node(*id).expect("kill");
        }
        phase("restart every node: linearizable reads return the last acknowledged values");
        for id in &ids {
            tc.cluster.start_node(*id).expect("restart");
        }
        common::assert_all_readable(&client, &acked).await;
    }
}

/// Sends raw requests so the test controls the request id.
async fn leader_kv(
    tc: &TestCluster,
    client: &strata_client::Client,
    key: &str,
) -> KvClient<tonic::transport::Channel> {
    let shard = client
        .route_table()
        .unwrap()
        .shard_for_key(key.as_bytes())
        .id;
    let leader = tc.leader_of(client, shard).await.expect("leader");
    let addr = tc.client_addr(leader);
    KvClient::connect(format!("http://{addr}")).await.unwrap()
}

/// A `LEASE` read whose lease has run out is not refused: the leader confirms its leadership with
/// a heartbeat round, as for a ReadIndex read. `--lease-drift-percent 100` leaves no lease at
/// all, so every read here takes that path; each must see the write before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_reads_without_a_lease_wait_for_a_heartbeat_round_instead_of_failing() {
    let tc = TestCluster::start_with(3, 2, &["--lease-drift-percent", "100"]).await;
    let client = tc.client().await;
    for i in 0..50 {
        let key = format!("lease:{i}");
        let version = client.put(key.clone(), format!("v{i}")).await.expect("put");
        let got = client
            .get_with(key, Consistency::Lease)
            .await
            .expect("lease read")
            .expect("just written");
        assert_eq!(got.version, version);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_write_with_same_request_id_applies_once() {
    let tc = TestCluster::start(3, 4).await;
    let client = tc.client().await;
    let mut kv = leader_kv(&tc, &client, "counter").await;
    let put = |seq: u64, value: &'static str| PutRequest {
        key: Bytes::from_static(b"counter"),
        value: Bytes::from_static(value.as_bytes()),
        request_id: Some(RequestId {
            client_id: 4242,
            sequence: seq,
            acked_below: 1,
        }),
    };

    phase("first attempt of write 1, then write 2");
    let v1 = kv.put(put(1, "first")).await.unwrap().into_inner().version;
    let v2 = kv.put(put(2, "second")).await.unwrap().into_inner().version;
    assert!(v2 > v1);

    phase("a retry of write 1 returns its original outcome and applies nothing");
    let again = kv.put(put(1, "first")).await.unwrap().into_inner().version;
    assert_eq!(again, v1);
    let r = client.get("counter").await.unwrap().unwrap();
    assert_eq!((r.version, r.value.as_ref()), (v2, &b"second"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_with_a_reason_and_writes_nothing() {
    let tc = TestCluster::start(3, 8).await;
    let client = tc.client().await;
    client.put("{user:1}:name", "ada").await.unwrap();
    let before = client.scan(ScanOptions::default()).await.unwrap().records;

    phase("client API rejects bad keys, values and batches");
    let invalid = |r: Result<u64, Error>, needle: &str| match r {
        Err(Error::InvalidArgument(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        other => panic!("expected InvalidArgument({needle}), got {other:?}"),
    };
    invalid(client.put("", "v").await, "key is empty");
    invalid(client.put(vec![b'k'; 4097], "v").await, "4097");
    invalid(client.put("k", vec![0u8; (1 << 20) + 1]).await, "value is");
    let (a, b) = distinct_shard_keys(&client);
    invalid(
        client
            .batch(vec![
                BatchOp::Put(a.clone().into(), "1".into()),
                BatchOp::Put(b.clone().into(), "2".into()),
            ])
            .await,
        "spans shards",
    );
    let too_many: Vec<BatchOp> = (0..129)
        .map(|i| BatchOp::Put(format!("{{t}}:{i}").into(), "v".into()))
        .collect();
    invalid(client.batch(too_many).await, "129 operations");

    phase("raw requests: unknown shard, missing request id, cross-shard batch");
    let mut kv = leader_kv(&tc, &client, "{user:1}:name").await;
    let err = kv
        .scan(ScanRequest {
            shard_id: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("unknown shard 99"),
        "{}",
        err.message()
    );
    let err = kv
        .put(PutRequest {
            key: Bytes::from_static(b"{user:1}:x"),
            value: Bytes::from_static(b"v"),
            request_id: None,
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("request_id"), "{}", err.message());
    let err = kv
        .batch(BatchRequest {
            ops: vec![
                PbBatchOp {
                    key: a.into(),
                    value: Bytes::from_static(b"1"),
                    delete: false,
                },
                PbBatchOp {
                    key: b.into(),
                    value: Bytes::from_static(b"2"),
                    delete: false,
                },
            ],
            request_id: Some(RequestId {
                client_id: 9,
                sequence: 1,
                acked_below: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("spans shards"), "{}", err.message());

    phase("nothing was written and the cluster keeps serving");
    assert_eq!(
        client.scan(ScanOptions::default()).await.unwrap().records,
        before
    );
    client
        .put("{user:1}:age", "36")
        .await
        .expect("still serving");
    let batch_version = client
        .batch(vec![
            BatchOp::Put("{user:2}:name".into(), "bob".into()),
            BatchOp::Put("{user:2}:age".into(), "40".into()),
        ])
        .await
        .expect("same-tag batch is one shard");
    let r = client.get("{user:2}:age").await.unwrap().unwrap();
    assert_eq!(r.version, batch_version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_batch_runs_each_batch_on_its_own() {
    let tc = TestCluster::start(3, 8).await;
    let client = tc.client().await;
    let table = client.route_table().unwrap();
    let shard_of = |k: &str| table.shard_for_key(k.as_bytes()).id;
    let here = tc
        .leader_of(&client, shard_of("{here}"))
        .await
        .expect("leader");
    let mut kv = KvClient::connect(format!("http://{}", tc.client_addr(here)))
        .await
        .unwrap();
    // A key of a shard that another node leads.
    let mut elsewhere = None;
    for i in 0..64 {
        let k = format!("{{other:{i}}}");
        if tc
            .leader_of(&client, shard_of(&k))
            .await
            .is_some_and(|l| l != here)
        {
            elsewhere = Some(k);
            break;
        }
    }
    let elsewhere = elsewhere.expect("some shard is led by another node");
    let (a, b) = distinct_shard_keys(&client);
    let op = |k: &str, v: &str| PbBatchOp {
        key: Bytes::copy_from_slice(k.as_bytes()),
        value: Bytes::copy_from_slice(v.as_bytes()),
        delete: false,
    };
    let id = |sequence| {
        Some(RequestId {
            client_id: 77,
            sequence,
            acked_below: 1,
        })
    };
    let batch = |ops, sequence| BatchRequest {
        ops,
        request_id: id(sequence),
    };
    let multi = MultiBatchRequest {
        batches: vec![
            batch(vec![op("{here}:1", "x"), op("{here}:2", "y")], 1),
            batch(vec![op(&a, "1"), op(&b, "2")], 2),
            batch(vec![op("", "empty key")], 3),
            batch(vec![op(&format!("{elsewhere}:k"), "v")], 4),
            BatchRequest {
                ops: vec![op("{here}:3", "no id")],
                request_id: None,
            },
        ],
    };

    phase("one call, five batches: each gets its own outcome");
    let results = kv
        .multi_batch(multi.clone())
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 5);
    let version = match &results[0].result {
        Some(batch_result::Result::Ok(ok)) => ok.version,
        other => panic!("the good batch failed: {other:?}"),
    };
    let failed = |i: usize| match &results[i].result {
        Some(batch_result::Result::Failed(f)) => f.clone(),
        other => panic!("batch {i} should have failed: {other:?}"),
    };
    for (i, needle) in [(1, "spans shards"), (2, "key is empty"), (4, "request_id")] {
        let f = failed(i);
        assert_eq!(f.code, tonic::Code::InvalidArgument as i32, "batch {i}");
        assert!(f.message.contains(needle), "batch {i}: {}", f.message);
        assert_eq!(f.details.unwrap().code, "InvalidArgument");
    }
    let not_leader = failed(3);
    assert_eq!(not_leader.code, tonic::Code::FailedPrecondition as i32);
    let d = not_leader.details.unwrap();
    assert_eq!(d.code, "NotLeader");
    assert_eq!(d.shard_id, shard_of(&elsewhere));

    phase("only the good batch was written, atomically at one version");
    for k in ["{here}:1", "{here}:2"] {
        assert_eq!(client.get(k).await.unwrap().unwrap().version, version);
    }
    for k in [a, b, format!("{elsewhere}:k"), "{here}:3".to_string()] {
        assert!(
            client.get(k.clone()).await.unwrap().is_none(),
            "{k} written"
        );
    }

    phase("the same call again: the good batch's request id is remembered, nothing reapplies");
    let again = kv.multi_batch(multi).await.unwrap().into_inner().results;
    match &again[0].result {
        Some(batch_result::Result::Ok(ok)) => assert_eq!(ok.version, version),
        other => panic!("retry of the good batch failed: {other:?}"),
    }

    phase("a call without batches is rejected");
    let err = kv
        .multi_batch(MultiBatchRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("no batches"), "{}", err.message());

    phase("MultiGet: each read its own outcome; the answer's size budget holds");
    let big = |c: u8| Bytes::from(vec![c; 900 << 10]);
    for (k, v) in [
        ("{here}:b1", big(1)),
        ("{here}:b2", big(2)),
        ("{here}:b3", big(3)),
    ] {
        client.put(k, v).await.unwrap();
    }
    let get = |k: &str| GetRequest {
        key: Bytes::copy_from_slice(k.as_bytes()),
        consistency: 0,
    };
    let reads = MultiGetRequest {
        gets: vec![
            get("{here}:1"),
            get("{here}:absent"),
            get(""),
            get(&format!("{elsewhere}:k")),
            get("{here}:b1"),
            get("{here}:b2"),
            get("{here}:b3"),
        ],
    };
    let results = kv.multi_get(reads).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 7);
    let ok = |i: usize| match &results[i].result {
        Some(get_result::Result::Ok(r)) => r.clone(),
        other => panic!("read {i} failed: {other:?}"),
    };
    let failed_code = |i: usize| match &results[i].result {
        Some(get_result::Result::Failed(f)) => f.details.clone().unwrap().code,
        other => panic!("read {i} should have failed: {other:?}"),
    };
    assert_eq!(
        (ok(0).found, ok(0).value.as_ref(), ok(0).version),
        (true, &b"x"[..], version)
    );
    assert!(!ok(1).found);
    assert_eq!(failed_code(2), "InvalidArgument");
    assert_eq!(failed_code(3), "NotLeader");
    assert_eq!(ok(4).value, big(1));
    assert_eq!(ok(5).value, big(2));
    assert_eq!(
        failed_code(6),
        "ReplyFull",
        "2 MiB budget spent by b1 and b2"
    );
    let err = kv.multi_get(MultiGetRequest::default()).await.unwrap_err();
    assert!(err.message().contains("no reads"), "{}", err.message());

    phase("the client's coalesced gets send a read the answer had no room for on its own");
    // Eight concurrent reads: any wave of three or more big ones overflows the answer.
    let keys = ["{here}:b1", "{here}:b2", "{here}:b3", "{here}:1"].repeat(2);
    let reads = keys.iter().map(|k| client.get(*k));
    let values: Vec<Bytes> = futures::future::join_all(reads)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap().value)
        .collect();
    let expected = [big(1), big(2), big(3), Bytes::from_static(b"x")].to_vec();
    let expected = [expected.clone(), expected].concat();
    // Compared by length and first byte: the values are too large to print.
    let shape = |v: &[Bytes]| -> Vec<(usize, u8)> { v.iter().map(|b| (b.len(), b[0])).collect() };
    assert_eq!(shape(&values), shape(&expected));
}

/// Two keys that live in different shards.
fn distinct_shard_keys(client: &strata_client::Client) -> (String, String) {
    let t = client.route_table().unwrap();
    let a = "k0".to_string();
    let sa = t.shard_for_key(a.as_bytes()).id;
    let b = (1..)
        .map(|i| format!("k{i}"))
        .find(|k| t.shard_for_key(k.as_bytes()).id != sa)
        .unwrap();
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_and_scan_behave_across_shards() {
    let tc = TestCluster::start(3, 8).await;
    let client = tc.client().await;

    phase("CAS: create-if-absent, compare on version, mismatch returns the current value");
    let created = client
        .cas("stock:1", 0, Some(Bytes::from_static(b"10")))
        .await
        .unwrap();
    assert!(created.succeeded);
    let again = client
        .cas("stock:1", 0, Some(Bytes::from_static(b"99")))
        .await
        .unwrap();
    assert!(!again.succeeded);
    assert_eq!(again.version, created.version);
    assert_eq!(again.current_value.as_deref(), Some(&b"10"[..]));
    let next = client
        .cas("stock:1", created.version, Some(Bytes::from_static(b"9")))
        .await
        .unwrap();
    assert!(next.succeeded && next.version > created.version);
    let gone = client.cas("stock:1", next.version, None).await.unwrap();
    assert!(gone.succeeded);
    assert!(client.get("stock:1").await.unwrap().is_none());

    phase("scan by prefix merges every shard in key order");
    for i in 0..50 {
        client
            .put(format!("item:{i:03}"), format!("{i}"))
            .await
            .unwrap();
    }
    client.put("other", "x").await.unwrap();
    let items = client
        .scan(ScanOptions {
            prefix: Bytes::from_static(b"item:"),
            limit: 20,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(items.more, "30 more item: keys follow the first 20");
    let keys: Vec<String> = items
        .records
        .iter()
        .map(|r| String::from_utf8(r.key.to_vec()).unwrap())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("item:{i:03}")).collect();
    assert_eq!(keys, expected);

    phase("paging on from just after each page's last key reads every item once");
    let mut paged = Vec::new();
    let mut start = Bytes::new();
    loop {
        let page = client
            .scan(ScanOptions {
                prefix: Bytes::from_static(b"item:"),
                start: start.clone(),
                limit: 20,
                ..Default::default()
            })
            .await
            .unwrap();
        paged.extend(page.records.iter().map(|r| r.key.clone()));
        match page.next_start() {
            Some(next) => start = next,
            None => break,
        }
    }
    let all: Vec<Bytes> = (0..50).map(|i| format!("item:{i:03}").into()).collect();
    assert_eq!(paged, all);

    let range = client
        .scan(ScanOptions {
            start: Bytes::from_static(b"item:010"),
            end: Bytes::from_static(b"item:015"),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(range.records.len(), 5);
    assert!(!range.more);
    assert!(client.delete("item:000").await.unwrap());
    assert!(!client.delete("item:000").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_is_compacted_and_a_restart_recovers_from_snapshot_and_log() {
    let mut tc = TestCluster::start_with(3, 2, &["--snapshot-logs", "40"]).await;
    let client = tc.client().await;

    phase("write enough for every replica to snapshot and purge its log");
    let acked = put_all(&client, "snap", 400).await;
    let victim = tc.leader_of(&client, 1).await.expect("leader");
    let addr = tc.client_addr(victim);
    let compacted = |status: &strata_proto::v1::StatusResponse| {
        status
            .groups
            .iter()
            .filter(|g| g.group_id != 0)
            .all(|g| g.snapshot_index > 0 && g.purged_index > 0)
    };
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client.node_status(&addr).await.unwrap();
        if compacted(&status) {
            break;
        }
        assert!(
            Instant::now() < until,
            "log never compacted: {:?}",
            status.groups
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    phase("kill and restart the node: it rebuilds from its snapshot and the log kept after it");
    tc.cluster.kill_node(victim).expect("kill");
    client
        .put("while-down", "x")
        .await
        .expect("write while one node is down");
    tc.cluster.start_node(victim).expect("restart");
    tc.wait_caught_up(&client, victim, Duration::from_secs(30))
        .await;
    assert_eq!(
        tc.assert_replica_has(&client, victim, &acked).await,
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_a_compacted_log_catches_up_by_snapshot() {
    let mut tc = TestCluster::start_with(3, 2, &["--snapshot-logs", "40"]).await;
    let client = tc.client().await;

    phase("stop a follower of shard 1");
    let leader = tc.leader_of(&client, 1).await.expect("leader");
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    tc.cluster.kill_node(follower).expect("kill follower");

    phase("write ~6 MiB in 64 KiB values, so each shard's snapshot spans several 1 MiB chunks");
    let mut acked = Vec::new();
    for i in 0..96 {
        let (k, v) = (format!("big:{i}"), format!("{i:07}|").repeat(8 << 10));
        let version = client.put(k.clone(), v.clone()).await.expect("big put");
        acked.push((k, version, v));
    }

    phase("write enough that the leaders snapshot and compact past the follower's log");
    acked.extend(put_all(&client, "snap", 400).await);

    phase("the leader's log no longer holds what the follower misses");
    let leader_addr = tc.client_addr(leader);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let st = client.node_status(&leader_addr).await.unwrap();
        let g1 = st.groups.iter().find(|g| g.group_id == 1).unwrap().clone();
        if g1.purged_index > 10 {
            break;
        }
        assert!(
            Instant::now() < until,
            "leader never compacted its log: {g1:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    phase("restart the follower: it installs a snapshot, then has every write");
    tc.cluster.start_node(follower).expect("restart follower");
    tc.wait_caught_up(&client, follower, Duration::from_secs(30))
        .await;
    let addr = tc.client_addr(follower);
    let status = client.node_status(&addr).await.unwrap();
    let g1 = status.groups.iter().find(|g| g.group_id == 1).unwrap();
    assert!(
        g1.snapshots_installed > 0,
        "the follower installed a snapshot from the leader (not log replay): {g1:?}"
    );
    assert!(g1.snapshot_index > 0, "follower holds a snapshot: {g1:?}");
    assert_eq!(
        tc.assert_replica_has(&client, follower, &acked).await,
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_share_batches_yet_stay_separate_writes() {
    let tc = TestCluster::start(3, 4).await;
    let client = tc.client().await;

    phase("200 concurrent puts from one client over 20 keys, 10 values each");
    let puts = (0..200).map(|i| {
        let client = client.clone();
        async move {
            let (k, v) = (format!("hot:{}", i % 20), format!("v{i}"));
            let version = client.put(k.clone(), v.clone()).await.expect("put");
            (k, version, v)
        }
    });
    let acked: Vec<Acked> = futures::future::join_all(puts).await;
    let mut versions: Vec<u64> = acked.iter().map(|(_, ver, _)| *ver).collect();
    versions.sort_unstable();
    versions.dedup();
    assert!(
        versions.len() < acked.len(),
        "no two puts shared a batch: coalescing did not happen"
    );

    phase("every put has its own version, and each key holds its highest-versioned put");
    let mut by_key: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for (k, version, v) in acked {
        by_key.entry(k).or_default().push((version, v));
    }
    for (k, mut writes) in by_key {
        writes.sort();
        let versions: Vec<u64> = writes.iter().map(|(ver, _)| *ver).collect();
        let mut distinct = versions.clone();
        distinct.dedup();
        assert_eq!(versions, distinct, "{k}: two puts share a version");
        let (last_version, last_value) = writes.last().unwrap();
        let r = client.get(k.clone()).await.unwrap().unwrap();
        assert_eq!(
            (r.version, r.value.as_ref()),
            (*last_version, last_value.as_bytes()),
            "{k}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_a_wiped_data_directory_stops_instead_of_taking_part() {
    let mut tc = TestCluster::start(3, 4).await;
    let client = tc.client().await;

    phase("write, then kill node 2 and wipe its Raft state (a replaced disk)");
    let acked = put_all(&client, "before-wipe", 100).await;
    tc.cluster.kill_node(2).expect("kill");
    let data_dir = tc.cluster.file().nodes[1].data_dir.clone();
    for state in ["db", "snapshots"] {
        let _ = std::fs::remove_dir_all(data_dir.join(state));
    }

    phase("started again with its old flags, it stops itself and says why");
    tc.cluster.start_node(2).expect("restart");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = tc.cluster.exit_status(2) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the wiped node kept running:\n{}",
            tc.cluster.log_tail(2, 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "{status}");
    let log = tc.cluster.log_tail(2, 20);
    assert!(
        log.contains("by another data directory")
            && log.contains("strata node remove --id 2 --force"),
        "{log}"
    );

    phase("the other two keep serving every acknowledged write, and new ones");
    assert_all_readable(&client, &acked).await;
    put_all(&client, "after-wipe", 20).await;
}
