//! gRPC over a unix socket: a berth-cri RuntimeService server that answers
//! only Version, called by a berth-cri client and by a k8s-cri 0.11 client
//! (the kubelet-era bindings berthd uses today keep working against it).

use std::path::{Path, PathBuf};

use b::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use berth_cri::v1 as b;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic::{Code, Request, Response, Status};

struct VersionOnly;

type NoStream<T> = tokio_stream::Empty<Result<T, Status>>;

/// The RuntimeService impl: Version answers, every other method is
/// Unimplemented (named here so that a method missing from the proto fails
/// to compile).
macro_rules! version_only {
    (
        unary { $($unary:ident($unary_req:ident) -> $unary_resp:ident;)* }
        streams { $($stream:ident($stream_req:ident) -> $stream_ty:ident of $stream_resp:ident;)* }
    ) => {
        #[tonic::async_trait]
        impl RuntimeService for VersionOnly {
            async fn version(
                &self,
                request: Request<b::VersionRequest>,
            ) -> Result<Response<b::VersionResponse>, Status> {
                Ok(Response::new(b::VersionResponse {
                    version: request.into_inner().version,
                    runtime_name: "berth-cri-test".into(),
                    runtime_version: "0.1.0".into(),
                    runtime_api_version: "v1".into(),
                }))
            }
            $(
                async fn $unary(
                    &self,
                    _: Request<b::$unary_req>,
                ) -> Result<Response<b::$unary_resp>, Status> {
                    Err(Status::unimplemented(stringify!($unary)))
                }
            )*
            $(
                type $stream_ty = NoStream<b::$stream_resp>;
                async fn $stream(
                    &self,
                    _: Request<b::$stream_req>,
                ) -> Result<Response<Self::$stream_ty>, Status> {
                    Err(Status::unimplemented(stringify!($stream)))
                }
            )*
        }
    };
}

version_only! {
    unary {
        run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse;
        stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse;
        remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse;
        pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse;
        list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse;
        create_container(CreateContainerRequest) -> CreateContainerResponse;
        start_container(StartContainerRequest) -> StartContainerResponse;
        stop_container(StopContainerRequest) -> StopContainerResponse;
        remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
        list_containers(ListContainersRequest) -> ListContainersResponse;
        container_status(ContainerStatusRequest) -> ContainerStatusResponse;
        update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
        reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse;
        exec_sync(ExecSyncRequest) -> ExecSyncResponse;
        exec(ExecRequest) -> ExecResponse;
        attach(AttachRequest) -> AttachResponse;
        port_forward(PortForwardRequest) -> PortForwardResponse;
        container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
        list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse;
        pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse;
        list_pod_sandbox_stats(ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse;
        update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse;
        status(StatusRequest) -> StatusResponse;
        checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse;
        list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse;
        list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse;
        runtime_config(RuntimeConfigRequest) -> RuntimeConfigResponse;
        update_pod_sandbox_resources(UpdatePodSandboxResourcesRequest) -> UpdatePodSandboxResourcesResponse;
    }
    streams {
        stream_pod_sandboxes(StreamPodSandboxesRequest) -> StreamPodSandboxesStream of StreamPodSandboxesResponse;
        stream_containers(StreamContainersRequest) -> StreamContainersStream of StreamContainersResponse;
        stream_container_stats(StreamContainerStatsRequest) -> StreamContainerStatsStream of StreamContainerStatsResponse;
        stream_pod_sandbox_stats(StreamPodSandboxStatsRequest) -> StreamPodSandboxStatsStream of StreamPodSandboxStatsResponse;
        get_container_events(GetEventsRequest) -> GetContainerEventsStream of ContainerEventResponse;
        stream_pod_sandbox_metrics(StreamPodSandboxMetricsRequest) -> StreamPodSandboxMetricsStream of StreamPodSandboxMetricsResponse;
    }
}

/// Serves VersionOnly on `socket` until the test's runtime ends.
fn serve(socket: &Path) {
    let listener = UnixListener::bind(socket).expect("bind the test socket");
    tokio::spawn(
        Server::builder()
            .add_service(RuntimeServiceServer::new(VersionOnly))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
}

async fn channel(socket: &Path) -> Channel {
    let path: PathBuf = socket.to_path_buf();
    // The URI only names the authority; every connection goes to the socket.
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect to the test socket")
}

#[tokio::test]
async fn berth_cri_client_calls_version_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cri.sock");
    serve(&socket);
    let mut client = b::runtime_service_client::RuntimeServiceClient::new(channel(&socket).await);

    let version = client
        .version(b::VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect("Version answers")
        .into_inner();
    assert_eq!(
        version,
        b::VersionResponse {
            version: "v1".into(),
            runtime_name: "berth-cri-test".into(),
            runtime_version: "0.1.0".into(),
            runtime_api_version: "v1".into(),
        }
    );

    // The new RPCs reach the server under their published paths.
    let err = client
        .stream_containers(b::StreamContainersRequest::default())
        .await
        .expect_err("StreamContainers is not implemented");
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(err.message(), "stream_containers");
    let err = client
        .update_pod_sandbox_resources(b::UpdatePodSandboxResourcesRequest::default())
        .await
        .expect_err("UpdatePodSandboxResources is not implemented");
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(err.message(), "update_pod_sandbox_resources");
}

#[tokio::test]
async fn k8s_cri_client_still_talks_to_a_berth_cri_server() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cri.sock");
    serve(&socket);
    let mut client =
        k8s_cri::v1::runtime_service_client::RuntimeServiceClient::new(channel(&socket).await);

    let version = client
        .version(k8s_cri::v1::VersionRequest {
            version: "0.1.0".into(),
        })
        .await
        .expect("Version answers a k8s-cri client")
        .into_inner();
    assert_eq!(version.version, "0.1.0");
    assert_eq!(version.runtime_name, "berth-cri-test");
    assert_eq!(version.runtime_version, "0.1.0");
    assert_eq!(version.runtime_api_version, "v1");

    let err = client
        .status(k8s_cri::v1::StatusRequest { verbose: true })
        .await
        .expect_err("Status is not implemented");
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(err.message(), "status");
}
