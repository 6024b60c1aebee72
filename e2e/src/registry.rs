//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry) on 127.0.0.1 with a free port and its own storage;
//! plain HTTP by default, or TLS with a CA made for it, optionally behind
//! htpasswd basic auth. Its access log is kept so tests can count blob
//! fetches.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::http::{self, Target};
use crate::process::{OwnedChild, free_port, wait_until};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How a harness registry serves.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Serve HTTPS with a certificate for IP 127.0.0.1 signed by a CA made
    /// for this registry ([`Registry::ca_cert_path`]).
    pub tls: bool,
    /// Require these credentials (htpasswd, bcrypt). The distribution
    /// registry only allows htpasswd together with TLS.
    pub basic_auth: Option<(String, String)>,
}

impl RegistryOptions {
    /// TLS plus basic auth with `user`/`password`.
    pub fn tls_with_auth(user: &str, password: &str) -> RegistryOptions {
        RegistryOptions {
            tls: true,
            basic_auth: Some((user.to_string(), password.to_string())),
        }
    }
}

/// One line of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// The request path without its query.
    pub path: String,
    pub status: u16,
}

pub struct Registry {
    /// `127.0.0.1:PORT`
    pub addr: String,
    options: RegistryOptions,
    child: Option<OwnedChild>,
    dir: tempfile::TempDir,
}

impl Registry {
    /// A plain-HTTP, anonymous registry.
    pub fn start() -> anyhow::Result<Registry> {
        Registry::start_with(RegistryOptions::default())
    }

    pub fn start_with(options: RegistryOptions) -> anyhow::Result<Registry> {
        anyhow::ensure!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: install Debian's docker-registry package (the README's test command does)"
        );
        anyhow::ensure!(
            options.basic_auth.is_none() || options.tls,
            "the distribution registry only serves htpasswd auth over TLS: set tls too"
        );
        let dir = tempfile::Builder::new()
            .prefix("berth-registry-")
            .tempdir()?;
        if options.tls {
            write_tls_files(dir.path())?;
        }
        if let Some((user, password)) = &options.basic_auth {
            let hash =
                bcrypt::hash_with_result(password, 4)?.format_for_version(bcrypt::Version::TwoY);
            std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n"))?;
        }
        let mut registry = Registry {
            addr: String::new(),
            options,
            child: None,
            dir,
        };
        let mut last_err = None;
        // A free port can be taken between probing and binding; retry a few.
        for _ in 0..5 {
            registry.addr = format!("127.0.0.1:{}", free_port());
            match registry.spawn() {
                Ok(()) => return Ok(registry),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("docker-registry did not start")))
    }

    fn config_yaml(&self) -> String {
        let d = self.dir.path();
        let mut c = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}\n",
            d.join("data").display(),
            self.addr
        );
        if self.options.tls {
            c.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                d.join("cert.pem").display(),
                d.join("key.pem").display()
            ));
        }
        if self.options.basic_auth.is_some() {
            c.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                d.join("htpasswd").display()
            ));
        }
        c
    }

    /// Starts docker-registry on `self.addr`; waits until `/v2/` answers.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let config = self.dir.path().join("config.yml");
        std::fs::write(&config, self.config_yaml())?;
        // Appends, so the access log survives a kill and restart.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = OwnedChild::spawn("docker-registry", cmd)?;
        let target = Target {
            addr: self.addr.clone(),
            tls_ca: self.ca_cert_path(),
            basic_auth: None,
        };
        let up = wait_until(Duration::from_secs(10), || {
            child.try_status().is_some()
                || http::request(&target, "GET", "/v2/", &[], &[])
                    .is_ok_and(|r| r.status == 200 || r.status == 401)
        });
        if up && child.try_status().is_none() {
            self.child = Some(child);
            return Ok(());
        }
        drop(child);
        anyhow::bail!(
            "docker-registry did not start on {}: {}",
            self.addr,
            self.log()
        )
    }

    /// `127.0.0.1:PORT/<repo>:<tag>`
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr)
    }

    /// `127.0.0.1:PORT/<repo>@<digest>`
    pub fn digest_reference(&self, repo: &str, digest: &str) -> String {
        format!("{}/{repo}@{digest}", self.addr)
    }

    /// `"http"` or `"https"`.
    pub fn url_scheme(&self) -> &str {
        if self.options.tls { "https" } else { "http" }
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT` (for mirror
    /// endpoints in a berthd config).
    pub fn url(&self) -> String {
        format!("{}://{}", self.url_scheme(), self.addr)
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// The credentials the registry requires, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.options
            .basic_auth
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The PEM certificate of the CA that signed the registry's certificate
    /// (what a client must trust); `None` for a plain-HTTP registry.
    pub fn ca_cert_path(&self) -> Option<PathBuf> {
        self.options.tls.then(|| self.dir.path().join("ca.pem"))
    }

    /// A directory holding `ca.crt`, as skopeo's `--dest-cert-dir` and
    /// `--src-cert-dir` want it; `None` for a plain-HTTP registry.
    pub fn cert_dir(&self) -> Option<PathBuf> {
        self.options.tls.then(|| self.dir.path().join("certs"))
    }

    /// Skopeo flags to reach this registry as a destination with `creds`
    /// (`None`: anonymous).
    pub fn skopeo_dest_args(&self, creds: Option<(&str, &str)>) -> Vec<String> {
        let mut args = Vec::new();
        match self.cert_dir() {
            Some(dir) => args.push(format!("--dest-cert-dir={}", dir.display())),
            None => args.push("--dest-tls-verify=false".into()),
        }
        match creds {
            Some((u, p)) => args.push(format!("--dest-creds={u}:{p}")),
            None => args.push("--dest-no-creds".into()),
        }
        args
    }

    /// Where the harness's HTTP client reaches this registry, with its
    /// credentials.
    pub fn http_target(&self) -> Target {
        Target {
            addr: self.addr.clone(),
            tls_ca: self.ca_cert_path(),
            basic_auth: self.options.basic_auth.clone(),
        }
    }

    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// The registry's log: its own messages and the access log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Every request the registry logged, in order. Lines are written when
    /// a response has been sent, so a request just answered may be missing
    /// for a few milliseconds.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        self.log().lines().filter_map(parse_access_line).collect()
    }

    /// How many `GET /v2/<any repo>/blobs/<digest>` the registry answered
    /// with a success (2xx or 3xx; 401 challenges and 404s don't count,
    /// nor do HEAD requests). Waits until the count has been stable for
    /// 300 ms (at most 3 s), as log lines trail responses.
    pub fn blob_fetches(&self, digest: &str) -> usize {
        let count = || {
            self.access_log()
                .iter()
                .filter(|e| {
                    e.method == "GET"
                        && (200..400).contains(&e.status)
                        && is_blob_path(&e.path, digest)
                })
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut last = count();
        let mut stable_since = Instant::now();
        while Instant::now() < deadline && stable_since.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(50));
            let now = count();
            if now != last {
                last = now;
                stable_since = Instant::now();
            }
        }
        last
    }

    /// SIGKILLs the registry ("registry down"); `addr` stays reserved in
    /// this struct so tests can name it, and [`Registry::restart`] brings
    /// it back on the same address with the same storage.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_status().is_none())
    }

    /// Starts the registry again after [`Registry::kill`], same address.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "registry is still running");
        self.spawn()
    }

    /// Fetches a manifest back by tag or digest; returns its raw bytes.
    pub fn fetch_manifest(&self, repo: &str, reference: &str) -> anyhow::Result<Vec<u8>> {
        Ok(self.fetch_manifest_typed(repo, reference)?.0)
    }

    /// Fetches a manifest back; returns its raw bytes and Content-Type.
    pub fn fetch_manifest_typed(
        &self,
        repo: &str,
        reference: &str,
    ) -> anyhow::Result<(Vec<u8>, String)> {
        let r = http::request(
            &self.http_target(),
            "GET",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json",
            )],
            &[],
        )?;
        anyhow::ensure!(
            r.status == 200,
            "manifest {repo}:{reference}: HTTP {}",
            r.status
        );
        let content_type = r.header("Content-Type").unwrap_or_default().to_string();
        Ok((r.body, content_type))
    }

    pub fn fetch_blob(&self, repo: &str, digest: &str) -> anyhow::Result<Vec<u8>> {
        let r = http::request(
            &self.http_target(),
            "GET",
            &format!("/v2/{repo}/blobs/{digest}"),
            &[],
            &[],
        )?;
        anyhow::ensure!(r.status == 200, "blob {repo}@{digest}: HTTP {}", r.status);
        Ok(r.body)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- registry log ({}) ----\n{}",
                self.log_path().display(),
                tail(&self.log(), 100)
            );
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A CA and a server certificate for IP 127.0.0.1 (and `localhost`) signed
/// by it, written as `ca.pem`, `cert.pem`, `key.pem` and `certs/ca.crt`.
fn write_tls_files(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "berth e2e test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("cert.pem"), leaf_cert.pem())?;
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem())?;
    std::fs::create_dir_all(dir.join("certs"))?;
    std::fs::write(dir.join("certs/ca.crt"), ca_cert.pem())?;
    Ok(())
}

/// Parses a combined-log-format line:
/// `127.0.0.1 - user [date] "GET /v2/x/blobs/sha256:… HTTP/1.1" 200 123 "" "ua"`.
fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    let start = line.find("] \"")? + 3;
    let rest = &line[start..];
    let end = rest.find('"')?;
    let mut request = rest[..end].split(' ');
    let method = request.next()?;
    let target = request.next()?;
    if !request.next()?.starts_with("HTTP/") {
        return None;
    }
    let status = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
    Some(AccessLogEntry {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or_default().to_string(),
        status,
    })
}

/// `/v2/<repo>/blobs/<digest>` for any repo.
fn is_blob_path(path: &str, digest: &str) -> bool {
    path.strip_prefix("/v2/")
        .and_then(|p| p.strip_suffix(digest))
        .and_then(|p| p.strip_suffix("/blobs/"))
        .is_some_and(|repo| !repo.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_parse() {
        let line = r#"127.0.0.1 - - [26/Nov/2026:10:51:09 +0000] "GET /v2/berth-test/busybox/blobs/sha256:ab?x=1 HTTP/1.1" 200 1234 "" "skopeo/1.9.3""#;
        let e = parse_access_line(line).unwrap();
        assert_eq!(
            e,
            AccessLogEntry {
                method: "GET".into(),
                path: "/v2/berth-test/busybox/blobs/sha256:ab".into(),
                status: 200
            }
        );
        assert!(is_blob_path(&e.path, "sha256:ab"));
        assert!(!is_blob_path("/v2/blobs/sha256:ab", "sha256:ab"));
        assert!(!is_blob_path(&e.path, "sha256:a"));
        assert!(parse_access_line("time=\"x\" level=warning msg=\"hi\"").is_none());
    }
}
