//! Compiles the .proto files with protox, a protobuf compiler written in Rust, so building ward
//! needs no protoc on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/ward/control/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Encodings must be deterministic: the control plane hashes resources to version them.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
