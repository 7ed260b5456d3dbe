//! Compiles `proto/medray/v1/*.proto` with a vendored `protoc`, so neither CI nor Docker
//! needs one installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let files = [
        "proto/medray/v1/common.proto",
        "proto/medray/v1/client.proto",
        "proto/medray/v1/worker.proto",
        "proto/medray/v1/control.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure().compile_protos(&files, &["proto"])?;
    Ok(())
}
