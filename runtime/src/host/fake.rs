//! A recording fake of the host for unit tests: every kernel call is
//! logged as one line (`"op argument"`), a failure can be injected into any
//! operation, and processes, pins and shims are simulated, so lifecycle
//! code and its undo paths run without root. Plain files (sandbox files,
//! bundles, breadcrumbs) are real, in the test's temp dir.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use berth_cri::v1::PodSandboxConfig;
use berth_proto::shim::{ContainerState, ExitRecord, shim_request, shim_response};
use prost::Message;

use super::Host;
use crate::error::{Error, Result};
use crate::process::ProcessIdentity;
use crate::sandbox::namespaces::{Kind, NamespaceSetup};

#[derive(Default)]
struct State {
    calls: Vec<String>,
    /// The operation to fail, the next time it is called.
    fail: Option<String>,
    alive: HashSet<i32>,
    next_pid: i32,
    pinned: HashSet<PathBuf>,
    mounted: HashSet<PathBuf>,
    cgroups: HashSet<String>,
    /// Shim dir → its monitor's pid.
    shims: HashMap<PathBuf, i32>,
    networks: HashSet<String>,
    network_problem: Option<String>,
}

pub struct RecordingHost {
    state: Mutex<State>,
    /// Where the fake CNI keeps its cache, as the real one does, so
    /// recovery finds unrecorded networks.
    cni_cache: PathBuf,
}

impl RecordingHost {
    pub fn new(cni_cache: &Path) -> RecordingHost {
        RecordingHost {
            state: Mutex::new(State::default()),
            cni_cache: cni_cache.to_path_buf(),
        }
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    /// The next call of `op` fails.
    pub fn fail_next(&self, op: &str) {
        self.state.lock().unwrap().fail = Some(op.to_string());
    }

    pub fn set_network_problem(&self, problem: &str) {
        self.state.lock().unwrap().network_problem = Some(problem.to_string());
    }

    /// Kills a simulated process (a shim or an infra process dying).
    pub fn kill(&self, pid: i32) {
        self.state.lock().unwrap().alive.remove(&pid);
    }

    /// What is still there: live processes, pins, mounts, cgroups,
    /// networks. Empty once everything was released.
    pub fn leftovers(&self) -> Vec<String> {
        let s = self.state.lock().unwrap();
        let mut out = Vec::new();
        out.extend(s.alive.iter().map(|p| format!("process {p}")));
        out.extend(s.pinned.iter().map(|p| format!("pin {}", p.display())));
        out.extend(s.mounted.iter().map(|p| format!("mount {}", p.display())));
        out.extend(s.cgroups.iter().map(|c| format!("cgroup {c}")));
        out.extend(s.networks.iter().map(|n| format!("network {n}")));
        out.sort();
        out
    }

    /// Logs a mount call `op` and records `target` as mounted.
    fn mount(&self, op: &str, target: &Path) -> Result<()> {
        self.call(op, target.display())?;
        self.state
            .lock()
            .unwrap()
            .mounted
            .insert(target.to_path_buf());
        Ok(())
    }

    /// Logs a call; fails it when a failure was injected for `op`.
    fn call(&self, op: &str, arg: impl std::fmt::Display) -> Result<()> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(format!("{op} {arg}"));
        if s.fail.as_deref() == Some(op) {
            s.fail = None;
            return Err(Error::Internal(format!("injected failure in {op}")));
        }
        Ok(())
    }

    fn spawn(&self) -> ProcessIdentity {
        let mut s = self.state.lock().unwrap();
        s.next_pid += 1;
        let pid = 10_000 + s.next_pid;
        s.alive.insert(pid);
        ProcessIdentity { pid, start_time: 1 }
    }
}

fn request_name(request: &shim_request::Request) -> &'static str {
    match request {
        shim_request::Request::State(_) => "state",
        shim_request::Request::Start(_) => "start",
        shim_request::Request::Kill(_) => "kill",
        shim_request::Request::ReopenLog(_) => "reopen-log",
        shim_request::Request::Shutdown(_) => "shutdown",
        shim_request::Request::ExecSync(_) => "exec-sync",
        shim_request::Request::Pause(_) => "pause",
        shim_request::Request::Resume(_) => "resume",
        shim_request::Request::ExecStream(_) => "exec-stream",
        shim_request::Request::Attach(_) => "attach",
    }
}

impl Host for RecordingHost {
    fn mount_overlay(
        &self,
        _lower: &[PathBuf],
        _upper: &Path,
        _work: &Path,
        target: &Path,
    ) -> Result<()> {
        self.mount("mount_overlay", target)
    }

    fn mount_readonly_layers(&self, _lower: &[PathBuf], target: &Path) -> Result<()> {
        self.mount("mount_readonly_layers", target)
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        self.call("unmount", target.display())?;
        self.state.lock().unwrap().mounted.remove(target);
        Ok(())
    }

    fn idmapped_bind(
        &self,
        _source: &Path,
        target: &Path,
        _with: crate::host::IdmapWith<'_>,
        _recursive: bool,
    ) -> Result<()> {
        self.mount("idmapped_bind", target)
    }

    fn supports_idmapped_mounts(&self, _dir: &Path) -> bool {
        true
    }

    fn give_to(&self, path: &Path, uid: u32, gid: u32) -> Result<()> {
        self.call("give_to", format!("{} {uid}:{gid}", path.display()))
    }

    fn unmount_all_under(&self, dir: &Path) -> Result<()> {
        self.call("unmount_all_under", dir.display())?;
        self.state
            .lock()
            .unwrap()
            .mounted
            .retain(|m| !m.starts_with(dir));
        Ok(())
    }

    fn pin_namespaces(&self, dir: &Path, setup: NamespaceSetup) -> Result<Vec<(Kind, PathBuf)>> {
        let user = setup.user.is_some().then_some(Kind::User);
        let kinds: Vec<Kind> = user.into_iter().chain(setup.kinds).collect();
        let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
        self.call("pin_namespaces", names.join(","))?;
        let mut pinned = Vec::new();
        for kind in kinds {
            let path = dir.join(kind.name());
            std::fs::write(&path, b"").map_err(|e| Error::io("fake pin", e))?;
            self.state.lock().unwrap().pinned.insert(path.clone());
            pinned.push((kind, path));
        }
        Ok(pinned)
    }

    fn unpin_namespace(&self, path: &Path) -> Result<()> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        self.call("unpin_namespace", name)?;
        self.state.lock().unwrap().pinned.remove(path);
        let _ = std::fs::remove_file(path);
        Ok(())
    }

    fn is_pinned(&self, path: &Path) -> bool {
        self.state.lock().unwrap().pinned.contains(path)
    }

    fn create_cgroup(&self, path: &str) -> Result<bool> {
        self.call("create_cgroup", path)?;
        Ok(self.state.lock().unwrap().cgroups.insert(path.to_string()))
    }

    fn remove_cgroup(&self, path: &str) -> Result<()> {
        self.call("remove_cgroup", path)?;
        self.state.lock().unwrap().cgroups.remove(path);
        Ok(())
    }

    fn add_to_cgroup(&self, path: &str, _pid: i32) -> Result<()> {
        self.call("add_to_cgroup", path)
    }

    fn apply_resources(&self, path: &str, _resources: &berth_cgroup::Resources) -> Result<()> {
        self.call("apply_resources", path)
    }

    fn start_infra(&self, _log: &Path, userns: Option<&Path>) -> Result<ProcessIdentity> {
        let userns = userns.map(|p| p.display().to_string()).unwrap_or_default();
        self.call("start_infra", userns)?;
        Ok(self.spawn())
    }

    fn stop_infra(&self, infra: &ProcessIdentity) {
        let _ = self.call("stop_infra", infra.pid);
        self.kill(infra.pid);
    }

    fn is_alive(&self, process: &ProcessIdentity) -> bool {
        process.start_time == 1 && self.state.lock().unwrap().alive.contains(&process.pid)
    }

    fn launch_shim(&self, dir: &Path, id: &str) -> Result<ProcessIdentity> {
        self.call("launch_shim", id)?;
        let shim = self.spawn();
        self.state
            .lock()
            .unwrap()
            .shims
            .insert(dir.to_path_buf(), shim.pid);
        Ok(shim)
    }

    fn call_shim(
        &self,
        dir: &Path,
        request: shim_request::Request,
        _timeout: Duration,
    ) -> Result<shim_response::Response> {
        let name = request_name(&request);
        self.call("call_shim", name)?;
        let pid = self.state.lock().unwrap().shims.get(dir).copied();
        let Some(pid) = pid.filter(|p| self.state.lock().unwrap().alive.contains(p)) else {
            return Err(Error::ShimUnreachable {
                socket: dir.join("shim.sock"),
                source: std::io::ErrorKind::ConnectionRefused.into(),
            });
        };
        let ok = shim_response::Response::Ok(Default::default());
        Ok(match request {
            shim_request::Request::State(_) => shim_response::Response::State(ContainerState {
                pid: pid + 1,
                started_at_ns: 1,
                ..Default::default()
            }),
            shim_request::Request::Kill(_) => {
                let exit = ExitRecord {
                    exit_code: 137,
                    finished_at_ns: 2,
                    reason: "Error".into(),
                    ..Default::default()
                };
                std::fs::write(dir.join("exit.pb"), exit.encode_to_vec())
                    .map_err(|e| Error::io("fake exit record", e))?;
                ok
            }
            shim_request::Request::Shutdown(_) => {
                self.kill(pid);
                ok
            }
            _ => ok,
        })
    }

    fn shim_answers(&self, dir: &Path) -> bool {
        let s = self.state.lock().unwrap();
        s.shims.get(dir).is_some_and(|p| s.alive.contains(p))
    }

    fn delete_container(&self, _root: &Path, id: &str) -> Result<()> {
        self.call("delete_container", id)
    }

    fn network_setup(
        &self,
        sandbox_id: &str,
        _netns: &Path,
        _config: &PodSandboxConfig,
    ) -> Result<Vec<String>> {
        self.call("network_setup", sandbox_id)?;
        std::fs::create_dir_all(&self.cni_cache).map_err(|e| Error::io("fake CNI cache", e))?;
        std::fs::write(self.cni_cache.join(format!("{sandbox_id}.json")), b"{}")
            .map_err(|e| Error::io("fake CNI cache", e))?;
        self.state
            .lock()
            .unwrap()
            .networks
            .insert(sandbox_id.to_string());
        Ok(vec!["10.88.0.7".into()])
    }

    fn network_teardown(&self, sandbox_id: &str) -> Result<()> {
        self.call("network_teardown", sandbox_id)?;
        let _ = std::fs::remove_file(self.cni_cache.join(format!("{sandbox_id}.json")));
        self.state.lock().unwrap().networks.remove(sandbox_id);
        Ok(())
    }

    fn network_check(
        &self,
        sandbox_id: &str,
        _netns: &Path,
        _pod_ips: &[String],
    ) -> Option<String> {
        let _ = self.call("network_check", sandbox_id);
        let s = self.state.lock().unwrap();
        if !s.networks.contains(sandbox_id) {
            return Some("the pod's CNI result is gone".into());
        }
        s.network_problem.clone()
    }
}
