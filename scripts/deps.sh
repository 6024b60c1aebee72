#!/usr/bin/env bash
# Installs the Debian packages Berth builds and tests with, when missing.
# Sourced by scripts/run-berthd and scripts/test; safe to run again.
set -euo pipefail

berth_install_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "installing: ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# Build: protoc for the CRI bindings (k8s-cri and cri/) and proto/, libseccomp for the container runtime library.
BERTH_BUILD_PACKAGES=(protobuf-compiler libseccomp-dev pkg-config)
# Tests: a real registry, busybox for test images, skopeo to push them, the
# reference CNI plugins and nftables for networking tests; Python with venv
# for the tests that install from PyPI (grpcio for the interop test, a
# Kubernetes schema validator for the deploy tests) and python3-yaml to read
# the manifests; user-mode-linux (a 6.1 kernel run as a process) and kmod
# (modprobe for its modules) and e2fsprogs (mkfs.ext4 for the guest's /tmp
# disk) for the cgroup v2 lane (scripts/v2-lane).
BERTH_TEST_PACKAGES=(docker-registry busybox-static skopeo containernetworking-plugins nftables iproute2 python3 python3-venv python3-yaml user-mode-linux kmod e2fsprogs)
