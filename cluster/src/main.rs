//! `strata`: the operator and user CLI. Parses arguments and hands them to the library; any error
//! is printed as one line and the exit code is non-zero.

use clap::Parser;

fn main() {
    let args = strata_cluster::cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(strata_cluster::cli::run(args)) {
        eprintln!("strata: {e:#}");
        std::process::exit(1);
    }
}
