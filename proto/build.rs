//! Compiles the client API's protobuf definitions with tonic.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The descriptor set is served by gRPC reflection: clients list and call the services
    // without the .proto files.
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("forge_descriptor.bin"))
        .compile_protos(
            &[
                "proto/forge/v1/control.proto",
                "proto/forge/v1/volume.proto",
                "proto/forge/v1/snapshot.proto",
                "proto/forge/v1/maintenance.proto",
                "proto/forge/v1/node.proto",
                "proto/forge/v1/mount.proto",
                "proto/forge/v1/mesh.proto",
                "proto/forge/v1/trust.proto",
                "proto/forge/v1/run.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
