//! `strata-cluster`: the `strata` command-line tool and the local-cluster launcher.
//!
//! Module map:
//! - [`launcher`]: starts, stops, kills and restarts real `strata-node` processes of a local
//!   cluster described by `cluster.json` (used by `strata dev up` and by tests).
//! - [`cli`]: the `strata` commands — `dev up`, `status`, `get/put/del/scan/cas`, `bench` — and
//!   their table/JSON output.

pub mod cli;
pub mod launcher;
