//! `strata-jepsen`: the Jepsen-style chaos suite (real processes, nemeses, a linearizability
//! checker). **Not built yet** — this crate is a placeholder so the workspace has its final shape;
//! see `docs/architecture.md` ("What is not built yet").
//!
//! It will drive clusters through [`strata_cluster::launcher`] and talk to them with
//! [`strata_client`].

#![warn(missing_docs)]

/// Always fails: the chaos suite does not exist yet. Callers get a clear error instead of a
/// silent pass.
pub fn run() -> Result<(), &'static str> {
    Err("strata-jepsen is not built yet: no nemesis, workload or checker exists")
}

#[doc(hidden)]
pub use strata_client as _client;
#[doc(hidden)]
pub use strata_cluster as _cluster;
