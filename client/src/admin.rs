//! Admin requests. Membership (`strata node add/remove/update`) is served by the meta group's leader;
//! the client finds it by asking the meta replicas and following `NotLeader` hints, within the
//! client's deadline. Leadership transfer goes to the shard's leader; a snapshot request to the
//! replica named.

use std::future::Future;
use std::time::Duration;

use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::{
    AddNodeRequest, RemoveNodeRequest, SnapshotRequest, TransferLeaderRequest, UpdateNodeRequest,
};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::error::{classify, Error, Verdict};
use crate::Client;

/// Pause before another round over the meta replicas.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

impl Client {
    /// Adds the node listening on `client_addr` / `peer_addr`, which was started empty with
    /// `--join`. `id` asks for a specific id (`None`: the next free one). Returns the node's id
    /// and the shard-map epoch that contains it; replicas move to it in the background.
    pub async fn add_node(
        &self,
        client_addr: &str,
        peer_addr: &str,
        id: Option<u64>,
    ) -> Result<(u64, u64), Error> {
        self.send_add(AddNodeRequest {
            id: id.unwrap_or(0),
            client_addr: client_addr.into(),
            peer_addr: peer_addr.into(),
            replaces: 0,
        })
        .await
    }

    /// Adds the node listening on `client_addr` / `peer_addr` (started empty with `--join`) in
    /// place of node `old`, in one change: the new node gets the next free id, and `old` starts
    /// draining as with a forced [`remove_node`](Self::remove_node), its replicas rebuilt on the
    /// other nodes. The new node may use `old`'s addresses if `old` does not answer (a machine
    /// back with a new disk). Allowed with as few nodes as the replication factor, where a
    /// removal is refused. Returns the new node's id and the epoch that contains it.
    pub async fn replace_node(
        &self,
        old: u64,
        client_addr: &str,
        peer_addr: &str,
    ) -> Result<(u64, u64), Error> {
        if old == 0 {
            return Err(Error::InvalidArgument(
                "the node to replace must be given by its id (> 0)".into(),
            ));
        }
        self.send_add(AddNodeRequest {
            id: 0,
            client_addr: client_addr.into(),
            peer_addr: peer_addr.into(),
            replaces: old,
        })
        .await
    }

    async fn send_add(&self, req: AddNodeRequest) -> Result<(u64, u64), Error> {
        let r = self
            .meta_call(|mut c| {
                let req = req.clone();
                async move { c.add_node(req).await }
            })
            .await?;
        let _ = self.refresh_map().await;
        Ok((r.id, r.epoch))
    }

    /// Starts draining node `id`: its replicas and leaderships move away, then it leaves the
    /// cluster. `force` allows it for a node that no longer answers. Returns the epoch that
    /// marks it as draining.
    pub async fn remove_node(&self, id: u64, force: bool) -> Result<u64, Error> {
        let r = self
            .meta_call(|mut c| async move { c.remove_node(RemoveNodeRequest { id, force }).await })
            .await?;
        Ok(r.epoch)
    }

    /// Records new addresses for member `id` (`None`: keep the recorded one); the node must then
    /// be restarted at them, and until it is, it cannot be reached. Returns the epoch that
    /// records them and whether anything changed: asking for the recorded addresses writes
    /// nothing, so a retry is harmless.
    pub async fn update_node(
        &self,
        id: u64,
        client_addr: Option<&str>,
        peer_addr: Option<&str>,
    ) -> Result<(u64, bool), Error> {
        let req = UpdateNodeRequest {
            id,
            client_addr: client_addr.unwrap_or_default().into(),
            peer_addr: peer_addr.unwrap_or_default().into(),
        };
        let r = self
            .meta_call(|mut c| {
                let req = req.clone();
                async move { c.update_node(req).await }
            })
            .await?;
        let _ = self.refresh_map().await;
        Ok((r.epoch, r.changed))
    }

    /// Moves the leadership of `shard` to node `to` (another replica of it).
    pub async fn transfer_leader(&self, shard: u64, to: u64) -> Result<(), Error> {
        let table = self.refresh_map().await?;
        let route = table
            .shard(shard)
            .ok_or_else(|| Error::InvalidArgument(format!("unknown shard {shard}")))?;
        let mut last = String::from("no replica answered");
        let mut kept_refusal = false;
        for node in &route.replicas {
            let Some(addr) = table.nodes.get(node) else {
                continue;
            };
            let mut c = ClusterClient::new(self.channel(addr)?);
            let req = TransferLeaderRequest {
                shard_id: shard,
                to,
            };
            match c.transfer_leader(req).await {
                Ok(_) => return Ok(()),
                Err(s) => match classify(&s, false) {
                    Verdict::Fail(e) => return Err(e),
                    // A refusal (the leader's reason, an unreachable node) says more than the
                    // "not the leader" of the replicas asked after it.
                    Verdict::NotLeader(_) if kept_refusal => {}
                    verdict => {
                        kept_refusal = !matches!(verdict, Verdict::NotLeader(_));
                        last = format!("{addr}: {}", s.message());
                    }
                },
            }
        }
        Err(Error::Unavailable(last))
    }

    /// Makes the replica of `shard` on the node at `addr` snapshot now (and compact its log).
    /// Returns the last index the snapshot covers.
    pub async fn snapshot_replica(&self, addr: &str, shard: u64) -> Result<u64, Error> {
        let mut c = ClusterClient::new(self.channel(addr)?);
        c.snapshot(SnapshotRequest { shard_id: shard })
            .await
            .map(|r| r.into_inner().snapshot_index)
            .map_err(|s| match classify(&s, false) {
                Verdict::Fail(e) => e,
                _ => Error::Unavailable(format!("{addr}: {}", s.message())),
            })
    }

    /// Runs `call` at the meta leader.
    async fn meta_call<T, F, Fut>(&self, mut call: F) -> Result<T, Error>
    where
        F: FnMut(ClusterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.config().deadline;
        let mut last = String::from("no meta replica known");
        loop {
            let table = self.refresh_map().await?;
            let mut queue: Vec<String> = table
                .meta_replicas
                .iter()
                .filter_map(|id| table.nodes.get(id).cloned())
                .collect();
            let mut tried = 0;
            while let Some(addr) = queue.pop() {
                tried += 1;
                let c = ClusterClient::new(self.channel(&addr)?);
                let attempt = tokio::time::timeout(self.config().attempt_timeout, call(c));
                let status = match attempt.await {
                    Ok(Ok(r)) => return Ok(r.into_inner()),
                    Ok(Err(s)) => s,
                    Err(_) => tonic::Status::deadline_exceeded("attempt timed out"),
                };
                last = format!("{addr}: {}", status.message());
                match classify(&status, false) {
                    Verdict::Fail(e) => return Err(e),
                    Verdict::NotLeader(Some(leader)) if tried < 8 => {
                        // The map and the answering node may know different addresses for
                        // the leader (it moved, and one has not heard yet): both are tried.
                        let known = table.nodes.get(&leader.id);
                        queue.extend(known.cloned());
                        if !leader.addr.is_empty() && known != Some(&leader.addr) {
                            queue.push(leader.addr);
                        }
                    }
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "no meta-group leader answered before the deadline; last error: {last}"
                )));
            }
            tokio::time::sleep(ROUND_PAUSE).await;
        }
    }
}
