//! Compiles the task service's proto with a vendored protoc, and keeps its descriptor set for
//! server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let includes = protoc_bin_vendored::include_path()?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("task_descriptor.bin"))
        .compile_protos(
            &[std::path::PathBuf::from("proto/kafkify/task/v1/task.proto")],
            &[std::path::PathBuf::from("proto"), includes],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
