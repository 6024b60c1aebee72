//! The fields and messages new in CRI v1 since k8s-cri 0.11 (Kubernetes
//! 1.33-1.36) exist and go on the wire under their published numbers and
//! types. Each check either compares exact bytes (single-field messages, so
//! the encoding is fixed) or decodes into a hand-written prost struct that
//! carries only the published tag.

use berth_cri::v1 as b;
use prost::Message;

/// Hand-written mirrors of the published shapes, one tag each.
mod published {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PsiData {
        #[prost(uint64, tag = "1")]
        pub total: u64,
        #[prost(double, tag = "2")]
        pub avg10: f64,
        #[prost(double, tag = "3")]
        pub avg60: f64,
        #[prost(double, tag = "4")]
        pub avg300: f64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PsiStats {
        #[prost(message, optional, tag = "1")]
        pub full: Option<PsiData>,
        #[prost(message, optional, tag = "2")]
        pub some: Option<PsiData>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CpuUsage {
        #[prost(message, optional, tag = "4")]
        pub psi: Option<PsiStats>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MemoryUsage {
        #[prost(message, optional, tag = "8")]
        pub psi: Option<PsiStats>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IoUsage {
        #[prost(int64, tag = "1")]
        pub timestamp: i64,
        #[prost(message, optional, tag = "2")]
        pub psi: Option<PsiStats>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStats {
        #[prost(message, optional, tag = "6")]
        pub io: Option<IoUsage>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxPodSandboxStats {
        #[prost(message, optional, tag = "6")]
        pub io: Option<IoUsage>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxContainerResources {
        #[prost(int64, tag = "1")]
        pub cpu_period: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UpdatePodSandboxResourcesRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "2")]
        pub overhead: Option<LinuxContainerResources>,
        #[prost(message, optional, tag = "3")]
        pub resources: Option<LinuxContainerResources>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Named {
        #[prost(string, tag = "1")]
        pub id: String,
    }
    /// StreamPodSandboxesResponse, StreamContainersResponse, ...: one
    /// repeated message at number 1.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RepeatedAt1 {
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<Named>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FilterAt1 {
        #[prost(message, optional, tag = "1")]
        pub filter: Option<Named>,
    }
}

fn psi() -> b::PsiStats {
    b::PsiStats {
        full: Some(b::PsiData {
            total: 123_456,
            avg10: 1.5,
            avg60: 0.75,
            avg300: 0.125,
        }),
        some: Some(b::PsiData {
            total: 7,
            avg10: 99.0,
            avg60: 50.0,
            avg300: 25.0,
        }),
    }
}

fn published_psi() -> published::PsiStats {
    published::PsiStats {
        full: Some(published::PsiData {
            total: 123_456,
            avg10: 1.5,
            avg60: 0.75,
            avg300: 0.125,
        }),
        some: Some(published::PsiData {
            total: 7,
            avg10: 99.0,
            avg60: 50.0,
            avg300: 25.0,
        }),
    }
}

#[test]
fn stop_signal_is_field_18_of_container_config_and_19_of_container_status() {
    // KEP-4960, Kubernetes 1.33. Enum values as published.
    assert_eq!(b::Signal::RuntimeDefault as i32, 0);
    assert_eq!(b::Signal::Sigkill as i32, 13);
    assert_eq!(b::Signal::Sigterm as i32, 23);
    assert_eq!(b::Signal::Sigrtmin as i32, 35);
    assert_eq!(b::Signal::Sigrtmax as i32, 65);
    assert_eq!(b::Signal::Sigrtmaxminus1.as_str_name(), "SIGRTMAXMINUS1");

    let config = b::ContainerConfig {
        stop_signal: b::Signal::Sigterm as i32,
        ..Default::default()
    };
    // tag (18 << 3 | varint) = 144 = 0x90 0x01, value 23
    assert_eq!(config.encode_to_vec(), [0x90, 0x01, 23]);

    let status = b::ContainerStatus {
        stop_signal: b::Signal::Sigrtmax as i32,
        ..Default::default()
    };
    // tag (19 << 3 | varint) = 152 = 0x98 0x01, value 65
    assert_eq!(status.encode_to_vec(), [0x98, 0x01, 65]);
}

#[test]
fn image_sub_path_is_field_10_of_mount() {
    let mount = b::Mount {
        image_sub_path: "ab".into(),
        ..Default::default()
    };
    // tag (10 << 3 | length-delimited) = 0x52
    assert_eq!(mount.encode_to_vec(), [0x52, 2, b'a', b'b']);
}

#[test]
fn image_ref_is_field_20_of_image_spec() {
    let spec = b::ImageSpec {
        image_ref: "x".into(),
        ..Default::default()
    };
    // tag (20 << 3 | length-delimited) = 162 = 0xa2 0x01
    assert_eq!(spec.encode_to_vec(), [0xa2, 0x01, 1, b'x']);
    // The neighbours, for reference: user_specified_image 18, runtime_handler 19.
    let spec = b::ImageSpec {
        user_specified_image: "u".into(),
        ..Default::default()
    };
    assert_eq!(spec.encode_to_vec(), [0x92, 0x01, 1, b'u']);
}

#[test]
fn user_namespaces_host_network_is_field_2_of_runtime_features() {
    let features = b::RuntimeFeatures {
        user_namespaces_host_network: true,
        ..Default::default()
    };
    assert_eq!(features.encode_to_vec(), [0x10, 1]);
}

#[test]
fn psi_is_in_cpu_memory_and_io_usage_with_published_tags() {
    let cpu = b::CpuUsage {
        psi: Some(psi()),
        ..Default::default()
    };
    let decoded = published::CpuUsage::decode(cpu.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded.psi, Some(published_psi()));
    // Only the psi field (tag 4, length-delimited) is on the wire.
    assert_eq!(cpu.encode_to_vec()[0], 0x22);

    let memory = b::MemoryUsage {
        psi: Some(psi()),
        ..Default::default()
    };
    let decoded = published::MemoryUsage::decode(memory.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded.psi, Some(published_psi()));
    assert_eq!(memory.encode_to_vec()[0], 0x42);

    let io = b::IoUsage {
        timestamp: 5,
        psi: Some(psi()),
    };
    let stats = b::ContainerStats {
        io: Some(io),
        ..Default::default()
    };
    let decoded = published::ContainerStats::decode(stats.encode_to_vec().as_slice()).unwrap();
    assert_eq!(
        decoded.io,
        Some(published::IoUsage {
            timestamp: 5,
            psi: Some(published_psi()),
        })
    );
    let pod = b::LinuxPodSandboxStats {
        io: Some(io),
        ..Default::default()
    };
    let decoded = published::LinuxPodSandboxStats::decode(pod.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded.io.unwrap().timestamp, 5);

    // PsiData: Total is a varint at 1, the averages are doubles (fixed64)
    // at 2, 3 and 4.
    let data = b::PsiData {
        total: 1,
        avg10: 0.0,
        avg60: 0.0,
        avg300: 2.0,
    };
    let mut expected = vec![0x08, 1, 0x21];
    expected.extend_from_slice(&2.0f64.to_le_bytes());
    assert_eq!(data.encode_to_vec(), expected);
}

#[test]
fn update_pod_sandbox_resources_request_has_published_tags() {
    let request = b::UpdatePodSandboxResourcesRequest {
        pod_sandbox_id: "feedface".into(),
        overhead: Some(b::LinuxContainerResources {
            cpu_period: 1,
            ..Default::default()
        }),
        resources: Some(b::LinuxContainerResources {
            cpu_period: 2,
            ..Default::default()
        }),
    };
    let decoded =
        published::UpdatePodSandboxResourcesRequest::decode(request.encode_to_vec().as_slice())
            .unwrap();
    assert_eq!(
        decoded,
        published::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: "feedface".into(),
            overhead: Some(published::LinuxContainerResources { cpu_period: 1 }),
            resources: Some(published::LinuxContainerResources { cpu_period: 2 }),
        }
    );
    assert!(
        b::UpdatePodSandboxResourcesResponse {}
            .encode_to_vec()
            .is_empty()
    );
}

#[test]
fn stream_messages_carry_their_list_and_filter_at_field_1() {
    fn items(bytes: Vec<u8>) -> Vec<String> {
        published::RepeatedAt1::decode(bytes.as_slice())
            .unwrap()
            .items
            .into_iter()
            .map(|n| n.id)
            .collect()
    }
    let sandbox = |id: &str| b::PodSandbox {
        id: id.into(),
        ..Default::default()
    };
    let container = |id: &str| b::Container {
        id: id.into(),
        ..Default::default()
    };
    let stats = |id: &str| b::ContainerStats {
        attributes: Some(b::ContainerAttributes {
            id: id.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let image = |id: &str| b::Image {
        id: id.into(),
        ..Default::default()
    };

    let response = b::StreamPodSandboxesResponse {
        pod_sandboxes: vec![sandbox("p1"), sandbox("p2")],
    };
    assert_eq!(items(response.encode_to_vec()), ["p1", "p2"]);
    let response = b::StreamContainersResponse {
        containers: vec![container("c1")],
    };
    assert_eq!(items(response.encode_to_vec()), ["c1"]);
    let response = b::StreamImagesResponse {
        images: vec![image("sha256:1"), image("sha256:2")],
    };
    assert_eq!(items(response.encode_to_vec()), ["sha256:1", "sha256:2"]);
    // ContainerStats and PodSandboxStats start with their attributes at 1,
    // whose id is at 1 again.
    let response = b::StreamContainerStatsResponse {
        container_stats: vec![stats("c1")],
    };
    let decoded = published::RepeatedAt1::decode(response.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded.items.len(), 1);
    let response = b::StreamPodSandboxStatsResponse {
        pod_sandbox_stats: vec![b::PodSandboxStats::default(), b::PodSandboxStats::default()],
    };
    let decoded = published::RepeatedAt1::decode(response.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded.items.len(), 2);
    let response = b::StreamPodSandboxMetricsResponse {
        pod_sandbox_metrics: vec![b::PodSandboxMetrics {
            pod_sandbox_id: "p1".into(),
            ..Default::default()
        }],
    };
    assert_eq!(items(response.encode_to_vec()), ["p1"]);
    assert!(
        b::StreamPodSandboxMetricsRequest {}
            .encode_to_vec()
            .is_empty()
    );

    fn filter_id(bytes: Vec<u8>) -> String {
        published::FilterAt1::decode(bytes.as_slice())
            .unwrap()
            .filter
            .unwrap()
            .id
    }
    let request = b::StreamPodSandboxesRequest {
        filter: Some(b::PodSandboxFilter {
            id: "p".into(),
            ..Default::default()
        }),
    };
    assert_eq!(filter_id(request.encode_to_vec()), "p");
    let request = b::StreamContainersRequest {
        filter: Some(b::ContainerFilter {
            id: "c".into(),
            ..Default::default()
        }),
    };
    assert_eq!(filter_id(request.encode_to_vec()), "c");
    let request = b::StreamContainerStatsRequest {
        filter: Some(b::ContainerStatsFilter {
            id: "s".into(),
            ..Default::default()
        }),
    };
    assert_eq!(filter_id(request.encode_to_vec()), "s");
    let request = b::StreamPodSandboxStatsRequest {
        filter: Some(b::PodSandboxStatsFilter {
            id: "q".into(),
            ..Default::default()
        }),
    };
    assert_eq!(filter_id(request.encode_to_vec()), "q");
    // ImageFilter's first field is an ImageSpec, whose image is at 1.
    let request = b::StreamImagesRequest {
        filter: Some(b::ImageFilter {
            image: Some(b::ImageSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
        }),
    };
    let bytes = request.encode_to_vec();
    assert_eq!(&bytes[..2], [0x0a, 11]);
    assert_eq!(&bytes[2..4], [0x0a, 9]);
    assert_eq!(&bytes[4..], b"\x0a\x07busybox");
}

#[test]
fn services_carry_the_published_rpc_names() {
    use b::image_service_server::ImageServiceServer;
    use b::runtime_service_server::RuntimeServiceServer;
    use tonic::server::NamedService;
    assert_eq!(
        <RuntimeServiceServer<()> as NamedService>::NAME,
        "runtime.v1.RuntimeService"
    );
    assert_eq!(
        <ImageServiceServer<()> as NamedService>::NAME,
        "runtime.v1.ImageService"
    );
}
