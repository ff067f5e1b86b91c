//! `strata-client`: the async Rust client of Strata.
//!
//! ```no_run
//! # async fn demo() -> Result<(), strata_client::Error> {
//! let client = strata_client::Client::connect(["127.0.0.1:7101"]).await?;
//! let version = client.put("{user:42}:name", "Ada").await?;
//! let record = client.get("{user:42}:name").await?.expect("just written");
//! assert_eq!(record.version, version);
//! # Ok(()) }
//! ```
//!
//! Module map:
//! - [`error`]: the typed [`Error`], which says whether a failed write may still have applied.
//! - [`route`]: the cached shard map: key → shard → replicas, and the leader cache.
//! - [`session`]: request ids — one client id per [`Client`], a sequence per write, and the
//!   acknowledged floor that lets servers forget finished writes.
//! - [`client`]: [`Client`], [`ClientBuilder`] and the operations, with retries within a deadline
//!   (its submodules: the builder, the retry loop, the senders of coalesced calls, scans).
//! - `types`: the values operations take and give back ([`Record`], [`ScanPage`],
//!   [`ScanOptions`], [`CasOutcome`], [`BatchOp`]).
//! - `coalesce`: concurrent puts to one shard share one atomic batch, and the batches for the
//!   shards one node leads share one `MultiBatch` call; concurrent gets to one node share one
//!   `MultiGet` call.
//! - `admin`: membership requests (`add_node`, `remove_node`) sent to the meta leader.
//!
//! Retries: a request that meets `NotLeader`, `WrongShard`, an unavailable shard or a lost
//! connection is retried (following leader hints, refreshing the shard map) until the operation's
//! deadline. A retried write reuses its request id, so it never applies twice. While replicas
//! move (`strata node add/remove`) the shard map's epoch changes: a node that no longer holds a
//! shard answers `WrongShard`, a hint may name a node the cached map does not know, and every
//! replica of a shard may stop answering; each case reloads the map (asking every known node,
//! keeping the newest epoch) and retries.

#![warn(missing_docs)]

mod admin;
pub mod client;
mod coalesce;
pub mod error;
pub mod route;
pub mod session;
mod types;

pub use client::{
    BatchOp, CasOutcome, Client, ClientBuilder, Consistency, Record, ScanOptions, ScanPage,
};
pub use error::Error;
