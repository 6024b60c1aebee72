//! The container operations `berth-container` performs, behind a small trait
//! so the command-line layer does not depend on libcontainer's types.
//!
//! [`Libcontainer`] is the only implementation: youki's `libcontainer` does
//! every security-relevant step (namespaces, pivot_root, mounts, masked
//! paths, capabilities, seccomp, rlimits, cgroups, freezer).

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::oci_spec::runtime::{LinuxSeccomp, Spec};
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};

/// What `create` learned about the new container.
#[derive(Debug)]
pub struct Created {
    /// Host pid of the container's init (blocked until `start`).
    pub pid: i32,
    /// The spec has poststart hooks, so `start` must go through libcontainer
    /// (the monitor's fast path only signals the notify socket).
    pub poststart_hooks: bool,
}

pub struct CreateOpts<'a> {
    pub id: &'a str,
    pub bundle: &'a Path,
    pub console_socket: Option<&'a Path>,
}

pub struct ExecOpts<'a> {
    pub id: &'a str,
    pub args: Vec<String>,
    /// Give the process a pty allocated in the container (its controlling
    /// terminal); the master goes to this socket, as for create.
    pub console_socket: Option<&'a Path>,
    /// Initial terminal size (rows, columns), set before execve.
    pub console_size: Option<(u32, u32)>,
}

/// Failures carry libcontainer's message (with its causes), one line.
#[derive(Debug)]
pub struct OpError(pub String);

impl OpError {
    fn from_err(context: &str, err: &dyn std::error::Error) -> Self {
        let mut msg = format!("{context}: {err}");
        let mut source = err.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !msg.ends_with(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            source = s.source();
        }
        OpError(msg.replace('\n', " "))
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub type OpResult<T> = Result<T, OpError>;

/// The operations the monitor asks for, one per `berth-container` run.
pub trait ContainerOps {
    /// Creates the container; its init waits for `start`. The init uses this
    /// process's stdin/stdout/stderr (or the console socket when the spec
    /// asks for a terminal).
    fn create(&self, opts: &CreateOpts) -> OpResult<Created>;
    /// Starts a created container (notify socket + state + poststart hooks).
    fn start(&self, id: &str) -> OpResult<()>;
    /// Runs a process in the container (detached), returning its host pid.
    fn exec(&self, opts: &ExecOpts) -> OpResult<i32>;
    fn pause(&self, id: &str) -> OpResult<()>;
    fn resume(&self, id: &str) -> OpResult<()>;
    /// Removes the container: kills what is left, removes its cgroup and its
    /// state directory. A container that does not exist is not an error.
    fn delete(&self, id: &str) -> OpResult<()>;
    /// Records that the monitor started the container itself (through the
    /// notify socket): a `created` state with a live init becomes `running`.
    fn mark_running(&self, id: &str) -> OpResult<()>;
}

pub struct Libcontainer {
    /// libcontainer's state root (holds `<id>/state.json`).
    pub root: PathBuf,
}

impl Libcontainer {
    fn builder(&self, id: &str) -> OpResult<ContainerBuilder> {
        ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .validate_id()
            .map_err(|e| OpError::from_err("invalid container id", &e))?
            .with_root_path(&self.root)
            .map_err(|e| OpError::from_err("invalid runtime root", &e))
    }

    fn load(&self, id: &str) -> OpResult<Container> {
        let dir = self.root.join(id);
        if !dir.exists() {
            return Err(OpError(format!("container {id} does not exist")));
        }
        Container::load(dir).map_err(|e| OpError::from_err("load container state", &e))
    }
}

impl ContainerOps for Libcontainer {
    fn create(&self, opts: &CreateOpts) -> OpResult<Created> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| OpError::from_err("create runtime root", &e))?;
        let container = self
            .builder(opts.id)?
            .with_console_socket(opts.console_socket)
            .as_init(opts.bundle)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| OpError::from_err("create container", &e))?;
        let pid = container
            .pid()
            .ok_or_else(|| OpError("created container has no pid".into()))?
            .as_raw();
        let poststart_hooks = container
            .spec()
            .ok()
            .and_then(|c| c.hooks)
            .and_then(|h| h.poststart().clone())
            .is_some_and(|v| !v.is_empty());
        Ok(Created {
            pid,
            poststart_hooks,
        })
    }

    fn start(&self, id: &str) -> OpResult<()> {
        self.load(id)?
            .start()
            .map_err(|e| OpError::from_err("start container", &e))
    }

    fn exec(&self, opts: &ExecOpts) -> OpResult<i32> {
        let container = self.load(opts.id)?;
        let spec = Spec::load(container.bundle().join("config.json"))
            .map_err(|e| OpError::from_err("load container spec", &e))?;
        // The exec'd process runs as the container's process does (user,
        // cwd, env, capabilities, no_new_privileges, rlimits, apparmor,
        // oom_score_adj, io priority, scheduler), only with other arguments
        // and its own terminal (or none).
        let mut process = spec
            .process()
            .clone()
            .ok_or_else(|| OpError("container spec has no process".into()))?;
        process.set_args(Some(opts.args.clone()));
        let tty = opts.console_socket.is_some();
        process.set_terminal(Some(tty));
        // libcontainer 0.7's tenant joins every namespace of the container
        // but its user namespace. The process is made as host root (the
        // namespace's owner, so it may enter it) and the executor enters the
        // namespace, then takes the container's user and capabilities.
        let user_namespace = container_user_namespace(&container)?.map(|ns| {
            let identity = UserNsIdentity {
                namespace: std::sync::Arc::new(ns),
                user: process.user().clone(),
                capabilities: process.capabilities().clone(),
            };
            process.set_user(libcontainer::oci_spec::runtime::User::default());
            identity
        });
        // libcontainer 0.7 ignores consoleSize; the executor applies it.
        process.set_console_size(match opts.console_size {
            Some((h, w)) if tty => Some(
                libcontainer::oci_spec::runtime::BoxBuilder::default()
                    .height(h as u64)
                    .width(w as u64)
                    .build()
                    .map_err(|e| OpError::from_err("console size", &e))?,
            ),
            _ => None,
        });
        let json = serde_json::to_vec(&process)
            .map_err(|e| OpError::from_err("encode exec process", &e))?;
        let memfd = memfd_with(&json).map_err(|e| OpError::from_err("exec process file", &e))?;
        let process_path = PathBuf::from(format!("/proc/self/fd/{}", memfd.as_raw_fd()));

        // libcontainer 0.7 drops linux.seccomp from the spec of a tenant
        // process, so the exec'd process would run without the container's
        // seccomp profile: the executor installs it right before execve.
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        if let Some(s) = &seccomp
            && libcontainer::seccomp::is_notify(s)
        {
            return Err(OpError(
                "exec into a container whose seccomp profile uses SCMP_ACT_NOTIFY is not supported"
                    .into(),
            ));
        }
        let pid = self
            .builder(opts.id)?
            .with_console_socket(opts.console_socket)
            .with_executor(SeccompExecutor {
                seccomp,
                user_namespace,
            })
            .as_tenant()
            .with_process(Some(&process_path))
            .with_detach(true)
            .build()
            .map_err(|e| OpError::from_err("exec in container", &e))?;
        drop(memfd);
        Ok(pid.as_raw())
    }

    fn pause(&self, id: &str) -> OpResult<()> {
        self.load(id)?
            .pause()
            .map_err(|e| OpError::from_err("pause container", &e))
    }

    fn resume(&self, id: &str) -> OpResult<()> {
        self.load(id)?
            .resume()
            .map_err(|e| OpError::from_err("resume container", &e))
    }

    fn delete(&self, id: &str) -> OpResult<()> {
        if !self.root.join(id).exists() {
            return Ok(());
        }
        let mut container = self.load(id)?;
        // libcontainer removes the container's cgroup but not cgroups a
        // privileged container made below it, which would keep it busy.
        if let Ok(config) = container.spec()
            && !config.cgroup_path.as_os_str().is_empty()
        {
            let cgroups =
                berth_cgroup::Cgroups::detect(std::path::Path::new(berth_cgroup::DEFAULT_ROOT));
            let path = config.cgroup_path.display().to_string();
            cgroups
                .remove_below(&path)
                .map_err(|e| OpError::from_err("remove the container's child cgroups", &e))?;
        }
        container
            .delete(true)
            .map_err(|e| OpError::from_err("delete container", &e))
    }

    fn mark_running(&self, id: &str) -> OpResult<()> {
        let mut container = self.load(id)?;
        if container.status() == ContainerStatus::Created {
            container
                .set_status(ContainerStatus::Running)
                .save()
                .map_err(|e| OpError::from_err("save container state", &e))?;
        }
        Ok(())
    }
}

/// An anonymous in-memory file holding `data`, readable through
/// `/proc/self/fd/N` (so no temporary file is left behind).
fn memfd_with(data: &[u8]) -> std::io::Result<OwnedFd> {
    let name = CString::new("berth-exec-process").expect("no nul");
    // SAFETY: plain syscall with a valid C string.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(owned);
    file.write_all(data)?;
    Ok(file.into())
}

/// The user namespace of a container's init when it is not ours.
fn container_user_namespace(container: &Container) -> OpResult<Option<std::fs::File>> {
    use std::os::unix::fs::MetadataExt;
    let pid = container
        .pid()
        .ok_or_else(|| OpError("the container has no init pid".into()))?;
    let path = format!("/proc/{pid}/ns/user");
    let theirs = std::fs::File::open(&path).map_err(|e| OpError::from_err(&path, &e))?;
    let (a, b) = (
        theirs
            .metadata()
            .map_err(|e| OpError::from_err(&path, &e))?,
        std::fs::metadata("/proc/self/ns/user")
            .map_err(|e| OpError::from_err("/proc/self/ns/user", &e))?,
    );
    Ok((a.ino() != b.ino() || a.dev() != b.dev()).then_some(theirs))
}

/// Who an exec'd process is inside its container's user namespace.
#[derive(Clone)]
struct UserNsIdentity {
    /// Open from before the fork (closed by the final execve).
    namespace: std::sync::Arc<std::fs::File>,
    user: libcontainer::oci_spec::runtime::User,
    capabilities: Option<libcontainer::oci_spec::runtime::LinuxCapabilities>,
}

impl UserNsIdentity {
    /// Enters the namespace (which gives every capability in it), takes the
    /// container's groups, gid and uid there, then its capabilities.
    fn enter(&self) -> Result<(), ExecutorError> {
        use libcontainer::syscall::syscall::create_syscall;
        let other =
            |what: &str, e: &dyn std::fmt::Display| ExecutorError::Other(format!("{what}: {e}"));
        nix::sched::setns(
            self.namespace.as_ref(),
            nix::sched::CloneFlags::CLONE_NEWUSER,
        )
        .map_err(|e| other("enter the container's user namespace", &e))?;
        let groups: Vec<libc::gid_t> = self
            .user
            .additional_gids()
            .iter()
            .flatten()
            .copied()
            .collect();
        let (uid, gid) = (self.user.uid(), self.user.gid());
        // SAFETY: plain syscalls; this process has one thread (it is about
        // to execve), so the ids change for the whole process.
        unsafe {
            if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0
                || libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                return Err(other(
                    &format!("take uid {uid} gid {gid} groups {groups:?}"),
                    &std::io::Error::last_os_error(),
                ));
            }
        }
        let syscall = create_syscall();
        if let Some(caps) = &self.capabilities {
            libcontainer::capabilities::drop_privileges(caps, syscall.as_ref())
                .map_err(|e| other("set capabilities", &e))?;
        }
        Ok(())
    }
}

/// Installs the container's seccomp filter right before the default
/// executor's execve (capabilities are already dropped by then, so without
/// CAP_SYS_ADMIN the filter needs no_new_privs, which is set first); for a
/// container in a user namespace, enters it first.
#[derive(Clone)]
struct SeccompExecutor {
    seccomp: Option<LinuxSeccomp>,
    user_namespace: Option<UserNsIdentity>,
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(identity) = &self.user_namespace {
            identity.enter()?;
        }
        // The initial size of an exec's terminal (stdin is the pty slave by
        // now), before seccomp could refuse the ioctl.
        if let Some(process) = spec.process()
            && process.terminal() == Some(true)
            && let Some(size) = process.console_size()
        {
            let ws = libc::winsize {
                ws_row: size.height() as u16,
                ws_col: size.width() as u16,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: ioctl on fd 0 with a valid winsize.
            if unsafe { libc::ioctl(0, libc::TIOCSWINSZ, &ws) } != 0 {
                return Err(ExecutorError::Other(format!(
                    "set terminal size: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        if let Some(seccomp) = &self.seccomp {
            if !has_cap_sys_admin() {
                // SAFETY: plain prctl.
                if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                    return Err(ExecutorError::Other(format!(
                        "set no_new_privs: {}",
                        std::io::Error::last_os_error()
                    )));
                }
            }
            libcontainer::seccomp::initialize_seccomp(seccomp)
                .map_err(|e| ExecutorError::Other(format!("install seccomp filter: {e}")))?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        DefaultExecutor {}.setup_envs(envs)
    }
}

/// From <linux/capability.h>.
const CAP_SYS_ADMIN: u32 = 21;

fn has_cap_sys_admin() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}
