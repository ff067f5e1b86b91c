//! A Strata storage node: one RocksDB shared by every Raft group the node hosts, the groups
//! themselves (one per shard plus the meta group), and the gRPC services in front of them.
//!
//! Module map, in data-flow order:
//!
//! - [`config`]: the node's settings from flags, `STRATA_*` environment variables and a TOML file.
//! - [`layout`]: the cluster layout — nodes, shards, their slot ranges, replicas and moves under
//!   way — and the initial placement computed at bootstrap.
//! - [`limits`]: input validation (key, value, batch and message size limits).
//! - [`error`]: the one table that maps every request error to a `tonic::Status` plus details.
//! - [`storage`]: the RocksDB engine (column families, key encodings, the group-commit syncer),
//!   the Raft log store and the state machine.
//! - [`raft`]: the openraft wrapper: type config, commands, the peer network, group lifecycle.
//!   The rest of the crate does not see openraft types beyond [`raft::Group`].
//! - [`membership`]: how the layout changes — the meta group's copy, adoption on every node, the
//!   placement driver on the meta leader, and the operator's add/remove node requests.
//! - [`service`]: the gRPC services — `Kv` (client API), `Cluster` (map, status, add/remove
//!   node), `Raft` (peers, plus the placement driver's calls).
//! - [`server`]: wires everything together, serves until shutdown, then stops cleanly.
//! - [`planted`]: known bugs for the chaos suite to catch; compiled in only with the
//!   `planted-bugs` feature.

#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod layout;
pub mod limits;
pub mod membership;
pub mod planted;
pub mod raft;
pub mod server;
pub mod service;
pub mod storage;
