// Generates `berth_cri::v1` from the project's wire definitions in the
// top-level proto/ (proto/proto/cri/v1/api.proto) with protoc (the Debian
// package protobuf-compiler, installed by scripts/deps.sh); PROTOC points
// prost-build at another protoc.
fn main() {
    let api = "../proto/proto/cri/v1/api.proto";
    println!("cargo:rerun-if-changed={api}");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // berthd keeps a container's CRI config as JSON in its store: the
        // same derive as k8s-cri's, so records written by a berthd built on
        // k8s-cri read back; fields a newer CRI added default when absent.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        .compile_protos(&[api], &["../proto/proto/"])
        .expect("compile proto/proto/cri/v1/api.proto");
}
