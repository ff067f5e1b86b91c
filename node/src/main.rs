//! `strata-node`: parses settings, sets up logging, runs the node until SIGINT/SIGTERM.

use std::io::{IsTerminal, Write};

use clap::Parser;

use strata_node::config::{Args, NodeConfig};

/// The log filter unless `RUST_LOG` gives one.
///
/// openraft's warnings are mostly one line per failed message to a peer that is down (dozens a
/// second); the peer transport logs each peer's reachability changes instead. openraft's
/// heartbeat worker has one error, "failed to send … to RaftCore", and it fires when a group's
/// core has already shut down — at most clean stops — so that module is off.
const DEFAULT_LOG_FILTER: &str = "info,openraft=error,openraft::core::heartbeat::worker=off";

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into()),
        )
        .with_target(false)
        // Colour codes only on a terminal: a node's output usually goes to a log file
        // (`strata dev up` writes node.log), where they would get in the way of grep.
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let config = match NodeConfig::resolve(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("strata-node: {e:#}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("strata-node")
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(strata_node::server::run(config, shutdown_signal())) {
        tracing::error!("{e:#}");
        // Not `eprintln!`: it panics when stderr cannot be written, as when the log file is on
        // the disk whose filling stopped the node.
        let _ = writeln!(std::io::stderr(), "strata-node: {e:#}");
        std::process::exit(1);
    }
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
