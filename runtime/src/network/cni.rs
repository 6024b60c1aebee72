//! The runtime side of the CNI specification: run the plugins of the
//! network list for a pod (ADD in order with `prevResult` chaining, DEL in
//! reverse), with the pod's identity in `CNI_ARGS` and the capabilities the
//! plugins declare (`portMappings`, `dns`) in `runtimeConfig`. Every ADD
//! result is cached on disk so DEL works after a restart or after the
//! conflist changed.

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
    /// Plugin binaries checked for Berth's marker: path → (mtime, size, is ours).
    pub own_plugins:
        std::sync::Mutex<std::collections::HashMap<PathBuf, (std::time::SystemTime, u64, bool)>>,
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

    /// Whether `binary` is one of Berth's own plugins (it carries the marker).
    fn is_own_plugin(&self, binary: &Path) -> bool {
        let Ok(meta) = std::fs::metadata(binary) else {
            return false;
        };
        let key = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
        if let Some((mtime, len, ours)) = self.own_plugins.lock().unwrap().get(binary)
            && (*mtime, *len) == key
        {
            return *ours;
        }
        let marker = berth_cni::PLUGIN_MARKER.as_bytes();
        let ours = std::fs::read(binary)
            .is_ok_and(|bytes| bytes.windows(marker.len()).any(|w| w == marker));
        self.own_plugins
            .lock()
            .unwrap()
            .insert(binary.to_path_buf(), (key.0, key.1, ours));
        ours
    }

    async fn invoke(
        &self,
        command: &str,
        network: &NetworkList,
        plugin: &Value,
        pod: &PodNetwork,
        prev: &Value,
    ) -> Result<Value> {
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
        let cni_args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            pod.pod_namespace, pod.pod_name, pod.sandbox_id, pod.pod_uid
        );
        let path = std::env::join_paths(&self.bin_dirs).unwrap_or_default();
        if self.in_process
            && let Some(own) = berth_cni::Plugin::from_name(&kind)
            && self.is_own_plugin(&binary)
        {
            let request = berth_cni::Request {
                command: command
                    .parse()
                    .map_err(|e: berth_cni::Error| Error::Internal(e.msg))?,
                container_id: pod.sandbox_id.clone(),
                netns: pod.netns.display().to_string(),
                ifname: self.ifname.clone(),
                args: cni_args,
                path: path.to_string_lossy().into_owned(),
                config: stdin,
            };
            let task = tokio::task::spawn_blocking(move || berth_cni::invoke(own, &request));
            let outcome = tokio::time::timeout(self.timeout, task)
                .await
                .map_err(|_| {
                    Error::DeadlineExceeded(format!(
                        "CNI plugin {kind} {command} did not finish within {} s",
                        self.timeout.as_secs()
                    ))
                })?
                .map_err(|e| Error::Internal(format!("CNI plugin task: {e}")))?;
            return match outcome {
                Err(e) => {
                    let mut msg = e.msg.clone();
                    if !e.details.is_empty() {
                        msg.push_str(&format!(" ({})", e.details));
                    }
                    Err(Error::Internal(format!(
                        "CNI plugin {kind} {command} failed: code {}: {msg}",
                        e.code
                    )))
                }
                Ok(_) if command != "ADD" => Ok(Value::Null),
                Ok(bytes) => serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .filter(|v| v.is_object())
                    .ok_or_else(|| {
                        Error::Internal(format!("CNI plugin {kind} ADD gave no valid result"))
                    }),
            };
        }
        let mut command_line = tokio::process::Command::new(&binary);
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
        let mut child = command_line
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.sandbox_id)
            .env("CNI_NETNS", &pod.netns)
            .env("CNI_IFNAME", &self.ifname)
            .env("CNI_ARGS", cni_args)
            .env("CNI_PATH", &path)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io(format!("run CNI plugin {}", binary.display()), e))?;
        if let Some(mut input) = child.stdin.take() {
            // A plugin may exit without reading its config (a failing one
            // often does): its exit status and output are what count.
            match input.write_all(&stdin).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => return Err(Error::io(format!("write config to CNI plugin {kind}"), e)),
            }
        }
        let output = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(out) => out.map_err(|e| Error::io(format!("wait for CNI plugin {kind}"), e))?,
            Err(_) => {
                return Err(Error::DeadlineExceeded(format!(
                    "CNI plugin {kind} {command} did not finish within {} s",
                    self.timeout.as_secs()
                )));
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let detail = match serde_json::from_str::<Value>(&stdout) {
                Ok(v) if v.get("msg").is_some() => {
                    let mut m = v["msg"].as_str().unwrap_or_default().to_string();
                    if let Some(d) = v["details"].as_str().filter(|d| !d.is_empty()) {
                        m.push_str(&format!(" ({d})"));
                    }
                    format!("code {}: {m}", v["code"])
                }
                _ => format!(
                    "{} {}",
                    stdout.trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            };
            return Err(Error::Internal(format!(
                "CNI plugin {kind} {command} failed: {detail}"
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
}
