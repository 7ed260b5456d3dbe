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
    tonic_prost_build::configure()
        // Inference specs and tasks are larger than the other kinds: boxed, the messages
        // of the actors that carry them stay small.
        .boxed(".medray.v1.TaskAssignment.kind.infer")
        .boxed(".medray.v1.JobSpec.kind.infer")
        .compile_protos(&files, &["proto"])?;
    Ok(())
}
