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
    for _ in 0..runs {
        let mut f = Fixture::new("lat", Opts::new(&["sleep", "1000"]));
        let t0 = Instant::now();
        f.create_ok();
        let t1 = Instant::now();
        let mut c = f.client();
        assert_ok(&c.call(Request::Start(StartRequest {})), "start");
        let t2 = Instant::now();
        create.push(t1 - t0);
        start.push(t2 - t1);
        total.push(t2 - t0);
        drop(c);
        f.shutdown();
    }
    for v in [&mut total, &mut create, &mut start] {
        v.sort();
    }
    eprintln!(
        "create+start over {runs} runs: p50 {:.2} ms, p90 {:.2} ms, min {:.2} ms (create p50 {:.2} ms, start p50 {:.2} ms)",
        ms(percentile(&total, 0.5)),
        ms(percentile(&total, 0.9)),
        ms(total[0]),
        ms(percentile(&create, 0.5)),
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
        if n == 1 && std::env::var_os("BERTH_SHIM_SMAPS").is_some() {
            let smaps =
                std::fs::read_to_string(format!("/proc/{}/smaps", f_pid(&fixtures))).unwrap();
            let mut name = String::new();
            for l in smaps.lines() {
                if l.contains('-') && l.split_whitespace().count() >= 5 && !l.contains(':')
                    || l.split_whitespace().next().is_some_and(|w| {
                        w.contains('-') && w.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
                    })
                {
                    name = l.to_owned();
                } else if let Some(v) = l.strip_prefix("Private_Dirty:") {
                    if v.trim() != "0 kB" {
                        eprintln!("{v:>10}  {name}");
                    }
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

fn f_pid(f: &[Fixture]) -> i32 {
    f[0].monitor_pid()
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
