//! The benchmark in quick mode against Berth alone (what CI runs): every
//! row is there with a figure or "n/a (reason)", the JSON matches the
//! table, and nothing is left on the host.

use berth_e2e::bench::{self, BenchOptions, Cell, Plan, report};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_bench_against_berth_has_every_row() {
    berth_e2e::require_root();
    let opts = BenchOptions::quick();
    let plan = Plan::from_options(&opts);
    let started = std::time::Instant::now();
    let report = bench::run(&opts).await.expect("berth-bench --quick");
    let elapsed = started.elapsed();
    let table = report.table();
    println!("{}\n{table}", report.preamble());

    // One runtime: Berth, which answered Version.
    assert_eq!(report.runtimes.len(), 1, "{table}");
    let berth = &report.runtimes[0];
    assert_eq!(berth.key, "berth");
    assert!(
        berth.version.starts_with("berth "),
        "version {:?}",
        berth.version
    );

    // Every row of the quick plan, in order, with a figure or n/a.
    let expected = [
        "RunPodSandbox",
        "CreateContainer",
        "StartContainer",
        "ExecSync (echo hi)",
        "Exec (streaming, SPDY) `echo hi`",
        "ContainerStatus",
        "StopContainer (timeout 0, sleep 1000)",
        "RemoveContainer",
        "StopPodSandbox",
        "RemovePodSandbox",
        "RunPodSandbox → container's first log line",
        "5 pods × 1 container started concurrently (wall)",
        "runtime PSS per container (K=3)",
        "daemon RSS idle",
        "daemon RSS with 30 pods × 1 container",
        "ListContainers at 30 containers",
        "ListContainerStats at 30 containers",
        "ListPodSandboxStats at 30 pods",
        "one /metrics scrape at 30 containers",
        "daemon CPU while listing stats every second (30 containers, 3 s)",
        "ContainerStatus p99 while 10 RemovePodSandbox run concurrently",
        "container exit → STOPPED event",
        "port-forward pod → client, 64 MiB over one SPDY connection",
        "port-forward client → pod, 64 MiB over one SPDY connection",
        "pull+unpack 20 MiB incompressible, 5 layers (cold cache)",
        "RemoveImage of that image (20 MiB, 5 layers, unused)",
    ];
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("metric") && lines[0].contains("Berth"),
        "{table}"
    );
    assert_eq!(lines.len(), 2 + expected.len(), "{table}");
    for (label, line) in expected.iter().zip(&lines[2..]) {
        let cols: Vec<&str> = line.split(" | ").map(str::trim).collect();
        assert_eq!(cols[0], *label, "{table}");
        assert_eq!(cols.len(), 3, "metric, unit, Berth: {line}");
        let cell = cols[2];
        assert!(
            cell.starts_with("n/a (") || cell.starts_with(|c: char| c.is_ascii_digit()),
            "row {label:?}: neither a figure nor n/a: {cell:?}"
        );
    }
    assert_eq!(
        report.defs.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        bench::row_ids(&plan)
    );

    // Figures that need nothing but a running berthd.
    assert!(
        berth
            .cell(report::RSS_IDLE)
            .median()
            .is_some_and(|m| m > 1.0),
        "daemon RSS idle: {:?}",
        berth.cell(report::RSS_IDLE)
    );
    // Berth implements ListPodSandboxStats; its CPU is read from /proc.
    for id in [report::LIST_POD_STATS, report::STATS_CPU] {
        assert!(
            !berth.cell(id).is_na(),
            "{id}: {:?}\n{table}",
            berth.cell(id)
        );
    }
    // The scrape is measured, or berthd says it has no endpoint.
    match berth.cell(report::METRICS_SCRAPE) {
        Cell::Na(why) => assert!(
            why.starts_with("berthd: metrics endpoint not configured"),
            "metrics scrape: {why}"
        ),
        Cell::Samples { values, failed, .. } => {
            assert_eq!(values.len() + failed, plan.iterations)
        }
    }
    // A figure with samples has the plan's count (failures aside).
    if let Cell::Samples { values, failed, .. } = berth.cell("container_status") {
        assert_eq!(values.len() + failed, plan.iterations);
    }

    // The JSON has every metric with a value or a reason for Berth.
    let json = report.to_json();
    let metrics = json["metrics"].as_array().expect("metrics");
    assert_eq!(metrics.len(), expected.len());
    for m in metrics {
        let v = &m["values"]["berth"];
        assert!(v["median"].is_f64() || v["na"].is_string(), "{m}");
    }

    // Nothing left: no cgroup of the run, no shim of it.
    let run_id = &report.environment["run id"];
    let cgroup = format!("/berth-bench-{run_id}");
    assert!(
        bench::host::cgroup_dirs(&cgroup).is_empty(),
        "cgroup {cgroup} left behind"
    );
    assert!(
        elapsed < std::time::Duration::from_secs(180),
        "--quick took {elapsed:?}"
    );
}
