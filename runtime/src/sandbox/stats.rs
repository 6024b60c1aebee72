//! A pod sandbox's own resource usage: its cgroup (CPU, memory, processes)
//! and the interfaces of its network namespace.

use berth_cri::v1::NamespaceMode;

use super::SandboxContext;
use super::namespaces::{self, InterfaceCounters, Kind};
use crate::container::stats::{CgroupUsage, cgroup_usage};
use crate::daemon::Daemon;

/// The key of a pod's CPU samples in `Daemon::cpu_samples`: never a
/// container id (those are hex).
pub fn sample_key(sandbox_id: &str) -> String {
    format!("pod:{sandbox_id}")
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkUsage {
    pub timestamp_ns: i64,
    /// The CNI interface ([`crate::network::POD_INTERFACE`]), when there.
    pub default_interface: Option<InterfaceCounters>,
    /// Every other interface but loopback.
    pub interfaces: Vec<InterfaceCounters>,
}

impl NetworkUsage {
    pub fn of(timestamp_ns: i64, counters: Vec<InterfaceCounters>, default: &str) -> Self {
        let mut usage = NetworkUsage {
            timestamp_ns,
            ..Default::default()
        };
        for c in counters {
            if c.name == default {
                usage.default_interface = Some(c);
            } else if c.name != "lo" {
                usage.interfaces.push(c);
            }
        }
        usage
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SandboxUsage {
    /// The pod cgroup, containers included.
    pub cgroup: CgroupUsage,
    /// `None` for a host-network pod, or when its namespace cannot be read.
    pub network: Option<NetworkUsage>,
}

/// The usage of a sandbox: its cgroup (with the CPU rate against the
/// previous sample), and its network namespace unless it uses the host's.
///
/// `members` are pids of processes in the pod (its running containers'),
/// through which the network counters are read without entering the
/// namespace.
pub fn read(daemon: &Daemon, ctx: &SandboxContext, members: &[i32]) -> SandboxUsage {
    let cgroup = cgroup_usage(
        &daemon.cgroups,
        &ctx.record.cgroup_parent,
        &sample_key(&ctx.record.id),
        &daemon.cpu_samples,
    );
    let network = if ctx.namespace_options().network == NamespaceMode::Node {
        None
    } else {
        ctx.namespace_path(Kind::Net)
            .and_then(|netns| match namespaces::interface_counters(&netns, members) {
                Ok(counters) => Some(NetworkUsage::of(
                    crate::timing::now_ns(),
                    counters,
                    crate::network::POD_INTERFACE,
                )),
                Err(e) => {
                    tracing::warn!(pod_id = %ctx.record.id, error = %crate::error::chain(&e), "no network stats for the pod");
                    None
                }
            })
    };
    SandboxUsage { cgroup, network }
}

/// Forgets the pod's CPU sample, once it is removed.
pub fn forget(daemon: &Daemon, sandbox_id: &str) {
    daemon.cpu_samples.forget(&sample_key(sandbox_id));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(name: &str, rx: u64) -> InterfaceCounters {
        InterfaceCounters {
            name: name.into(),
            rx_bytes: rx,
            ..Default::default()
        }
    }

    #[test]
    fn default_interface_apart_and_loopback_left_out() {
        let usage = NetworkUsage::of(
            7,
            vec![counters("lo", 1), counters("eth0", 2), counters("net1", 3)],
            "eth0",
        );
        assert_eq!(usage.timestamp_ns, 7);
        assert_eq!(usage.default_interface, Some(counters("eth0", 2)));
        assert_eq!(usage.interfaces, vec![counters("net1", 3)]);
        let none = NetworkUsage::of(7, vec![counters("lo", 1)], "eth0");
        assert_eq!(none.default_interface, None);
        assert!(none.interfaces.is_empty());
    }

    #[test]
    fn pod_samples_never_collide_with_containers() {
        let id = "0123456789abcdef";
        assert_ne!(sample_key(id), id);
        assert!(!sample_key(id).bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
