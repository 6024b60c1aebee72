//! CRI v1 RuntimeService.

use std::sync::Arc;

use berth_cri::v1::runtime_service_server::RuntimeService as CriRuntimeService;
use berth_cri::v1::*;
use tonic::{Request, Response, Status};

use super::cri_service;
use crate::container;
use crate::daemon::{self, Daemon};
use crate::error::Error;
use crate::pod;
use crate::sandbox::{self, namespaces::Kind};

use super::convert;

pub struct RuntimeService {
    daemon: Arc<Daemon>,
    streaming: Arc<crate::streaming::Server>,
}

impl RuntimeService {
    pub fn new(daemon: Arc<Daemon>, streaming: Arc<crate::streaming::Server>) -> Self {
        RuntimeService { daemon, streaming }
    }
}

type EventStream = super::events::EventStream;
type ListStream<T> = super::list_stream::ListStream<T>;
use super::list_stream::chunked;

cri_service! {
    impl CriRuntimeService for RuntimeService {
        type GetContainerEventsStream = EventStream;
        type StreamPodSandboxesStream = ListStream<StreamPodSandboxesResponse>;
        type StreamContainersStream = ListStream<StreamContainersResponse>;
        type StreamContainerStatsStream = ListStream<StreamContainerStatsResponse>;
        type StreamPodSandboxStatsStream = ListStream<StreamPodSandboxStatsResponse>;
        type StreamPodSandboxMetricsStream = ListStream<StreamPodSandboxMetricsResponse>;

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
                .run(|d| Ok(d.conditions()))
                .await?
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
                        // mount_setattr(AT_RECURSIVE) through libcontainer's "rro".
                        recursive_read_only_mounts: true,
                        // Mode POD: a pinned user namespace per pod,
                        // idmapped image layers and volumes.
                        user_namespaces: self.daemon.user_namespaces,
                    }),
                }],
                features: Some(RuntimeFeatures {
                    supplemental_groups_policy: true,
                    // The pod's network namespace belongs to its user
                    // namespace; the host's cannot.
                    user_namespaces_host_network: false,
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


        async fn run_pod_sandbox(&self, request: Request<RunPodSandboxRequest>) -> Result<Response<RunPodSandboxResponse>, Status> {
            let request = request.into_inner();
            let config = request.config.ok_or_else(|| Error::InvalidArgument("sandbox config is required".into()))?;
            let id = self.daemon.run(move |d| sandbox::run(d, config, &request.runtime_handler)).await?;
            Ok(Response::new(RunPodSandboxResponse { pod_sandbox_id: id }))
        }

        async fn stop_pod_sandbox(&self, request: Request<StopPodSandboxRequest>) -> Result<Response<StopPodSandboxResponse>, Status> {
            let id = request.into_inner().pod_sandbox_id;
            // Stopping what is gone is done, as kubelet expects.
            self.daemon.on_sandbox(&id, pod::stop).await?;
            Ok(Response::new(StopPodSandboxResponse {}))
        }

        async fn remove_pod_sandbox(&self, request: Request<RemovePodSandboxRequest>) -> Result<Response<RemovePodSandboxResponse>, Status> {
            let id = request.into_inner().pod_sandbox_id;
            self.daemon.on_sandbox(&id, pod::remove).await?;
            Ok(Response::new(RemovePodSandboxResponse {}))
        }

        async fn pod_sandbox_status(&self, request: Request<PodSandboxStatusRequest>) -> Result<Response<PodSandboxStatusResponse>, Status> {
            let request = request.into_inner();
            let verbose = request.verbose;
            let (ctx, containers) = self.daemon.run(move |d| {
                let ctx = sandbox::context(d, sandbox::find(d, &request.pod_sandbox_id)?)?;
                let containers = container::of_sandbox(d, &ctx.record.id)?
                    .into_iter()
                    .map(|c| container::current(d, c))
                    .collect::<Vec<_>>();
                Ok((ctx, containers))
            }).await?;
            tracing::Span::current().record("pod_id", ctx.record.id.as_str());
            let status = convert::pod_sandbox_status(&ctx.record, &ctx.config);
            let mut info = std::collections::HashMap::new();
            if verbose {
                let detail = serde_json::json!({
                    "stateDir": ctx.dir,
                    "cgroupParent": ctx.record.cgroup_parent,
                    "reason": ctx.record.reason,
                    "namespaces": {
                        "network": ctx.namespace_path(Kind::Net),
                        "ipc": ctx.namespace_path(Kind::Ipc),
                        "uts": ctx.namespace_path(Kind::Uts),
                    },
                    "config": ctx.config,
                });
                info.insert("info".to_string(), detail.to_string());
            }
            let containers_statuses = containers.iter().map(convert::container_status_of).collect();
            Ok(Response::new(PodSandboxStatusResponse {
                status: Some(status),
                info,
                containers_statuses,
                timestamp: 0,
            }))
        }

        async fn list_pod_sandbox(&self, request: Request<ListPodSandboxRequest>) -> Result<Response<ListPodSandboxResponse>, Status> {
            let filter = request.into_inner().filter;
            // From the store's in-memory copy, on this thread.
            let mut items = self.daemon.store.list_map(|r: &crate::store::SandboxRecord| {
                let wanted = filter.as_ref().is_none_or(|f| {
                    (f.id.is_empty() || r.id.starts_with(&f.id))
                        && f.state.as_ref().is_none_or(|s| s.state == convert::sandbox_state(r.state) as i32)
                        && convert::labels_match(&r.labels, &f.label_selector)
                });
                wanted.then(|| convert::pod_sandbox(r))
            })?;
            items.sort_by_key(|s| s.created_at);
            Ok(Response::new(ListPodSandboxResponse { items }))
        }

        async fn create_container(&self, request: Request<CreateContainerRequest>) -> Result<Response<CreateContainerResponse>, Status> {
            let request = request.into_inner();
            let config = request.config.ok_or_else(|| Error::InvalidArgument("container config is required".into()))?;
            let id = self.daemon.in_sandbox(&request.pod_sandbox_id, move |d, pod| container::create(d, pod, config)).await?;
            Ok(Response::new(CreateContainerResponse { container_id: id }))
        }

        async fn start_container(&self, request: Request<StartContainerRequest>) -> Result<Response<StartContainerResponse>, Status> {
            self.daemon.on_container(&request.into_inner().container_id, container::start).await?;
            Ok(Response::new(StartContainerResponse {}))
        }

        async fn stop_container(&self, request: Request<StopContainerRequest>) -> Result<Response<StopContainerResponse>, Status> {
            let request = request.into_inner();
            let timeout = request.timeout;
            // Stopping what is gone is done, as kubelet expects (and as
            // StopPodSandbox and RemoveContainer answer).
            self.daemon.on_container_if_exists(&request.container_id, move |d, c| container::stop(d, c, timeout)).await?;
            Ok(Response::new(StopContainerResponse {}))
        }

        async fn remove_container(&self, request: Request<RemoveContainerRequest>) -> Result<Response<RemoveContainerResponse>, Status> {
            let id = request.into_inner().container_id;
            // Removing what is gone is done, as kubelet expects.
            self.daemon.on_container_if_exists(&id, container::remove).await?;
            Ok(Response::new(RemoveContainerResponse {}))
        }

        async fn list_containers(&self, request: Request<ListContainersRequest>) -> Result<Response<ListContainersResponse>, Status> {
            let filter = request.into_inner().filter;
            // From the store's in-memory copy, on this thread.
            let mut containers = self.daemon.store.list_map(|r: &crate::store::ContainerRecord| {
                let wanted = filter.as_ref().is_none_or(|f| {
                    convert::container_matches(r, &f.id, &f.pod_sandbox_id, &f.label_selector)
                        && f.state.as_ref().is_none_or(|s| s.state == convert::container_state(r.state) as i32)
                });
                wanted.then(|| convert::container(r))
            })?;
            containers.sort_by_key(|c| c.created_at);
            Ok(Response::new(ListContainersResponse { containers }))
        }

        async fn container_status(&self, request: Request<ContainerStatusRequest>) -> Result<Response<ContainerStatusResponse>, Status> {
            let request = request.into_inner();
            let record = match container::unchanged(&self.daemon, &request.container_id)? {
                Some(record) => record,
                None => {
                    let id = request.container_id.clone();
                    self.daemon.run(move |d| Ok(container::observed(d, container::find(d, &id)?))).await?
                }
            };
            tracing::Span::current().record("container_id", record.id.as_str());
            let config: Option<ContainerConfig> = serde_json::from_str(&record.config_json).ok();
            let status = convert::container_status(&record, config.as_ref());
            let mut info = std::collections::HashMap::new();
            if request.verbose {
                let detail = serde_json::json!({
                    "pid": record.pid,
                    "sandboxID": record.sandbox_id,
                    "cgroupsPath": record.cgroups_path,
                    "snapshotChainIDs": record.snapshot_chain_ids,
                    "shim": record.shim,
                    "config": config,
                });
                info.insert("info".to_string(), detail.to_string());
            }
            Ok(Response::new(ContainerStatusResponse { status: Some(status), info }))
        }

        async fn exec_sync(&self, request: Request<ExecSyncRequest>) -> Result<Response<ExecSyncResponse>, Status> {
            let request = request.into_inner();
            let out = container::exec_sync::exec_sync(
                self.daemon.clone(),
                request.container_id,
                request.cmd,
                request.timeout,
            )
            .await?;
            Ok(Response::new(ExecSyncResponse {
                stdout: out.stdout,
                stderr: out.stderr,
                exit_code: out.exit_code,
            }))
        }

        async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
            let url = self.streaming.exec_url(request.into_inner()).await?;
            Ok(Response::new(ExecResponse { url }))
        }

        async fn attach(&self, request: Request<AttachRequest>) -> Result<Response<AttachResponse>, Status> {
            let url = self.streaming.attach_url(request.into_inner()).await?;
            Ok(Response::new(AttachResponse { url }))
        }

        async fn port_forward(&self, request: Request<PortForwardRequest>) -> Result<Response<PortForwardResponse>, Status> {
            let url = self.streaming.port_forward_url(request.into_inner()).await?;
            Ok(Response::new(PortForwardResponse { url }))
        }

        async fn reopen_container_log(&self, request: Request<ReopenContainerLogRequest>) -> Result<Response<ReopenContainerLogResponse>, Status> {
            self.daemon.on_container(&request.into_inner().container_id, container::reopen_log).await?;
            Ok(Response::new(ReopenContainerLogResponse {}))
        }

        async fn container_stats(&self, request: Request<ContainerStatsRequest>) -> Result<Response<ContainerStatsResponse>, Status> {
            let id = request.into_inner().container_id;
            let (record, stats) = self.daemon.run(move |d| container::stats_of(d, &id)).await?;
            Ok(Response::new(ContainerStatsResponse { stats: Some(convert::container_stats(&record, &stats)) }))
        }

        async fn list_container_stats(&self, request: Request<ListContainerStatsRequest>) -> Result<Response<ListContainerStatsResponse>, Status> {
            let filter = request.into_inner().filter;
            let stats = self.daemon.run(move |d| {
                container::list_stats(d, |r| filter.as_ref().is_none_or(|f| convert::container_matches(r, &f.id, &f.pod_sandbox_id, &f.label_selector)))
            }).await?;
            Ok(Response::new(ListContainerStatsResponse {
                stats: stats.iter().map(|(r, s)| convert::container_stats(r, s)).collect(),
            }))
        }

        async fn pod_sandbox_stats(&self, request: Request<PodSandboxStatsRequest>) -> Result<Response<PodSandboxStatsResponse>, Status> {
            let id = request.into_inner().pod_sandbox_id;
            let stats = self.daemon.run(move |d| pod::stats(d, &id)).await?;
            Ok(Response::new(PodSandboxStatsResponse { stats: Some(convert::pod_sandbox_stats(&stats)) }))
        }

        async fn list_pod_sandbox_stats(&self, request: Request<ListPodSandboxStatsRequest>) -> Result<Response<ListPodSandboxStatsResponse>, Status> {
            let filter = request.into_inner().filter;
            let stats = self.daemon.run(move |d| pod::list_stats(d, |r| convert::pod_stats_matches(r, filter.as_ref()))).await?;
            Ok(Response::new(ListPodSandboxStatsResponse { stats: stats.iter().map(convert::pod_sandbox_stats).collect() }))
        }

        async fn list_metric_descriptors(&self, _request: Request<ListMetricDescriptorsRequest>) -> Result<Response<ListMetricDescriptorsResponse>, Status> {
            Ok(Response::new(ListMetricDescriptorsResponse { descriptors: super::metrics::descriptors() }))
        }

        async fn list_pod_sandbox_metrics(&self, _request: Request<ListPodSandboxMetricsRequest>) -> Result<Response<ListPodSandboxMetricsResponse>, Status> {
            let pods = self.daemon.run(pod::list_metrics).await?;
            Ok(Response::new(ListPodSandboxMetricsResponse { pod_metrics: pods.iter().map(super::metrics::pod_metrics).collect() }))
        }

        async fn update_container_resources(&self, request: Request<UpdateContainerResourcesRequest>) -> Result<Response<UpdateContainerResourcesResponse>, Status> {
            let request = request.into_inner();
            let linux = request
                .linux
                .ok_or_else(|| Error::InvalidArgument("linux resources are required".into()))?;
            self.daemon.on_container(&request.container_id, move |d, c| container::update_resources(d, c, linux)).await?;
            Ok(Response::new(UpdateContainerResourcesResponse {}))
        }

        async fn update_pod_sandbox_resources(&self, request: Request<UpdatePodSandboxResourcesRequest>) -> Result<Response<UpdatePodSandboxResourcesResponse>, Status> {
            let request = request.into_inner();
            let (overhead, resources) = (request.overhead, request.resources);
            self.daemon.in_sandbox(&request.pod_sandbox_id, move |d, pod| pod::update_resources(d, pod, overhead, resources)).await?;
            Ok(Response::new(UpdatePodSandboxResourcesResponse {}))
        }

        // The streaming lists answer what the unary ones do, in chunks.
        async fn stream_pod_sandboxes(&self, request: Request<StreamPodSandboxesRequest>) -> Result<Response<Self::StreamPodSandboxesStream>, Status> {
            let filter = request.into_inner().filter;
            let items = self.list_pod_sandbox(Request::new(ListPodSandboxRequest { filter })).await?.into_inner().items;
            Ok(Response::new(chunked(items, |pod_sandboxes| StreamPodSandboxesResponse { pod_sandboxes })))
        }

        async fn stream_containers(&self, request: Request<StreamContainersRequest>) -> Result<Response<Self::StreamContainersStream>, Status> {
            let filter = request.into_inner().filter;
            let items = self.list_containers(Request::new(ListContainersRequest { filter })).await?.into_inner().containers;
            Ok(Response::new(chunked(items, |containers| StreamContainersResponse { containers })))
        }

        async fn stream_container_stats(&self, request: Request<StreamContainerStatsRequest>) -> Result<Response<Self::StreamContainerStatsStream>, Status> {
            let filter = request.into_inner().filter;
            let items = self.list_container_stats(Request::new(ListContainerStatsRequest { filter })).await?.into_inner().stats;
            Ok(Response::new(chunked(items, |container_stats| StreamContainerStatsResponse { container_stats })))
        }

        async fn stream_pod_sandbox_stats(&self, request: Request<StreamPodSandboxStatsRequest>) -> Result<Response<Self::StreamPodSandboxStatsStream>, Status> {
            let filter = request.into_inner().filter;
            let items = self.list_pod_sandbox_stats(Request::new(ListPodSandboxStatsRequest { filter })).await?.into_inner().stats;
            Ok(Response::new(chunked(items, |pod_sandbox_stats| StreamPodSandboxStatsResponse { pod_sandbox_stats })))
        }

        async fn stream_pod_sandbox_metrics(&self, _request: Request<StreamPodSandboxMetricsRequest>) -> Result<Response<Self::StreamPodSandboxMetricsStream>, Status> {
            let items = self.list_pod_sandbox_metrics(Request::new(ListPodSandboxMetricsRequest {})).await?.into_inner().pod_metrics;
            Ok(Response::new(chunked(items, |pod_sandbox_metrics| StreamPodSandboxMetricsResponse { pod_sandbox_metrics })))
        }

        async fn get_container_events(&self, request: Request<GetEventsRequest>) -> Result<Response<Self::GetContainerEventsStream>, Status> {
            let who = request
                .remote_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "CRI client".into());
            Ok(Response::new(super::events::stream(self.daemon.clone(), &who)))
        }
    }
    unimplemented "RuntimeService" {
        checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse = "CheckpointContainer";
    }
}
