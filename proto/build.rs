//! Generates the tonic/prost code from `proto/` with a vendored `protoc`, so building needs no
//! system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let files = [
        "proto/strata/v1/kv.proto",
        "proto/strata/v1/cluster.proto",
        "proto/strata/v1/raft.proto",
    ];
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&files, &["proto"])?;
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    Ok(())
}
