//! Generates the protobuf and gRPC code from `proto/` with protox, a pure-Rust
//! protobuf compiler, so a fresh clone builds with cargo alone (no system protoc).

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/dfs/v1/storage.proto",
        "proto/dfs/v1/cluster.proto",
        "proto/dfs/v1/record.proto",
        "proto/dfs/v1/peer.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;

    // The descriptor set is served by gRPC server reflection.
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("dfs_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::grpc::codec::DfsCodec")
        .compile_fds(fds)?;
    Ok(())
}
