//! `strata-cluster`: the `strata` command-line tool and the local-cluster launcher.
//!
//! Module map:
//! - [`launcher`]: starts, stops, kills and restarts real `strata-node` processes of a local
//!   cluster described by `cluster.json` (used by `strata dev up` and by tests).
//! - [`cli`]: the `strata` commands — `dev up`, `status`, `get/put/del/scan/cas`, `bench` — and
//!   their table/JSON output.
//! - [`etcd`]: a minimal etcd KV client, so `strata bench --target etcd` measures etcd with the
//!   same harness.

#![warn(missing_docs)]

pub mod cli;
pub mod launcher;

/// The subset of etcd's v3 KV API used by `strata bench --target etcd` (generated).
#[allow(missing_docs, clippy::all)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}
