//! Strata's wire contract: the protobuf definitions under `proto/`, the tonic/prost code
//! generated from them, and the key → slot rule every node and client must agree on.
//!
//! - [`v1`]: package `strata.v1` — the `Kv` service (client API), the `Cluster` service (shard
//!   map, status) and the internal `Raft` service (node-to-node transport).
//! - [`keyspace`]: hash tags and slot hashing.
//! - [`address`]: the `HOST:PORT` form of the node addresses the cluster records.

#![warn(missing_docs)]

/// Package `strata.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("strata.v1");
}

pub mod address;
pub mod keyspace;
