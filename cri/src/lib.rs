//! Kubernetes CRI v1 (`runtime.v1`) at the Kubernetes 1.36 level.
//!
//! [`v1`] holds the prost messages and the tonic clients and servers generated
//! from the top-level `proto/proto/cri/v1/api.proto`, e.g. [`v1::RunPodSandboxRequest`],
//! [`v1::runtime_service_server::RuntimeServiceServer`] and
//! [`v1::image_service_client::ImageServiceClient`]. The wire format is the
//! upstream one, so it talks to any CRI v1 peer; see the crate README for the
//! upstream version it follows.

/// The `runtime.v1` package.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod v1 {
    tonic::include_proto!("runtime.v1");
}
