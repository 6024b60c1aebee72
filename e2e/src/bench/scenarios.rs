//! The measurements, each against one [`Target`]: pod lifecycles call by
//! call, concurrent starts, per-container memory, many pods, pulls.
//! Every failure becomes an "n/a (reason)" cell; nothing here aborts the
//! run.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use berth_cri::v1::*;

use super::host;
use crate::cri::CriClient;
use crate::streaming;

use super::report::{self, Cell, Collector, LIFECYCLE, RuntimeResult};
use super::target::{
    self, Kind, Launched, PAYLOAD_CMDLINE, PodFactory, Target, call, launch, ms, teardown,
    teardown_many, timed,
};
use super::{BigImage, Plan};

fn progress(t: &Target, what: &str) {
    eprintln!("berth-bench [{}] {what}", t.key);
}

/// The daemon's RSS in MiB.
pub fn daemon_rss(t: &Target) -> Cell {
    match t.daemon_pid {
        None => Cell::na("daemon pid unknown"),
        Some(pid) => match host::rss_kib(pid) {
            Some(kib) => Cell::value(kib as f64 / 1024.0),
            None => Cell::na(format!("cannot read /proc/{pid}/status")),
        },
    }
}

/// N pod lifecycles (after W warm-ups), every CRI call timed:
/// RunPodSandbox, CreateContainer, StartContainer, (first log line),
/// ExecSync, ContainerStatus, StopContainer, RemoveContainer,
/// StopPodSandbox, RemovePodSandbox. A failed call is recorded and the
/// lifecycle goes on with what still makes sense.
pub async fn lifecycle(t: &mut Target, f: &PodFactory, plan: &Plan, res: &mut RuntimeResult) {
    let mut cols: HashMap<&str, Collector> = LIFECYCLE
        .iter()
        .map(|(id, _)| (*id, Collector::default()))
        .chain([(report::E2E, Collector::default())])
        .collect();
    // Why a metric got no sample at all, when it was never reached.
    let mut blocked: HashMap<&str, String> = HashMap::new();
    // Streaming execs whose status the client lost to a stream reset.
    let mut exec_status_reset = 0usize;
    let total = plan.warmup + plan.iterations;
    for i in 0..total {
        let rec = i >= plan.warmup;
        if i == 0 || (i + 1) % 10 == 0 || i + 1 == total {
            progress(t, &format!("lifecycle {}/{total}", i + 1));
        }
        let note =
            |cols: &mut HashMap<&str, Collector>, id: &'static str, r: Result<Duration, String>| {
                if let Some(c) = cols.get_mut(id)
                    && rec
                {
                    match r {
                        Ok(d) => c.push(ms(d)),
                        Err(e) => c.fail(e),
                    }
                }
            };
        let c = &mut t.client;
        let config = f.pod("lc");
        let log_file = std::path::Path::new(&config.log_directory).join("c.log");
        let t0 = Instant::now();
        let pod = timed(c.runtime.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        }))
        .await;
        let pod_id = match pod {
            Ok((r, d)) => {
                note(&mut cols, "run_pod_sandbox", Ok(d));
                r.pod_sandbox_id
            }
            Err(e) => {
                note(&mut cols, "run_pod_sandbox", Err(e.clone()));
                for (id, _) in &LIFECYCLE[1..] {
                    blocked
                        .entry(id)
                        .or_insert(format!("RunPodSandbox failed: {e}"));
                }
                blocked
                    .entry(report::E2E)
                    .or_insert(format!("RunPodSandbox failed: {e}"));
                continue;
            }
        };
        let created = timed(c.runtime.create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(f.container()),
            sandbox_config: Some(config),
        }))
        .await;
        let ctr = match created {
            Ok((r, d)) => {
                note(&mut cols, "create_container", Ok(d));
                Some(r.container_id)
            }
            Err(e) => {
                note(&mut cols, "create_container", Err(e.clone()));
                for id in [
                    "start_container",
                    "exec_sync",
                    report::EXEC_STREAMING,
                    "container_status",
                    "stop_container",
                    "remove_container",
                    report::E2E,
                ] {
                    blocked
                        .entry(id)
                        .or_insert(format!("CreateContainer failed: {e}"));
                }
                None
            }
        };
        if let Some(ctr) = &ctr {
            let started = timed(c.runtime.start_container(StartContainerRequest {
                container_id: ctr.clone(),
            }))
            .await;
            let running = started.is_ok();
            if let Err(e) = &started {
                for id in ["exec_sync", report::EXEC_STREAMING, report::E2E] {
                    blocked
                        .entry(id)
                        .or_insert(format!("StartContainer failed: {e}"));
                }
            }
            note(&mut cols, "start_container", started.map(|(_, d)| d));
            if running {
                let ready = target::wait_log_line(&log_file, t0).await;
                note(&mut cols, report::E2E, ready);
                let exec = timed(c.runtime.exec_sync(ExecSyncRequest {
                    container_id: ctr.clone(),
                    cmd: vec!["echo".into(), "hi".into()],
                    timeout: 10,
                }))
                .await
                .and_then(|(r, d)| {
                    if r.exit_code == 0 && r.stdout == b"hi\n" {
                        Ok(d)
                    } else {
                        Err(format!(
                            "echo hi: exit {}, stdout {:?}, stderr {:?}",
                            r.exit_code,
                            String::from_utf8_lossy(&r.stdout),
                            String::from_utf8_lossy(&r.stderr)
                        ))
                    }
                });
                note(&mut cols, "exec_sync", exec);
                let exec = exec_streaming(c, ctr).await;
                if rec && matches!(exec, Ok((_, true))) {
                    exec_status_reset += 1;
                }
                note(&mut cols, report::EXEC_STREAMING, exec.map(|(d, _)| d));
            }
            let status = timed(c.runtime.container_status(ContainerStatusRequest {
                container_id: ctr.clone(),
                verbose: false,
            }))
            .await
            .and_then(|(r, d)| {
                let state = r.status.map(|s| s.state).unwrap_or(-1);
                if !running || state == ContainerState::ContainerRunning as i32 {
                    Ok(d)
                } else {
                    Err(format!("state {state}, not RUNNING"))
                }
            });
            note(&mut cols, "container_status", status);
            let stopped = timed(c.runtime.stop_container(StopContainerRequest {
                container_id: ctr.clone(),
                timeout: 0,
            }))
            .await;
            note(&mut cols, "stop_container", stopped.map(|(_, d)| d));
            let removed = timed(c.runtime.remove_container(RemoveContainerRequest {
                container_id: ctr.clone(),
            }))
            .await;
            note(&mut cols, "remove_container", removed.map(|(_, d)| d));
        }
        let stopped = timed(c.runtime.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        }))
        .await;
        note(&mut cols, "stop_pod_sandbox", stopped.map(|(_, d)| d));
        let removed = timed(c.runtime.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        }))
        .await;
        let removed_ok = removed.is_ok();
        note(&mut cols, "remove_pod_sandbox", removed.map(|(_, d)| d));
        if !removed_ok {
            // Whatever failed above, leave nothing behind.
            teardown(c, &pod_id, ctr.as_deref()).await;
        }
    }
    if exec_status_reset > 0
        && let Some(c) = cols.get_mut(report::EXEC_STREAMING)
    {
        c.note(format!(
            "{exec_status_reset} of {}: error stream reset (RST_STREAM) before its status was read, after stdout; counted as success, as client-go reads an empty v4 error stream",
            plan.iterations
        ));
    }
    for (id, col) in cols {
        let missing = blocked
            .get(id)
            .cloned()
            .unwrap_or_else(|| "not measured".into());
        res.set(id, col.cell(&missing));
    }
}

/// How long a streaming session (exec, one port-forward transfer) may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// CRI `Exec` of `echo hi` (stdout only, no tty), then the SPDY session
/// to the URL it answered (`v4.channel.k8s.io`, streams opened as
/// client-go does) until stdout holds `hi\n` and the error stream the v4
/// Success status: the time from sending the request to having both, and
/// whether the status was lost to a reset of the error stream instead.
async fn exec_streaming(c: &mut CriClient, container_id: &str) -> Result<(Duration, bool), String> {
    let t0 = Instant::now();
    let url = call(c.runtime.exec(ExecRequest {
        container_id: container_id.to_string(),
        cmd: vec!["echo".into(), "hi".into()],
        tty: false,
        stdin: false,
        stdout: true,
        stderr: false,
    }))
    .await
    .map_err(|e| format!("Exec: {e}"))?
    .url;
    let stdio = streaming::Stdio {
        stdin: false,
        stdout: true,
        stderr: false,
        tty: false,
    };
    let mut session = streaming::spdy_remote_command(&url, &[streaming::WS_V4], stdio)
        .await
        .map_err(|e| format!("SPDY to the Exec URL: {e}"))?;
    let success = |o: &streaming::Output| {
        o.status()
            .is_some_and(|s| s["status"].as_str() == Some("Success"))
    };
    // Done once both are there, or on any other status, or at the end.
    session
        .read_while(STREAM_TIMEOUT, |o| {
            o.closed
                || (o.status().is_some() && (!success(o) || o.bytes(streaming::STDOUT) == b"hi\n"))
        })
        .await;
    let took = t0.elapsed();
    let o = &session.output;
    if o.bytes(streaming::STDOUT) == b"hi\n" {
        if success(o) {
            return Ok((took, false));
        }
        // The error stream reset by the server with nothing read from it
        // (the session reader drops what it had not read yet on a reset):
        // for client-go (spdystream) that is an empty error stream, which
        // v4 reads as success.
        if o.closed
            && o.bytes(streaming::ERROR)
                .starts_with(b"<SPDY read error: stream reset by peer")
        {
            return Ok((took, true));
        }
    }
    Err(match o.status() {
        Some(s) if !success(o) => format!(
            "error stream: {}",
            s["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| s.to_string())
        ),
        _ if !o.closed => format!(
            "no stdout \"hi\\n\" and Success status within {STREAM_TIMEOUT:?}:{}",
            o.describe()
        ),
        _ => format!(
            "the session ended without stdout \"hi\\n\" and a Success status:{}",
            o.describe()
        ),
    })
}

/// Starts `count` pods with one container each, `parallel` at a time;
/// returns the started ones and the failures (with what to clean up).
async fn launch_many(
    t: &Target,
    f: &PodFactory,
    count: usize,
    parallel: usize,
    wait_ready: bool,
    name: &str,
) -> (Vec<Launched>, Vec<target::LaunchError>) {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..count {
        let mut c = t.client.clone();
        let f = f.clone();
        let sem = sem.clone();
        let name = name.to_string();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            launch(&mut c, &f, &name, wait_ready).await
        });
    }
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(l)) => ok.push(l),
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(target::LaunchError {
                step: "task",
                error: e.to_string(),
                pod_id: None,
                container_id: None,
            }),
        }
    }
    (ok, failed)
}

fn cleanup_list(ok: &[Launched], failed: &[target::LaunchError]) -> Vec<(String, Option<String>)> {
    ok.iter()
        .map(|l| (l.pod_id.clone(), Some(l.container_id.clone())))
        .chain(
            failed
                .iter()
                .filter_map(|e| e.pod_id.clone().map(|p| (p, e.container_id.clone()))),
        )
        .collect()
}

fn failure_text(failed: &[target::LaunchError], of: usize) -> String {
    let e = &failed[0];
    format!(
        "{} of {of} pods failed; first at {}: {}",
        failed.len(),
        e.step,
        e.error
    )
}

/// Wall time to start P pods (one container each, until its first log
/// line) all at once.
pub async fn concurrent(t: &mut Target, f: &PodFactory, plan: &Plan, res: &mut RuntimeResult) {
    for &p in &plan.concurrent {
        let mut col = Collector::default();
        for run in 0..plan.concurrent_runs {
            progress(
                t,
                &format!(
                    "{p} pods concurrently, run {}/{}",
                    run + 1,
                    plan.concurrent_runs
                ),
            );
            let t0 = Instant::now();
            let (ok, failed) = launch_many(t, f, p, p, true, &format!("cc{p}")).await;
            let wall = t0.elapsed();
            if failed.is_empty() {
                col.push(ms(wall));
            } else {
                col.fail(failure_text(&failed, p));
            }
            teardown_many(&t.client, cleanup_list(&ok, &failed), 8).await;
        }
        res.set(report::concurrent_id(p), col.cell("not measured"));
    }
}

/// The runtime's own processes for `containers` (payload excluded), and
/// how they were found.
async fn runtime_processes(
    t: &mut Target,
    launched: &[Launched],
) -> Result<(BTreeSet<i32>, String), String> {
    // The payload: each container's init (verbose status) and whatever runs
    // `sleep 1000`, with their descendants.
    let mut payload_roots = Vec::new();
    for l in launched {
        if let Some(pid) = target::container_pid(&mut t.client, &l.container_id).await {
            payload_roots.push(pid);
        }
    }
    let tree = host::ProcessTree::snapshot();
    let (roots, how): (Vec<i32>, String) = match &t.kind {
        Kind::Berth { state_dir, .. } => {
            let mut shims = Vec::new();
            for l in launched {
                let file = state_dir
                    .join("shims")
                    .join(&l.container_id)
                    .join("shim.pid");
                match std::fs::read_to_string(&file)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    Some(pid) if host::alive(pid) => shims.push(pid),
                    _ => return Err(format!("no live shim pid in {}", file.display())),
                }
            }
            (
                shims,
                "berth-shim monitors (shims/*/shim.pid) and their children".into(),
            )
        }
        Kind::Containerd { address, .. } => {
            let shims =
                host::processes_matching("containerd-shim-runc-v2", &address.display().to_string());
            if shims.is_empty() {
                return Err("no containerd-shim-runc-v2 process found".into());
            }
            let mut roots = shims;
            // The pause processes (children of the shims; added in case).
            for l in launched {
                if let Some(pid) = target::sandbox_pid(&mut t.client, &l.pod_id).await {
                    roots.push(pid);
                }
            }
            (
                roots,
                "containerd-shim-runc-v2 processes and their children (pause)".into(),
            )
        }
        Kind::External => return Err("process layout unknown for an external endpoint".into()),
    };
    let mut payload = BTreeSet::new();
    for p in &payload_roots {
        payload.extend(tree.subtree(*p));
    }
    let mut procs = BTreeSet::new();
    for r in roots {
        for p in tree.subtree(r) {
            if payload.contains(&p) {
                continue;
            }
            if host::cmdline(p).is_some_and(|c| c == PAYLOAD_CMDLINE) {
                continue;
            }
            procs.insert(p);
        }
    }
    Ok((procs, how))
}

/// PSS of every process the runtime adds per container, at K running
/// containers, per container.
pub async fn memory(t: &mut Target, f: &PodFactory, plan: &Plan, res: &mut RuntimeResult) {
    progress(t, &format!("memory at K={}", plan.k));
    let (ok, failed) = launch_many(t, f, plan.k, 4, true, "mem").await;
    let cell = if !failed.is_empty() {
        Cell::na(failure_text(&failed, plan.k))
    } else {
        // Let the runtime's processes settle after start.
        tokio::time::sleep(Duration::from_secs(1)).await;
        match runtime_processes(t, &ok).await {
            Err(e) => Cell::na(e),
            Ok((procs, how)) => {
                let mut pss = 0u64;
                let mut rss = 0u64;
                for p in &procs {
                    pss += host::pss_kib(*p).unwrap_or(0);
                    rss += host::rss_kib(*p).unwrap_or(0);
                }
                let k = plan.k as f64;
                res.notes.push(format!(
                    "per-container memory: {} processes for {} containers ({how}); PSS {:.2} MiB, summed RSS {:.2} MiB per container",
                    procs.len(),
                    plan.k,
                    pss as f64 / 1024.0 / k,
                    rss as f64 / 1024.0 / k
                ));
                Cell::value(pss as f64 / 1024.0 / k)
            }
        }
    };
    res.set(report::PSS, cell);
    teardown_many(&t.client, cleanup_list(&ok, &failed), 8).await;
}

/// `plan.many` pods with one container each: the daemon's RSS, then
/// ListContainers and ListContainerStats timed N times.
pub async fn many(t: &mut Target, f: &PodFactory, plan: &Plan, res: &mut RuntimeResult) {
    progress(t, &format!("starting {} pods", plan.many));
    let t0 = Instant::now();
    let (ok, failed) = launch_many(t, f, plan.many, 8, false, "many").await;
    progress(
        t,
        &format!(
            "{} pods started in {:.1} s ({} failed)",
            ok.len(),
            t0.elapsed().as_secs_f64(),
            failed.len()
        ),
    );
    if ok.is_empty() {
        let why = if failed.is_empty() {
            "no pod started".to_string()
        } else {
            failure_text(&failed, plan.many)
        };
        for id in [
            report::RSS_MANY,
            report::LIST_CONTAINERS,
            report::LIST_STATS,
            report::LIST_POD_STATS,
            report::METRICS_SCRAPE,
            report::STATS_CPU,
        ] {
            res.set(id, Cell::na(why.clone()));
        }
    } else {
        let partial = (!failed.is_empty()).then(|| failure_text(&failed, plan.many));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut rss = daemon_rss(t);
        if let (Some(p), Cell::Samples { note, .. }) = (&partial, &mut rss) {
            *note = Some(format!("only {} pods: {p}", ok.len()));
        }
        res.set(report::RSS_MANY, rss);

        let mut col = Collector::default();
        for _ in 0..plan.iterations {
            match timed(
                t.client
                    .runtime
                    .list_containers(ListContainersRequest { filter: None }),
            )
            .await
            {
                Ok((r, d)) => {
                    col.push(ms(d));
                    if r.containers.len() < ok.len() {
                        col.note(format!(
                            "listed {} of {} containers",
                            r.containers.len(),
                            ok.len()
                        ));
                    }
                }
                Err(e) => {
                    col.fail(e);
                    break;
                }
            }
        }
        if let Some(p) = &partial {
            col.note(format!("only {} containers: {p}", ok.len()));
        }
        res.set(report::LIST_CONTAINERS, col.cell("not measured"));

        let mut col = Collector::default();
        for _ in 0..plan.iterations {
            match timed(
                t.client
                    .runtime
                    .list_container_stats(ListContainerStatsRequest { filter: None }),
            )
            .await
            {
                Ok((r, d)) => {
                    col.push(ms(d));
                    if r.stats.len() < ok.len() {
                        col.note(format!(
                            "stats for {} of {} containers",
                            r.stats.len(),
                            ok.len()
                        ));
                    }
                }
                Err(e) => {
                    col.fail(e);
                    break;
                }
            }
        }
        if let Some(p) = &partial {
            col.note(format!("only {} containers: {p}", ok.len()));
        }
        res.set(report::LIST_STATS, col.cell("not measured"));

        let mut cell = list_pod_stats(t, plan, ok.len()).await;
        if let Some(p) = &partial {
            append_note(&mut cell, format!("only {} pods: {p}", ok.len()));
        }
        res.set(report::LIST_POD_STATS, cell);

        progress(t, "scraping the metrics endpoint");
        let mut cell = metrics_scrape(t, plan).await;
        if let Some(p) = &partial {
            append_note(&mut cell, format!("only {} containers: {p}", ok.len()));
        }
        res.set(report::METRICS_SCRAPE, cell);

        progress(
            t,
            &format!(
                "daemon CPU: {} s idle, {} s listing stats every second",
                plan.stats_cpu_secs, plan.stats_cpu_secs
            ),
        );
        let mut cell = stats_cpu(t, plan).await;
        if let Some(p) = &partial {
            append_note(&mut cell, format!("only {} containers: {p}", ok.len()));
        }
        res.set(report::STATS_CPU, cell);
    }
    progress(t, "removing the pods");
    teardown_many(&t.client, cleanup_list(&ok, &failed), 8).await;
}

/// Adds `extra` to a measured cell's note (after what it says).
fn append_note(cell: &mut Cell, extra: String) {
    if let Cell::Samples { note, .. } = cell {
        *note = Some(match note.take() {
            Some(n) => format!("{n}; {extra}"),
            None => extra,
        });
    }
}

/// ListPodSandboxStats (no filter) timed N times at `pods` running pods,
/// as ListContainerStats is; an Unimplemented answer is an n/a cell
/// naming the runtime, not a failure.
async fn list_pod_stats(t: &mut Target, plan: &Plan, pods: usize) -> Cell {
    let mut col = Collector::default();
    for _ in 0..plan.iterations {
        match timed(
            t.client
                .runtime
                .list_pod_sandbox_stats(ListPodSandboxStatsRequest { filter: None }),
        )
        .await
        {
            Ok((r, d)) => {
                col.push(ms(d));
                if r.stats.len() < pods {
                    col.note(format!("stats for {} of {pods} pods", r.stats.len()));
                }
            }
            Err(e) if e.starts_with("Unimplemented") => {
                return Cell::na(format!("{}: {e}", t.key));
            }
            Err(e) => {
                col.fail(e);
                break;
            }
        }
    }
    col.cell("not measured")
}

/// How long one scrape of a metrics endpoint may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);

/// One whole scrape of the daemon's Prometheus endpoint, N times: a new
/// loopback TCP connection, an HTTP/1.1 GET, the body read to its end
/// (as a Prometheus server's scrape, without compression). The note has
/// the body's size and sample lines.
async fn metrics_scrape(t: &mut Target, plan: &Plan) -> Cell {
    let (addr, path) = match target::metrics_endpoint(t).await {
        Ok(x) => x,
        Err(why) => return Cell::na(why),
    };
    let mut col = Collector::default();
    let mut body: Option<(usize, usize)> = None;
    for _ in 0..plan.iterations {
        let t0 = Instant::now();
        match crate::http::get_http11(&addr, &path, SCRAPE_TIMEOUT).await {
            Ok(r) if r.status == 200 => {
                col.push(ms(t0.elapsed()));
                let samples = String::from_utf8_lossy(&r.body)
                    .lines()
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .count();
                body = Some((r.body.len(), samples));
            }
            Ok(r) => {
                col.fail(format!(
                    "GET http://{addr}{path}: HTTP {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).trim()
                ));
                break;
            }
            Err(e) => {
                col.fail(format!("{e:#}"));
                break;
            }
        }
    }
    if let Some((bytes, samples)) = body {
        col.note(format!(
            "body {:.1} KiB, {samples} samples; GET {path}, new connection each",
            bytes as f64 / 1024.0
        ));
    }
    col.cell("not measured")
}

/// The runtime's per-container helper processes (shims), to show their
/// CPU beside the daemon's: containerd asks its shims for the stats,
/// berthd reads cgroups itself.
fn helper_processes(t: &Target) -> Vec<i32> {
    match &t.kind {
        Kind::Berth { state_dir, .. } => {
            host::processes_matching("berth-shim", &state_dir.display().to_string())
        }
        Kind::Containerd { address, .. } => {
            host::processes_matching("containerd-shim-runc-v2", &address.display().to_string())
        }
        Kind::External => Vec::new(),
    }
}

/// CPU ticks of each of `pids` (those still there).
fn ticks_of(pids: &[i32]) -> HashMap<i32, u64> {
    pids.iter()
        .filter_map(|p| host::cpu_ticks(*p).map(|t| (*p, t)))
        .collect()
}

/// Ticks spent from `before` to `after` by the processes in both.
fn ticks_spent(before: &HashMap<i32, u64>, after: &HashMap<i32, u64>) -> u64 {
    after
        .iter()
        .filter_map(|(p, a)| before.get(p).map(|b| a.saturating_sub(*b)))
        .sum()
}

/// CPU used by the daemon and by its helpers over `secs` seconds, as
/// percent of one core, while `work` runs once at the start of every
/// second: (daemon %, helpers %).
async fn cpu_over<F, Fut>(
    daemon: i32,
    helpers: &[i32],
    secs: u64,
    mut work: F,
) -> Result<(f64, f64), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let per_sec = host::clock_ticks_per_sec() as f64;
    let h0 = ticks_of(helpers);
    let d0 = host::cpu_ticks(daemon).ok_or(format!("cannot read /proc/{daemon}/stat"))?;
    let start = tokio::time::Instant::now();
    for i in 0..secs {
        tokio::time::sleep_until(start + Duration::from_secs(i)).await;
        work().await;
    }
    tokio::time::sleep_until(start + Duration::from_secs(secs)).await;
    let d1 = host::cpu_ticks(daemon).ok_or(format!("cannot read /proc/{daemon}/stat"))?;
    let h1 = ticks_of(helpers);
    let wall = start.elapsed().as_secs_f64();
    let pct = |ticks: u64| ticks as f64 / per_sec / wall * 100.0;
    Ok((pct(d1.saturating_sub(d0)), pct(ticks_spent(&h0, &h1))))
}

/// The calls of [`stats_cpu`] that failed, the first failure, and an
/// Unimplemented ListPodSandboxStats (not a failure).
#[derive(Debug, Clone, Default)]
struct ListingErrors {
    failed: usize,
    first: Option<String>,
    unimplemented: Option<String>,
}

/// The daemon's CPU while a client calls ListContainerStats and
/// ListPodSandboxStats once a second for [`Plan::stats_cpu_secs`]: its
/// utime + stime (/proc/PID/stat) over the whole period divided by the
/// wall time, in percent of one core, one figure. The note has the same
/// figure for as long idle just before (no calls), and the shims' CPU in
/// both periods (containerd's come from its shims, Berth's from berthd).
async fn stats_cpu(t: &mut Target, plan: &Plan) -> Cell {
    let Some(daemon) = t.daemon_pid else {
        return Cell::na("daemon pid unknown");
    };
    let secs = plan.stats_cpu_secs.max(1);
    let helpers = helper_processes(t);
    let idle = match cpu_over(daemon, &helpers, secs, || async {}).await {
        Ok(x) => x,
        Err(e) => return Cell::na(e),
    };
    let client = t.client.clone();
    let errors: std::sync::Arc<std::sync::Mutex<ListingErrors>> = Default::default();
    let listing = cpu_over(daemon, &helpers, secs, || {
        let mut c = client.clone();
        let errors = errors.clone();
        async move {
            let containers = call(
                c.runtime
                    .list_container_stats(ListContainerStatsRequest { filter: None }),
            )
            .await;
            let pods = call(
                c.runtime
                    .list_pod_sandbox_stats(ListPodSandboxStatsRequest { filter: None }),
            )
            .await;
            let mut e = errors.lock().unwrap();
            if let Err(x) = containers {
                e.failed += 1;
                e.first.get_or_insert(format!("ListContainerStats: {x}"));
            }
            if let Err(x) = pods {
                if x.starts_with("Unimplemented") {
                    e.unimplemented
                        .get_or_insert(format!("ListPodSandboxStats answered {x}"));
                } else {
                    e.failed += 1;
                    e.first.get_or_insert(format!("ListPodSandboxStats: {x}"));
                }
            }
        }
    })
    .await;
    let (daemon_pct, helpers_pct) = match listing {
        Ok(x) => x,
        Err(e) => return Cell::na(e),
    };
    let ListingErrors {
        failed,
        first: first_error,
        unimplemented,
    } = errors.lock().unwrap().clone();
    let mut note = format!(
        "idle {}; shims {} ({} idle); CPU time / wall time over {secs} s, ListContainerStats + ListPodSandboxStats at the start of each second (idle: the {secs} s before, no calls); shims: the {} shim processes' own CPU",
        report::fmt_num(idle.0),
        report::fmt_num(helpers_pct),
        report::fmt_num(idle.1),
        helpers.len(),
    );
    if let Some(u) = unimplemented {
        note.push_str(&format!("; {u}"));
    }
    Cell::Samples {
        values: vec![daemon_pct],
        failed,
        first_error,
        note: Some(note),
    }
}

/// Pull + unpack throughput of the incompressible image from a cold
/// start: the image removed, its blobs gone, the page cache dropped.
pub async fn pull_throughput(t: &mut Target, big: &BigImage, plan: &Plan, res: &mut RuntimeResult) {
    let mut col = Collector::default();
    let mut removals = Collector::default();
    // Unpacked layers held before the image is first pulled (those of the
    // busybox and pause images): a removed image must leave no more.
    let base_snapshots = t.snapshot_count();
    for run in 0..plan.pull_runs {
        progress(t, &format!("pull {}/{}", run + 1, plan.pull_runs));
        // Before the first run the image is normally absent (NotFound).
        let started = Instant::now();
        match target::remove_image(&mut t.client, &big.reference).await {
            Err(e) if run > 0 => {
                col.fail(format!("RemoveImage: {e}"));
                break;
            }
            Ok(()) if run > 0 => removals.push(started.elapsed().as_secs_f64() * 1e3),
            _ => {}
        }
        // A pull that finds its layers still in the content store is no
        // measure of download + unpack.
        let blobs: Vec<_> = big
            .layer_digests
            .iter()
            .filter_map(|d| t.blob_path(d))
            .collect();
        let gone = host_wait(Duration::from_secs(5), || {
            blobs.iter().all(|b| !b.exists())
                && t.snapshot_count().unwrap_or(0) <= base_snapshots.unwrap_or(0)
        })
        .await;
        if !gone {
            col.note("layer blobs or unpacked layers were still there after RemoveImage");
        }
        if let Err(e) = host::drop_caches() {
            col.note(format!("could not drop caches: {e}"));
        }
        match target::pull(&mut t.client, &big.reference).await {
            Ok((_, d)) => col.push(big.bytes as f64 / 1e6 / d.as_secs_f64()),
            Err(e) => {
                col.fail(e);
                break;
            }
        }
    }
    let started = Instant::now();
    if target::remove_image(&mut t.client, &big.reference)
        .await
        .is_ok()
    {
        removals.push(started.elapsed().as_secs_f64() * 1e3);
    }
    res.set(report::PULL, col.cell("not measured"));
    res.set(report::REMOVE_IMAGE, removals.cell("not measured"));
}

async fn host_wait(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// `Version`: `name version (CRI api)`.
pub async fn version(t: &mut Target) -> Result<String, String> {
    let v = call(t.client.runtime.version(VersionRequest::default())).await?;
    Ok(format!(
        "{} {} (CRI {})",
        v.runtime_name, v.runtime_version, v.runtime_api_version
    ))
}

/// ContainerStatus latency on an untouched container while
/// [`report::REMOVALS`] pods (one running container each) are removed with
/// RemovePodSandbox all at once: one p99 per run (`plan.concurrent_runs`),
/// the median over every call in the note.
pub async fn status_during_removals(
    t: &mut Target,
    f: &PodFactory,
    plan: &Plan,
    res: &mut RuntimeResult,
) {
    let pods = report::REMOVALS + 1;
    let mut col = Collector::default();
    let mut all: Vec<f64> = Vec::new();
    let mut remove_failures = 0usize;
    let mut first_remove_failure = None;
    for run in 0..plan.concurrent_runs {
        progress(
            t,
            &format!(
                "ContainerStatus during {} RemovePodSandbox, run {}/{}",
                report::REMOVALS,
                run + 1,
                plan.concurrent_runs
            ),
        );
        let (ok, failed) = launch_many(t, f, pods, 4, false, "rm").await;
        if !failed.is_empty() {
            col.fail(failure_text(&failed, pods));
            teardown_many(&t.client, cleanup_list(&ok, &failed), 8).await;
            continue;
        }
        let (watched, doomed) = ok.split_last().expect("pods were launched");

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let looper = {
            let stop = stop.clone();
            let mut c = t.client.clone();
            let id = watched.container_id.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match timed(c.runtime.container_status(ContainerStatusRequest {
                        container_id: id.clone(),
                        verbose: false,
                    }))
                    .await
                    {
                        Ok((_, d)) => lat.push(ms(d)),
                        Err(e) => return Err(e),
                    }
                }
                Ok(lat)
            })
        };
        let mut set = tokio::task::JoinSet::new();
        for l in doomed {
            let mut c = t.client.clone();
            let pod = l.pod_id.clone();
            set.spawn(async move {
                call(c.runtime.remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                }))
                .await
                .map(|_| ())
                .map_err(|e| (pod, e))
            });
        }
        let mut left: Vec<(String, Option<String>)> =
            vec![(watched.pod_id.clone(), Some(watched.container_id.clone()))];
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err((pod, e))) => {
                    remove_failures += 1;
                    first_remove_failure.get_or_insert(e);
                    left.push((pod, None));
                }
                Err(e) => {
                    remove_failures += 1;
                    first_remove_failure.get_or_insert(e.to_string());
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match looper.await {
            Ok(Ok(lat)) if !lat.is_empty() => {
                col.push(report::percentile(&lat, 0.99));
                all.extend(lat);
            }
            Ok(Ok(_)) => col.fail("no ContainerStatus answered while the pods were removed"),
            Ok(Err(e)) => col.fail(format!("ContainerStatus: {e}")),
            Err(e) => col.fail(format!("ContainerStatus loop: {e}")),
        }
        teardown_many(&t.client, left, 8).await;
    }
    let mut notes = Vec::new();
    if !all.is_empty() {
        notes.push(format!(
            "median {} ms, n={}",
            report::fmt_num(report::summary(&all).median),
            all.len()
        ));
    }
    if let Some(e) = first_remove_failure {
        notes.push(format!("{remove_failures} RemovePodSandbox failed: {e}"));
    }
    if !notes.is_empty() {
        col.note(notes.join("; "));
    }
    res.set(report::STATUS_DURING_REMOVALS, col.cell("not measured"));
}

/// How long one container's STOPPED event may take.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// From StartContainer's answer to the arrival of the STOPPED event of a
/// container running `sh -c 'exit 0'`, on a GetContainerEvents stream
/// opened first; n/a when the runtime has no GetContainerEvents.
pub async fn exit_to_event(t: &mut Target, f: &PodFactory, plan: &Plan, res: &mut RuntimeResult) {
    progress(t, "container exit → STOPPED event");
    let mut sub = t.client.clone();
    let stream = match tokio::time::timeout(
        target::RPC_TIMEOUT,
        sub.runtime.get_container_events(GetEventsRequest {}),
    )
    .await
    {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(e)) => {
            let cell = Cell::na(format!("GetContainerEvents: {}", target::status_text(&e)));
            res.set(report::EXIT_TO_EVENT, cell);
            return;
        }
        Err(_) => {
            let cell = Cell::na(format!(
                "GetContainerEvents: no answer within {:?}",
                target::RPC_TIMEOUT
            ));
            res.set(report::EXIT_TO_EVENT, cell);
            return;
        }
    };
    // STOPPED events, stamped on arrival.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<(String, Instant), String>>();
    let reader = tokio::spawn(async move {
        let mut stream = stream;
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    if ev.container_event_type == ContainerEventType::ContainerStoppedEvent as i32
                        && tx.send(Ok((ev.container_id, Instant::now()))).is_err()
                    {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = tx.send(Err("the event stream ended".into()));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(format!(
                        "the event stream failed: {}",
                        target::status_text(&e)
                    )));
                    return;
                }
            }
        }
    });
    let config = f.pod("ev");
    let pod = match call(t.client.runtime.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    }))
    .await
    {
        Ok(r) => r.pod_sandbox_id,
        Err(e) => {
            reader.abort();
            res.set(
                report::EXIT_TO_EVENT,
                Cell::na(format!("RunPodSandbox: {e}")),
            );
            return;
        }
    };
    let mut col = Collector::default();
    for i in 0..plan.warmup + plan.iterations {
        let rec = i >= plan.warmup;
        let mut container = f.container();
        let name = format!("exit-{i}");
        container.metadata = Some(ContainerMetadata {
            name: name.clone(),
            attempt: 0,
        });
        container.command = ["/bin/sh", "-c", "exit 0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        container.log_path = format!("{name}.log");
        let id = match call(t.client.runtime.create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container),
            sandbox_config: Some(config.clone()),
        }))
        .await
        {
            Ok(r) => r.container_id,
            Err(e) => {
                if rec {
                    col.fail(format!("CreateContainer: {e}"));
                }
                continue;
            }
        };
        let started = call(t.client.runtime.start_container(StartContainerRequest {
            container_id: id.clone(),
        }))
        .await;
        let t0 = Instant::now();
        let mut stream_broken = false;
        match started {
            Err(e) => {
                if rec {
                    col.fail(format!("StartContainer: {e}"));
                }
            }
            Ok(_) => {
                let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
                let got = loop {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Err(_) => break Err(format!("no STOPPED event within {EVENT_TIMEOUT:?}")),
                        Ok(None) => {
                            stream_broken = true;
                            break Err("the event reader is gone".to_string());
                        }
                        Ok(Some(Err(e))) => {
                            stream_broken = true;
                            break Err(e);
                        }
                        Ok(Some(Ok((cid, at)))) if cid == id => break Ok(at),
                        Ok(Some(Ok(_))) => {}
                    }
                };
                match got {
                    // An exit published before StartContainer's answer
                    // arrived counts as 0.
                    Ok(at) if rec => col.push(ms(at.saturating_duration_since(t0))),
                    Ok(_) => {}
                    Err(e) => col.fail(e),
                }
            }
        }
        let _ = call(t.client.runtime.remove_container(RemoveContainerRequest {
            container_id: id.clone(),
        }))
        .await;
        if stream_broken {
            break;
        }
    }
    reader.abort();
    teardown(&mut t.client, &pod, None).await;
    res.set(report::EXIT_TO_EVENT, col.cell("not measured"));
}

/// The pod port that sends [`Plan::forward_mib`] MiB of zeros to each
/// connection (`dd` on the socket itself, through busybox `nc -ll -e`).
const FORWARD_DOWN_PORT: u16 = 9000;
/// The pod port that reads [`Plan::forward_mib`] MiB from each connection
/// and then answers dd's record counts.
const FORWARD_UP_PORT: u16 = 9001;
/// How long the pod's listeners have to come up.
const FORWARD_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Port-forward throughput over one forwarded connection (one SPDY stream
/// pair on one upgraded connection), each way: a pod whose busybox `nc`
/// servers write or read [`Plan::forward_mib`] MiB per connection with
/// `dd` on the socket, `plan.forward_runs` transfers each way after one
/// warm-up. The time runs from opening the stream pair to the last byte
/// read (pod → client) or to dd's answer that it read everything (client
/// → pod); neither waits for the connection's end (containerd closes a
/// forwarded connection only a second after one side finished).
pub async fn port_forward(t: &mut Target, f: &PodFactory, plan: &Plan, res: &mut RuntimeResult) {
    progress(
        t,
        &format!(
            "port-forward {} MiB × {} each way",
            plan.forward_mib, plan.forward_runs
        ),
    );
    let bytes = plan.forward_mib << 20;
    let script = format!(
        "nc -ll -p {FORWARD_DOWN_PORT} -e sh -c 'exec dd if=/dev/zero bs=65536 count={down} 2>/dev/null' & \
         nc -ll -p {FORWARD_UP_PORT} -e sh -c 'exec dd of=/dev/null bs=1048576 count={up} iflag=fullblock 2>&1' & \
         echo ready; wait",
        down = bytes / 65536,
        up = bytes >> 20,
    );
    let config = f.pod("pf");
    let log_file = std::path::Path::new(&config.log_directory).join("c.log");
    let pod = match call(t.client.runtime.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    }))
    .await
    {
        Ok(r) => r.pod_sandbox_id,
        Err(e) => {
            let why = format!("RunPodSandbox: {e}");
            res.set(report::FORWARD_DOWN, Cell::na(why.clone()));
            res.set(report::FORWARD_UP, Cell::na(why));
            return;
        }
    };
    let mut container = f.container();
    container.command = vec!["/bin/sh".into(), "-c".into(), script];
    let t0 = Instant::now();
    let setup = async {
        let id = call(t.client.runtime.create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container),
            sandbox_config: Some(config),
        }))
        .await
        .map_err(|e| (format!("CreateContainer: {e}"), None))?
        .container_id;
        let fail = |e: String| (e, Some(id.clone()));
        call(t.client.runtime.start_container(StartContainerRequest {
            container_id: id.clone(),
        }))
        .await
        .map_err(|e| fail(format!("StartContainer: {e}")))?;
        target::wait_log_line(&log_file, t0).await.map_err(fail)?;
        let url = call(t.client.runtime.port_forward(PortForwardRequest {
            pod_sandbox_id: pod.clone(),
            port: vec![FORWARD_DOWN_PORT.into(), FORWARD_UP_PORT.into()],
        }))
        .await
        .map_err(|e| fail(format!("PortForward: {e}")))?
        .url;
        let fwd = streaming::SpdyForward::connect(&url)
            .await
            .map_err(|e| fail(format!("SPDY to the PortForward URL: {e}")))?;
        Ok::<_, (String, Option<String>)>((id, fwd))
    };
    let (ctr, fwd) = match setup.await {
        Ok(x) => x,
        Err((why, ctr)) => {
            res.set(report::FORWARD_DOWN, Cell::na(why.clone()));
            res.set(report::FORWARD_UP, Cell::na(why));
            teardown(&mut t.client, &pod, ctr.as_deref()).await;
            return;
        }
    };
    for (id, up) in [(report::FORWARD_DOWN, false), (report::FORWARD_UP, true)] {
        let transfer = || async {
            if up {
                forward_up(&fwd, bytes).await
            } else {
                forward_down(&fwd, bytes).await
            }
        };
        let mut col = Collector::default();
        // Warm-up, retried until the pod's listener answers.
        let deadline = Instant::now() + FORWARD_READY_TIMEOUT;
        let warm = loop {
            match transfer().await {
                Ok(_) => break Ok(()),
                Err(e) if Instant::now() >= deadline || fwd.conn.is_closed() => break Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        match warm {
            Err(e) => col.fail(format!("warm-up: {e}")),
            Ok(()) => {
                for _ in 0..plan.forward_runs {
                    match transfer().await {
                        Ok(d) => col.push(bytes as f64 / 1e6 / d.as_secs_f64()),
                        Err(e) => col.fail(e),
                    }
                }
            }
        }
        res.set(id, col.cell("not measured"));
    }
    drop(fwd);
    teardown(&mut t.client, &pod, Some(&ctr)).await;
}

/// What the error stream of a forwarded connection says, read for at most
/// a second (after the data stream failed).
async fn forward_error(s: &mut streaming::ForwardStreams) -> String {
    use tokio::io::AsyncReadExt;
    let mut error = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.error_rx.read_to_end(&mut error)).await;
    let text = String::from_utf8_lossy(&error).trim().to_string();
    if text.is_empty() {
        "nothing on the error stream".into()
    } else {
        format!("error stream: {text}")
    }
}

/// Pod → client: reads `bytes` from [`FORWARD_DOWN_PORT`] (counted, not
/// kept); the time from opening the streams to the last byte.
async fn forward_down(fwd: &streaming::SpdyForward, bytes: u64) -> Result<Duration, String> {
    use tokio::io::AsyncReadExt;
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + STREAM_TIMEOUT;
    let mut s = fwd.open(FORWARD_DOWN_PORT).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        match tokio::time::timeout_at(deadline, s.rx.read(&mut buf)).await {
            Err(_) => {
                return Err(format!("{got} of {bytes} bytes within {STREAM_TIMEOUT:?}"));
            }
            Ok(Ok(0)) => {
                return Err(format!(
                    "the data stream ended after {got} of {bytes} bytes; {}",
                    forward_error(&mut s).await
                ));
            }
            Ok(Ok(n)) => got += n as u64,
            Ok(Err(e)) => {
                return Err(format!("reading the data stream after {got} bytes: {e}"));
            }
        }
    }
    let took = t0.elapsed();
    if got > bytes {
        return Err(format!("{got} bytes, {bytes} expected"));
    }
    Ok(took)
}

/// Client → pod: writes `bytes` to [`FORWARD_UP_PORT`], whose dd answers
/// its record counts once it has read them all; the time from opening the
/// streams to that answer.
async fn forward_up(fwd: &streaming::SpdyForward, bytes: u64) -> Result<Duration, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + STREAM_TIMEOUT;
    let mut s = fwd.open(FORWARD_UP_PORT).await?;
    let chunk = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    let writing = async {
        while sent < bytes {
            let n = chunk.len().min((bytes - sent) as usize);
            s.tx.write_all(&chunk[..n])
                .await
                .map_err(|e| format!("writing the data stream after {sent} bytes: {e}"))?;
            sent += n as u64;
        }
        s.tx.flush()
            .await
            .map_err(|e| format!("flushing the data stream: {e}"))
    };
    match tokio::time::timeout_at(deadline, writing).await {
        Err(_) => {
            return Err(format!(
                "{sent} of {bytes} bytes sent within {STREAM_TIMEOUT:?}"
            ));
        }
        Ok(Err(e)) => return Err(format!("{e}; {}", forward_error(&mut s).await)),
        Ok(Ok(())) => {}
    }
    let records = bytes >> 20;
    let want = format!("{records}+0 records in");
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        if String::from_utf8_lossy(&answer).contains("records out") {
            break;
        }
        match tokio::time::timeout_at(deadline, s.rx.read(&mut buf)).await {
            Err(_) => {
                return Err(format!(
                    "no answer from dd within {STREAM_TIMEOUT:?} (got {:?})",
                    String::from_utf8_lossy(&answer)
                ));
            }
            Ok(Ok(0)) => {
                return Err(format!(
                    "the data stream ended before dd answered (got {:?}); {}",
                    String::from_utf8_lossy(&answer),
                    forward_error(&mut s).await
                ));
            }
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(format!("reading dd's answer: {e}")),
        }
    }
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&answer);
    if !text.contains(&want) {
        return Err(format!(
            "dd read something else: {:?}, not {want:?}",
            text.trim()
        ));
    }
    Ok(took)
}
