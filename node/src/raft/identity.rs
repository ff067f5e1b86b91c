//! Which data directory is on the other end of a peer connection.
//!
//! A node id alone does not say whether the node still has its Raft state. A node whose data
//! directory was wiped (a replaced disk, an operator's `rm -rf`) and which is started again with
//! its old flags looks like a fresh member of its old cluster: it would grant votes and accept
//! appends with an empty log, and a stale replica could win an election with its vote and drop
//! writes that were acknowledged with the help of the lost log. Raft cannot notice this by itself.
//!
//! So every data directory has an **incarnation**, a random number drawn when it is first used
//! and stored with it. Every peer request carries the sender's id and incarnation and the
//! receiver's id and incarnation as the sender knows them, in the `strata-peer` header; every
//! node records the incarnation of each peer the first time it hears from it (from its requests,
//! or from a `Hello` this node sends it), and checks it ever after:
//!
//! - a request that knows *this* node by another incarnation means this data directory is not the
//!   one the cluster knew: the request is refused and the node stops (fail-stop), naming the cause;
//! - a request from a known peer with another incarnation is refused: that peer lost its state;
//! - a request meant for another node id is refused (an address reused after a removal), and
//!   stops nothing.
//!
//! The check covers every peer message (the AppendEntries stream's header is checked once, when
//! the stream opens, which a restarted peer must do again). It cannot help when no running peer
//! ever heard from the lost directory — then there was nothing to lose — and a peer's record is
//! written without its own fsync (it becomes durable with the next WAL fsync, milliseconds later).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rocksdb::WriteBatch;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::stop_reason::StopReason;
use crate::storage::keys::{peer_incarnation_key, CF_STATE, INCARNATION_KEY, PEER_INCARNATION_TAG};
use crate::storage::Engine;

/// The request header carrying `<sender id>.<sender incarnation>.<receiver id>.<receiver
/// incarnation>` (0 where the sender does not know).
pub const PEER_HEADER: &str = "strata-peer";

/// This node's identity and the identities of the peers it has heard from.
pub struct PeerIdentity {
    /// This node's id; 0 while a joining node waits to be added.
    id: AtomicU64,
    /// This data directory's incarnation.
    incarnation: u64,
    /// Each peer's incarnation, as first heard.
    known: RwLock<HashMap<u64, u64>>,
    /// Peers refused for another incarnation, so each is logged once, not per request.
    refused: Mutex<HashSet<u64>>,
    engine: Arc<Engine>,
    /// Why this node must stop, once a peer knew it by another incarnation.
    lost: StopReason,
}

impl PeerIdentity {
    /// This data directory's identity, drawing (and durably storing) its incarnation on first use,
    /// with the peers it knows.
    pub async fn open(engine: Arc<Engine>, id: u64) -> anyhow::Result<Arc<PeerIdentity>> {
        let state = engine.cf(CF_STATE);
        let incarnation = match engine.db().get_cf(state, INCARNATION_KEY)? {
            Some(raw) => u64::from_be_bytes(raw.as_slice().try_into()?),
            None => {
                let drawn = rand::random_range(1..u64::MAX);
                let mut b = WriteBatch::default();
                b.put_cf(state, INCARNATION_KEY, drawn.to_be_bytes());
                engine.write_durable(b).await?;
                drawn
            }
        };
        let mut known = HashMap::new();
        let lo = [PEER_INCARNATION_TAG];
        let hi = [PEER_INCARNATION_TAG + 1];
        for record in engine.range(CF_STATE, &lo, &hi) {
            let (key, value) = record?;
            let peer = u64::from_be_bytes(key[1..].try_into()?);
            known.insert(peer, u64::from_be_bytes(value[..].try_into()?));
        }
        Ok(Arc::new(PeerIdentity {
            id: AtomicU64::new(id),
            incarnation,
            known: RwLock::new(known),
            refused: Mutex::default(),
            engine,
            lost: StopReason::default(),
        }))
    }

    /// This node's id (0 while joining).
    pub fn id(&self) -> u64 {
        self.id.load(Ordering::Acquire)
    }

    /// Records the id the cluster gave this node.
    pub fn set_id(&self, id: u64) {
        self.id.store(id, Ordering::Release);
    }

    /// This data directory's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Whether `peer`'s incarnation is known.
    pub fn knows(&self, peer: u64) -> bool {
        self.known_as(peer).is_some()
    }

    fn known_as(&self, peer: u64) -> Option<u64> {
        self.known
            .read()
            .expect("known poisoned")
            .get(&peer)
            .copied()
    }

    /// The `strata-peer` header of a request to node `to` (`None`: a node outside the cluster).
    fn header(&self, to: Option<u64>) -> AsciiMetadataValue {
        let expected = to.and_then(|to| self.known_as(to)).unwrap_or(0);
        format!(
            "{}.{}.{}.{expected}",
            self.id(),
            self.incarnation,
            to.unwrap_or(0)
        )
        .parse()
        .expect("digits and dots are valid header text")
    }

    /// Checks the `strata-peer` header of an incoming request: `Err` refuses it (see the module
    /// documentation). A request without the header (a tool, a node of an older version) passes.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        if crate::planted::active(crate::planted::Bug::NoIncarnationCheck) {
            return Ok(());
        }
        let Some(raw) = metadata.get(PEER_HEADER) else {
            return Ok(());
        };
        let Some(Header {
            from,
            from_incarnation,
            to,
            expected,
        }) = Header::parse(raw.to_str().unwrap_or(""))
        else {
            return Err(Status::invalid_argument(format!(
                "malformed {PEER_HEADER} header"
            )));
        };
        let me = self.id();
        if to != 0 && me != 0 && to != me {
            // Meant for a node that had this address before (removed, its address reused): not
            // a sign that this node lost anything.
            return Err(Status::failed_precondition(format!(
                "this is node {me}, not node {to}"
            )));
        }
        if me == 0 && expected != 0 {
            // This node is waiting to join and has told no one its incarnation, so the request is
            // for a node known by its data directory that had this address (one this node
            // replaces, say). Not a sign that this node lost anything.
            return Err(Status::failed_precondition(format!(
                "this node is waiting to join; it is not node {to}"
            )));
        }
        if expected != 0 && expected != self.incarnation {
            let why = format!(
                "node {from} knows this node (id {}) by another data directory (incarnation {expected}; this one is {}): this data directory is not the one this node ran with — it was wiped, replaced or restored from elsewhere — so the Raft state the cluster relies on is gone, and taking part could elect a stale leader and lose acknowledged writes. Start this machine as a new node (`--join`, empty data directory) and add it in this node's place with `strata node add --addr ADDR --replaces {}`, or remove this node with `strata node remove --id {} --force`",
                self.id(),
                self.incarnation,
                self.id(),
                self.id(),
            );
            self.lost.report(why.clone());
            return Err(Status::failed_precondition(why));
        }
        if from != 0 {
            self.learn(from, from_incarnation)
                .map_err(Status::failed_precondition)?;
        }
        Ok(())
    }

    /// Records that `peer` runs with `incarnation`, or says why not: a known peer with another
    /// incarnation lost its state, and the first record stays.
    pub fn learn(&self, peer: u64, incarnation: u64) -> Result<(), String> {
        match self.known_as(peer) {
            Some(known) if known == incarnation => Ok(()),
            Some(known) => {
                let why = format!(
                    "node {peer} came back with another data directory (incarnation {incarnation}, known as {known}): it lost its Raft state and is refused until it is removed and rejoins as a new node"
                );
                if self.refused.lock().expect("refused poisoned").insert(peer) {
                    tracing::warn!("{why}");
                }
                Err(why)
            }
            None => {
                {
                    let mut known = self.known.write().expect("known poisoned");
                    match known.get(&peer) {
                        // Recorded meanwhile by another request of the same peer.
                        Some(&k) if k == incarnation => return Ok(()),
                        Some(_) => {
                            drop(known);
                            return self.learn(peer, incarnation);
                        }
                        None => known.insert(peer, incarnation),
                    };
                }
                let mut b = WriteBatch::default();
                b.put_cf(
                    self.engine.cf(CF_STATE),
                    peer_incarnation_key(peer),
                    incarnation.to_be_bytes(),
                );
                // Not synced: the next WAL fsync (milliseconds away) makes it durable, and until
                // then the peer is only as unknown as before it was heard from.
                self.engine
                    .write(b)
                    .map_err(|e| format!("store node {peer}'s incarnation: {e}"))?;
                tracing::info!(peer, incarnation, "learnt a peer's incarnation");
                Ok(())
            }
        }
    }

    /// Resolves once a peer knew this node by another incarnation, with the reason.
    pub async fn lost(&self) -> String {
        self.lost.wait().await
    }

    /// The interceptor that stamps every request to node `to` with the `strata-peer` header.
    pub fn stamp(self: &Arc<Self>, to: Option<u64>) -> Stamp {
        Stamp {
            identity: self.clone(),
            to,
        }
    }
}

/// What a `strata-peer` header says: `<from>.<from_incarnation>.<to>.<expected>`.
struct Header {
    /// The sender's id (0 while joining).
    from: u64,
    /// The sender's incarnation.
    from_incarnation: u64,
    /// The node the request is meant for (0: a node outside the cluster, probed by address).
    to: u64,
    /// The incarnation the sender knows that node by (0: not known yet).
    expected: u64,
}

impl Header {
    fn parse(text: &str) -> Option<Header> {
        let mut parts = text.split('.').map(|p| p.parse::<u64>().ok());
        let header = Header {
            from: parts.next()??,
            from_incarnation: parts.next()??,
            to: parts.next()??,
            expected: parts.next()??,
        };
        parts.next().is_none().then_some(header)
    }
}

/// Adds the `strata-peer` header to every request of one peer client.
#[derive(Clone)]
pub struct Stamp {
    identity: Arc<PeerIdentity>,
    to: Option<u64>,
}

impl Interceptor for Stamp {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(PEER_HEADER, self.identity.header(self.to));
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn identity(dir: &std::path::Path, id: u64) -> Arc<PeerIdentity> {
        PeerIdentity::open(Engine::open(dir, 16 << 20).unwrap(), id)
            .await
            .unwrap()
    }

    fn request_from(sender: &PeerIdentity, to: u64) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(PEER_HEADER, sender.header(Some(to)));
        m
    }

    #[tokio::test]
    async fn an_incarnation_and_the_peers_heard_from_survive_a_restart() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = identity(a.path(), 1).await;
        let two = identity(b.path(), 2).await;
        two.check(&request_from(&one, 2)).unwrap();
        assert!(two.knows(1));
        // The record rides the next WAL fsync.
        two.engine
            .write_durable(WriteBatch::default())
            .await
            .unwrap();
        let first = two.incarnation();
        drop(two);
        let two = identity(b.path(), 2).await;
        assert_eq!(two.incarnation(), first);
        assert!(two.knows(1), "the record of node 1 was lost");
    }

    #[tokio::test]
    async fn a_node_known_by_another_incarnation_refuses_requests_and_stops() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = identity(a.path(), 1).await;
        let two = identity(b.path(), 2).await;
        one.learn(2, two.incarnation()).unwrap();
        drop(two);
        // Node 2's data directory is wiped and it starts again under its old id.
        let wiped = tempfile::tempdir().unwrap();
        let two = identity(wiped.path(), 2).await;
        let refused = two.check(&request_from(&one, 2)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("not the one this node ran with"));
        let why = tokio::time::timeout(std::time::Duration::from_secs(1), two.lost())
            .await
            .expect("the node was not told to stop");
        assert!(why.contains("strata node remove --id 2 --force"), "{why}");
        // Its own requests are refused by the node that knew it.
        let refused = one.check(&request_from(&two, 1)).unwrap_err();
        assert!(refused
            .message()
            .contains("came back with another data directory"));
    }

    #[tokio::test]
    async fn unknown_peers_and_requests_without_the_header_pass() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = identity(a.path(), 1).await;
        let two = identity(b.path(), 2).await;
        one.check(&MetadataMap::new()).unwrap();
        one.check(&request_from(&two, 1)).unwrap();
        two.check(&request_from(&one, 2)).unwrap();
        assert!(one.knows(2) && two.knows(1));
        let mut bad = MetadataMap::new();
        bad.insert(PEER_HEADER, "1.x.2.0".parse().unwrap());
        assert_eq!(
            one.check(&bad).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn a_request_meant_for_the_node_that_had_this_address_before_stops_nothing() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let one = identity(a.path(), 1).await;
        let two = identity(b.path(), 2).await;
        one.learn(2, two.incarnation()).unwrap();
        // Node 2 was removed; node 5 now listens at its address.
        let five = identity(c.path(), 5).await;
        let refused = five.check(&request_from(&one, 2)).unwrap_err();
        assert_eq!(refused.message(), "this is node 5, not node 2");
        let stopped = tokio::time::timeout(std::time::Duration::from_millis(100), five.lost());
        assert!(stopped.await.is_err(), "node 5 was told to stop");
        // A node waiting to join (no id yet) at node 2's address: refused the same way.
        let d = tempfile::tempdir().unwrap();
        let joining = identity(d.path(), 0).await;
        let refused = joining.check(&request_from(&one, 2)).unwrap_err();
        assert_eq!(
            refused.message(),
            "this node is waiting to join; it is not node 2"
        );
        let stopped = tokio::time::timeout(std::time::Duration::from_millis(100), joining.lost());
        assert!(stopped.await.is_err(), "the joining node was told to stop");
    }
}
