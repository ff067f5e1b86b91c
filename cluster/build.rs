//! Generates the etcd KV client used by `strata bench --target etcd`, with a vendored `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".")
        .compile_protos(&["proto/etcd_kv.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/etcd_kv.proto");
    Ok(())
}
