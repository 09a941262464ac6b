// gRPC code for containerd's snapshots service, from the vendored protos.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[
                "proto/containerd/snapshots.proto",
                "proto/containerd/mount.proto",
            ],
            &["proto", "/usr/include"],
        )?;
    Ok(())
}
