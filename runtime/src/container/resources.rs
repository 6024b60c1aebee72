//! The CRI's `LinuxContainerResources` in the cgroup module's terms; the
//! limits themselves are checked and written by `berth_cgroup`.

use berth_cri::v1::LinuxContainerResources;

use crate::error::{Error, Result};

fn non_negative(what: &str, value: i64) -> Result<Option<u64>> {
    match value {
        0 => Ok(None),
        v if v > 0 => Ok(Some(v as u64)),
        v => Err(Error::InvalidArgument(format!("{what} {v} is negative"))),
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// The limits `r` asks for, checked (`berth_cgroup::Resources::validate`);
/// zero and empty fields are "not set", as the CRI means them. A swap
/// limit counts only with a memory limit (kubelet sends one without for
/// pods that have none).
pub fn from_cri(r: &LinuxContainerResources) -> Result<berth_cgroup::Resources> {
    let memory_limit = match r.memory_limit_in_bytes {
        0 => None,
        v => Some(v),
    };
    let out = berth_cgroup::Resources {
        cpu_shares: non_negative("cpu_shares", r.cpu_shares)?,
        cpu_quota: (r.cpu_quota != 0).then_some(r.cpu_quota),
        cpu_period: non_negative("cpu_period", r.cpu_period)?,
        cpuset_cpus: non_empty(&r.cpuset_cpus),
        cpuset_mems: non_empty(&r.cpuset_mems),
        memory_limit,
        memory_swap: memory_limit
            .and((r.memory_swap_limit_in_bytes != 0).then_some(r.memory_swap_limit_in_bytes)),
        unified: r
            .unified
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    out.validate()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_unset_and_bad_values_are_refused() {
        let r = from_cri(&LinuxContainerResources {
            cpu_shares: 512,
            memory_swap_limit_in_bytes: 1 << 30,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.cpu_shares, Some(512));
        assert_eq!(r.memory_swap, None, "swap without a memory limit");
        assert_eq!(
            (r.cpu_quota, r.memory_limit, r.cpuset_cpus),
            (None, None, None)
        );

        for bad in [
            LinuxContainerResources {
                cpu_shares: -1,
                ..Default::default()
            },
            LinuxContainerResources {
                memory_limit_in_bytes: -1,
                ..Default::default()
            },
            LinuxContainerResources {
                cpu_period: 10,
                ..Default::default()
            },
        ] {
            assert!(
                matches!(from_cri(&bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }
}
