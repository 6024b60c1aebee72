// Generates `berth_cri::v1` from proto/cri/v1/api.proto with protoc (the
// Debian package protobuf-compiler, installed by scripts/deps.sh); PROTOC
// points prost-build at another protoc.
fn main() {
    println!("cargo:rerun-if-changed=proto/cri/v1/api.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/cri/v1/api.proto"], &["proto/"])
        .expect("compile proto/cri/v1/api.proto");
}
