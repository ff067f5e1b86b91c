//! `strata`: the operator and user CLI. Parses arguments and hands them to the library; any error
//! is printed as one line and the exit code is non-zero.

use std::io::Write;

use clap::Parser;

fn main() {
    // Exit quietly when stdout is closed early (`strata status | head`), like other CLI tools.
    // SAFETY: sets the default disposition of one signal before any thread starts.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let args = strata_cluster::cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(strata_cluster::cli::run(args)) {
        // Not eprintln!: `dev up` ignores SIGPIPE, and a closed stderr must not turn this into a
        // panic.
        let _ = writeln!(std::io::stderr(), "strata: {e:#}");
        std::process::exit(1);
    }
}
