//! The runtime side of the CNI specification: run the plugins of the
//! network list for a pod (ADD in order with `prevResult` chaining, DEL in
//! reverse), with the pod's identity in `CNI_ARGS` and the capabilities the
//! plugins declare (`portMappings`, `dns`) in `runtimeConfig`. Every ADD
//! result is cached on disk so DEL works after a restart or after the
//! conflist changed.

use crate::process::NoInheritedFds;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, IoContext, Result};

/// A loaded network list: the conflist (a single `.conf` becomes a list of
/// one) and where it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkList {
    pub source: PathBuf,
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
}

impl NetworkList {
    pub fn load(path: &Path) -> Result<NetworkList> {
        let text = std::fs::read_to_string(path).context(|| format!("read {}", path.display()))?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| {
            Error::InvalidArgument(format!("{}: invalid JSON: {e}", path.display()))
        })?;
        let name = doc["name"].as_str().unwrap_or_default().to_string();
        let cni_version = doc["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
        let plugins = match doc.get("plugins").and_then(|p| p.as_array()) {
            Some(list) => list.clone(),
            None => vec![doc.clone()],
        };
        Ok(NetworkList {
            source: path.to_path_buf(),
            name,
            cni_version,
            plugins,
        })
    }
}

/// The pod a network operation is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodNetwork {
    pub sandbox_id: String,
    pub netns: PathBuf,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub port_mappings: Vec<PortMapping>,
    pub dns: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: i32,
    #[serde(rename = "containerPort")]
    pub container_port: i32,
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// What an ADD left behind, for DEL.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cached {
    network: NetworkList,
    pod: PodNetwork,
    result: Value,
}

pub struct Cni {
    pub bin_dirs: Vec<PathBuf>,
    pub cache_dir: PathBuf,
    pub timeout: Duration,
    pub ifname: String,
    pub in_process: bool,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// The pod's IP addresses (without prefix) from a CNI result, IPv4 first:
/// those on the pod interface `ifname` when the result says which
/// interface an address is on, never loopback ones.
pub fn result_ips(result: &Value, ifname: &str) -> Vec<String> {
    let pod_interfaces: Vec<u64> = result["interfaces"]
        .as_array()
        .map(|list| {
            list.iter()
                .enumerate()
                .filter(|(_, i)| {
                    i["name"].as_str() == Some(ifname)
                        && i["sandbox"].as_str().is_some_and(|s| !s.is_empty())
                })
                .map(|(n, _)| n as u64)
                .collect()
        })
        .unwrap_or_default();
    let mut ips: Vec<String> = result["ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|ip| match ip["interface"].as_u64() {
                    Some(idx) if !pod_interfaces.is_empty() => pod_interfaces.contains(&idx),
                    _ => true,
                })
                .filter_map(|ip| ip["address"].as_str())
                .map(|addr| addr.split('/').next().unwrap_or(addr).to_string())
                .filter(|ip| {
                    ip.parse::<std::net::IpAddr>()
                        .is_ok_and(|a| !a.is_loopback())
                })
                .collect()
        })
        .unwrap_or_default();
    ips.sort_by_key(|ip| ip.contains(':'));
    ips
}

impl Cni {
    fn cache_path(&self, sandbox_id: &str) -> PathBuf {
        self.cache_dir.join(format!("{sandbox_id}.json"))
    }

    fn find_plugin(&self, kind: &str) -> Result<PathBuf> {
        if kind.is_empty() || kind.contains('/') || kind.starts_with('.') {
            return Err(Error::InvalidArgument(format!(
                "CNI plugin type {kind:?} is invalid"
            )));
        }
        self.bin_dirs
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "CNI plugin {kind:?} not found in {}",
                    self.bin_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":")
                ))
            })
    }

    /// Runs ADD for every plugin; on failure runs DEL for the whole list and
    /// reports the failing plugin's own message.
    pub async fn add(&self, network: &NetworkList, pod: &PodNetwork) -> Result<Value> {
        std::fs::create_dir_all(&self.cache_dir)
            .context(|| format!("create {}", self.cache_dir.display()))?;
        // Cache first: a crash half way still lets DEL clean up.
        self.write_cache(&Cached {
            network: network.clone(),
            pod: pod.clone(),
            result: Value::Null,
        })?;
        let mut prev = Value::Null;
        for plugin in &network.plugins {
            match self.invoke("ADD", network, plugin, pod, &prev).await {
                Ok(result) => prev = result,
                Err(e) => {
                    if let Err(del) = self.del_list(network, pod, &prev).await {
                        tracing::warn!(pod_id = %pod.sandbox_id, error = %del, "CNI DEL after a failed ADD also failed");
                    }
                    let _ = std::fs::remove_file(self.cache_path(&pod.sandbox_id));
                    return Err(e);
                }
            }
        }
        self.write_cache(&Cached {
            network: network.clone(),
            pod: pod.clone(),
            result: prev.clone(),
        })?;
        Ok(prev)
    }

    /// DEL with what ADD used; a pod with no cache was never added (or was
    /// deleted already). Idempotent.
    pub async fn del(&self, sandbox_id: &str) -> Result<()> {
        let path = self.cache_path(sandbox_id);
        let cached: Cached = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::Internal(format!("CNI cache {}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        self.del_list(&cached.network, &cached.pod, &cached.result)
            .await?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
        }
    }

    /// The network list a cached ADD used, if any.
    pub fn cached_network(&self, sandbox_id: &str) -> Option<NetworkList> {
        let bytes = std::fs::read(self.cache_path(sandbox_id)).ok()?;
        serde_json::from_slice::<Cached>(&bytes)
            .ok()
            .map(|c| c.network)
    }

    /// Whether an ADD is cached for the sandbox.
    pub fn has_cache(&self, sandbox_id: &str) -> bool {
        self.cache_path(sandbox_id).exists()
    }

    async fn del_list(&self, network: &NetworkList, pod: &PodNetwork, prev: &Value) -> Result<()> {
        let mut first_err = None;
        for plugin in network.plugins.iter().rev() {
            if let Err(e) = self.invoke("DEL", network, plugin, pod, prev).await {
                tracing::warn!(pod_id = %pod.sandbox_id, error = %e, "CNI DEL failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn write_cache(&self, cached: &Cached) -> Result<()> {
        let path = self.cache_path(&cached.pod.sandbox_id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(cached).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(&tmp, bytes).context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).context(|| format!("rename {}", path.display()))
    }

    /// The stdin of one plugin: its own config plus name, version,
    /// prevResult and the runtimeConfig for the capabilities it declares.
    fn plugin_config(
        network: &NetworkList,
        plugin: &Value,
        pod: &PodNetwork,
        prev: &Value,
    ) -> Value {
        let mut conf = plugin.clone();
        let obj = conf.as_object_mut().expect("plugin config is an object");
        obj.insert("name".into(), json!(network.name));
        obj.insert("cniVersion".into(), json!(network.cni_version));
        if !prev.is_null() {
            obj.insert("prevResult".into(), prev.clone());
        }
        let caps = plugin["capabilities"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mut runtime = serde_json::Map::new();
        if caps.get("portMappings").and_then(|v| v.as_bool()) == Some(true)
            && !pod.port_mappings.is_empty()
        {
            runtime.insert("portMappings".into(), json!(pod.port_mappings));
        }
        if caps.get("dns").and_then(|v| v.as_bool()) == Some(true)
            && let Some(dns) = &pod.dns
        {
            runtime.insert("dns".into(), dns.clone());
        }
        if !runtime.is_empty() {
            obj.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        conf
    }

    /// Runs one plugin for `command`: Berth's own in-process when allowed,
    /// any other as its binary. The result for ADD, `Null` otherwise.
    async fn invoke(
        &self,
        command: &str,
        network: &NetworkList,
        plugin: &Value,
        pod: &PodNetwork,
        prev: &Value,
    ) -> Result<Value> {
        let call = self.prepare(command, network, plugin, pod, prev)?;
        // The type is bounded as a label: prepare found its binary in the
        // operator's bin dirs.
        let kind = call.kind.clone();
        let started = std::time::Instant::now();
        let result = match self.own_plugin(&call) {
            Some(own) => self.run_in_process(own, call, pod).await,
            None => self.run_binary(call, pod).await,
        };
        self.metrics.cni_call(&kind, command, started.elapsed());
        result
    }

    /// Finds the plugin's binary and builds what both ways of running it
    /// are given: the stdin config, `CNI_ARGS` and `CNI_PATH`.
    fn prepare<'a>(
        &self,
        command: &'a str,
        network: &NetworkList,
        plugin: &Value,
        pod: &PodNetwork,
        prev: &Value,
    ) -> Result<Invocation<'a>> {
        if !plugin.is_object() {
            return Err(Error::InvalidArgument(format!(
                "{}: a plugin entry is not an object",
                network.source.display()
            )));
        }
        let kind = plugin["type"].as_str().unwrap_or_default().to_string();
        let binary = self.find_plugin(&kind)?;
        let stdin = serde_json::to_vec(&Self::plugin_config(network, plugin, pod, prev))
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Invocation {
            command,
            kind,
            binary,
            stdin,
            cni_args: cni_args(pod),
            path: std::env::join_paths(&self.bin_dirs).unwrap_or_default(),
        })
    }

    /// The Berth plugin to run in-process instead of `call`'s binary: only
    /// with `in_process` on and when the binary found is really ours.
    fn own_plugin(&self, call: &Invocation) -> Option<berth_cni::Plugin> {
        if !self.in_process {
            return None;
        }
        let own = berth_cni::Plugin::from_name(&call.kind)?;
        berth_cni::is_berth_plugin(&call.binary).then_some(own)
    }

    /// Runs Berth's own plugin code on a blocking thread, with the request
    /// its binary would have read from the environment and stdin.
    async fn run_in_process(
        &self,
        own: berth_cni::Plugin,
        call: Invocation<'_>,
        pod: &PodNetwork,
    ) -> Result<Value> {
        let request = berth_cni::Request {
            command: call
                .command
                .parse()
                .map_err(|e: berth_cni::Error| Error::Internal(e.msg))?,
            container_id: pod.sandbox_id.clone(),
            netns: pod.netns.display().to_string(),
            ifname: self.ifname.clone(),
            args: call.cni_args,
            path: call.path.to_string_lossy().into_owned(),
            config: call.stdin,
        };
        let mut task = tokio::task::spawn_blocking(move || berth_cni::invoke(own, &request));
        let outcome = match tokio::time::timeout(self.timeout, &mut task).await {
            Ok(joined) => joined.map_err(|e| Error::Internal(format!("CNI plugin task: {e}")))?,
            Err(_) => {
                // In-process code cannot be killed as a late binary is: let
                // it finish, so the DEL that follows sees all it made.
                tracing::warn!(plugin = %call.kind, command = call.command, "in-process CNI plugin exceeded its timeout; waiting for it before cleaning up");
                let _ = task.await;
                return Err(self.deadline_exceeded(&call.kind, call.command));
            }
        };
        judge_own_outcome(&call.kind, call.command, outcome)
    }

    /// Runs the plugin binary, feeds it its config and waits for it within
    /// the timeout (a late one is killed).
    async fn run_binary(&self, call: Invocation<'_>, pod: &PodNetwork) -> Result<Value> {
        let mut child = self
            .plugin_command(&call, pod)
            .spawn()
            .map_err(|e| Error::io(format!("run CNI plugin {}", call.binary.display()), e))?;
        feed_config(&mut child, &call).await?;
        let output = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(out) => {
                out.map_err(|e| Error::io(format!("wait for CNI plugin {}", call.kind), e))?
            }
            Err(_) => return Err(self.deadline_exceeded(&call.kind, call.command)),
        };
        judge_binary_output(&call.kind, call.command, &output)
    }

    /// The plugin's process as the spec wants it: only the `CNI_*`
    /// variables and a plain PATH, config on stdin, result on stdout.
    fn plugin_command(&self, call: &Invocation, pod: &PodNetwork) -> tokio::process::Command {
        let mut command_line = tokio::process::Command::new(&call.binary);
        // A plugin must not outlive a killed berthd: start-up recovery
        // redoes what it left half done.
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            command_line.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command_line
            .no_inherited_fds()
            .env_clear()
            .env("CNI_COMMAND", call.command)
            .env("CNI_CONTAINERID", &pod.sandbox_id)
            .env("CNI_NETNS", &pod.netns)
            .env("CNI_IFNAME", &self.ifname)
            .env("CNI_ARGS", &call.cni_args)
            .env("CNI_PATH", &call.path)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        command_line
    }

    fn deadline_exceeded(&self, kind: &str, command: &str) -> Error {
        Error::DeadlineExceeded(format!(
            "CNI plugin {kind} {command} did not finish within {} s",
            self.timeout.as_secs()
        ))
    }
}

/// One plugin call, ready to run in-process or as a binary.
struct Invocation<'a> {
    command: &'a str,
    /// The plugin entry's `type`.
    kind: String,
    binary: PathBuf,
    /// The plugin's config (its stdin).
    stdin: Vec<u8>,
    cni_args: String,
    /// `CNI_PATH`: the bin dirs.
    path: std::ffi::OsString,
}

/// `CNI_ARGS`: the pod's identity the way Kubernetes runtimes pass it.
fn cni_args(pod: &PodNetwork) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        pod.pod_namespace, pod.pod_name, pod.sandbox_id, pod.pod_uid
    )
}

/// Writes the config to the plugin's stdin and closes it.
async fn feed_config(child: &mut tokio::process::Child, call: &Invocation<'_>) -> Result<()> {
    if let Some(mut input) = child.stdin.take() {
        // A plugin may exit without reading its config (a failing one
        // often does): its exit status and output are what count.
        match input.write_all(&call.stdin).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                return Err(Error::io(
                    format!("write config to CNI plugin {}", call.kind),
                    e,
                ));
            }
        }
    }
    Ok(())
}

/// `msg (details)`, or `msg` when there are none.
fn with_details(mut msg: String, details: &str) -> String {
    if !details.is_empty() {
        msg.push_str(&format!(" ({details})"));
    }
    msg
}

/// What an in-process plugin's outcome means: its error object, or for ADD
/// the result it would have printed.
fn judge_own_outcome(
    kind: &str,
    command: &str,
    outcome: std::result::Result<Vec<u8>, berth_cni::ErrorResult>,
) -> Result<Value> {
    match outcome {
        Err(e) => Err(Error::Internal(format!(
            "CNI plugin {kind} {command} failed: code {}: {}",
            e.code,
            with_details(e.msg, &e.details)
        ))),
        Ok(_) if command != "ADD" => Ok(Value::Null),
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes)
            .ok()
            .filter(|v| v.is_object())
            .ok_or_else(|| Error::Internal(format!("CNI plugin {kind} ADD gave no valid result"))),
    }
}

/// What a plugin binary's exit means: failure with its error object (or
/// its raw output), or for ADD the result it printed.
fn judge_binary_output(kind: &str, command: &str, output: &std::process::Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(Error::Internal(format!(
            "CNI plugin {kind} {command} failed: {}",
            failure_detail(&stdout, &output.stderr)
        )));
    }
    if command != "ADD" {
        return Ok(Value::Null);
    }
    serde_json::from_str::<Value>(&stdout)
        .ok()
        .filter(|v| v.is_object())
        .ok_or_else(|| {
            Error::Internal(format!(
                "CNI plugin {kind} ADD printed no valid result: {:?}",
                stdout.chars().take(200).collect::<String>()
            ))
        })
}

/// A failed binary's story: the spec's error object on stdout when it
/// printed one, else whatever it wrote to stdout and stderr.
fn failure_detail(stdout: &str, stderr: &[u8]) -> String {
    match serde_json::from_str::<Value>(stdout) {
        Ok(v) if v.get("msg").is_some() => {
            let msg = v["msg"].as_str().unwrap_or_default().to_string();
            let details = v["details"].as_str().unwrap_or_default();
            format!("code {}: {}", v["code"], with_details(msg, details))
        }
        _ => format!(
            "{} {}",
            stdout.trim(),
            String::from_utf8_lossy(stderr).trim()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_v4_first() {
        let r = json!({"ips":[{"address":"fd00::5/64"},{"address":"10.88.0.5/16","gateway":"10.88.0.1"}]});
        assert_eq!(
            result_ips(&r, "eth0"),
            vec!["10.88.0.5".to_string(), "fd00::5".to_string()]
        );
        let chained = json!({
            "interfaces": [{"name":"lo","sandbox":"/n"},{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/n"}],
            "ips": [{"address":"127.0.0.1/8","interface":0},{"address":"10.88.0.7/16","interface":3}]
        });
        assert_eq!(result_ips(&chained, "eth0"), vec!["10.88.0.7".to_string()]);
    }

    #[test]
    fn plugin_config_carries_chain_and_capabilities() {
        let net = NetworkList {
            source: "x".into(),
            name: "berth".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![],
        };
        let pod = PodNetwork {
            sandbox_id: "s".into(),
            netns: "/n".into(),
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: "127.0.0.1".into(),
            }],
            dns: None,
        };
        let plugin = json!({"type":"portmap","capabilities":{"portMappings":true}});
        let prev = json!({"ips":[]});
        let c = Cni::plugin_config(&net, &plugin, &pod, &prev);
        assert_eq!(c["name"], "berth");
        assert_eq!(c["prevResult"], prev);
        assert_eq!(c["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert_eq!(c["runtimeConfig"]["portMappings"][0]["hostIP"], "127.0.0.1");
        let plain = Cni::plugin_config(&net, &json!({"type":"bridge"}), &pod, &Value::Null);
        assert!(plain.get("runtimeConfig").is_none());
        assert!(plain.get("prevResult").is_none());
    }

    fn exited(code: i32, stdout: &str, stderr: &str) -> std::process::Output {
        use std::os::unix::process::ExitStatusExt;
        std::process::Output {
            status: std::process::ExitStatus::from_raw(code << 8),
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    /// The message of an `Error::Internal`.
    fn internal(r: Result<Value>) -> String {
        match r {
            Err(Error::Internal(m)) => m,
            other => panic!("not Internal: {other:?}"),
        }
    }

    #[test]
    fn binary_output_is_judged() {
        let spec_error = r#"{"cniVersion":"1.0.0","code":11,"msg":"busy","details":"try later"}"#;
        assert_eq!(
            internal(judge_binary_output(
                "bridge",
                "ADD",
                &exited(1, spec_error, "")
            )),
            "CNI plugin bridge ADD failed: code 11: busy (try later)"
        );
        assert_eq!(
            internal(judge_binary_output(
                "x",
                "DEL",
                &exited(2, " out\n", "err\n")
            )),
            "CNI plugin x DEL failed: out err"
        );
        assert_eq!(
            judge_binary_output("x", "DEL", &exited(0, "junk", "")).unwrap(),
            Value::Null
        );
        assert_eq!(
            internal(judge_binary_output("x", "ADD", &exited(0, "[1]", ""))),
            r#"CNI plugin x ADD printed no valid result: "[1]""#
        );
        let ok = judge_binary_output("x", "ADD", &exited(0, r#"{"ips":[]}"#, "")).unwrap();
        assert_eq!(ok, json!({"ips":[]}));
    }

    #[test]
    fn own_outcome_is_judged() {
        let mut e =
            berth_cni::ErrorResult::new("1.0.0", berth_cni::ErrorCode::InvalidConfig, "bad");
        assert_eq!(
            internal(judge_own_outcome("bridge", "ADD", Err(e.clone()))),
            "CNI plugin bridge ADD failed: code 7: bad"
        );
        e.details = "why".into();
        assert_eq!(
            internal(judge_own_outcome("bridge", "CHECK", Err(e))),
            "CNI plugin bridge CHECK failed: code 7: bad (why)"
        );
        assert_eq!(
            judge_own_outcome("bridge", "DEL", Ok(Vec::new())).unwrap(),
            Value::Null
        );
        assert_eq!(
            internal(judge_own_outcome("bridge", "ADD", Ok(Vec::new()))),
            "CNI plugin bridge ADD gave no valid result"
        );
    }

    /// A `fake` plugin binary running `script`, and a Cni that finds it.
    fn fake_plugin(script: &str, timeout: Duration) -> (tempfile::TempDir, Cni) {
        named_plugin("fake", script, timeout)
    }

    fn named_plugin(name: &str, script: &str, timeout: Duration) -> (tempfile::TempDir, Cni) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join(name);
        std::fs::write(&bin, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cni = Cni {
            bin_dirs: vec![dir.path().to_path_buf()],
            cache_dir: dir.path().join("cache"),
            timeout,
            ifname: "eth0".into(),
            in_process: true,
            metrics: Default::default(),
        };
        (dir, cni)
    }

    fn test_pod() -> PodNetwork {
        PodNetwork {
            sandbox_id: "sb1".into(),
            netns: "/var/run/netns/none".into(),
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            port_mappings: vec![],
            dns: None,
        }
    }

    fn test_network() -> NetworkList {
        NetworkList {
            source: "test.conflist".into(),
            name: "net".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![json!({"type":"fake"})],
        }
    }

    #[tokio::test]
    async fn binary_gets_the_spec_environment_and_config() {
        // Prints its environment and stdin back as the ADD result.
        let (_dir, cni) = fake_plugin(
            r#"conf=$(cat); printf '{"env":"%s","conf":%s}' "$(env | sort | tr '\n' ' ')" "$conf""#,
            Duration::from_secs(10),
        );
        let (net, pod) = (test_network(), test_pod());
        let r = cni
            .invoke("ADD", &net, &net.plugins[0], &pod, &Value::Null)
            .await
            .unwrap();
        let env = r["env"].as_str().unwrap();
        for want in [
            "CNI_COMMAND=ADD ",
            "CNI_CONTAINERID=sb1 ",
            "CNI_NETNS=/var/run/netns/none ",
            "CNI_IFNAME=eth0 ",
            "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=sb1;K8S_POD_UID=u ",
            &format!("CNI_PATH={} ", cni.bin_dirs[0].display()),
        ] {
            assert!(env.contains(want), "{want:?} not in {env}");
        }
        assert!(!env.contains("HOME="), "{env}");
        assert_eq!(r["conf"]["name"], "net");
        assert_eq!(r["conf"]["type"], "fake");
        // Not ours (no marker), so never in-process.
        assert!(!berth_cni::is_berth_plugin(&cni.bin_dirs[0].join("fake")));
    }

    #[tokio::test]
    async fn binary_failure_and_timeout() {
        let (net, pod) = (test_network(), test_pod());
        // Exits without reading its config.
        let (_dir, cni) = fake_plugin(
            r#"echo '{"code":4,"msg":"no netns"}'; exit 1"#,
            Duration::from_secs(10),
        );
        let err = cni
            .invoke("DEL", &net, &net.plugins[0], &pod, &Value::Null)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Internal(m) if m == "CNI plugin fake DEL failed: code 4: no netns"),
            "{err}"
        );
        let (_dir, cni) = fake_plugin("exec sleep 30", Duration::from_millis(300));
        let started = std::time::Instant::now();
        let err = cni
            .invoke("ADD", &net, &net.plugins[0], &pod, &Value::Null)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::DeadlineExceeded(m) if m == "CNI plugin fake ADD did not finish within 0 s"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        let err = cni
            .invoke("ADD", &net, &json!("fake"), &pod, &Value::Null)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }

    #[tokio::test]
    async fn own_plugin_runs_in_process_only_when_allowed() {
        // Carries the marker, so berthd takes it for Berth's loopback.
        let script = format!(
            "# {}\necho '{{\"code\":99,\"msg\":\"ran the binary\"}}'; exit 1",
            berth_cni::PLUGIN_MARKER
        );
        let (_dir, mut cni) = named_plugin("loopback", &script, Duration::from_secs(10));
        let net = NetworkList {
            plugins: vec![json!({"type":"loopback"})],
            ..test_network()
        };
        let pod = test_pod();
        // In-process loopback: DEL of a missing netns is done, ADD fails in
        // the plugin code.
        assert_eq!(
            cni.invoke("DEL", &net, &net.plugins[0], &pod, &Value::Null)
                .await
                .unwrap(),
            Value::Null
        );
        let msg = internal(
            cni.invoke("ADD", &net, &net.plugins[0], &pod, &Value::Null)
                .await,
        );
        assert!(
            msg.starts_with("CNI plugin loopback ADD failed: code ")
                && msg.contains("failed to open netns /var/run/netns/none"),
            "{msg}"
        );
        cni.in_process = false;
        assert_eq!(
            internal(
                cni.invoke("DEL", &net, &net.plugins[0], &pod, &Value::Null)
                    .await
            ),
            "CNI plugin loopback DEL failed: code 99: ran the binary"
        );
    }
}
