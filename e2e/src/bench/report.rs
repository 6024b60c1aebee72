//! The figures the benchmark reports, per runtime: the catalogue of
//! metrics, their cells (samples or "n/a (reason)"), the table printed on
//! stdout and the JSON document.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::json;

use super::Plan;

/// Which way is better for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct MetricDef {
    /// Stable key (JSON, tests): `run_pod_sandbox`, `concurrent_10`, ...
    pub id: String,
    pub label: String,
    pub unit: &'static str,
    pub better: Better,
}

fn def(
    id: impl Into<String>,
    label: impl Into<String>,
    unit: &'static str,
    better: Better,
) -> MetricDef {
    MetricDef {
        id: id.into(),
        label: label.into(),
        unit,
        better,
    }
}

/// The CRI calls timed one by one in every pod lifecycle, in call order:
/// (id, label).
pub const LIFECYCLE: [(&str, &str); 10] = [
    ("run_pod_sandbox", "RunPodSandbox"),
    ("create_container", "CreateContainer"),
    ("start_container", "StartContainer"),
    ("exec_sync", "ExecSync (echo hi)"),
    (EXEC_STREAMING, "Exec (streaming, SPDY) `echo hi`"),
    ("container_status", "ContainerStatus"),
    ("stop_container", "StopContainer (timeout 0, sleep 1000)"),
    ("remove_container", "RemoveContainer"),
    ("stop_pod_sandbox", "StopPodSandbox"),
    ("remove_pod_sandbox", "RemovePodSandbox"),
];

pub const E2E: &str = "pod_start_e2e";
pub const PSS: &str = "pss_per_container";
pub const RSS_IDLE: &str = "daemon_rss_idle";
pub const RSS_MANY: &str = "daemon_rss_many";
pub const LIST_CONTAINERS: &str = "list_containers_many";
pub const LIST_STATS: &str = "list_container_stats_many";
pub const LIST_POD_STATS: &str = "list_pod_sandbox_stats_many";
/// One whole scrape of the daemon's Prometheus endpoint (HTTP/1.1 GET
/// and body) at [`Plan::many`] containers.
pub const METRICS_SCRAPE: &str = "metrics_scrape_many";
/// The daemon's CPU (percent of one core) while a client calls
/// ListContainerStats and ListPodSandboxStats once a second.
pub const STATS_CPU: &str = "daemon_cpu_listing_stats";
pub const PULL: &str = "pull_throughput";
/// RemoveImage of the image the pull scenario pulled, while no container
/// uses it: the answer, not the deletion of its files after it.
pub const REMOVE_IMAGE: &str = "remove_image_big";
pub const STATUS_DURING_REMOVALS: &str = "container_status_p99_during_removals";
pub const EXIT_TO_EVENT: &str = "exit_to_stopped_event";
/// CRI Exec, then the SPDY session to its URL until stdout and the v4
/// Success status are read.
pub const EXEC_STREAMING: &str = "exec_streaming_spdy";
/// Port-forward throughput over one forwarded SPDY connection, pod →
/// client and client → pod.
pub const FORWARD_DOWN: &str = "port_forward_download";
pub const FORWARD_UP: &str = "port_forward_upload";
/// Pods removed at once in the [`STATUS_DURING_REMOVALS`] scenario.
pub const REMOVALS: usize = 10;

pub fn concurrent_id(pods: usize) -> String {
    format!("concurrent_{pods}")
}

/// Every row, in the order printed, labelled with the plan's counts.
pub fn catalogue(plan: &Plan) -> Vec<MetricDef> {
    use Better::*;
    let mut v: Vec<MetricDef> = LIFECYCLE
        .iter()
        .map(|(id, label)| def(*id, *label, "ms", Lower))
        .collect();
    v.push(def(
        E2E,
        "RunPodSandbox → container's first log line",
        "ms",
        Lower,
    ));
    for p in &plan.concurrent {
        v.push(def(
            concurrent_id(*p),
            format!("{p} pods × 1 container started concurrently (wall)"),
            "ms",
            Lower,
        ));
    }
    v.push(def(
        PSS,
        format!("runtime PSS per container (K={})", plan.k),
        "MiB",
        Lower,
    ));
    v.push(def(RSS_IDLE, "daemon RSS idle", "MiB", Lower));
    v.push(def(
        RSS_MANY,
        format!("daemon RSS with {} pods × 1 container", plan.many),
        "MiB",
        Lower,
    ));
    v.push(def(
        LIST_CONTAINERS,
        format!("ListContainers at {} containers", plan.many),
        "ms",
        Lower,
    ));
    v.push(def(
        LIST_STATS,
        format!("ListContainerStats at {} containers", plan.many),
        "ms",
        Lower,
    ));
    v.push(def(
        LIST_POD_STATS,
        format!("ListPodSandboxStats at {} pods", plan.many),
        "ms",
        Lower,
    ));
    v.push(def(
        METRICS_SCRAPE,
        format!("one /metrics scrape at {} containers", plan.many),
        "ms",
        Lower,
    ));
    v.push(def(
        STATS_CPU,
        format!(
            "daemon CPU while listing stats every second ({} containers, {} s)",
            plan.many, plan.stats_cpu_secs
        ),
        "% core",
        Lower,
    ));
    v.push(def(
        STATUS_DURING_REMOVALS,
        format!("ContainerStatus p99 while {REMOVALS} RemovePodSandbox run concurrently"),
        "ms",
        Lower,
    ));
    v.push(def(
        EXIT_TO_EVENT,
        "container exit → STOPPED event",
        "ms",
        Lower,
    ));
    v.push(def(
        FORWARD_DOWN,
        format!(
            "port-forward pod → client, {} MiB over one SPDY connection",
            plan.forward_mib
        ),
        "MB/s",
        Higher,
    ));
    v.push(def(
        FORWARD_UP,
        format!(
            "port-forward client → pod, {} MiB over one SPDY connection",
            plan.forward_mib
        ),
        "MB/s",
        Higher,
    ));
    v.push(def(
        PULL,
        format!(
            "pull+unpack {} MiB incompressible, {} layers (cold cache)",
            plan.image_mib, plan.image_layers
        ),
        "MB/s",
        Higher,
    ));
    v.push(def(
        REMOVE_IMAGE,
        format!(
            "RemoveImage of that image ({} MiB, {} layers, unused)",
            plan.image_mib, plan.image_layers
        ),
        "ms",
        Lower,
    ));
    v
}

/// One runtime's figure for one metric.
#[derive(Debug, Clone)]
pub enum Cell {
    /// Measured: every successful sample, how many attempts failed (and
    /// the first failure), and a remark shown with the value.
    Samples {
        values: Vec<f64>,
        failed: usize,
        first_error: Option<String>,
        note: Option<String>,
    },
    /// Not measured, and why.
    Na(String),
}

impl Cell {
    pub fn value(v: f64) -> Cell {
        Cell::Samples {
            values: vec![v],
            failed: 0,
            first_error: None,
            note: None,
        }
    }

    pub fn na(reason: impl Into<String>) -> Cell {
        Cell::Na(reason.into())
    }

    /// The median, if measured.
    pub fn median(&self) -> Option<f64> {
        match self {
            Cell::Samples { values, .. } if !values.is_empty() => Some(summary(values).median),
            _ => None,
        }
    }

    pub fn is_na(&self) -> bool {
        self.median().is_none()
    }
}

/// Collects samples and failures of one metric.
#[derive(Debug, Default, Clone)]
pub struct Collector {
    values: Vec<f64>,
    failed: usize,
    first_error: Option<String>,
    note: Option<String>,
}

impl Collector {
    pub fn push(&mut self, v: f64) {
        self.values.push(v);
    }

    pub fn fail(&mut self, error: impl Into<String>) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error.into());
        }
    }

    pub fn note(&mut self, note: impl Into<String>) {
        if self.note.is_none() {
            self.note = Some(note.into());
        }
    }

    /// The cell: n/a with the first error (or `missing`) when nothing was
    /// measured.
    pub fn cell(self, missing: &str) -> Cell {
        if self.values.is_empty() {
            return Cell::Na(self.first_error.unwrap_or_else(|| missing.to_string()));
        }
        Cell::Samples {
            values: self.values,
            failed: self.failed,
            first_error: self.first_error,
            note: self.note,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub p90: f64,
    pub max: f64,
    pub min: f64,
    pub mean: f64,
}

/// Median (mean of the middle two for an even count), p90 (nearest rank),
/// max, min, mean. `values` must not be empty.
pub fn summary(values: &[f64]) -> Summary {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let rank = ((0.9 * n as f64).ceil() as usize).clamp(1, n);
    Summary {
        median,
        p90: v[rank - 1],
        max: v[n - 1],
        min: v[0],
        mean: v.iter().sum::<f64>() / n as f64,
    }
}

/// The `p`-quantile (0 < p <= 1) of `values` by nearest rank; `values`
/// must not be empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// What one runtime measured.
#[derive(Debug, Clone)]
pub struct RuntimeResult {
    /// `berth`, `containerd`, `endpoint1`, ...
    pub key: String,
    /// Column header: `Berth`, `containerd`, or the runtime name.
    pub display: String,
    /// From `Version`: `name version`.
    pub version: String,
    pub cells: BTreeMap<String, Cell>,
    /// Remarks about this runtime's set-up and measurements.
    pub notes: Vec<String>,
}

impl RuntimeResult {
    pub fn new(key: &str, display: &str) -> RuntimeResult {
        RuntimeResult {
            key: key.into(),
            display: display.into(),
            version: String::new(),
            cells: BTreeMap::new(),
            notes: Vec::new(),
        }
    }

    pub fn set(&mut self, id: impl Into<String>, cell: Cell) {
        self.cells.insert(id.into(), cell);
    }

    pub fn cell(&self, id: &str) -> Cell {
        self.cells
            .get(id)
            .cloned()
            .unwrap_or_else(|| Cell::na("not measured"))
    }

    /// Marks every metric without a cell n/a with `reason`.
    pub fn fill_na(&mut self, defs: &[MetricDef], reason: &str) {
        for d in defs {
            self.cells
                .entry(d.id.clone())
                .or_insert_with(|| Cell::na(reason));
        }
    }
}

/// The whole benchmark's result.
#[derive(Debug, Clone)]
pub struct Report {
    pub plan: Plan,
    pub defs: Vec<MetricDef>,
    pub runtimes: Vec<RuntimeResult>,
    pub environment: BTreeMap<String, String>,
    pub notes: Vec<String>,
}

/// Formats a figure with 3 significant digits at most (at least 0 decimals).
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn shorten(s: &str, max: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut t: String = one_line.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The table text of a cell: `med / p90 / max` (a lone sample: the value),
/// with the failure count and the note; or `n/a (reason)`.
pub fn cell_text(cell: &Cell, reason_width: usize) -> String {
    match cell {
        Cell::Na(reason) => format!("n/a ({})", shorten(reason, reason_width)),
        Cell::Samples {
            values,
            failed,
            first_error,
            note,
        } => {
            let mut s = if values.len() == 1 {
                fmt_num(values[0])
            } else {
                let sm = summary(values);
                format!(
                    "{} / {} / {}",
                    fmt_num(sm.median),
                    fmt_num(sm.p90),
                    fmt_num(sm.max)
                )
            };
            if *failed > 0 {
                let _ = write!(
                    s,
                    " ({failed} failed: {})",
                    shorten(first_error.as_deref().unwrap_or("?"), reason_width / 2)
                );
            }
            if let Some(n) = note {
                let _ = write!(s, " [{}]", shorten(n, reason_width / 2));
            }
            s
        }
    }
}

/// `other/berth` for lower-is-better, `berth/other` for throughput, of
/// the medians: above 1 means Berth is better.
pub fn ratio(def: &MetricDef, berth: &Cell, other: &Cell) -> Option<f64> {
    let (b, o) = (berth.median()?, other.median()?);
    let (num, den) = match def.better {
        Better::Lower => (o, b),
        Better::Higher => (b, o),
    };
    (den > 0.0).then(|| num / den)
}

impl Report {
    fn base(&self) -> Option<&RuntimeResult> {
        self.runtimes.iter().find(|r| r.key == "berth")
    }

    /// The table: one row per metric, one column per runtime, and for
    /// every runtime other than Berth the ratio against Berth.
    pub fn table(&self) -> String {
        const REASON: usize = 56;
        let base = self.base();
        let mut header = vec!["metric".to_string(), "unit".to_string()];
        for r in &self.runtimes {
            header.push(if self.plan.iterations > 1 {
                format!("{} (med / p90 / max)", r.display)
            } else {
                r.display.clone()
            });
        }
        let others: Vec<&RuntimeResult> = match base {
            Some(_) => self.runtimes.iter().filter(|r| r.key != "berth").collect(),
            None => Vec::new(),
        };
        for o in &others {
            header.push(format!("{}/berth", o.key));
        }
        let mut rows = vec![header];
        for d in &self.defs {
            let mut row = vec![d.label.clone(), d.unit.to_string()];
            for r in &self.runtimes {
                row.push(cell_text(&r.cell(&d.id), REASON));
            }
            if let Some(b) = base {
                for o in &others {
                    row.push(match ratio(d, &b.cell(&d.id), &o.cell(&d.id)) {
                        Some(x) => format!("{x:.2}×"),
                        None => "–".into(),
                    });
                }
            }
            rows.push(row);
        }
        let cols = rows[0].len();
        let width = |i: usize| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols).map(width).collect();
        let mut out = String::new();
        for (n, row) in rows.iter().enumerate() {
            let mut line = String::new();
            for (i, c) in row.iter().enumerate() {
                let pad = widths[i] - c.chars().count();
                if i > 0 {
                    line.push_str(" | ");
                }
                line.push_str(c);
                line.push_str(&" ".repeat(pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
            if n == 0 {
                let sep: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                out.push_str(&sep.join("-|-"));
                out.push('\n');
            }
        }
        out
    }

    /// The header above the table: runtimes, versions, the plan.
    pub fn preamble(&self) -> String {
        let p = &self.plan;
        let mut s = format!(
            "berth-bench: N={} iterations after W={} warm-ups; concurrent P={:?}; K={}; {} pods; {} MiB image, {} pull run(s); {} MiB port-forwarded × {}{}{}\n",
            p.iterations,
            p.warmup,
            p.concurrent,
            p.k,
            p.many,
            p.image_mib,
            p.pull_runs,
            p.forward_mib,
            p.forward_runs,
            if p.quick { " (quick)" } else { "" },
            if p.only.is_empty() {
                String::new()
            } else {
                format!("; only {:?}", p.only)
            }
        );
        for (k, v) in &self.environment {
            let _ = writeln!(s, "  {k}: {v}");
        }
        for r in &self.runtimes {
            let _ = writeln!(s, "  {}: {}", r.display, r.version);
            for n in &r.notes {
                let _ = writeln!(s, "    - {n}");
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        s.push_str("  ratio columns: >1 means Berth is better (times, memory and CPU: other/berth; throughput: berth/other)\n");
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let base = self.base();
        let metrics: Vec<serde_json::Value> = self
            .defs
            .iter()
            .map(|d| {
                let mut values = serde_json::Map::new();
                let mut ratios = serde_json::Map::new();
                for r in &self.runtimes {
                    let c = r.cell(&d.id);
                    values.insert(r.key.clone(), cell_json(&c));
                    if let Some(b) = base
                        && r.key != "berth"
                        && let Some(x) = ratio(d, &b.cell(&d.id), &c)
                    {
                        ratios.insert(r.key.clone(), json!(x));
                    }
                }
                json!({
                    "id": d.id,
                    "label": d.label,
                    "unit": d.unit,
                    "better": match d.better { Better::Lower => "lower", Better::Higher => "higher" },
                    "values": values,
                    "ratio_vs_berth": ratios,
                })
            })
            .collect();
        let p = &self.plan;
        json!({
            "plan": {
                "quick": p.quick,
                "iterations": p.iterations,
                "warmup": p.warmup,
                "concurrent": p.concurrent,
                "concurrent_runs": p.concurrent_runs,
                "k": p.k,
                "many": p.many,
                "image_mib": p.image_mib,
                "image_layers": p.image_layers,
                "pull_runs": p.pull_runs,
                "forward_mib": p.forward_mib,
                "forward_runs": p.forward_runs,
                "stats_cpu_secs": p.stats_cpu_secs,
                "only": p.only.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>(),
            },
            "environment": self.environment,
            "runtimes": self.runtimes.iter().map(|r| json!({
                "key": r.key,
                "display": r.display,
                "version": r.version,
                "notes": r.notes,
            })).collect::<Vec<_>>(),
            "notes": self.notes,
            "metrics": metrics,
        })
    }
}

fn cell_json(c: &Cell) -> serde_json::Value {
    match c {
        Cell::Na(reason) => json!({"na": reason}),
        Cell::Samples {
            values,
            failed,
            first_error,
            note,
        } => {
            let s = summary(values);
            json!({
                "median": s.median,
                "p90": s.p90,
                "max": s.max,
                "min": s.min,
                "mean": s.mean,
                "n": values.len(),
                "failed": failed,
                "first_error": first_error,
                "note": note,
                "samples": values,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = summary(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.p90, s.max), (2.0, 3.0, 3.0));
        let v: Vec<f64> = (1..=30).map(f64::from).collect();
        let s = summary(&v);
        assert_eq!((s.median, s.p90, s.max), (15.5, 27.0, 30.0));
        assert_eq!(summary(&[7.0]).p90, 7.0);
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 198.0);
        assert_eq!(percentile(&[5.0, 1.0], 0.99), 5.0);
        assert_eq!(percentile(&[4.0], 0.5), 4.0);
    }

    #[test]
    fn ratios_point_the_same_way() {
        let lower = def("t", "t", "ms", Better::Lower);
        let higher = def("h", "h", "MB/s", Better::Higher);
        let (a, b) = (Cell::value(10.0), Cell::value(40.0));
        assert_eq!(ratio(&lower, &a, &b), Some(4.0));
        assert_eq!(ratio(&higher, &b, &a), Some(4.0));
        assert_eq!(ratio(&lower, &Cell::na("x"), &b), None);
    }

    #[test]
    fn cells_render() {
        assert_eq!(
            cell_text(&Cell::na("Unimplemented"), 40),
            "n/a (Unimplemented)"
        );
        let mut c = Collector::default();
        c.push(1.0);
        c.push(3.0);
        c.fail("boom");
        assert_eq!(
            cell_text(&c.cell("-"), 40),
            "2.00 / 3.00 / 3.00 (1 failed: boom)"
        );
        assert_eq!(Collector::default().cell("never ran").median(), None);
    }
}
