//! Measurements (printed, not asserted): create+start latency and the
//! monitor's memory. In their own test binary so no other test runs
//! concurrently (`cargo test -p berth-shim --test perf -- --nocapture`).

mod common;

use std::time::{Duration, Instant};

use berth_proto::shim::StartRequest;
use berth_proto::shim::shim_request::Request;
use common::*;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn create_start_latency_and_monitor_pss() {
    if !is_root() {
        return;
    }
    // Warm up (page cache, cgroup parents).
    {
        let mut f = Fixture::new("warm", Opts::new(&["sleep", "1000"]));
        f.create_ok();
        f.shutdown();
    }
    let runs = 20;
    let mut total = Vec::new();
    let mut create = Vec::new();
    let mut start = Vec::new();
    let mut helper = Vec::new();
    for _ in 0..runs {
        let mut f = Fixture::new("lat", Opts::new(&["sleep", "1000"]));
        let t0 = Instant::now();
        f.create_ok();
        let t1 = Instant::now();
        let mut c = f.client();
        assert_ok(&c.call(Request::Start(StartRequest {})), "start");
        let t2 = Instant::now();
        let diag = std::fs::read_to_string(f.shim_dir.join("shim.log")).unwrap_or_default();
        if let Some(ms) = diag
            .split("(berth-container ")
            .nth(1)
            .and_then(|r| r.split(" ms").next())
            .and_then(|v| v.parse::<f64>().ok())
        {
            helper.push(Duration::from_secs_f64(ms / 1000.0));
        }
        create.push(t1 - t0);
        start.push(t2 - t1);
        total.push(t2 - t0);
        drop(c);
        f.shutdown();
    }
    for v in [&mut total, &mut create, &mut start, &mut helper] {
        v.sort();
    }
    eprintln!(
        "create+start over {runs} runs: p50 {:.2} ms, p90 {:.2} ms, min {:.2} ms (create p50 {:.2} ms, of which berth-container create p50 {:.2} ms; start p50 {:.2} ms)",
        ms(percentile(&total, 0.5)),
        ms(percentile(&total, 0.9)),
        ms(total[0]),
        ms(percentile(&create, 0.5)),
        ms(percentile(&helper, 0.5)),
        ms(percentile(&start, 0.5)),
    );

    // Memory: one running container, then ten.
    let mut fixtures = Vec::new();
    for n in 1..=10 {
        let f = Fixture::new("pss", Opts::new(&["sleep", "1000"]));
        f.create_ok();
        assert_ok(&f.client().call(Request::Start(StartRequest {})), "start");
        // Exercise the request path once so its pages are counted.
        let _ = f.client().state();
        fixtures.push(f);
        if n == 10 && std::env::var_os("BERTH_SHIM_SMAPS").is_some() {
            // Where the monitor's memory is: Pss and Private_Dirty per mapping.
            let smaps =
                std::fs::read_to_string(format!("/proc/{}/smaps", fixtures[0].monitor_pid()))
                    .unwrap();
            let mut mapping = "";
            let mut pss = String::new();
            for l in smaps.lines() {
                if l.split(' ')
                    .next()
                    .is_some_and(|w| w.contains('-') && !w.ends_with(':'))
                {
                    mapping = l;
                } else if let Some(v) = l.strip_prefix("Pss:") {
                    pss = v.trim().to_owned();
                } else if let Some(v) = l.strip_prefix("Private_Dirty:")
                    && (v.trim() != "0 kB" || pss != "0 kB")
                {
                    eprintln!("Pss {pss:>7} Private_Dirty {:>7}  {mapping}", v.trim());
                }
            }
        }
        if n == 1 || n == 10 {
            std::thread::sleep(Duration::from_millis(100));
            let mut pss = Vec::new();
            for f in &fixtures {
                pss.push(smaps_rollup(f.monitor_pid()));
            }
            let avg = |key: &str| {
                pss.iter()
                    .map(|m| m.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v))
                    .sum::<u64>()
                    / pss.len() as u64
            };
            eprintln!(
                "monitor memory with {n} running (average kB): Pss {} (anon {}, file {}), Rss {}, Private_Dirty {}, Private_Clean {}, Shared_Clean {}",
                avg("Pss"),
                avg("Pss_Anon"),
                avg("Pss_File"),
                avg("Rss"),
                avg("Private_Dirty"),
                avg("Private_Clean"),
                avg("Shared_Clean"),
            );
        }
    }
    for mut f in fixtures {
        f.shutdown();
    }
}

fn smaps_rollup(pid: i32) -> Vec<(String, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let kb = v.trim().strip_suffix(" kB")?.trim().parse().ok()?;
            Some((k.to_owned(), kb))
        })
        .collect()
}
