//! [`Client`]: connects to any node, caches the shard map and leaders, and runs every operation
//! in a retry loop bounded by a deadline.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::kv_client::KvClient;
use strata_proto::v1::{self as pb, ShardMap, ShardMapRequest, StatusRequest, StatusResponse};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::coalesce::{self, CoalescedBatch, GetCoalescer, PendingGet, PendingPut, PutCoalescer};
use crate::error::{classify, is_reply_full, Error, Verdict};
use crate::route::{LeaderCache, RouteTable, ShardRoute};
use crate::session::{Session, Ticket};

pub use strata_proto::v1::Consistency;

/// A `WrongShard` status for a node missing from the cached map, so the retry loop reloads it.
fn unknown_node(node: u64, epoch: u64) -> tonic::Status {
    use prost::Message;
    let details = pb::ErrorDetails {
        code: "WrongShard".into(),
        retryable: true,
        epoch,
        ..Default::default()
    };
    tonic::Status::with_details(
        tonic::Code::FailedPrecondition,
        format!("node {node} is not in shard map epoch {epoch}"),
        details.encode_to_vec().into(),
    )
}

/// One item's failure from a `MultiBatch` or `MultiGet` answer, as the status its own call would
/// have returned, so that the usual retry rules apply to it.
fn item_failure(f: pb::ItemFailure) -> tonic::Status {
    use prost::Message;
    tonic::Status::with_details(
        tonic::Code::from(f.code),
        f.message,
        f.details.unwrap_or_default().encode_to_vec().into(),
    )
}

fn batch_outcome(r: pb::BatchResult) -> Result<pb::BatchResponse, tonic::Status> {
    match r.result {
        Some(pb::batch_result::Result::Ok(ok)) => Ok(ok),
        Some(pb::batch_result::Result::Failed(f)) => Err(item_failure(f)),
        None => Err(tonic::Status::internal(
            "a MultiBatch result holds no outcome",
        )),
    }
}

fn get_outcome(r: pb::GetResult) -> Result<pb::GetResponse, tonic::Status> {
    match r.result {
        Some(pb::get_result::Result::Ok(ok)) => Ok(ok),
        Some(pb::get_result::Result::Failed(f)) => Err(item_failure(f)),
        None => Err(tonic::Status::internal(
            "a MultiGet result holds no outcome",
        )),
    }
}

/// The per-item outcomes of a multi-item call with `items` items: the answer's, or the call's
/// own failure for every item.
fn per_item<R, T>(
    node: u64,
    items: usize,
    answer: Result<Vec<R>, tonic::Status>,
    outcome: fn(R) -> Result<T, tonic::Status>,
) -> Vec<Result<T, tonic::Status>> {
    match answer {
        Ok(results) if results.len() == items => results.into_iter().map(outcome).collect(),
        Ok(results) => {
            let wrong = tonic::Status::internal(format!(
                "node {node} answered {} results for {items} items",
                results.len()
            ));
            (0..items).map(|_| Err(wrong.clone())).collect()
        }
        Err(status) => (0..items).map(|_| Err(status.clone())).collect(),
    }
}

/// After the first node answers a shard-map request, how long the others get.
const MAP_GRACE: Duration = Duration::from_millis(150);

/// Longest pause between two attempts of one operation.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// A stored value and its version (the log index that last wrote it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The key (filled by scans).
    pub key: Bytes,
    /// The value.
    pub value: Bytes,
    /// Version: the log index of the write that produced this value.
    pub version: u64,
}

/// One page of a scan: records in key order, and whether the range holds keys past them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// The records, in key order.
    pub records: Vec<Record>,
    /// Keys past the last record remain in the range: [`ScanPage::next_start`] gives the `start`
    /// of the next page.
    pub more: bool,
}

impl ScanPage {
    /// Where the next page of the same range starts (just after this page's last key), or `None`
    /// when this page ends the range.
    pub fn next_start(&self) -> Option<Bytes> {
        let last = self.records.last().filter(|_| self.more)?;
        Some([last.key.as_ref(), &[0]].concat().into())
    }
}

/// The result of a compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOutcome {
    /// Whether the comparison held and the write applied.
    pub succeeded: bool,
    /// On success the new version (0 after a delete); on mismatch the current one (0 = absent).
    pub version: u64,
    /// On mismatch, the current value.
    pub current_value: Option<Bytes>,
}

/// One operation of an atomic batch.
#[derive(Debug, Clone)]
pub enum BatchOp {
    /// Set a key.
    Put(Bytes, Bytes),
    /// Remove a key.
    Delete(Bytes),
}

impl From<BatchOp> for pb::BatchOp {
    fn from(op: BatchOp) -> pb::BatchOp {
        match op {
            BatchOp::Put(key, value) => pb::BatchOp {
                key,
                value,
                delete: false,
            },
            BatchOp::Delete(key) => pb::BatchOp {
                key,
                value: Bytes::new(),
                delete: true,
            },
        }
    }
}

/// What a scan covers.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Only keys with this prefix.
    pub prefix: Bytes,
    /// Inclusive lower bound (empty: none).
    pub start: Bytes,
    /// Exclusive upper bound (empty: none).
    pub end: Bytes,
    /// Most records returned (0: the server default, 1000). A node answers at most 10 000 per
    /// shard; a larger limit gives a page that ends early, with [`ScanPage::more`] set.
    pub limit: u32,
    /// Read consistency.
    pub consistency: Consistency,
}

/// Builds a [`Client`] with custom timeouts.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    pub(crate) attempt_timeout: Duration,
    pub(crate) deadline: Duration,
    connect_timeout: Duration,
    coalesce_puts: bool,
    coalesce_gets: bool,
}

impl ClientBuilder {
    /// A builder for the cluster reachable at `endpoints` (`host:port`, any node).
    pub fn new<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            attempt_timeout: Duration::from_secs(3),
            deadline: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(1),
            coalesce_puts: true,
            coalesce_gets: true,
        }
    }

    /// Whether concurrent puts may share requests: one atomic batch per shard, one call per node
    /// (default: yes).
    pub fn coalesce_puts(mut self, on: bool) -> Self {
        self.coalesce_puts = on;
        self
    }

    /// Whether concurrent gets to one node may share one `MultiGet` call (default: yes).
    pub fn coalesce_gets(mut self, on: bool) -> Self {
        self.coalesce_gets = on;
        self
    }

    /// How long one attempt may take before it is abandoned and retried.
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = d;
        self
    }

    /// How long an operation may take, retries included.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    /// TCP connect timeout.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Connects: loads the shard map from the first endpoint that answers. An endpoint that is
    /// not `host:port` (a missing or non-numeric port, a scheme such as `http://`) is an
    /// [`Error::InvalidArgument`] naming it, before anything is sent.
    pub async fn connect(self) -> Result<Client, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::InvalidArgument("no endpoints given".into()));
        }
        for e in &self.endpoints {
            check_endpoint(e)?;
        }
        let client = Client {
            inner: Arc::new(Inner {
                config: self,
                session: Arc::new(Session::new()),
                puts: PutCoalescer::default(),
                gets: GetCoalescer::default(),
                channels: Mutex::new(HashMap::new()),
                table: RwLock::new(None),
                leaders: Mutex::new(LeaderCache::default()),
            }),
        };
        client.refresh_map().await?;
        Ok(client)
    }
}

/// An endpoint is `host:port` (`[::1]:7101` for IPv6), without a scheme: checked up front so a
/// typo is named as such instead of surfacing later as a DNS or connection error.
fn check_endpoint(endpoint: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "bad endpoint {endpoint:?}: {why}"
        )))
    };
    if endpoint.trim().is_empty() {
        return Err(Error::InvalidArgument("empty endpoint".into()));
    }
    if endpoint.contains("://") {
        return bad("give host:port, without a scheme");
    }
    match endpoint.rsplit_once(':') {
        None => bad("missing :port"),
        Some(("", _)) => bad("missing host"),
        Some((_, port)) => match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok(()),
            _ => bad("the port must be a number from 1 to 65535"),
        },
    }
}

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

/// Where an operation goes.
#[derive(Clone, Copy)]
enum Target<'a> {
    Key(&'a [u8]),
    Shard(u64),
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

    /// Runs `call` against the right node for `target`, retrying per the error table until the
    /// deadline. `is_write` makes transport failures count as "may have applied".
    async fn run<T, F, Fut>(&self, target: Target<'_>, is_write: bool, call: F) -> Result<T, Error>
    where
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.run_from(target, is_write, None, call).await
    }

    /// [`run`](Self::run), when the first attempt already happened elsewhere (a batch of a
    /// `MultiBatch` call): `first` is the node it went to and its outcome.
    async fn run_from<T, F, Fut>(
        &self,
        target: Target<'_>,
        is_write: bool,
        mut first: Option<(u64, Result<T, tonic::Status>)>,
        mut call: F,
    ) -> Result<T, Error>
    where
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.inner.config.deadline;
        let mut may_have_applied = false;
        let mut backoff = Duration::from_millis(10);
        let mut attempt = 0usize;
        let mut last;
        loop {
            let table = match self.table() {
                Some(t) => t,
                None => self.refresh_map().await?,
            };
            let shard = match target {
                Target::Key(k) => table.shard_for_key(k).clone(),
                Target::Shard(id) => table
                    .shard(id)
                    .cloned()
                    .ok_or_else(|| Error::InvalidArgument(format!("unknown shard {id}")))?,
            };
            let (node, outcome) = match first.take() {
                Some(done) => done,
                None => {
                    let node = self.inner.leaders.lock().expect("leaders poisoned").pick(
                        shard.id,
                        &shard.replicas,
                        attempt,
                    );
                    (node, self.attempt(&table, node, &mut call).await)
                }
            };
            attempt += 1;
            let status = match outcome {
                Ok(v) => {
                    let mut leaders = self.inner.leaders.lock().expect("leaders poisoned");
                    leaders.answered(node);
                    leaders.set(shard.id, node);
                    return Ok(v);
                }
                Err(status) => status,
            };
            let mut wait = true;
            match classify(&status, is_write) {
                Verdict::Fail(e) => {
                    return Err(match e {
                        // A final error after an earlier attempt may have applied is unknown.
                        Error::InvalidArgument(_) => e,
                        e if may_have_applied => Error::OutcomeUnknown(e.to_string()),
                        e => e,
                    });
                }
                Verdict::NotLeader(hint) => {
                    let mut leaders = self.inner.leaders.lock().expect("leaders poisoned");
                    wait = !leaders.follow_hint(shard.id, node, hint);
                    last = status.message().to_string();
                }
                Verdict::WrongShard => {
                    self.inner
                        .leaders
                        .lock()
                        .expect("leaders poisoned")
                        .forget(shard.id);
                    let _ = self.refresh_map().await;
                    last = status.message().to_string();
                }
                Verdict::Retry {
                    may_have_applied: m,
                    node_failed,
                    reason,
                } => {
                    may_have_applied |= m;
                    {
                        let mut leaders = self.inner.leaders.lock().expect("leaders poisoned");
                        leaders.forget(shard.id);
                        if node_failed {
                            leaders.suspect(node);
                            // Another replica can be tried at once.
                            wait = attempt.is_multiple_of(shard.replicas.len());
                        }
                    }
                    if wait && node_failed {
                        // Every replica failed: the shard's replicas may have moved.
                        let _ = self.refresh_map().await;
                    }
                    last = reason;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let msg = format!("deadline exceeded after {attempt} attempts; last error: {last}");
                return Err(if may_have_applied {
                    Error::OutcomeUnknown(msg)
                } else {
                    Error::Unavailable(msg)
                });
            }
            if wait {
                let jitter =
                    Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 + 1));
                tokio::time::sleep((backoff + jitter).min(deadline - now)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// One attempt: `call` against `node`, bounded by the attempt timeout.
    async fn attempt<T, F, Fut>(
        &self,
        table: &RouteTable,
        node: u64,
        call: F,
    ) -> Result<T, tonic::Status>
    where
        F: FnOnce(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let Some(addr) = table.nodes.get(&node) else {
            // The node (a leader hint) joined after this map was loaded: reload it.
            return Err(unknown_node(node, table.epoch));
        };
        let ch = self
            .channel(addr)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        match tokio::time::timeout(self.inner.config.attempt_timeout, call(KvClient::new(ch))).await
        {
            Ok(r) => r.map(|r| r.into_inner()),
            Err(_) => Err(tonic::Status::deadline_exceeded("attempt timed out")),
        }
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

    /// The sender of coalesced gets to `node`: sends `MultiGet` waves, one at a time, until none
    /// waits. A read whose first attempt failed is retried in a task of its own.
    async fn send_get_waves(&self, node: u64) {
        while let Some(wave) = self.inner.gets.next_wave(node) {
            let req = pb::MultiGetRequest {
                gets: wave.iter().map(|g| g.req.clone()).collect(),
            };
            let answer = self
                .attempt_on(node, |mut c| async move { c.multi_get(req).await })
                .await
                .map(|r| r.results);
            let outcomes = per_item(node, wave.len(), answer, get_outcome);
            if outcomes.iter().any(Result::is_ok) {
                self.inner
                    .leaders
                    .lock()
                    .expect("leaders poisoned")
                    .answered(node);
            }
            for (get, first) in wave.into_iter().zip(outcomes) {
                match first {
                    Ok(r) => {
                        let _ = get.reply.send(Ok(r));
                    }
                    Err(status) => {
                        let client = self.clone();
                        tokio::spawn(async move {
                            // A read the answer had no room for was not served: it goes alone.
                            let first = (!is_reply_full(&status)).then_some((node, Err(status)));
                            let _ = get.reply.send(client.get_once(get.req, first).await);
                        });
                    }
                }
            }
            coalesce::let_answered_callers_resubmit().await;
        }
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

    /// The sender of coalesced puts to `node`: sends waves, one at a time, until none waits. A
    /// batch whose first attempt failed is retried in a task of its own, so one shard's trouble
    /// does not hold up the node's next wave.
    async fn send_put_waves(&self, node: u64) {
        while let Some(wave) = self.inner.puts.next_wave(node) {
            let batches: Vec<CoalescedBatch> = wave
                .into_iter()
                .map(|(_, puts)| CoalescedBatch::new(puts, self.inner.session.begin()))
                .collect();
            let outcomes = self.multi_batch(node, &batches).await;
            for (batch, first) in batches.into_iter().zip(outcomes) {
                if first.is_ok() {
                    self.finish_batch(batch, node, first).await;
                } else {
                    let client = self.clone();
                    tokio::spawn(async move { client.finish_batch(batch, node, first).await });
                }
            }
            coalesce::let_answered_callers_resubmit().await;
        }
    }

    /// Sends `batches` to `node` in one `MultiBatch` call: one outcome per batch, each the
    /// status its own `Batch` call would have had (the call's own failure for all of them).
    async fn multi_batch(
        &self,
        node: u64,
        batches: &[CoalescedBatch],
    ) -> Vec<Result<pb::BatchResponse, tonic::Status>> {
        let req = pb::MultiBatchRequest {
            batches: batches.iter().map(CoalescedBatch::request).collect(),
        };
        let answer = self
            .attempt_on(node, |mut c| async move { c.multi_batch(req).await })
            .await
            .map(|r| r.results);
        per_item(node, batches.len(), answer, batch_outcome)
    }

    /// The node a coalesced request for `shard` goes to: its cached leader, else a replica.
    fn first_node(&self, shard: &ShardRoute) -> u64 {
        self.inner
            .leaders
            .lock()
            .expect("leaders poisoned")
            .pick(shard.id, &shard.replicas, 0)
    }

    /// One attempt against `node` with the cached map (loading it first if there is none).
    async fn attempt_on<T, F, Fut>(&self, node: u64, call: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let table = match self.table() {
            Some(t) => t,
            None => self
                .refresh_map()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?,
        };
        self.attempt(&table, node, call).await
    }

    /// Completes a coalesced batch from its first outcome: retries it (same request id) if that
    /// failed, then answers its puts.
    async fn finish_batch(
        &self,
        batch: CoalescedBatch,
        node: u64,
        first: Result<pb::BatchResponse, tonic::Status>,
    ) {
        let result = self
            .send_batch(&batch.ops, &batch.ticket, Some((node, first)))
            .await;
        match result {
            Ok(version) => {
                for p in batch.puts {
                    let _ = p.reply.send(Ok(version));
                }
            }
            // Nothing was applied: send each put alone so only a bad one fails.
            Err(Error::InvalidArgument(_)) => {
                for p in batch.puts {
                    let _ = p.reply.send(self.put_one(p.key, p.value).await);
                }
            }
            Err(e) => {
                for p in batch.puts {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
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

    /// Scans every shard and merges the results in key order: the first page of at most
    /// `opts.limit` records of the range, and whether more follow.
    pub async fn scan(&self, opts: ScanOptions) -> Result<ScanPage, Error> {
        let table = match self.table() {
            Some(t) => t,
            None => self.refresh_map().await?,
        };
        let scans = table.shards.iter().map(|s| self.scan_shard(s.id, &opts));
        let mut pages = Vec::new();
        for r in futures::future::join_all(scans).await {
            pages.push(r?);
        }
        let limit = if opts.limit == 0 {
            1000
        } else {
            opts.limit as usize
        };
        Ok(merge_pages(pages, limit))
    }

    /// Scans one shard: its first page of the range.
    pub async fn scan_shard(&self, shard: u64, opts: &ScanOptions) -> Result<ScanPage, Error> {
        let req = pb::ScanRequest {
            shard_id: shard,
            start: opts.start.clone(),
            end: opts.end.clone(),
            prefix: opts.prefix.clone(),
            limit: opts.limit,
            consistency: opts.consistency as i32,
        };
        let r = self
            .run(Target::Shard(shard), false, |mut c| {
                let req = req.clone();
                async move { c.scan(req).await }
            })
            .await?;
        let records = r
            .items
            .into_iter()
            .map(|kv| Record {
                key: kv.key,
                value: kv.value,
                version: kv.version,
            })
            .collect();
        Ok(ScanPage {
            records,
            more: r.more,
        })
    }
}

/// Merges the shards' pages into one page of at most `limit` records in key order. A shard
/// whose page ended early has not shown its keys past its last record, so the merged page stops
/// at the smallest such key: keeping another shard's later keys would leave a silent gap.
fn merge_pages(pages: Vec<ScanPage>, limit: usize) -> ScanPage {
    let cut = pages
        .iter()
        .filter(|p| p.more)
        .filter_map(|p| p.records.last())
        .map(|r| r.key.clone())
        .min();
    let mut more = pages.iter().any(|p| p.more);
    let mut records: Vec<Record> = pages
        .into_iter()
        .flat_map(|p| p.records)
        .filter(|r| cut.as_ref().is_none_or(|c| r.key <= *c))
        .collect();
    records.sort_by(|a, b| a.key.cmp(&b.key));
    if records.len() > limit {
        records.truncate(limit);
        more = true;
    }
    ScanPage { records, more }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{check_endpoint, merge_pages, Record, ScanPage};

    fn page(keys: &[&str], more: bool) -> ScanPage {
        let records = keys
            .iter()
            .map(|k| Record {
                key: Bytes::copy_from_slice(k.as_bytes()),
                value: Bytes::new(),
                version: 1,
            })
            .collect();
        ScanPage { records, more }
    }

    fn keys(p: &ScanPage) -> Vec<&[u8]> {
        p.records.iter().map(|r| r.key.as_ref()).collect()
    }

    #[test]
    fn a_merged_scan_stops_where_a_shard_stopped_early() {
        // Shard 1 was capped after "c": its "d" may exist, so "e" and "f" must not be returned.
        let m = merge_pages(
            vec![page(&["a", "c"], true), page(&["b", "e", "f"], false)],
            10,
        );
        assert_eq!(keys(&m), [b"a", b"b", b"c"]);
        assert!(m.more);
        assert_eq!(m.next_start().as_deref(), Some(&b"c\0"[..]));
        // No shard stopped early and everything fits: the whole range, nothing more.
        let m = merge_pages(vec![page(&["a", "c"], false), page(&["b"], false)], 10);
        assert_eq!(keys(&m), [b"a", b"b", b"c"]);
        assert!(!m.more);
        assert_eq!(m.next_start(), None);
        // The limit cuts the merged range: more follow.
        let m = merge_pages(vec![page(&["a", "c"], false), page(&["b"], false)], 2);
        assert_eq!(keys(&m), [b"a", b"b"]);
        assert!(m.more);
    }

    #[test]
    fn endpoints_are_host_and_port() {
        for good in [
            "127.0.0.1:7101",
            "localhost:1",
            "[::1]:7101",
            "node-1.internal:65535",
        ] {
            assert!(check_endpoint(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty endpoint"),
            ("  ", "empty endpoint"),
            ("127.0.0.1", "missing :port"),
            (":7101", "missing host"),
            ("host:port", "number from 1 to 65535"),
            ("host:0", "number from 1 to 65535"),
            ("host:70000", "number from 1 to 65535"),
            ("http://127.0.0.1:7101", "without a scheme"),
        ] {
            let e = check_endpoint(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
