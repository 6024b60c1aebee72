//! The metadata store loses no committed record when its writer is killed
//! with SIGKILL at an arbitrary moment.
//!
//! The test re-runs its own binary as the writer (`store_writer_child`), which
//! prints `committed N` after each durable put; the parent kills it mid-stream
//! and reopens the store.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use berth_runtime::store::{SandboxRecord, SandboxState, Store};

const CHILD_ENV: &str = "BERTH_STORE_CRASH_CHILD";

fn record(n: u64) -> SandboxRecord {
    SandboxRecord {
        id: format!("sandbox-{n:06}"),
        name: format!("pod-{n}"),
        namespace: "crash".into(),
        attempt: (n % 7) as u32,
        state: if n.is_multiple_of(2) {
            SandboxState::Ready
        } else {
            SandboxState::NotReady
        },
        created_at_ns: n as i64,
        // Big enough that a commit spans several pages.
        config_json: "x".repeat(8192 + (n as usize % 1000)),
        ..Default::default()
    }
}

/// The writer. A no-op unless started by `sigkill_mid_stream_loses_nothing`.
#[test]
fn store_writer_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = Store::open(std::path::Path::new(&path)).unwrap();
    let start: u64 = store.list::<SandboxRecord>().unwrap().len() as u64;
    for n in start.. {
        store.put(&record(n)).unwrap();
        // Rewrite an older record too, so a torn update would show.
        if n > 0 {
            let mut old = record(n - 1);
            old.state = SandboxState::NotReady;
            store.put(&old).unwrap();
        }
        println!("committed {n}");
    }
}

#[test]
fn sigkill_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let mut committed_total = 0u64;
    // Kill after different numbers of commits: the kill lands at a different
    // point of a write each round.
    for (round, kill_after) in [37u64, 101, 5, 64].into_iter().enumerate() {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "store_writer_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut last = None;
        let mut seen = 0;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("committed ") {
                last = Some(n.parse::<u64>().unwrap());
                seen += 1;
                if seen == kill_after {
                    child.kill().unwrap();
                    break;
                }
            }
        }
        child.wait().unwrap();
        let last = last.unwrap_or_else(|| panic!("round {round}: writer committed nothing"));
        committed_total = committed_total.max(last + 1);

        let store = Store::open(&path).unwrap();
        let all = store.list::<SandboxRecord>().unwrap();
        for n in 0..=last {
            let got = store
                .get::<SandboxRecord>(&format!("sandbox-{n:06}"))
                .unwrap()
                .unwrap_or_else(|| panic!("round {round}: committed record {n} lost"));
            let mut want = record(n);
            if n < last {
                want.state = SandboxState::NotReady;
            }
            if n == last {
                // The rewrite of `last` may or may not have landed.
                want.state = got.state;
            }
            assert_eq!(got, want, "round {round}: record {n} differs");
        }
        // At most the one write in flight beyond what was reported.
        assert!(
            all.len() as u64 <= last + 2,
            "round {round}: {} records for {} commits",
            all.len(),
            last + 1
        );
    }
    assert!(committed_total > 100);
}
