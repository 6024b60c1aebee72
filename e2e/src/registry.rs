//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry) on 127.0.0.1 with a free port and its own storage.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::http;
use crate::process::{OwnedChild, free_port, wait_until};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

pub struct Registry {
    /// `127.0.0.1:PORT`
    pub addr: String,
    _child: OwnedChild,
    dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> anyhow::Result<Registry> {
        anyhow::ensure!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: install Debian's docker-registry package (the README's test command does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("berth-registry-")
            .tempdir()?;
        let mut last_err = None;
        // A free port can be taken between probing and binding; retry a few.
        for _ in 0..5 {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                    dir.path().join("data").display()
                ),
            )?;
            let log = std::fs::File::create(dir.path().join("registry.log"))?;
            let mut cmd = Command::new(REGISTRY_BIN);
            cmd.arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            let mut child = OwnedChild::spawn("docker-registry", cmd)?;
            let up = wait_until(Duration::from_secs(10), || {
                child.try_status().is_some()
                    || http::get(&addr, "/v2/", &[]).is_ok_and(|r| r.status == 200)
            });
            if up && child.try_status().is_none() {
                return Ok(Registry {
                    addr,
                    _child: child,
                    dir,
                });
            }
            last_err =
                Some(std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default());
        }
        anyhow::bail!(
            "docker-registry did not start: {}",
            last_err.unwrap_or_default()
        )
    }

    /// `127.0.0.1:PORT/<repo>:<tag>`
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr)
    }

    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Fetches a manifest back by tag or digest; returns its raw bytes.
    pub fn fetch_manifest(&self, repo: &str, reference: &str) -> anyhow::Result<Vec<u8>> {
        let r = http::get(
            &self.addr,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            )],
        )?;
        anyhow::ensure!(
            r.status == 200,
            "manifest {repo}:{reference}: HTTP {}",
            r.status
        );
        Ok(r.body)
    }

    pub fn fetch_blob(&self, repo: &str, digest: &str) -> anyhow::Result<Vec<u8>> {
        let r = http::get(&self.addr, &format!("/v2/{repo}/blobs/{digest}"), &[])?;
        anyhow::ensure!(r.status == 200, "blob {repo}@{digest}: HTTP {}", r.status);
        Ok(r.body)
    }
}
