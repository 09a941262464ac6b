// gRPC client code for the Kubernetes CRI (runtime.v1) subset that the CRI
// tests (tests/cri.rs) call, from the vendored proto. Only the tests include
// it; the binary does not.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=tests/cri/api.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_protos(&["tests/cri/api.proto"], &["tests/cri"])?;
    Ok(())
}
