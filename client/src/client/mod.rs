//! [`Client`]: connects to any node, caches the shard map and leaders, and runs every operation
//! in a retry loop bounded by a deadline.
//!
//! Its parts: this module holds the client's shared state, the shard map and the key operations;
//! `builder` checks the settings and connects; `retry` is the loop every operation runs in;
//! `multi` sends coalesced puts and gets, one call per node; `scan` scans every shard and merges.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::{self as pb, ShardMap, ShardMapRequest, StatusRequest, StatusResponse};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::coalesce::{GetCoalescer, PendingGet, PendingPut, PutCoalescer};
use crate::error::Error;
use crate::route::{LeaderCache, RouteTable};
use crate::session::{Session, Ticket};
use retry::Target;

mod builder;
mod multi;
mod retry;
mod scan;

pub use builder::ClientBuilder;
pub use strata_proto::v1::Consistency;

pub use crate::types::{BatchOp, CasOutcome, Record, ScanOptions, ScanPage};

/// After the first node answers a shard-map request, how long the others get.
const MAP_GRACE: Duration = Duration::from_millis(150);

/// The Strata client. Cheap to clone; clones share caches and the write session.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientBuilder,
    session: Arc<Session>,
    /// Puts waiting to be sent together, per node and shard.
    puts: PutCoalescer,
    /// Gets waiting to be sent together, per node.
    gets: GetCoalescer,
    /// One channel per node address. `std` locks: never held across an await.
    channels: Mutex<HashMap<String, Channel>>,
    table: RwLock<Option<Arc<RouteTable>>>,
    leaders: Mutex<LeaderCache>,
}

impl Client {
    /// Connects with default timeouts (3 s per attempt, 15 s per operation).
    pub async fn connect<I, S>(endpoints: I) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder::new(endpoints).connect().await
    }

    /// This client's id in request ids.
    pub fn client_id(&self) -> u64 {
        self.inner.session.client_id()
    }

    /// The builder settings this client runs with.
    pub(crate) fn config(&self) -> &ClientBuilder {
        &self.inner.config
    }

    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, Error> {
        let mut channels = self.inner.channels.lock().expect("channels poisoned");
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::InvalidArgument(format!("bad endpoint {addr:?}: {e}")))?
            .connect_timeout(self.inner.config.connect_timeout)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Reloads the shard map from the first node that answers.
    pub async fn refresh_map(&self) -> Result<Arc<RouteTable>, Error> {
        let table = Arc::new(RouteTable::from_map(self.shard_map().await?).map_err(Error::Server)?);
        if let Some(current) = self.table().filter(|t| t.epoch > table.epoch) {
            return Ok(current);
        }
        let mut leaders = self.inner.leaders.lock().expect("leaders poisoned");
        for s in &table.shards {
            if s.leader != 0 && leaders.get(s.id).is_none() {
                leaders.set(s.id, s.leader);
            }
        }
        *self.inner.table.write().expect("table poisoned") = Some(table.clone());
        Ok(table)
    }

    /// The newest shard map the nodes report (with the answering node's view of the leaders).
    /// Every endpoint and known node is asked at once; once one has answered, the others get a
    /// short grace period, and the highest epoch wins — a node that missed recent changes (or
    /// was removed while cut off) must not pin the client to its old map.
    pub async fn shard_map(&self) -> Result<ShardMap, Error> {
        use futures::stream::{FuturesUnordered, StreamExt};
        let mut addrs: Vec<String> = self.inner.config.endpoints.clone();
        if let Some(t) = self.table() {
            addrs.extend(t.nodes.values().cloned());
        }
        addrs.sort();
        addrs.dedup();
        let mut pending: FuturesUnordered<_> = addrs
            .iter()
            .map(|addr| async move { (addr, self.fetch_map(addr).await) })
            .collect();
        let mut last = String::from("no endpoint tried");
        let mut best: Option<ShardMap> = None;
        let mut grace_until: Option<Instant> = None;
        loop {
            let next = match grace_until {
                Some(until) => match tokio::time::timeout_at(until, pending.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
                None => pending.next().await,
            };
            let Some((addr, result)) = next else { break };
            match result {
                Ok(map) => {
                    if best.as_ref().is_none_or(|b| b.epoch < map.epoch) {
                        best = Some(map);
                    }
                    grace_until.get_or_insert(Instant::now() + MAP_GRACE);
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        best.ok_or(Error::Connect(last))
    }

    async fn fetch_map(&self, addr: &str) -> Result<ShardMap, Error> {
        let mut c = ClusterClient::new(self.channel(addr)?);
        let mut req = tonic::Request::new(ShardMapRequest {});
        req.set_timeout(self.inner.config.attempt_timeout);
        c.get_shard_map(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| Error::Unavailable(s.message().to_string()))
    }

    fn table(&self) -> Option<Arc<RouteTable>> {
        self.inner.table.read().expect("table poisoned").clone()
    }

    /// The cached shard map.
    pub fn route_table(&self) -> Option<Arc<RouteTable>> {
        self.table()
    }

    /// The status of the node at `addr` (its groups and the map it routes with).
    pub async fn node_status(&self, addr: &str) -> Result<StatusResponse, Error> {
        let mut c = ClusterClient::new(self.channel(addr)?);
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(self.inner.config.attempt_timeout);
        c.status(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| Error::Unavailable(format!("{addr}: {}", s.message())))
    }

    /// Reads `key` linearizably.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Record>, Error> {
        self.get_with(key, Consistency::Linearizable).await
    }

    /// Reads `key` at the given consistency. Concurrent gets of this client to one node may
    /// travel together in one `MultiGet` call (see the `coalesce` module); each is still served
    /// as a separate read.
    pub async fn get_with(
        &self,
        key: impl Into<Bytes>,
        consistency: Consistency,
    ) -> Result<Option<Record>, Error> {
        let key: Bytes = key.into();
        let req = pb::GetRequest {
            key: key.clone(),
            consistency: consistency as i32,
        };
        let r = match self.table().filter(|_| self.inner.config.coalesce_gets) {
            Some(table) => {
                let node = self.first_node(table.shard_for_key(&key));
                let (reply, result) = oneshot::channel();
                if self.inner.gets.enqueue(node, PendingGet { req, reply }) {
                    let client = self.clone();
                    tokio::spawn(async move { client.send_get_waves(node).await });
                }
                result
                    .await
                    .unwrap_or_else(|_| Err(Error::Server("get sender stopped".into())))?
            }
            None => self.get_once(req, None).await?,
        };
        Ok(r.found.then(|| Record {
            key,
            value: r.value,
            version: r.version,
        }))
    }

    /// The read `req` through the retry loop, optionally after a first attempt made elsewhere.
    async fn get_once(
        &self,
        req: pb::GetRequest,
        first: Option<(u64, Result<pb::GetResponse, tonic::Status>)>,
    ) -> Result<pb::GetResponse, Error> {
        let key = req.key.clone();
        self.run_from(Target::Key(&key), false, first, |mut c| {
            let req = req.clone();
            async move { c.get(req).await }
        })
        .await
    }

    /// Sets `key` to `value`; returns the new version. Concurrent puts of this client may travel
    /// together: one atomic batch per shard, the batches for one node in one call (see the
    /// `coalesce` module); each still behaves as a separate put.
    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<u64, Error> {
        let key: Bytes = key.into();
        let value: Bytes = value.into();
        let Some(table) = self.table().filter(|_| self.inner.config.coalesce_puts) else {
            return self.put_one(key, value).await;
        };
        let shard = table.shard_for_key(&key);
        let node = self.first_node(shard);
        let (reply, result) = oneshot::channel();
        if self
            .inner
            .puts
            .enqueue(node, shard.id, PendingPut { key, value, reply })
        {
            let client = self.clone();
            tokio::spawn(async move { client.send_put_waves(node).await });
        }
        result
            .await
            .unwrap_or_else(|_| Err(Error::Server("put sender stopped".into())))
    }

    /// One put in its own request.
    async fn put_one(&self, key: Bytes, value: Bytes) -> Result<u64, Error> {
        let ticket = self.inner.session.begin();
        let r = self
            .run(Target::Key(&key), true, |mut c| {
                let req = pb::PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    request_id: Some(ticket.request_id()),
                };
                async move { c.put(req).await }
            })
            .await?;
        Ok(r.version)
    }

    /// Removes `key`; returns whether it existed.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool, Error> {
        let key: Bytes = key.into();
        let ticket = self.inner.session.begin();
        let r = self
            .run(Target::Key(&key), true, |mut c| {
                let req = pb::DeleteRequest {
                    key: key.clone(),
                    request_id: Some(ticket.request_id()),
                };
                async move { c.delete(req).await }
            })
            .await?;
        Ok(r.existed)
    }

    /// If `key` has version `expected_version` (0 = absent), sets it to `new_value`, or deletes it
    /// when `new_value` is `None`.
    pub async fn cas(
        &self,
        key: impl Into<Bytes>,
        expected_version: u64,
        new_value: Option<Bytes>,
    ) -> Result<CasOutcome, Error> {
        let key: Bytes = key.into();
        let ticket = self.inner.session.begin();
        let r = self
            .run(Target::Key(&key), true, |mut c| {
                let req = pb::CasRequest {
                    key: key.clone(),
                    expected_version,
                    delete: new_value.is_none(),
                    new_value: new_value.clone().unwrap_or_default(),
                    request_id: Some(ticket.request_id()),
                };
                async move { c.cas(req).await }
            })
            .await?;
        Ok(CasOutcome {
            succeeded: r.succeeded,
            version: r.version,
            current_value: (!r.succeeded && r.version != 0).then_some(r.current_value),
        })
    }

    /// Applies `ops` atomically; all keys must be in one shard (use a common hash tag).
    /// Returns the batch's version.
    pub async fn batch(&self, ops: Vec<BatchOp>) -> Result<u64, Error> {
        if ops.is_empty() {
            return Err(Error::InvalidArgument("batch is empty".into()));
        }
        let wire: Vec<pb::BatchOp> = ops.into_iter().map(pb::BatchOp::from).collect();
        let ticket = self.inner.session.begin();
        self.send_batch(&wire, &ticket, None).await
    }

    /// Runs the batch `ops` under `ticket`'s request id (the retry loop of [`batch`](Self::batch),
    /// optionally after a first attempt made elsewhere). Returns the batch's version.
    async fn send_batch(
        &self,
        ops: &[pb::BatchOp],
        ticket: &Ticket,
        first: Option<(u64, Result<pb::BatchResponse, tonic::Status>)>,
    ) -> Result<u64, Error> {
        let Some(key) = ops.first().map(|op| op.key.clone()) else {
            return Err(Error::InvalidArgument("batch is empty".into()));
        };
        let r = self
            .run_from(Target::Key(&key), true, first, |mut c| {
                let req = pb::BatchRequest {
                    ops: ops.to_vec(),
                    request_id: Some(ticket.request_id()),
                };
                async move { c.batch(req).await }
            })
            .await?;
        Ok(r.version)
    }
}
