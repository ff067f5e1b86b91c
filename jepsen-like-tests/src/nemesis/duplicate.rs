//! Duplicated delivery: the network delivers a write twice, with the same request id.

use std::time::Duration;

use strata_client::Client;
use strata_proto::v1::kv_client::KvClient;
use strata_proto::v1::{PutRequest, RequestId};

use super::event;
use crate::history::{Event, Kind, Recorder, F};
use crate::workload::{invoke, write_error_kind};

/// Process ids of the duplicate nemesis' own operations (workers count up from 0).
const DUPLICATE_PROCESS: u64 = 1 << 40;

/// One duplicated delivery: write `A` with request id `R`, overwrite with `B`, deliver `R`
/// again, read. Each step is recorded as an operation of the nemesis' process (the re-delivery as
/// a nemesis event), so the checker sees `A` then `B` acknowledged and judges the read.
pub(super) async fn duplicate(client: &Client, recorder: &Recorder, n: u64) -> anyhow::Result<()> {
    let key = format!("dup:{n}");
    let process = DUPLICATE_PROCESS + n;
    let id = RequestId {
        client_id: rand::random::<u64>() | 1,
        sequence: 1,
        // Nothing is acknowledged yet: the server must keep this request's outcome.
        acked_below: 0,
    };
    let first = format!("d{n}a");
    let mut done = recorder.record(invoke_write(client, process, &key, &first));
    match raw_put(client, &key, &first, id).await {
        Ok(version) => {
            done.kind = Kind::Ok;
            done.version = Some(version);
            recorder.record(done);
        }
        Err(err) => {
            // Unknown outcome: give up on this round (the checker handles the info write).
            done.kind = Kind::Info;
            done.error = Some(err);
            recorder.record(done);
            return Ok(());
        }
    }
    let second = format!("d{n}b");
    let mut done = recorder.record(invoke_write(client, process, &key, &second));
    match client.put(key.clone(), second).await {
        Ok(v) => {
            done.kind = Kind::Ok;
            done.version = Some(v);
        }
        Err(err) => {
            done.kind = write_error_kind(&err);
            done.error = Some(err.to_string());
        }
    }
    let second_ok = done.kind == Kind::Ok;
    recorder.record(done);
    if !second_ok {
        return Ok(());
    }
    recorder.record(event(
        F::Start,
        "duplicate",
        format!("request {}/{} for {key}", id.client_id, id.sequence),
    ));
    let redelivered = raw_put(client, &key, &first, id).await;
    recorder.record(event(
        F::Stop,
        "duplicate",
        format!("answered {redelivered:?}"),
    ));
    let mut done = recorder.record(invoke(client, process + (1 << 20), F::Read, &key));
    match client.get(key).await {
        Ok(r) => {
            done.kind = Kind::Ok;
            done.value = r
                .as_ref()
                .map(|r| String::from_utf8_lossy(&r.value).to_string());
            done.version = r.map(|r| r.version);
        }
        Err(err) => {
            done.kind = Kind::Fail;
            done.error = Some(err.to_string());
        }
    }
    recorder.record(done);
    Ok(())
}

/// The invocation of a write of `value` to `key`.
fn invoke_write(client: &Client, process: u64, key: &str, value: &str) -> Event {
    let mut e = invoke(client, process, F::Write, key);
    e.value = Some(value.to_string());
    e
}

/// A put with an explicit request id, sent to the replicas of the key's shard until the leader
/// takes it.
async fn raw_put(client: &Client, key: &str, value: &str, id: RequestId) -> Result<u64, String> {
    let table = client.refresh_map().await.map_err(|e| e.to_string())?;
    let shard = table.shard_for_key(key.as_bytes()).clone();
    let mut last = String::new();
    for _ in 0..20 {
        for node in &shard.replicas {
            let Some(addr) = table.nodes.get(node) else {
                continue;
            };
            let Ok(mut kv) = KvClient::connect(format!("http://{addr}")).await else {
                continue;
            };
            let req = PutRequest {
                key: key.to_string().into(),
                value: value.to_string().into(),
                request_id: Some(id),
            };
            match kv.put(req).await {
                Ok(r) => return Ok(r.into_inner().version),
                Err(s) => last = s.message().to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}
