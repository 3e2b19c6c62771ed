//! Compiles the client API's protobuf definitions with tonic.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["proto/forge/v1/control.proto"], &["proto"])?;
    Ok(())
}
