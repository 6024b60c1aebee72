//! berthd's Prometheus `/metrics`: the calls a test makes are counted by
//! method and code, the pod and container states and live shims match what
//! runs, pulls are counted, and the endpoint is off unless configured.
//! Nothing here depends on the cgroup version.

use std::time::{Duration, Instant};

use berth_cri::v1::*;
use berth_e2e::berthd::{ConfigBase, dev_config, metrics_address, sample, scrape, scrape_path};
use berth_e2e::pods::{PodEnv, container_config};
use berth_e2e::{Berthd, BerthdOptions, CniOptions, require_root};
use tonic::Code;

/// Metrics on a port of its own (other berthds may be running).
fn metrics_on() -> BerthdOptions {
    BerthdOptions {
        extra_toml: "[metrics]\naddress = \"127.0.0.1:0\"\n".into(),
    }
}

fn requests(text: &str, method: &str, code: &str) -> f64 {
    sample(
        text,
        &format!("berth_cri_requests_total{{method=\"{method}\",code=\"{code}\"}}"),
    )
    .unwrap_or(0.0)
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rpcs_states_shims_and_pulls() {
    let mut env = PodEnv::start_with(metrics_on()).await;
    let addr = metrics_address(&env.client).await.expect("metrics are on");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    assert!(
        env.d.log().contains(&format!("address={addr}")) && env.d.log().contains("serving metrics"),
        "the bound address is logged:\n{}",
        env.d.log()
    );

    let before = scrape(addr).await;
    for _ in 0..3 {
        env.client
            .runtime
            .version(VersionRequest::default())
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let err = env.try_status("no-such-container").await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    let after = scrape(addr).await;
    let delta =
        |method: &str, code: &str| requests(&after, method, code) - requests(&before, method, code);
    assert_eq!(delta("RuntimeService/Version", "OK"), 3.0, "{after}");
    assert_eq!(
        delta("RuntimeService/ContainerStatus", "NotFound"),
        2.0,
        "{after}"
    );
    assert_eq!(
        delta("RuntimeService/ContainerStatus", "OK"),
        0.0,
        "{after}"
    );
    assert!(
        value(
            &after,
            "berth_cri_request_duration_seconds_count{method=\"RuntimeService/Version\"}"
        ) >= 3.0
    );
    // The harness pulled two images before the test began.
    assert_eq!(
        requests(&after, "ImageService/PullImage", "OK"),
        2.0,
        "{after}"
    );
    assert_eq!(
        value(&after, "berth_image_pulls_total{result=\"success\"}"),
        2.0
    );
    assert!(
        value(&after, "berth_image_pulled_bytes_total") > 0.0,
        "{after}"
    );
    assert_eq!(
        value(&after, "berth_image_pull_duration_seconds_count"),
        2.0
    );

    // A pod with one running container.
    let pod_config = env.pod_config("metrics");
    let pod = env.run_pod(&pod_config).await;
    let ctr = env
        .run(
            &pod,
            &container_config("sleeper", &env.busybox(), &["sleep", "600"]),
        )
        .await;
    let text = scrape(addr).await;
    assert_eq!(
        value(&text, "berth_sandboxes{state=\"ready\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(value(&text, "berth_sandboxes{state=\"notready\"}"), 0.0);
    assert_eq!(
        value(&text, "berth_containers{state=\"running\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(value(&text, "berth_containers{state=\"created\"}"), 0.0);
    assert!(value(&text, "berth_shims") >= 1.0, "{text}");
    assert_eq!(requests(&text, "RuntimeService/RunPodSandbox", "OK"), 1.0);
    assert_eq!(requests(&text, "RuntimeService/StartContainer", "OK"), 1.0);
    assert!(value(&text, "berth_store_write_duration_seconds_count") > 0.0);
    assert!(
        value(&text, "berth_events_published_total") >= 2.0,
        "{text}"
    );
    assert!(value(&text, "process_resident_memory_bytes") > 0.0);
    assert!(value(&text, "process_open_fds") > 0.0);
    assert!(value(&text, "process_threads") >= 1.0);
    assert!(value(&text, "process_start_time_seconds") > 1.0e9);
    assert!(sample(&text, "process_cpu_seconds_total").is_some());

    // A scrape answers while a CRI call is in flight on that container.
    let mut slow = env.client.clone();
    let id = ctr.clone();
    let exec = tokio::spawn(async move {
        slow.runtime
            .exec_sync(ExecSyncRequest {
                container_id: id,
                cmd: vec!["sleep".into(), "3".into()],
                timeout: 30,
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let during = scrape(addr).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a scrape waited for ExecSync: {:?}",
        started.elapsed()
    );
    assert!(!exec.is_finished(), "ExecSync should still run");
    assert_eq!(requests(&during, "RuntimeService/ExecSync", "OK"), 0.0);
    exec.await.unwrap().unwrap();
    let text = scrape(addr).await;
    assert_eq!(
        requests(&text, "RuntimeService/ExecSync", "OK"),
        1.0,
        "{text}"
    );

    // Stopped and removed: the gauges follow.
    env.stop_container(&ctr, 0).await.unwrap();
    let text = scrape(addr).await;
    assert_eq!(
        value(&text, "berth_containers{state=\"running\"}"),
        0.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "berth_containers{state=\"exited\"}"),
        1.0,
        "{text}"
    );
    env.stop_pod(&pod).await.unwrap();
    env.remove_pod(&pod).await.unwrap();
    let text = scrape(addr).await;
    assert_eq!(
        value(&text, "berth_sandboxes{state=\"ready\"}"),
        0.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "berth_containers{state=\"exited\"}"),
        0.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_only_get_metrics() {
    require_root();
    let d = Berthd::start(metrics_on()).await.unwrap();
    let c = d.client().await.unwrap();
    let addr = metrics_address(&c).await.unwrap();

    let r = tokio::task::spawn_blocking(move || {
        berth_e2e::http::get(&addr.to_string(), "/metrics", &[])
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let body = String::from_utf8(r.body).unwrap();
    assert!(
        body.contains("# TYPE berth_cri_requests_total counter"),
        "{body}"
    );

    for path in ["/", "/metricsx", "/debug"] {
        let (status, _) = scrape_path(addr, path).await.unwrap();
        assert_eq!(status, 404, "{path}");
    }
    let r = tokio::task::spawn_blocking(move || {
        berth_e2e::http::request(
            &berth_e2e::http::Target::plain(&addr.to_string()),
            "POST",
            "/metrics",
            &[],
            b"x",
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r.status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_off_by_default() {
    require_root();
    let d = Berthd::start(BerthdOptions::default()).await.unwrap();
    let c = d.client().await.unwrap();
    assert_eq!(metrics_address(&c).await, None);
    assert!(!d.log().contains("serving metrics"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_config_serves_metrics_on_loopback() {
    require_root();
    let d = Berthd::start_from(
        ConfigBase {
            toml: dev_config().unwrap(),
            cni: vec![("write_default_conflist".into(), "false".into())],
        },
        BerthdOptions::default(),
        CniOptions::default(),
    )
    .await
    .unwrap();
    let c = d.client().await.unwrap();
    let addr = metrics_address(&c).await.expect("dev.toml serves metrics");
    assert!(addr.ip().is_loopback(), "{addr}");
    // The harness gave it a port of its own instead of dev.toml's.
    let config = std::fs::read_to_string(&d.config_path).unwrap();
    assert!(config.contains("address = \"127.0.0.1:0\""), "{config}");
    let text = scrape(addr).await;
    assert!(
        requests(&text, "RuntimeService/Status", "OK") >= 1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_cannot_be_bound_stops_berthd() {
    require_root();
    let mut d = Berthd::start(BerthdOptions::default()).await.unwrap();
    d.stop();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(
        &d.config_path,
        format!("{config}\n[metrics]\naddress = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let (status, stderr) = d.run_once(&[]).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("metrics.address") && stderr.contains(&format!("127.0.0.1:{port}")),
        "{stderr}"
    );
}
