//! The peer pool: one lazily-connected tonic channel per peer node, shared by every Raft group
//! (openraft-multi's `GroupRouter`). Each RPC names its group; openraft's messages travel as
//! bincode payloads, and the reply is the bincode of `Result<Response, String>`. AppendEntries of
//! all groups share one stream per peer ([`super::peer_link`]); votes, leader transfers and
//! snapshots are calls of their own.
//!
//! Outgoing connections bind to the node's peer IP, so that with one loopback address per node a
//! partition is a plain firewall rule between two addresses.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft_multi::{GroupNetworkFactory, GroupRouter};
use serde::de::DeserializeOwned;
use serde::Serialize;
use strata_proto::v1::raft_client::RaftClient;
use strata_proto::v1::{PeerHello, RaftRequest, SnapshotChunk};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::append_stream::{CoalescingSession, COMMIT_LINGER};
use super::codec::{decode, encode};
use super::identity::{PeerIdentity, Stamp};
use super::peer_link::PeerLink;
use super::snapshot_pace::SnapshotPace;
use super::TypeConfig;
use crate::layout::{GroupId, NodeSpec};
use crate::storage::snapshot::SnapshotData;

/// Snapshot data travels in chunks of this size.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// A client of one peer's `Raft` service whose requests carry this node's identity (see
/// [`crate::raft::identity`]).
pub type PeerClient = RaftClient<InterceptedService<Channel, Stamp>>;

/// Connections to every peer node, shared by all groups. Cheap to clone.
#[derive(Clone)]
pub struct PeerPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    /// Peer address of every known node.
    addrs: RwLock<HashMap<u64, String>>,
    /// One client per peer, created on first use; tonic reconnects it as needed.
    clients: Mutex<HashMap<u64, PeerClient>>,
    /// One AppendEntries stream per peer, over that peer's client, created on first use.
    links: Mutex<HashMap<u64, PeerLink>>,
    /// Local IP outgoing connections bind to (`None`: any).
    bind_ip: Option<IpAddr>,
    /// gRPC message size limit.
    max_message: usize,
    /// The budget of outgoing snapshot bytes, shared by every snapshot this node sends.
    snapshot_pace: SnapshotPace,
    /// How long an AppendEntries waits for its answer (see [`PeerPool::new`]).
    append_timeout: Duration,
    /// This node's identity, stamped on every request, and the peers' identities.
    identity: Arc<PeerIdentity>,
}

/// Which peer RPC to call.
#[derive(Clone, Copy, Debug)]
enum Rpc {
    Vote,
    PreVote,
    TransferLeader,
}

impl PeerPool {
    /// A pool knowing `nodes`; connections bind to `bind_ip` when given; snapshots are sent at
    /// most at `snapshot_bytes_per_sec` in all (0: unlimited).
    ///
    /// An AppendEntries waits up to `append_timeout` for its answer — at least as long as
    /// openraft asks. openraft asks for one heartbeat interval, so a round trip plus the
    /// follower's fsync longer than that (a slow link, a disk stalling for 100 ms) failed every
    /// append, and replication stopped until the delay went away. An answer is worth waiting for
    /// as long as the follower would wait for the leader: the minimum election timeout, which is
    /// also what openraft gives a vote request.
    pub fn new(
        identity: Arc<PeerIdentity>,
        nodes: &[NodeSpec],
        bind_ip: Option<IpAddr>,
        max_message: usize,
        snapshot_bytes_per_sec: u64,
        append_timeout: Duration,
    ) -> PeerPool {
        let addrs = nodes.iter().map(|n| (n.id, n.peer_addr.clone())).collect();
        PeerPool {
            inner: Arc::new(PoolInner {
                addrs: RwLock::new(addrs),
                clients: Mutex::new(HashMap::new()),
                links: Mutex::new(HashMap::new()),
                bind_ip,
                max_message,
                snapshot_pace: SnapshotPace::new(snapshot_bytes_per_sec),
                append_timeout,
                identity,
            }),
        }
    }

    /// Learns the addresses of `nodes` not known yet (ids are never reused). For addresses
    /// from a source that may be stale, such as a placement driver's request.
    pub fn learn_nodes(&self, nodes: &[NodeSpec]) {
        let mut addrs = self.inner.addrs.write().expect("addrs poisoned");
        for n in nodes {
            addrs.entry(n.id).or_insert_with(|| n.peer_addr.clone());
        }
    }

    /// Takes the peer addresses of `nodes` from a layout newer than any before: new nodes join
    /// the pool, and a node whose address changed (`strata node update`) is dialled there from
    /// now on — its connection and stream to the old address are dropped.
    pub fn adopt_nodes(&self, nodes: &[NodeSpec]) {
        let mut moved = Vec::new();
        {
            let mut addrs = self.inner.addrs.write().expect("addrs poisoned");
            for n in nodes {
                if let Some(old) = addrs.insert(n.id, n.peer_addr.clone()) {
                    if old != n.peer_addr {
                        moved.push((n.id, old));
                    }
                }
            }
        }
        // Apart from the address lock: `client` takes the client lock, then the address lock.
        for (id, old) in moved {
            self.inner
                .clients
                .lock()
                .expect("clients poisoned")
                .remove(&id);
            self.inner.links.lock().expect("links poisoned").remove(&id);
            tracing::info!(node = id, from = %old, "peer address changed");
        }
    }

    /// This node's identity and the peers'.
    pub fn identity(&self) -> &Arc<PeerIdentity> {
        &self.inner.identity
    }

    fn client(&self, target: u64) -> Result<PeerClient, Unreachable<TypeConfig>> {
        let mut clients = self.inner.clients.lock().expect("clients poisoned");
        if let Some(c) = clients.get(&target) {
            return Ok(c.clone());
        }
        let addr = self
            .inner
            .addrs
            .read()
            .expect("addrs poisoned")
            .get(&target)
            .cloned()
            .ok_or_else(|| {
                Unreachable::from_string(format!("node {target} has no known address"))
            })?;
        let client = self
            .new_client(&addr, Some(target))
            .map_err(|e| Unreachable::from_string(e.to_string()))?;
        clients.insert(target, client.clone());
        if !self.inner.identity.knows(target) {
            tokio::spawn(introduce(
                self.inner.identity.clone(),
                target,
                client.clone(),
            ));
        }
        Ok(client)
    }

    /// A new client for the peer service at `addr` (not pooled: for probing a node that is not
    /// part of the cluster yet).
    pub fn client_at(&self, addr: &str) -> Result<PeerClient, tonic::transport::Error> {
        self.new_client(addr, None)
    }

    /// A client for node `id`'s (`None`: an unknown node's) peer service at `addr`.
    fn new_client(
        &self,
        addr: &str,
        id: Option<u64>,
    ) -> Result<PeerClient, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .local_address(self.inner.bind_ip);
        let stamp = self.inner.identity.stamp(id);
        Ok(RaftClient::with_interceptor(endpoint.connect_lazy(), stamp)
            .max_decoding_message_size(self.inner.max_message)
            .max_encoding_message_size(self.inner.max_message))
    }

    /// The AppendEntries stream to node `target`.
    fn link(&self, target: u64) -> Result<PeerLink, Unreachable<TypeConfig>> {
        let mut links = self.inner.links.lock().expect("links poisoned");
        if let Some(link) = links.get(&target) {
            return Ok(link.clone());
        }
        let link = PeerLink::spawn(target, self.client(target)?);
        links.insert(target, link.clone());
        Ok(link)
    }

    /// Whether the AppendEntries stream to node `target` is broken right now (false when there
    /// is none yet).
    pub fn peer_down(&self, target: u64) -> bool {
        let links = self.inner.links.lock().expect("links poisoned");
        links.get(&target).is_some_and(PeerLink::is_down)
    }

    /// How long an AppendEntries asked with `option` waits for its answer.
    fn append_timeout(&self, option: &RPCOption) -> Duration {
        if crate::planted::active(crate::planted::Bug::ShortAppendTimeout) {
            return option.hard_ttl();
        }
        option.hard_ttl().max(self.inner.append_timeout)
    }

    /// The pooled client of node `target`, for the placement driver's calls.
    pub fn peer(&self, target: u64) -> Result<PeerClient, String> {
        self.client(target).map_err(|e| e.to_string())
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        target: u64,
        group: GroupId,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let mut client = self.client(target)?;
        let mut request = tonic::Request::new(RaftRequest {
            group_id: group,
            payload: encode(req).into(),
        });
        request.set_timeout(option.hard_ttl());
        let reply = match rpc {
            Rpc::Vote => client.vote(request).await,
            Rpc::PreVote => client.pre_vote(request).await,
            Rpc::TransferLeader => client.transfer_leader(request).await,
        };
        let reply = reply
            .map_err(|s| unreachable(target, rpc, &s))?
            .into_inner();
        decode_reply(&reply.payload)
    }
}

/// Most time between two attempts to learn a peer's identity.
const INTRODUCE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Learns node `target`'s identity with a `Hello`, retrying until it answers under its id (a
/// node just added may not know its id yet): until then, this node's requests cannot tell it
/// which incarnation they expect.
async fn introduce(identity: Arc<PeerIdentity>, target: u64, mut client: PeerClient) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let hello = PeerHello {
            node_id: identity.id(),
            incarnation: identity.incarnation(),
        };
        if let Ok(reply) = client.hello(hello).await {
            let reply = reply.into_inner();
            if reply.node_id == target {
                // A refusal is logged by `learn`; the old record stays, so this node's requests
                // go on naming the incarnation it knew, and the peer stops itself.
                let _ = identity.learn(target, reply.incarnation);
                return;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(INTRODUCE_BACKOFF_MAX);
    }
}

fn unreachable(target: u64, rpc: Rpc, s: &tonic::Status) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(format!(
        "{rpc:?} to node {target}: {}: {}",
        s.code(),
        s.message()
    )))
}

fn decode_reply<Resp: DeserializeOwned>(payload: &[u8]) -> Result<Resp, RPCError<TypeConfig>> {
    let result: Result<Resp, String> =
        decode(payload).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
    result.map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))
}

impl GroupRouter<TypeConfig, GroupId> for PeerPool {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &self,
        target: u64,
        group_id: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let answer = self
            .link(target)?
            .call(group_id, encode(&rpc).into(), self.append_timeout(&option))
            .await
            .map_err(|e| {
                RPCError::Unreachable(Unreachable::from_string(format!(
                    "AppendEntries to node {target}: {e}"
                )))
            })?;
        decode_reply(&answer)
    }

    async fn vote(
        &self,
        target: u64,
        group_id: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(target, group_id, Rpc::Vote, &rpc, &option).await
    }

    async fn pre_vote(
        &self,
        target: u64,
        group_id: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(target, group_id, Rpc::PreVote, &rpc, &option)
            .await
    }

    async fn transfer_leader(
        &self,
        target: u64,
        group_id: GroupId,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(target, group_id, Rpc::TransferLeader, &req, &option)
            .await
    }

    async fn full_snapshot(
        &self,
        target: u64,
        group_id: GroupId,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client(target)?;
        let header = encode(&(vote, snapshot.meta));
        let file = snapshot.snapshot.into_file();
        // openraft's timeout (`install_snapshot_timeout`) is fixed; the send and the install take
        // time in proportion to the snapshot's size.
        let size = file.metadata().map_or(0, |m| m.len());
        let timeout = option.hard_ttl() + self.inner.snapshot_pace.allowance(size);
        let file = tokio::fs::File::from_std(file);
        let chunks = snapshot_chunks(group_id, header, file, target, self.clone());
        let mut request = tonic::Request::new(chunks);
        request.set_timeout(timeout);
        let send = client.install_snapshot(request);
        let reply = tokio::select! {
            r = send => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let reply = reply
            .map_err(|s| Unreachable::from_string(format!("snapshot to node {target}: {s}")))?
            .into_inner();
        decode_reply(&reply.payload).map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Unreachable(Unreachable::from_string(other.to_string())),
        })
    }

    fn backoff(&self) -> Option<Backoff> {
        // An unreachable peer is retried every 200 ms: fast enough to notice a restart, slow
        // enough not to spin on a dead node.
        Some(Backoff::new(std::iter::repeat(Duration::from_millis(200))))
    }
}

/// The chunks of a snapshot file read from its start, the first one carrying `header`, each at
/// the pace of the pool's snapshot budget. A read error ends the stream early; the receiver then
/// finds the file cut short and refuses it.
fn snapshot_chunks(
    group_id: GroupId,
    header: Vec<u8>,
    file: tokio::fs::File,
    target: u64,
    pool: PeerPool,
) -> impl futures::Stream<Item = SnapshotChunk> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures::stream::unfold(Some((file, Some(header), pool)), move |state| async move {
        let (mut file, header, pool) = state?;
        let mut data = Vec::with_capacity(SNAPSHOT_CHUNK_BYTES);
        let mut chunk = (&mut file).take(SNAPSHOT_CHUNK_BYTES as u64);
        if let Err(e) = chunk.read_to_end(&mut data).await {
            tracing::warn!(
                group = group_id,
                target,
                "reading the snapshot to send: {e}"
            );
            return None;
        }
        if data.is_empty() && header.is_none() {
            return None;
        }
        pool.inner.snapshot_pace.wait(data.len()).await;
        let chunk = SnapshotChunk {
            group_id,
            header: header.unwrap_or_default().into(),
            data: data.into(),
        };
        Some((chunk, Some((file, None, pool))))
    })
}

/// The per-group network factory handed to openraft.
pub type NetworkFactory = GroupNetworkFactory<PeerPool, GroupId>;

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: u64, _node: &openraft::BasicNode) -> Self::Network {
        GroupNetwork {
            pool: self.factory.clone(),
            target,
            group: self.group_id,
        }
    }
}

/// One group's connection to one peer: the shared pool plus the group and target. Like
/// openraft-multi's adapter, except that AppendEntries streams merge commit-only requests into
/// the next entries (see [`super::append_stream`]).
pub struct GroupNetwork {
    pool: PeerPool,
    target: u64,
    group: GroupId,
}

impl RaftNetworkV2<TypeConfig> for GroupNetwork {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.pool
            .append_entries(self.target, self.group, rpc, option)
            .await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let (pool, target, group) = (self.pool.clone(), self.target, self.group);
        let send = move |rpc| {
            let (pool, option) = (pool.clone(), option.clone());
            async move { pool.append_entries(target, group, rpc, option).await }
        };
        let responses = CoalescingSession::new(input, send, COMMIT_LINGER).into_stream();
        Box::pin(async move { Ok(Box::pin(responses) as BoxStream<'s, _>) })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.pool.vote(self.target, self.group, rpc, option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.pool
            .pre_vote(self.target, self.group, rpc, option)
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        self.pool
            .full_snapshot(self.target, self.group, vote, snapshot, cancel, option)
            .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.pool
            .transfer_leader(self.target, self.group, req, option)
            .await
    }

    fn backoff(&self) -> Option<Backoff> {
        GroupRouter::backoff(&self.pool)
    }
}
