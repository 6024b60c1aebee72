//! What the benchmark reads from and does to the host: process trees and
//! their memory (/proc), cgroup trees, mounts, the page cache, routes.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Random lowercase hex of `bytes` bytes.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert_eq!(n as usize, buf.len(), "getrandom failed");
    hex::encode(buf)
}

/// Every pid in /proc.
pub fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// The argv of a process joined with spaces (`None` when it is gone; empty
/// for kernel threads and zombies).
pub fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// `(ppid, state)` of a process from /proc/PID/stat.
fn stat(pid: i32) -> Option<(i32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((ppid, state))
}

/// CPU time a process has used, all its threads (dead ones included):
/// utime + stime of /proc/PID/stat, in clock ticks ([`clock_ticks_per_sec`]).
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    // After the command: state (field 3), ..., utime (14), stime (15).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `sysconf(_SC_CLK_TCK)`: the unit of [`cpu_ticks`].
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf reads a constant.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 { n as u64 } else { 100 }
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    matches!(stat(pid), Some((_, s)) if s != 'Z' && s != 'X')
}

/// A snapshot of the process tree: children by parent.
pub struct ProcessTree {
    children: HashMap<i32, Vec<i32>>,
}

impl ProcessTree {
    pub fn snapshot() -> ProcessTree {
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for pid in all_pids() {
            if let Some((ppid, _)) = stat(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
        ProcessTree { children }
    }

    /// `root` and all its descendants.
    pub fn subtree(&self, root: i32) -> BTreeSet<i32> {
        let mut out = BTreeSet::new();
        let mut stack = vec![root];
        while let Some(p) = stack.pop() {
            if out.insert(p)
                && let Some(c) = self.children.get(&p)
            {
                stack.extend(c);
            }
        }
        out
    }
}

/// A `Name:   1234 kB` field of a /proc file, in KiB.
fn kib_field(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Proportional set size of a process (smaps_rollup), KiB.
pub fn pss_kib(pid: i32) -> Option<u64> {
    kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss")
}

/// Resident set size of a process (status VmRSS), KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    kib_field(&format!("/proc/{pid}/status"), "VmRSS")
}

/// Processes whose argv[0] ends with `program` and whose command line
/// contains `needle`.
pub fn processes_matching(program: &str, needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|p| *p != me)
        .filter(|p| {
            cmdline(*p).is_some_and(|c| {
                c.split(' ').next().unwrap_or("").ends_with(program) && c.contains(needle)
            })
        })
        .collect()
}

/// SIGKILLs `pids` (ignoring those already gone).
pub fn kill_all(pids: &[i32]) {
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// `sync` and drop the page cache, dentries and inodes.
pub fn drop_caches() -> std::io::Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
}

// ---- mounts ----

use crate::pods::unescape_mountinfo;

/// Mount points at or under `prefix` (host mount namespace).
pub fn mounts_under(prefix: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(prefix))
        .collect()
}

/// Lazily unmounts everything under `prefix`, deepest first.
pub fn unmount_under(prefix: &Path) -> usize {
    let mut mounts = mounts_under(prefix);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    mounts.dedup();
    let n = mounts.len();
    for m in mounts {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    n
}

// ---- cgroups ----

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn cgroup_v2() -> bool {
    nix::sys::statfs::statfs(CGROUP_ROOT)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The roots of every cgroup hierarchy (one on v2; one per v1 mount).
fn cgroup_roots() -> Vec<PathBuf> {
    if cgroup_v2() {
        return vec![PathBuf::from(CGROUP_ROOT)];
    }
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut roots: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if !right.starts_with("cgroup ") {
                return None;
            }
            let mp = PathBuf::from(unescape_mountinfo(left.split(' ').nth(4)?));
            mp.starts_with(CGROUP_ROOT).then_some(mp)
        })
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

/// Every existing directory of cgroup `path`, in every hierarchy.
pub fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let rel = path.trim_start_matches('/');
    cgroup_roots()
        .into_iter()
        .map(|r| r.join(rel))
        .filter(|p| p.is_dir())
        .collect()
}

/// The pids in cgroup `path` and below, in every hierarchy.
pub fn cgroup_tree_pids(path: &str) -> Vec<i32> {
    fn walk(dir: &Path, out: &mut Vec<i32>) {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut out = Vec::new();
    for dir in cgroup_dirs(path) {
        walk(&dir, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// Kills whatever still runs in cgroup `path` and removes its directories
/// in every hierarchy. Returns how many processes had to be killed.
pub fn remove_cgroup_tree(path: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut killed = BTreeSet::new();
    loop {
        let pids = cgroup_tree_pids(path);
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        killed.extend(pids.iter().copied());
        kill_all(&pids);
        std::thread::sleep(Duration::from_millis(50));
    }
    fn rmdir_tree(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_tree(&e.path());
                }
            }
        }
        for _ in 0..50 {
            match std::fs::remove_dir(dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    for dir in cgroup_dirs(path) {
        rmdir_tree(&dir);
    }
    killed.len()
}

/// Removes `dir` and every directory below it that holds nothing but
/// empty directories; leaves anything with a file (or a mount) in place.
pub fn remove_empty_dirs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

// ---- network ----

/// `ip <args>`: stdout, or an error with stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The output device of the route to `addr` (`ip route get`).
pub fn route_dev(addr: &str) -> anyhow::Result<String> {
    let out = ip(&["route", "get", addr])?;
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "dev")
        .map(|w| w[1].to_string())
        .ok_or_else(|| anyhow::anyhow!("no device in `ip route get {addr}`: {out}"))
}

// ---- misc ----

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn cpu_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The 1, 5 and 15 minute load averages (/proc/loadavg).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn mem_total_mib() -> u64 {
    kib_field("/proc/meminfo", "MemTotal").unwrap_or(0) / 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(rss_kib(me).is_some_and(|r| r > 0));
        // Spinning shows up as CPU time (a tenth of a second of it).
        let before = cpu_ticks(me).expect("own cpu ticks");
        let want = before + clock_ticks_per_sec() / 10;
        let t0 = Instant::now();
        let mut x = 0u64;
        while cpu_ticks(me).unwrap() < want && t0.elapsed() < Duration::from_secs(30) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
        }
        assert!(cpu_ticks(me).unwrap() >= want, "no CPU time after spinning");
        let tree = ProcessTree::snapshot();
        assert!(tree.subtree(me).contains(&me));
        assert!(cmdline(me).is_some_and(|c| !c.is_empty()));
    }
}
