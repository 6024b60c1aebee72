//! CRI messages of ListMetricDescriptors and ListPodSandboxMetrics, from
//! `sandbox::metrics`.

use berth_cri::v1 as cri;

use crate::sandbox::metrics::{self, Kind, PodSamples, Sample};

pub fn descriptors() -> Vec<cri::MetricDescriptor> {
    metrics::DESCRIPTORS
        .iter()
        .map(|d| cri::MetricDescriptor {
            name: d.name.into(),
            help: d.help.into(),
            label_keys: d.label_keys().into_iter().map(String::from).collect(),
        })
        .collect()
}

fn metric(s: &Sample) -> cri::Metric {
    cri::Metric {
        name: s.descriptor.name.into(),
        timestamp: s.timestamp_ns,
        metric_type: match s.descriptor.kind {
            Kind::Counter => cri::MetricType::Counter,
            Kind::Gauge => cri::MetricType::Gauge,
        } as i32,
        label_values: s.label_values.clone(),
        value: Some(cri::UInt64Value { value: s.value }),
    }
}

pub fn pod_metrics(p: &PodSamples) -> cri::PodSandboxMetrics {
    cri::PodSandboxMetrics {
        pod_sandbox_id: p.sandbox_id.clone(),
        metrics: p.samples.iter().map(metric).collect(),
        container_metrics: p
            .containers
            .iter()
            .map(|c| cri::ContainerMetrics {
                container_id: c.container_id.clone(),
                metrics: c.samples.iter().map(metric).collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_keys_and_metric_types() {
        let d = descriptors();
        assert_eq!(d.len(), metrics::DESCRIPTORS.len());
        let cpu = d
            .iter()
            .find(|d| d.name == "container_cpu_usage_seconds_total")
            .unwrap();
        assert_eq!(
            cpu.label_keys,
            [
                "id",
                "name",
                "image",
                "container",
                "pod",
                "namespace",
                "cpu"
            ]
        );
        let rx = d
            .iter()
            .find(|d| d.name == "container_network_receive_bytes_total")
            .unwrap();
        assert_eq!(rx.label_keys.last().map(String::as_str), Some("interface"));
        let sample = Sample {
            descriptor: metrics::descriptor("container_memory_rss").unwrap(),
            label_values: vec!["x".into(); 6],
            value: 5,
            timestamp_ns: 11,
        };
        let m = metric(&sample);
        assert_eq!(m.metric_type, cri::MetricType::Gauge as i32);
        assert_eq!((m.timestamp, m.value.map(|v| v.value)), (11, Some(5)));
    }
}
