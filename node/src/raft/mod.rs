//! The openraft wrapper. Everything that touches openraft's types lives here or in
//! [`crate::storage`]; services see a [`Group`] with a small API.
//!
//! - [`types`]: the type configuration and the [`types::Command`] a shard's log carries.
//! - [`codec`]: bincode encoding of openraft messages and log entries.
//! - [`network`]: the peer pool: one tonic channel per peer node shared by every group.
//! - [`identity`]: each data directory's incarnation, carried and checked on every peer request,
//!   so a node that lost its Raft state cannot take part under its old id.
//! - [`peer_link`]: the AppendEntries of every group bound for one peer, on one gRPC stream.
//! - [`append_stream`]: a replication session's AppendEntries, with commit-only requests merged
//!   into the next entries.
//! - [`group`]: one Raft group on this node — creation, writes, reads, status.
//! - [`hand_over`]: moving a group's leadership to a live successor before a planned stop.
//! - [`read_batch`]: concurrent linearizable reads of a group share one ReadIndex round.
//! - [`stop_reason`]: the first reason a node must stop on its own (fail-stop).
//! - [`snapshot_pace`]: the node's budget of outgoing snapshot bytes per second.

pub mod append_stream;
pub mod codec;
pub mod group;
pub mod hand_over;
pub mod identity;
pub mod network;
pub mod peer_link;
pub mod read_batch;
pub mod snapshot_pace;
pub mod stop_reason;
pub mod types;

pub use group::{Group, Groups};
pub use types::{BatchOp, Command, Op, Outcome, TypeConfig};
