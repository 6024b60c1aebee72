//! CRI v1 RuntimeService.

use std::pin::Pin;
use std::sync::Arc;

use k8s_cri::v1::runtime_service_server::RuntimeService as CriRuntimeService;
use k8s_cri::v1::*;
use tonic::{Request, Response, Status};

use super::cri_service;
use crate::daemon::{self, Daemon};
use crate::error::Error;

pub struct RuntimeService {
    daemon: Arc<Daemon>,
}

impl RuntimeService {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        RuntimeService { daemon }
    }
}

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

cri_service! {
    impl CriRuntimeService for RuntimeService {
        type GetContainerEventsStream = EventStream;

        async fn version(&self, _request: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
            Ok(Response::new(VersionResponse {
                // The version of the CRI API kubelet asks with; "0.1.0" is what
                // every CRI runtime answers here.
                version: "0.1.0".into(),
                runtime_name: daemon::RUNTIME_NAME.into(),
                runtime_version: daemon::RUNTIME_VERSION.into(),
                runtime_api_version: daemon::CRI_API_VERSION.into(),
            }))
        }

        async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
            let conditions = self
                .daemon
                .conditions()
                .into_iter()
                .map(|c| RuntimeCondition {
                    r#type: c.kind.into(),
                    status: c.ready,
                    reason: c.reason,
                    message: c.message,
                })
                .collect();
            let info = if request.get_ref().verbose {
                self.daemon.status_info().into_iter().collect()
            } else {
                Default::default()
            };
            Ok(Response::new(StatusResponse {
                status: Some(RuntimeStatus { conditions }),
                info,
                runtime_handlers: vec![RuntimeHandler {
                    name: String::new(),
                    features: Some(RuntimeHandlerFeatures {
                        recursive_read_only_mounts: false,
                        user_namespaces: false,
                    }),
                }],
                features: Some(RuntimeFeatures {
                    supplemental_groups_policy: false,
                }),
            }))
        }

        async fn runtime_config(&self, _request: Request<RuntimeConfigRequest>) -> Result<Response<RuntimeConfigResponse>, Status> {
            Ok(Response::new(RuntimeConfigResponse {
                linux: Some(LinuxRuntimeConfiguration {
                    cgroup_driver: CgroupDriver::Cgroupfs.into(),
                }),
            }))
        }

        async fn update_runtime_config(&self, request: Request<UpdateRuntimeConfigRequest>) -> Result<Response<UpdateRuntimeConfigResponse>, Status> {
            let cidr = request
                .into_inner()
                .runtime_config
                .and_then(|c| c.network_config)
                .map(|n| n.pod_cidr)
                .unwrap_or_default();
            self.daemon.set_pod_cidr(&cidr)?;
            Ok(Response::new(UpdateRuntimeConfigResponse {}))
        }

        async fn get_container_events(&self, _request: Request<GetEventsRequest>) -> Result<Response<Self::GetContainerEventsStream>, Status> {
            Err(Error::Unimplemented("RuntimeService/GetContainerEvents").into())
        }
    }
    unimplemented "RuntimeService" {
        run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse = "RunPodSandbox";
        stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse = "StopPodSandbox";
        remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse = "RemovePodSandbox";
        pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse = "PodSandboxStatus";
        list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse = "ListPodSandbox";
        create_container(CreateContainerRequest) -> CreateContainerResponse = "CreateContainer";
        start_container(StartContainerRequest) -> StartContainerResponse = "StartContainer";
        stop_container(StopContainerRequest) -> StopContainerResponse = "StopContainer";
        remove_container(RemoveContainerRequest) -> RemoveContainerResponse = "RemoveContainer";
        list_containers(ListContainersRequest) -> ListContainersResponse = "ListContainers";
        container_status(ContainerStatusRequest) -> ContainerStatusResponse = "ContainerStatus";
        update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse = "UpdateContainerResources";
        reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse = "ReopenContainerLog";
        exec_sync(ExecSyncRequest) -> ExecSyncResponse = "ExecSync";
        exec(ExecRequest) -> ExecResponse = "Exec";
        attach(AttachRequest) -> AttachResponse = "Attach";
        port_forward(PortForwardRequest) -> PortForwardResponse = "PortForward";
        container_stats(ContainerStatsRequest) -> ContainerStatsResponse = "ContainerStats";
        list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse = "ListContainerStats";
        pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse = "PodSandboxStats";
        list_pod_sandbox_stats(ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse = "ListPodSandboxStats";
        checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse = "CheckpointContainer";
        list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse = "ListMetricDescriptors";
        list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse = "ListPodSandboxMetrics";
    }
}
