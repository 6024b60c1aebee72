//! berth-bench: Berth and containerd+runc measured side by side over CRI.
//!
//! The benchmark sets up its own world: the harness registry with the
//! test images, a large incompressible image and a pause image; a berthd
//! on temporary dirs; with `--with-containerd`, Debian's containerd + runc
//! on temporary dirs with a bridge CNI network of its own; and any CRI
//! endpoint given with `--endpoint`. Each runtime is measured alone, one
//! after the other, with the same scenarios (see [`scenarios`]); a call a
//! runtime answers with an error shows as "n/a (reason)" and the run goes
//! on. [`run`] is the entry point, used by the binary and the smoke test.

pub mod containerd;
pub mod host;
pub mod net;
pub mod report;
pub mod scenarios;
pub mod target;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::images::incompressible_image;
use crate::{Berthd, BerthdOptions, Registry, TestImages};

pub use report::{Cell, Report, RuntimeResult};
use target::{Kind, PodFactory, Target};

/// The command line of `berth-bench`.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "berth-bench",
    about = "Berth and containerd+runc measured side by side over CRI",
    long_about = "Sets up a registry with test images, a berthd (and with --with-containerd a \
containerd + runc) on temporary dirs, measures CRI call latencies, pod start, memory and pull \
throughput, prints a table and optionally writes JSON. Needs root. Build with \
`cargo build --release --workspace --bins` for real numbers."
)]
pub struct BenchOptions {
    /// An already running CRI runtime to measure as well (repeatable); it
    /// must be able to pull from the benchmark's registry on 127.0.0.1 over
    /// plain HTTP.
    #[arg(long = "endpoint", value_name = "unix:///PATH")]
    pub endpoints: Vec<String>,
    /// Also measure Debian's containerd + runc (installed with apt-get when
    /// missing), started by the benchmark.
    #[arg(long)]
    pub with_containerd: bool,
    /// Measured iterations per figure [default: 30; --quick: 3].
    #[arg(long, value_name = "N")]
    pub iterations: Option<usize>,
    /// Warm-up iterations, not measured [default: 3; --quick: 1].
    #[arg(long, value_name = "W")]
    pub warmup: Option<usize>,
    /// Small and fast (about a minute, what CI runs): N=3, W=1, P=5, K=3,
    /// 30 pods instead of 100, a 20 MiB image, one pull, 64 MiB
    /// port-forwarded twice each way (instead of 256 MiB five times).
    #[arg(long)]
    pub quick: bool,
    /// Write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Do not measure the benchmark's own berthd.
    #[arg(long)]
    pub no_berth: bool,
    /// Berth's pod network: `bridge` is the same bridge + host-local CNI
    /// network containerd gets, with Debian's plugins; `berth-plugins` the
    /// same network with Berth's own plugins (run in-process by berthd);
    /// `loopback` gives Berth pods no CNI network at all.
    #[arg(long, value_enum, default_value_t = BerthNetwork::Bridge)]
    pub berth_network: BerthNetwork,
    /// Run only these scenarios (comma-separated; default: all); the rows
    /// of the others show "n/a (not measured)".
    #[arg(long, value_enum, value_delimiter = ',', value_name = "SCENARIO")]
    pub only: Vec<Scenario>,
}

/// The scenarios of one runtime's measurement, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Pod lifecycles, every CRI call timed (ExecSync, streaming Exec).
    Lifecycle,
    /// Pods started concurrently.
    Concurrent,
    /// Runtime PSS per container.
    Memory,
    /// Daemon RSS and list calls at many pods.
    Many,
    /// ContainerStatus while pods are removed.
    Removals,
    /// Container exit → STOPPED event.
    Events,
    /// Port-forward throughput.
    PortForward,
    /// Pull throughput.
    Pull,
}

/// The pod network of the benchmark's berthd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BerthNetwork {
    /// The benchmark's bridge network with Debian's plugins (as
    /// containerd's).
    #[default]
    Bridge,
    /// The same network with Berth's own CNI plugins (built next to
    /// berthd), which berthd runs in-process.
    BerthPlugins,
    /// No CNI config: pods have loopback only.
    Loopback,
}

impl BenchOptions {
    /// What CI runs: quick, Berth only, pods on loopback (CI sets up no
    /// pod network).
    pub fn quick() -> BenchOptions {
        BenchOptions {
            quick: true,
            berth_network: BerthNetwork::Loopback,
            ..Default::default()
        }
    }
}

/// The sizes one run uses, resolved from the options.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub iterations: usize,
    pub warmup: usize,
    /// Pod counts started concurrently.
    pub concurrent: Vec<usize>,
    /// How many times each concurrent start is repeated.
    pub concurrent_runs: usize,
    /// Running containers for the per-container memory figure.
    pub k: usize,
    /// Pods (one container each) for the daemon RSS and list figures.
    pub many: usize,
    pub image_mib: u64,
    pub image_layers: usize,
    pub pull_runs: usize,
    /// The scenarios to run (empty: all).
    pub only: Vec<Scenario>,
    /// MiB sent each way through one port-forwarded connection.
    pub forward_mib: u64,
    /// How many times each port-forward transfer is repeated.
    pub forward_runs: usize,
    /// Seconds of listing stats once a second at [`Plan::many`] pods while
    /// the daemon's CPU time is measured (and as long again idle).
    pub stats_cpu_secs: u64,
}

impl Plan {
    pub fn from_options(o: &BenchOptions) -> Plan {
        if o.quick {
            Plan {
                quick: true,
                iterations: o.iterations.unwrap_or(3).max(1),
                warmup: o.warmup.unwrap_or(1),
                concurrent: vec![5],
                concurrent_runs: 1,
                k: 3,
                many: 30,
                image_mib: 20,
                image_layers: 5,
                pull_runs: 1,
                only: o.only.clone(),
                forward_mib: 64,
                forward_runs: 2,
                stats_cpu_secs: 3,
            }
        } else {
            Plan {
                quick: false,
                iterations: o.iterations.unwrap_or(30).max(1),
                warmup: o.warmup.unwrap_or(3),
                concurrent: vec![10, 30],
                concurrent_runs: 3,
                k: 10,
                many: 100,
                image_mib: 150,
                image_layers: 5,
                pull_runs: 3,
                only: o.only.clone(),
                forward_mib: 256,
                forward_runs: 5,
                stats_cpu_secs: 10,
            }
        }
    }
}

impl Plan {
    /// Whether scenario `s` is part of this run.
    pub fn runs(&self, s: Scenario) -> bool {
        self.only.is_empty() || self.only.contains(&s)
    }
}

/// The pull-throughput image as pushed.
#[derive(Debug, Clone)]
pub struct BigImage {
    pub reference: String,
    /// The random layers' digests (to see them gone from a content store).
    pub layer_digests: Vec<String>,
    /// What the pull downloads: the random layers and the config (the
    /// busybox base layer is shared with the busybox image, already there).
    pub bytes: u64,
}

/// Runs the whole benchmark; progress goes to stderr. Fails only when the
/// shared world (registry, images) cannot be set up; a runtime that fails
/// shows as n/a cells.
pub async fn run(opts: &BenchOptions) -> anyhow::Result<Report> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "berth-bench needs root (namespaces, mounts, cgroups, the CRI sockets)"
    );
    let started = Instant::now();
    let plan = Plan::from_options(opts);
    let defs = report::catalogue(&plan);

    let registry = Registry::start()?;
    let work = tempfile::Builder::new().prefix("berth-bench-").tempdir()?;
    let layouts = work.path().join("layouts");
    std::fs::create_dir_all(&layouts)?;
    eprintln!("berth-bench: pushing the test images to {}", registry.addr);
    let images = TestImages::push_all(&registry, &layouts)?;
    let big = {
        let img = incompressible_image(plan.image_mib << 20, plan.image_layers, 0xbe47_be47)?;
        let built = img.push(&registry, "berth-bench/random", "latest", &layouts)?;
        BigImage {
            reference: built.reference,
            layer_digests: img.layers[1..].iter().map(|l| l.digest.clone()).collect(),
            // The busybox base layer is already there (the busybox image).
            bytes: img.layers[1..]
                .iter()
                .map(|l| l.blob.len() as u64)
                .sum::<u64>()
                + img.config.len() as u64,
        }
    };
    let run_id = host::random_hex(4);
    let factory = PodFactory {
        run_id: run_id.clone(),
        logs: work.path().join("logs"),
        cgroup_root: format!("/berth-bench-{run_id}"),
        image: images.busybox.reference.clone(),
    };
    std::fs::create_dir_all(&factory.logs)?;
    // Declared before the runtimes' worlds so it is dropped after them:
    // also on Ctrl-C, the run's cgroups go.
    let _cgroups = CgroupGuard(factory.cgroup_root.clone());

    let mut environment = BTreeMap::new();
    environment.insert("kernel".into(), host::kernel_release());
    environment.insert(
        "machine".into(),
        format!(
            "{} cpus, {} MiB memory",
            host::cpu_count(),
            host::mem_total_mib()
        ),
    );
    environment.insert(
        "bench build".into(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
    );
    environment.insert("run id".into(), run_id.clone());
    environment.insert("load average at start".into(), host::loadavg());
    let mut notes = Vec::new();

    let mut runtimes = Vec::new();
    if !opts.no_berth {
        environment.insert("berthd".into(), berthd_build());
        runtimes.push(
            bench_berth(
                &registry,
                &factory,
                &plan,
                &big,
                &defs,
                opts.berth_network,
                work.path(),
            )
            .await,
        );
        host::remove_cgroup_tree(&factory.cgroup_root);
    }
    if opts.with_containerd {
        runtimes.push(bench_containerd(&registry, &factory, &plan, &big, &defs, &layouts).await);
        host::remove_cgroup_tree(&factory.cgroup_root);
    }
    for (i, ep) in opts.endpoints.iter().enumerate() {
        runtimes.push(bench_endpoint(i + 1, ep, &factory, &plan, &big, &defs).await);
        host::remove_cgroup_tree(&factory.cgroup_root);
    }
    let both =
        runtimes.iter().any(|r| r.key == "berth") && runtimes.iter().any(|r| r.key == "containerd");
    notes.push(match (opts.berth_network, both) {
        (BerthNetwork::Bridge, _) => format!(
            "pod network: bridge {} + host-local {} (Debian's CNI plugins){}",
            net::BRIDGE,
            net::SUBNET,
            if both { " for Berth and containerd alike" } else { "" }
        ),
        (BerthNetwork::Loopback, true) => format!(
            "networking differs: Berth pods have loopback only, containerd pods get a bridge + host-local CNI network ({} {})",
            net::BRIDGE,
            net::SUBNET
        ),
        (BerthNetwork::BerthPlugins, _) => format!(
            "pod network: bridge {} + host-local {}; Berth runs its own CNI plugins in-process{}",
            net::BRIDGE,
            net::SUBNET,
            if both { ", containerd execs Debian's" } else { "" }
        ),
        (BerthNetwork::Loopback, false) => "Berth pods have loopback only (no CNI network)".into(),
    });
    notes.push(format!("load average at the end: {}", host::loadavg()));
    notes.push(format!(
        "total run time {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(Report {
        plan,
        defs,
        runtimes,
        environment,
        notes,
    })
}

/// Removes the run's cgroup tree (killing what is left in it) when dropped.
struct CgroupGuard(String);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let killed = host::remove_cgroup_tree(&self.0);
        if killed > 0 {
            eprintln!(
                "berth-bench: killed {killed} leftover processes in {}",
                self.0
            );
        }
    }
}

/// Everything measured against one runtime, in order; setup of the
/// runtime is the caller's. `extra_images` are pulled first too.
async fn bench_target(
    t: &mut Target,
    factory: &PodFactory,
    plan: &Plan,
    big: &BigImage,
    res: &mut RuntimeResult,
    extra_images: &[String],
    after_first_pod: &mut dyn FnMut() -> anyhow::Result<()>,
) -> Result<(), String> {
    res.version = scenarios::version(t).await?;
    for image in std::iter::once(&factory.image).chain(extra_images) {
        target::pull(&mut t.client, image)
            .await
            .map_err(|e| format!("PullImage {image}: {e}"))?;
    }
    // A first pod, not measured: checks the pipeline end to end (and lets
    // the caller look at the host once a sandbox exists).
    match target::launch(&mut t.client, factory, "probe", true).await {
        Ok(l) => {
            let checked = after_first_pod();
            target::teardown(&mut t.client, &l.pod_id, Some(&l.container_id)).await;
            checked.map_err(|e| format!("{e:#}"))?;
        }
        Err(e) => {
            if let Some(p) = &e.pod_id {
                target::teardown(&mut t.client, p, e.container_id.as_deref()).await;
            }
            after_first_pod().map_err(|e| format!("{e:#}"))?;
            res.notes
                .push(format!("the first pod failed at {}: {}", e.step, e.error));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    res.set(report::RSS_IDLE, scenarios::daemon_rss(t));
    if plan.runs(Scenario::Lifecycle) {
        scenarios::lifecycle(t, factory, plan, res).await;
    }
    if plan.runs(Scenario::Concurrent) {
        scenarios::concurrent(t, factory, plan, res).await;
    }
    if plan.runs(Scenario::Memory) {
        scenarios::memory(t, factory, plan, res).await;
    }
    if plan.runs(Scenario::Many) {
        scenarios::many(t, factory, plan, res).await;
    }
    if plan.runs(Scenario::Removals) {
        scenarios::status_during_removals(t, factory, plan, res).await;
    }
    if plan.runs(Scenario::Events) {
        scenarios::exit_to_event(t, factory, plan, res).await;
    }
    if plan.runs(Scenario::PortForward) {
        scenarios::port_forward(t, factory, plan, res).await;
    }
    if plan.runs(Scenario::Pull) {
        scenarios::pull_throughput(t, big, plan, res).await;
    }
    match target::sweep(&mut t.client, &factory.run_id).await {
        Ok((0, 0)) => {}
        Ok((p, c)) => res.notes.push(format!(
            "{p} pods and {c} containers were left over and removed"
        )),
        Err(e) => res
            .notes
            .push(format!("final clean-up listing failed: {e}")),
    }
    Ok(())
}

/// A berthd on temporary dirs with the harness registry marked insecure
/// and quiet logging. Dropping it kills what its shims left running and
/// unmounts what is left under its dirs (the normal path removes
/// everything through CRI first).
struct BerthWorld {
    d: Berthd,
    bridge: bool,
    /// Why berthd runs without [`BERTHD_METRICS_TOML`]: the line of its
    /// refusal.
    metrics_refused: Option<String>,
}

/// The benchmark berthd's metrics endpoint: loopback, a port of its own
/// choosing, reported by verbose `Status` (`info["metricsAddress"]`).
const BERTHD_METRICS_TOML: &str = "[metrics]\naddress = \"127.0.0.1:0\"\n";

impl BerthWorld {
    async fn start(
        registry: &Registry,
        network: BerthNetwork,
        work: &Path,
    ) -> anyhow::Result<BerthWorld> {
        let bridge = network != BerthNetwork::Loopback;
        if bridge {
            // Network safety first: private ranges must not leave the machine.
            net::prepare()?;
        }
        let registry_toml = format!("[registry]\ninsecure = [\"{}\"]\n", registry.addr);
        // The metrics endpoint on a port of its own choosing (reported by
        // verbose Status). A berthd from before the endpoint refuses the
        // table as an unknown key: it then runs without it, and the scrape
        // row says the endpoint is not configured.
        let mut metrics_refused = None;
        let mut d = match Berthd::start(BerthdOptions {
            extra_toml: format!("{registry_toml}{BERTHD_METRICS_TOML}"),
        })
        .await
        {
            Ok(d) => d,
            Err(e) if format!("{e:#}").contains("metrics") => {
                let text = format!("{e:#}");
                let line = text
                    .lines()
                    .find(|l| l.contains("metrics"))
                    .unwrap_or("")
                    .trim()
                    .to_string();
                metrics_refused = Some(line);
                Berthd::start(BerthdOptions {
                    extra_toml: registry_toml,
                })
                .await?
            }
            Err(e) => return Err(e),
        };
        // The harness logs berth_runtime at debug; a benchmark wants what an
        // operator runs: warnings only.
        let cfg = std::fs::read_to_string(&d.config_path)?;
        let mut new = cfg.replace("level = \"info,berth_runtime=debug\"", "level = \"warn\"");
        if bridge {
            // The harness config ends in its [cni] table.
            let last = format!("conf_dir = \"{}\"", d.cni_conf_dir().display());
            anyhow::ensure!(
                new.trim_end().ends_with(&last),
                "unexpected harness berthd config (its [cni] table is not last):\n{new}"
            );
            let bin_dir = match network {
                BerthNetwork::BerthPlugins => crate::berthd::berthd_bin()?
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                _ => PathBuf::from(net::CNI_BIN_DIR),
            };
            for plugin in ["bridge", "host-local", "loopback"] {
                anyhow::ensure!(
                    bin_dir.join(plugin).exists(),
                    "CNI plugin {plugin} is not in {}",
                    bin_dir.display()
                );
            }
            new.push_str(&format!("bin_dirs = [\"{}\"]\n", bin_dir.display()));
            net::write_conflist(&d.cni_conf_dir(), &work.join("berth-cni-ipam"))?;
        }
        if new != cfg {
            std::fs::write(&d.config_path, new)?;
            d.stop();
            d.restart().await?;
        }
        Ok(BerthWorld {
            d,
            bridge,
            metrics_refused,
        })
    }
}

impl Drop for BerthWorld {
    fn drop(&mut self) {
        let state = self.d.state_dir().display().to_string();
        let mut left = host::processes_matching("berth-shim", &state);
        left.extend(host::processes_matching("berth-container", &state));
        if !left.is_empty() {
            let tree = host::ProcessTree::snapshot();
            let all: Vec<i32> = left.iter().flat_map(|p| tree.subtree(*p)).collect();
            eprintln!(
                "berth-bench: killing {} leftover berth processes",
                all.len()
            );
            host::kill_all(&all);
            std::thread::sleep(Duration::from_millis(200));
        }
        host::unmount_under(self.d.dir.path());
        if self.bridge {
            let _ = net::remove_bridge();
        }
    }
}

/// The path of a berthd binary, and whether it is an optimised build.
fn berthd_build() -> String {
    match crate::berthd::berthd_bin() {
        Ok(p) => {
            let debug = p.components().any(|c| c.as_os_str() == "debug");
            format!(
                "{}{}",
                p.display(),
                if debug {
                    " (DEBUG build: not for real numbers)"
                } else {
                    ""
                }
            )
        }
        Err(e) => format!("{e}"),
    }
}

async fn bench_berth(
    registry: &Registry,
    factory: &PodFactory,
    plan: &Plan,
    big: &BigImage,
    defs: &[report::MetricDef],
    network: BerthNetwork,
    work: &Path,
) -> RuntimeResult {
    let mut res = RuntimeResult::new("berth", "Berth");
    eprintln!("berth-bench: starting berthd");
    let world = match BerthWorld::start(registry, network, work).await {
        Ok(w) => w,
        Err(e) => {
            res.fill_na(defs, &format!("berthd did not start: {e:#}"));
            return res;
        }
    };
    let client = match world.d.client().await {
        Ok(c) => c,
        Err(e) => {
            res.fill_na(defs, &format!("connect to berthd: {e:#}"));
            return res;
        }
    };
    let mut t = Target {
        key: "berth".into(),
        client,
        kind: Kind::Berth {
            state_dir: world.d.state_dir(),
            root_dir: world.d.root_dir(),
        },
        daemon_pid: world.d.pid().map(|p| p as i32),
        metrics: target::Metrics::FromStatus,
    };
    if let Some(line) = &world.metrics_refused {
        res.notes.push(format!(
            "berthd refused the [metrics] table, ran without it: {line}"
        ));
    }
    let route_check: &mut dyn FnMut() -> anyhow::Result<()> = match network {
        BerthNetwork::Bridge | BerthNetwork::BerthPlugins => &mut net::check_route,
        BerthNetwork::Loopback => &mut || Ok(()),
    };
    let outcome = bench_target(&mut t, factory, plan, big, &mut res, &[], route_check).await;
    if let Err(e) = outcome {
        res.fill_na(defs, &e);
        let _ = target::sweep(&mut t.client, &factory.run_id).await;
    }
    drop(t);
    drop(world);
    res
}

async fn bench_containerd(
    registry: &Registry,
    factory: &PodFactory,
    plan: &Plan,
    big: &BigImage,
    defs: &[report::MetricDef],
    layouts: &Path,
) -> RuntimeResult {
    let mut res = RuntimeResult::new("containerd", "containerd");
    let setup = async {
        containerd::ensure_installed()?;
        let pause =
            containerd::pause_image()?.push(registry, "berth-bench/pause", "3.9", layouts)?;
        eprintln!("berth-bench: starting containerd");
        let c = containerd::Containerd::start(&registry.addr, &pause.reference).await?;
        anyhow::Ok((c, pause.reference))
    };
    let (mut ctrd, pause) = match setup.await {
        Ok(x) => x,
        Err(e) => {
            res.fill_na(defs, &format!("containerd set-up failed: {e:#}"));
            return res;
        }
    };
    res.notes.push(format!(
        "runc {}; own root/state/socket under {}; pause image {pause}",
        runc_version(),
        ctrd.dir.path().display(),
    ));
    let client = match ctrd.client().await {
        Ok(c) => c,
        Err(e) => {
            res.fill_na(defs, &format!("connect to containerd: {e:#}"));
            return res;
        }
    };
    let mut t = Target {
        key: "containerd".into(),
        client,
        kind: Kind::Containerd {
            address: ctrd.socket.clone(),
            root: ctrd.root.clone(),
        },
        daemon_pid: ctrd.pid(),
        metrics: target::Metrics::At {
            addr: ctrd.metrics_addr.clone(),
            path: containerd::METRICS_PATH.into(),
        },
    };
    let route_check = &mut net::check_route;
    let outcome = bench_target(&mut t, factory, plan, big, &mut res, &[pause], route_check).await;
    if let Err(e) = outcome {
        res.fill_na(defs, &e);
        let _ = target::sweep(&mut t.client, &factory.run_id).await;
    }
    drop(t);
    for n in ctrd.shutdown() {
        res.notes.push(format!("clean-up: {n}"));
    }
    res
}

fn runc_version() -> String {
    std::process::Command::new("runc")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("runc version ").to_string())
        })
        .unwrap_or_else(|| "?".into())
}

async fn bench_endpoint(
    n: usize,
    endpoint: &str,
    factory: &PodFactory,
    plan: &Plan,
    big: &BigImage,
    defs: &[report::MetricDef],
) -> RuntimeResult {
    let key = format!("endpoint{n}");
    let mut res = RuntimeResult::new(&key, endpoint);
    let path = PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
    let client = match crate::cri::CriClient::connect(&path).await {
        Ok(c) => c,
        Err(e) => {
            res.fill_na(defs, &format!("connect to {endpoint}: {e:#}"));
            return res;
        }
    };
    let mut t = Target {
        key,
        client,
        kind: Kind::External,
        daemon_pid: None,
        metrics: target::Metrics::Unknown("metrics endpoint unknown for an --endpoint".into()),
    };
    if let Err(e) = bench_target(&mut t, factory, plan, big, &mut res, &[], &mut || Ok(())).await {
        res.fill_na(defs, &e);
    }
    if let Some(name) = res.version.split_whitespace().next() {
        res.display = format!("{name} ({endpoint})");
    }
    let _ = target::remove_image(&mut t.client, &factory.image).await;
    res
}

/// Prints the report and writes the JSON file if asked; what the binary
/// does after [`run`].
pub fn emit(report: &Report, opts: &BenchOptions) -> anyhow::Result<()> {
    print!("{}\n{}", report.preamble(), report.table());
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report.to_json())?)?;
        eprintln!("berth-bench: wrote {}", path.display());
    }
    Ok(())
}

/// Kept for the smoke test: the ids of every row of a plan.
pub fn row_ids(plan: &Plan) -> Vec<String> {
    report::catalogue(plan).into_iter().map(|d| d.id).collect()
}
