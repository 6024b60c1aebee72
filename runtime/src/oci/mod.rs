//! CRI → OCI runtime spec: what a container looks like, computed from its
//! CRI `ContainerConfig`, its pod's `PodSandboxConfig` and its image config.
//!
//! [`build_spec`] is a translation; the few host facts it needs (berthd's
//! own capabilities and RLIMIT_NOFILE, swap accounting, AppArmor, the host
//! name) are read at the call and the only files it reads are the image's
//! `/etc/passwd` and `/etc/group` (inside the rootfs, see [`resolve_user`]),
//! the CRI mounts' and devices' host paths (to check and canonicalize them)
//! and a Localhost seccomp profile. The rules follow containerd's CRI plugin
//! (`internal/cri/server/container_create_linux.go`, `internal/cri/opts/`)
//! so that critest sees the same behaviour:
//!
//! * **args**: Docker's rules (see [`process_args`]).
//! * **env**: PATH default, `HOSTNAME`, `TERM=xterm` with a tty, then the
//!   image Env, then the CRI envs; a later value replaces an earlier one of
//!   the same name in place.
//! * **cwd**: CRI `working_dir`, else image `WorkingDir`, else "/".
//!   libcontainer 0.7 does **not** create a missing cwd (its `chdir` fails):
//!   call [`ensure_cwd`] on the mounted rootfs before starting the shim.
//! * **mounts**: proc, /dev tmpfs, devpts, a per-container /dev/shm,
//!   mqueue, sysfs (ro), cgroup (ro); then the pod's /etc/hosts,
//!   /etc/resolv.conf, /etc/hostname (rw unless the rootfs is read-only);
//!   then the CRI mounts, sorted parents first, replacing a default at the
//!   same destination.
//! * **namespaces**: pid per [`PidMode`]; network, ipc, uts joined by path
//!   or shared with the host (omitted); mount and cgroup always new.
//! * **security**: containerd's 14 default capabilities with CRI add/drop
//!   ("ALL" too), never more than berthd holds; privileged = all of
//!   berthd's capabilities, no seccomp, no masked or read-only paths,
//!   writable /sys, every device allowed in the cgroup; seccomp
//!   Unconfined/RuntimeDefault/Localhost (see `seccomp.rs`); AppArmor
//!   Localhost only; SELinux options accepted and ignored.
//! * **resources**: cpu, cpuset, memory (+ swap = memory unless the CRI says
//!   otherwise, when the host accounts swap), hugepages, unified; the CRI
//!   has no per-container pids limit (the kubelet sets it on the pod cgroup).
//! * `process.oomScoreAdj` is the CRI value clamped to at least berthd's own
//!   (a process without CAP_SYS_RESOURCE cannot lower it).
//! * RLIMIT_NOFILE 1048576 soft and hard, or berthd's own hard limit when it
//!   is lower and berthd cannot raise it.
//!
//! Written for youki's libcontainer 0.7 (checked by running specs through
//! `berth-container`), whose readings differ from runc's in places:
//! `noNewPrivileges` is left out rather than `false` (libcontainer loads
//! seccomp while still privileged only when it is absent);
//! `rootfsPropagation` is "shared"/"slave" (it rejects "rshared"); the
//! default seccomp profile's only argument filter has `value == valueTwo`
//! (libcontainer swaps mask and datum of `SCMP_CMP_MASKED_EQ`). On cgroup v1
//! libcontainer mounts the container's cgroup hierarchies read-write whatever
//! the spec says.

pub(crate) mod inroot;
mod mounts;
mod resources;
mod seccomp;
mod security;
mod user;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use berth_cri::v1::{ContainerConfig, NamespaceMode, PodSandboxConfig};
use oci_spec::runtime::{
    Capability, Linux, LinuxNamespace, LinuxNamespaceType, PosixRlimitBuilder, PosixRlimitType,
    Process, Root, Spec,
};

pub use mounts::ImageVolumeSource;
pub(crate) use mounts::clean_container_path;
pub(crate) use mounts::is_image_volume;
pub use security::{DEFAULT_CAPS, DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS, parse_capability};
pub use user::resolve_user;

use crate::error::{Error, IoContext, Result};

/// The `ociVersion` written into specs.
pub const OCI_VERSION: &str = "1.2.0";

/// The PATH every container gets unless its image or request sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// RLIMIT_NOFILE of container processes (containerd's value).
pub const NOFILE_LIMIT: u64 = 1_048_576;

/// Annotation keys berth adds to every container spec (containerd's names).
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const ANNOTATION_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
pub const ANNOTATION_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
pub const ANNOTATION_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const ANNOTATION_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const ANNOTATION_SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";

/// Where the container's network, IPC and UTS namespaces come from: the
/// pod's pinned namespace files, or `None` to share the host's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePaths {
    pub network: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
}

/// The container's PID namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidMode {
    /// A new, private PID namespace: the container's process is PID 1.
    Container,
    /// Join this PID namespace (the pod's, e.g. `/proc/<infra pid>/ns/pid`,
    /// or a target container's).
    Pod(PathBuf),
    /// The host's PID namespace.
    Host,
}

/// The pod's files bind-mounted over /etc/hosts, /etc/resolv.conf and
/// /etc/hostname (`None`: leave the image's file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFiles {
    pub hosts: Option<PathBuf>,
    pub resolv_conf: Option<PathBuf>,
    pub hostname: Option<PathBuf>,
}

/// The pod's user namespace, which the container joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNamespaceInput {
    /// The pinned namespace file.
    pub path: PathBuf,
    pub mappings: crate::userns::IdMappings,
}

/// Everything [`build_spec`] needs.
#[derive(Debug)]
pub struct SpecInput<'a> {
    pub container_id: &'a str,
    pub config: &'a ContainerConfig,
    pub sandbox: &'a PodSandboxConfig,
    pub image: &'a crate::image::ProcessConfig,
    /// The mounted rootfs (absolute).
    pub rootfs: &'a Path,
    pub namespaces: NamespacePaths,
    pub pid: PidMode,
    pub files: SandboxFiles,
    /// Written to `linux.cgroupsPath` as given.
    pub cgroups_path: String,
    /// berthd's own oom_score_adj: the container's is never lower.
    pub oom_score_adj_min: i32,
    /// The pod's user namespace, when it has one.
    pub user_namespace: Option<UserNamespaceInput>,
    /// Where the images of the image volumes among `config.mounts` are
    /// mounted.
    pub image_volumes: &'a [ImageVolumeSource],
}

/// Facts about the host and berthd that shape a spec.
#[derive(Debug, Clone)]
struct Host {
    /// berthd's effective capabilities: the most a container can get.
    caps: Vec<Capability>,
    /// RLIMIT_NOFILE for containers.
    nofile: u64,
    /// RLIMIT_NOFILE for containers in a user namespace, where the limit
    /// cannot be raised above berthd's own (CAP_SYS_RESOURCE there is not
    /// the host's).
    nofile_in_userns: u64,
    /// Swap is accounted (memory.memsw.* on v1, memory.swap.max on v2).
    swap: bool,
    /// The host's cgroups (on v1 the container's are bind mounts).
    cgroups: berth_cgroup::Cgroups,
    apparmor: bool,
    /// The host's name, for `HOSTNAME` when the pod has none (host network).
    hostname: String,
}

impl Host {
    fn detect() -> Host {
        static STATIC: OnceLock<Host> = OnceLock::new();
        let mut host = STATIC
            .get_or_init(|| {
                let cgroups = berth_cgroup::Cgroups::detect(Path::new(berth_cgroup::DEFAULT_ROOT));
                let caps = own_capabilities().unwrap_or_else(|| security::ALL_CAPS.to_vec());
                let nofile = if caps.contains(&Capability::SysResource) {
                    NOFILE_LIMIT
                } else {
                    own_nofile_hard().map_or(NOFILE_LIMIT, |hard| hard.min(NOFILE_LIMIT))
                };
                Host {
                    caps,
                    nofile,
                    nofile_in_userns: own_nofile_hard().map_or(nofile, |h| h.min(nofile)),
                    swap: cgroups.swap_accounted(),
                    cgroups,
                    apparmor: std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
                        .is_ok_and(|s| s.starts_with('Y')),
                    hostname: String::new(),
                }
            })
            .clone();
        host.hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        host
    }
}

/// berthd's effective capability set, from /proc/self/status.
fn own_capabilities() -> Option<Vec<Capability>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16)
        .ok()
        .map(security::caps_from_mask)
}

fn own_nofile_hard() -> Option<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return None;
    }
    (rl.rlim_max != libc::RLIM_INFINITY).then_some(rl.rlim_max)
}

/// The process arguments, by Docker's rules: a CRI `command` replaces the
/// image Entrypoint and drops the image Cmd; CRI `args` replace the image
/// Cmd; with only args, image Entrypoint + args; with neither, Entrypoint +
/// Cmd. An image Entrypoint of `[""]` counts as none.
pub fn process_args(
    config: &ContainerConfig,
    image: &crate::image::ProcessConfig,
) -> Result<Vec<String>> {
    let mut command = config.command.clone();
    let mut args = config.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = image.cmd.clone().unwrap_or_default();
        }
        let entrypoint = image.entrypoint.clone().unwrap_or_default();
        if !(entrypoint.len() == 1 && entrypoint[0].is_empty()) {
            command = entrypoint;
        }
    }
    command.extend(args);
    if command.is_empty() {
        return Err(Error::InvalidArgument("no command specified".into()));
    }
    Ok(command)
}

/// Sets `entry` ("KEY=value", or a bare "KEY") in `env`, replacing an
/// entry with the same key in place.
fn set_env(env: &mut Vec<String>, entry: String) {
    let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
    match env
        .iter_mut()
        .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
    {
        Some(slot) => *slot = entry,
        None => env.push(entry),
    }
}

/// The process environment: `PATH` (default), `HOSTNAME`, `TERM=xterm`
/// with a tty, then the image Env, then the CRI envs, each replacing an
/// earlier entry with the same name.
pub fn process_env(
    config: &ContainerConfig,
    image: &crate::image::ProcessConfig,
    hostname: &str,
) -> Result<Vec<String>> {
    let mut env = vec![format!("PATH={DEFAULT_PATH}")];
    if !hostname.is_empty() {
        set_env(&mut env, format!("HOSTNAME={hostname}"));
    }
    if config.tty {
        set_env(&mut env, "TERM=xterm".into());
    }
    for e in image.env.iter().flatten() {
        if !e.is_empty() && !e.starts_with('=') {
            set_env(&mut env, e.clone());
        }
    }
    for kv in &config.envs {
        if kv.key.is_empty()
            || kv.key.contains('=')
            || kv.key.contains('\0')
            || kv.value.contains('\0')
        {
            return Err(Error::InvalidArgument(format!(
                "invalid environment variable name {:?}",
                kv.key
            )));
        }
        set_env(&mut env, format!("{}={}", kv.key, kv.value));
    }
    Ok(env)
}

/// The process working directory: CRI `working_dir`, else the image's
/// `WorkingDir`, else "/".
pub fn process_cwd(
    config: &ContainerConfig,
    image: &crate::image::ProcessConfig,
) -> Result<PathBuf> {
    if !config.working_dir.is_empty() {
        if !config.working_dir.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "working_dir {:?} must be an absolute path",
                config.working_dir
            )));
        }
        return Ok(PathBuf::from(&config.working_dir));
    }
    let wd = image.working_dir.trim();
    if wd.is_empty() {
        Ok(PathBuf::from("/"))
    } else if wd.starts_with('/') {
        Ok(PathBuf::from(wd))
    } else {
        // Docker resolves a relative WORKDIR against "/".
        Ok(Path::new("/").join(wd))
    }
}

fn namespace(typ: LinuxNamespaceType, path: Option<&Path>) -> LinuxNamespace {
    let mut ns = LinuxNamespace::default();
    ns.set_typ(typ);
    ns.set_path(path.map(Path::to_path_buf));
    ns
}

/// A container asks for the pod's user namespace or the host's; it must
/// be what the pod has (kubelet sends the pod's options again).
fn check_container_userns(config: &ContainerConfig, pod_has_userns: bool) -> Result<()> {
    let mode = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .and_then(|o| o.userns_options.as_ref())
        .map(|u| u.mode);
    let wanted = match mode {
        None => return Ok(()),
        Some(m) if m == NamespaceMode::Pod as i32 => true,
        Some(m) if m == NamespaceMode::Node as i32 => false,
        Some(m) => {
            return Err(Error::InvalidArgument(format!(
                "container user namespace mode {m} is not supported (only POD and NODE)"
            )));
        }
    };
    if wanted != pod_has_userns {
        return Err(Error::InvalidArgument(format!(
            "the container asks for {} user namespace but its pod {}",
            if wanted { "the pod's" } else { "the host's" },
            if pod_has_userns {
                "has one of its own"
            } else {
                "has none"
            }
        )));
    }
    Ok(())
}

/// Every id the process runs with must exist in the user namespace, or the
/// container could not start (setuid fails on an unmapped id).
fn check_user_mapped(
    user: &oci_spec::runtime::User,
    mappings: &crate::userns::IdMappings,
) -> Result<()> {
    if mappings.host_uid(user.uid()).is_none() {
        return Err(Error::InvalidArgument(format!(
            "uid {} is not mapped in the pod's user namespace",
            user.uid()
        )));
    }
    let gids = std::iter::once(user.gid()).chain(user.additional_gids().iter().flatten().copied());
    for gid in gids {
        if mappings.host_gid(gid).is_none() {
            return Err(Error::InvalidArgument(format!(
                "gid {gid} is not mapped in the pod's user namespace"
            )));
        }
    }
    Ok(())
}

/// The OCI runtime spec of a container.
pub fn build_spec(input: &SpecInput) -> Result<Spec> {
    build_spec_on(input, &Host::detect())
}

fn build_spec_on(input: &SpecInput, host: &Host) -> Result<Spec> {
    let config = input.config;
    let linux_cfg = config.linux.as_ref();
    let sc = linux_cfg.and_then(|l| l.security_context.as_ref());
    let res = linux_cfg.and_then(|l| l.resources.as_ref());
    let sandbox_sc = input
        .sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());

    let userns = input.user_namespace.as_ref();
    check_container_userns(config, userns.is_some())?;

    let privileged = sc.is_some_and(|s| s.privileged);
    if privileged && !sandbox_sc.is_some_and(|s| s.privileged) {
        return Err(Error::InvalidArgument(format!(
            "container {}: privileged container in a sandbox that is not privileged",
            input.container_id
        )));
    }
    let readonly_rootfs = sc.is_some_and(|s| s.readonly_rootfs);

    // Process.
    let pod_hostname = input.sandbox.hostname.as_str();
    let env_hostname = if !pod_hostname.is_empty() {
        pod_hostname
    } else if input.namespaces.uts.is_none() {
        host.hostname.as_str()
    } else {
        ""
    };
    let caps = security::capabilities(sc, &host.caps)?;
    let bounding: HashSet<Capability> = caps.bounding().clone().unwrap_or_default();
    let oom = match res.map(|r| r.oom_score_adj).unwrap_or(0) {
        v @ -1000..=1000 => (v as i32).max(input.oom_score_adj_min),
        v => {
            return Err(Error::InvalidArgument(format!(
                "oom_score_adj {v} is outside [-1000, 1000]"
            )));
        }
    };
    let nofile_limit = if userns.is_some() {
        host.nofile_in_userns
    } else {
        host.nofile
    };
    let nofile = PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .soft(nofile_limit)
        .hard(nofile_limit)
        .build()
        .expect("every field is set");

    let mut process = Process::default();
    process.set_terminal(Some(config.tty));
    process.set_console_size(None);
    let user = resolve_user(input.rootfs, sc, &input.image.user)?;
    if let Some(u) = userns {
        check_user_mapped(&user, &u.mappings)?;
    }
    process.set_user(user);
    process.set_args(Some(process_args(config, input.image)?));
    process.set_command_line(None);
    process.set_env(Some(process_env(config, input.image, env_hostname)?));
    process.set_cwd(process_cwd(config, input.image)?);
    process.set_capabilities(Some(caps));
    process.set_rlimits(Some(vec![nofile]));
    // Absent rather than false: libcontainer 0.7 loads seccomp early (while
    // still privileged) only when the field is absent, so `Some(false)`
    // makes a non-root container with a seccomp profile fail to start.
    process.set_no_new_privileges(sc.is_some_and(|s| s.no_new_privs).then_some(true));
    process.set_apparmor_profile(security::apparmor(sc, host.apparmor)?);
    process.set_oom_score_adj(Some(oom));
    process.set_selinux_label(None);
    process.set_io_priority(None);
    process.set_scheduler(None);
    process.set_exec_cpu_affinity(None);

    // Linux.
    let mut namespaces = Vec::with_capacity(7);
    // Joined first (libcontainer enters the user namespace before the
    // others, which it owns); no mappings: the namespace has them.
    if let Some(u) = userns {
        namespaces.push(namespace(LinuxNamespaceType::User, Some(&u.path)));
    }
    match &input.pid {
        PidMode::Container => namespaces.push(namespace(LinuxNamespaceType::Pid, None)),
        PidMode::Pod(path) => namespaces.push(namespace(LinuxNamespaceType::Pid, Some(path))),
        PidMode::Host => {}
    }
    for (typ, path) in [
        (LinuxNamespaceType::Network, &input.namespaces.network),
        (LinuxNamespaceType::Ipc, &input.namespaces.ipc),
        (LinuxNamespaceType::Uts, &input.namespaces.uts),
    ] {
        if let Some(path) = path {
            namespaces.push(namespace(typ, Some(path)));
        }
    }
    namespaces.push(namespace(LinuxNamespaceType::Mount, None));
    namespaces.push(namespace(LinuxNamespaceType::Cgroup, None));

    let (device_nodes, device_rules) = resources::devices(config, privileged)?;
    let (masked, mut readonly) = security::masked_and_readonly_paths(sc);
    // On v1 /sys/fs/cgroup is a tmpfs holding the hierarchy binds (see
    // mounts::cgroup_v1), writable so their mount points can be made.
    if !privileged && host.cgroups.version() == berth_cgroup::Version::V1 {
        readonly.push("/sys/fs/cgroup".into());
    }
    let mut linux = Linux::default();
    linux.set_net_devices(None);
    linux.set_uid_mappings(None);
    linux.set_gid_mappings(None);
    linux.set_sysctl(None);
    linux.set_resources(Some(resources::build(res, device_rules, host.swap)?));
    linux.set_cgroups_path(Some(PathBuf::from(&input.cgroups_path)));
    linux.set_namespaces(Some(namespaces));
    linux.set_devices((!device_nodes.is_empty()).then_some(device_nodes));
    linux.set_seccomp(security::seccomp(sc, &bounding)?);
    linux.set_rootfs_propagation(mounts::rootfs_propagation(config).map(String::from));
    linux.set_masked_paths((!masked.is_empty()).then_some(masked));
    linux.set_readonly_paths((!readonly.is_empty()).then_some(readonly));
    linux.set_mount_label(None);
    linux.set_intel_rdt(None);
    linux.set_memory_policy(None);
    linux.set_personality(None);
    linux.set_time_offsets(None);

    let mut root = Root::default();
    root.set_path(input.rootfs.to_path_buf());
    root.set_readonly(Some(readonly_rootfs));

    let mut annotations: HashMap<String, String> = config
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.insert(ANNOTATION_CONTAINER_TYPE.into(), "container".into());
    if let Some(meta) = &config.metadata {
        annotations.insert(ANNOTATION_CONTAINER_NAME.into(), meta.name.clone());
    }
    if let Some(image) = &config.image {
        annotations.insert(ANNOTATION_IMAGE_NAME.into(), image.image.clone());
    }
    if let Some(meta) = &input.sandbox.metadata {
        annotations.insert(ANNOTATION_SANDBOX_NAME.into(), meta.name.clone());
        annotations.insert(ANNOTATION_SANDBOX_NAMESPACE.into(), meta.namespace.clone());
        annotations.insert(ANNOTATION_SANDBOX_UID.into(), meta.uid.clone());
    }

    let mut spec = Spec::default();
    spec.set_version(OCI_VERSION.to_string());
    spec.set_root(Some(root));
    let cgroup_binds = host.cgroups.v1_container_binds(&input.cgroups_path)?;
    spec.set_mounts(Some(mounts::build(
        config,
        &input.files,
        privileged,
        readonly_rootfs,
        &cgroup_binds,
        input.image_volumes,
    )?));
    spec.set_process(Some(process));
    spec.set_hostname(
        (input.namespaces.uts.is_some() && !pod_hostname.is_empty())
            .then(|| pod_hostname.to_string()),
    );
    spec.set_domainname(None);
    spec.set_hooks(None);
    spec.set_annotations(Some(annotations));
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// Writes `spec` as `<bundle_dir>/config.json`, mode 0600, atomically
/// (a temporary file renamed over it).
pub fn write_spec(spec: &Spec, bundle_dir: &Path) -> Result<()> {
    let json = serde_json::to_vec(spec)
        .map_err(|e| Error::Internal(format!("serialize OCI spec: {e}")))?;
    let path = bundle_dir.join("config.json");
    let tmp = bundle_dir.join(".config.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .context(|| format!("create {}", tmp.display()))?;
    f.write_all(&json)
        .context(|| format!("write {}", tmp.display()))?;
    f.sync_all().context(|| format!("sync {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &path)
        .context(|| format!("rename {} to {}", tmp.display(), path.display()))
}

/// Replaces the resources in `<bundle_dir>/config.json` with `new` (its
/// device rules stay), for a container whose cgroup is made from it later.
pub fn update_resources(
    bundle_dir: &Path,
    new: &berth_cri::v1::LinuxContainerResources,
) -> Result<()> {
    let path = bundle_dir.join("config.json");
    let json = std::fs::read(&path).context(|| format!("read {}", path.display()))?;
    let mut spec: Spec = serde_json::from_slice(&json)
        .map_err(|e| Error::Internal(format!("parse {}: {e}", path.display())))?;
    let mut linux = spec.linux().clone().unwrap_or_default();
    let devices = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().clone())
        .unwrap_or_default();
    linux.set_resources(Some(resources::build(
        Some(new),
        devices,
        Host::detect().swap,
    )?));
    spec.set_linux(Some(linux));
    write_spec(&spec, bundle_dir)
}

/// Creates the spec's working directory in its rootfs when missing (as runc
/// does; libcontainer does not), resolving every symlink inside the rootfs.
/// Call it with the rootfs mounted, before the container starts. In a user
/// namespace the dirs it makes are given to the process's user there
/// (`owner`: its host ids), or root in the container could not use them.
pub fn ensure_cwd(spec: &Spec, owner: Option<(u32, u32)>) -> Result<()> {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_default();
    let cwd = spec
        .process()
        .as_ref()
        .map(|p| p.cwd().clone())
        .unwrap_or_default();
    if root.as_os_str().is_empty() || cwd.as_os_str().is_empty() || cwd == Path::new("/") {
        return Ok(());
    }
    inroot::mkdir_all(&root, &cwd, owner).context(|| {
        format!(
            "create working directory {} in {}",
            cwd.display(),
            root.display()
        )
    })
}

#[cfg(test)]
mod tests;
