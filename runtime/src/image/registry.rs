//! Talking to registries: endpoints (mirrors, then the upstream), plain
//! http where allowed, credentials, and the mapping of registry failures to
//! our errors. HTTP, TLS and the Basic/Bearer token flows are oci-client's.

use std::time::Duration;

use base64::Engine;
use oci_client::client::{
    Certificate, CertificateEncoding, ClientConfig, ClientProtocol, SizedStream,
};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::reference::ImageName;
use crate::config::RegistryConfig;
use crate::error::{Error, Result};

pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ACCEPTED_MANIFESTS: &[&str] = &[
    MEDIA_OCI_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_DOCKER_LIST,
];

/// Credentials from the CRI `AuthConfig`.
#[derive(Clone, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// base64 of `user:password`
    pub auth: String,
    pub server_address: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("server_address", &self.server_address)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    fn to_auth(&self) -> Result<RegistryAuth> {
        if !self.registry_token.is_empty() {
            return Ok(RegistryAuth::Bearer(self.registry_token.clone()));
        }
        if !self.auth.is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(self.auth.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    Error::InvalidArgument("auth is not base64 of user:password".into())
                })?;
            let (user, pass) = decoded.split_once(':').ok_or_else(|| {
                Error::InvalidArgument("auth is not base64 of user:password".into())
            })?;
            return Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()));
        }
        if !self.identity_token.is_empty() {
            // Docker's convention: an identity token stands in for the
            // password of a `<token>` user in the token-server exchange.
            let user = if self.username.is_empty() {
                "<token>"
            } else {
                &self.username
            };
            return Ok(RegistryAuth::Basic(
                user.to_string(),
                self.identity_token.clone(),
            ));
        }
        if !self.username.is_empty() || !self.password.is_empty() {
            return Ok(RegistryAuth::Basic(
                self.username.clone(),
                self.password.clone(),
            ));
        }
        Ok(RegistryAuth::Anonymous)
    }

    /// Whether these credentials were meant for `host` (an empty server
    /// address means: for the image's registry, whatever it is).
    fn applies_to(&self, host: &str) -> bool {
        let addr = self.server_address.trim();
        if addr.is_empty() {
            return true;
        }
        let addr = addr
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let addr = addr.split('/').next().unwrap_or(addr);
        addr == host || (host == "docker.io" && addr.ends_with("docker.io"))
    }
}

/// Where a pull can be served from, in the order to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub plain_http: bool,
    /// Try https first and fall back to plain http (loopback registries).
    pub http_fallback: bool,
    pub is_mirror: bool,
}

/// A registry connection serving one image: a client and the reference in
/// that endpoint's namespace.
pub struct Source {
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
    pub endpoint: Endpoint,
}

pub struct Registries {
    config: RegistryConfig,
    certificates: Vec<Certificate>,
}

impl Registries {
    pub fn new(config: &RegistryConfig) -> Result<Registries> {
        let mut certificates = Vec::new();
        for path in &config.ca_files {
            let data = std::fs::read(path).map_err(|e| Error::Config {
                origin: "registry.ca_files".into(),
                message: format!("cannot read {}: {e}", path.display()),
            })?;
            certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        Ok(Registries {
            config: config.clone(),
            certificates,
        })
    }

    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs(self.config.stall_timeout_secs.max(1))
    }

    /// Mirrors of the image's registry in order, then the registry itself.
    pub fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let mut out = Vec::new();
        if let Some(mirror) = self.config.mirrors.get(registry) {
            for url in &mirror.endpoints {
                let (plain_http, rest) = if let Some(r) = url.strip_prefix("http://") {
                    (true, r)
                } else {
                    (false, url.strip_prefix("https://").unwrap_or(url))
                };
                let host = rest.trim_end_matches('/').to_string();
                let http_fallback = !plain_http && is_loopback(&host);
                out.push(Endpoint {
                    plain_http: plain_http || self.config.insecure.contains(&host),
                    host,
                    http_fallback,
                    is_mirror: true,
                });
            }
        }
        let upstream = if registry == "docker.io" {
            "index.docker.io"
        } else {
            registry
        };
        out.push(Endpoint {
            host: upstream.to_string(),
            plain_http: self
                .config
                .insecure
                .iter()
                .any(|h| h == registry || h == upstream),
            http_fallback: is_loopback(registry),
            is_mirror: false,
        });
        out
    }

    /// Finds the first endpoint that serves the image's manifest; returns it
    /// with the manifest's bytes and media type.
    pub async fn resolve(
        &self,
        name: &ImageName,
        creds: &Credentials,
    ) -> Result<(Source, Vec<u8>)> {
        let mut last_err = None;
        for endpoint in self.endpoints(&name.registry) {
            let attempts: &[bool] = if endpoint.plain_http {
                &[true]
            } else if endpoint.http_fallback {
                &[false, true]
            } else {
                &[false]
            };
            for &plain in attempts {
                let source = self.source(name, &endpoint, plain, creds)?;
                match source.manifest(name.manifest_reference()).await {
                    Ok(bytes) => return Ok((source, bytes)),
                    Err(e) => {
                        tracing::debug!(endpoint = %endpoint.host, plain_http = plain, error = %e, "endpoint failed");
                        let retry_plain = !plain && matches!(e, Error::Unavailable(_));
                        last_err = Some(e);
                        if !retry_plain {
                            break;
                        }
                    }
                }
            }
            if let Some(e) = &last_err
                && !endpoint.is_mirror
                && matches!(e, Error::NotFound(_) | Error::Unauthenticated(_))
            {
                break;
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Internal(format!("no endpoint for {name}"))))
    }

    fn source(
        &self,
        name: &ImageName,
        endpoint: &Endpoint,
        plain_http: bool,
        creds: &Credentials,
    ) -> Result<Source> {
        let protocol = if plain_http {
            ClientProtocol::HttpsExcept(vec![endpoint.host.clone()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            extra_root_certificates: self.certificates.clone(),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(self.stall_timeout()),
            user_agent: concat!("berth/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        });
        let reference = match (&name.tag, &name.digest) {
            (_, Some(d)) => {
                Reference::with_digest(endpoint.host.clone(), name.repository.clone(), d.clone())
            }
            (Some(t), None) => {
                Reference::with_tag(endpoint.host.clone(), name.repository.clone(), t.clone())
            }
            (None, None) => Reference::with_tag(
                endpoint.host.clone(),
                name.repository.clone(),
                "latest".into(),
            ),
        };
        // Credentials are for the image's registry; mirrors get them only
        // when they were not addressed to a specific server.
        let auth = if creds.applies_to(&name.registry)
            && (!endpoint.is_mirror || creds.server_address.is_empty())
        {
            creds.to_auth()?
        } else {
            RegistryAuth::Anonymous
        };
        Ok(Source {
            client,
            reference,
            endpoint: endpoint.clone(),
            auth,
        })
    }
}

impl Source {
    fn at(&self, reference: &str) -> Reference {
        let (registry, repo) = (
            self.reference.registry().to_string(),
            self.reference.repository().to_string(),
        );
        if reference.starts_with("sha256:") {
            Reference::with_digest(registry, repo, reference.to_string())
        } else {
            Reference::with_tag(registry, repo, reference.to_string())
        }
    }

    /// The raw manifest (or index) for a tag or digest of this repository.
    pub async fn manifest(&self, reference: &str) -> Result<Vec<u8>> {
        let target = self.at(reference);
        self.client
            .auth(&target, &self.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| self.error(e, reference))?;
        let (bytes, _digest) = self
            .client
            .pull_manifest_raw(&target, &self.auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.error(e, reference))?;
        Ok(bytes.to_vec())
    }

    /// A blob as a stream; oci-client checks the digest at its end and we
    /// check it again while storing it.
    pub async fn blob_stream(&self, digest: &str) -> Result<SizedStream> {
        self.client
            .pull_blob_stream(&self.reference, &digest)
            .await
            .map_err(|e| self.error(e, digest))
    }

    pub fn host(&self) -> &str {
        &self.endpoint.host
    }

    pub fn repository(&self) -> &str {
        self.reference.repository()
    }

    /// Maps a registry failure to our error, naming what was asked for and
    /// where, and never the credentials.
    fn error(&self, err: OciDistributionError, what: &str) -> Error {
        let host = &self.endpoint.host;
        let repo = self.reference.repository();
        match err {
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => Error::Unauthenticated(format!(
                "authentication failed for registry {host} (repository {repo})"
            )),
            OciDistributionError::ImageManifestNotFoundError(m) => {
                Error::NotFound(format!("{repo}:{what} not found at {host}: {m}"))
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let messages: Vec<String> = envelope
                    .errors
                    .iter()
                    .map(|e| format!("{:?}: {}", e.code, e.message))
                    .collect();
                let messages = messages.join("; ");
                let code = envelope.errors.first().map(|e| &e.code);
                match code {
                    Some(
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown,
                    ) => Error::NotFound(format!("{repo}:{what} not found at {host}: {messages}")),
                    Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                        Error::Unauthenticated(format!(
                            "authentication failed for registry {host} (repository {repo}): {messages}"
                        ))
                    }
                    Some(OciErrorCode::Toomanyrequests) => {
                        Error::Unavailable(format!("registry {host} is rate limiting: {messages}"))
                    }
                    _ => Error::Internal(format!(
                        "registry {host} refused {repo}:{what}: {messages}"
                    )),
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                404 => Error::NotFound(format!("{repo}:{what} not found at {host}: {message}")),
                401 | 403 => Error::Unauthenticated(format!(
                    "authentication failed for registry {host} (repository {repo})"
                )),
                429 | 500.. => {
                    Error::Unavailable(format!("registry {host} answered HTTP {code}: {message}"))
                }
                _ => Error::Internal(format!(
                    "registry {host} answered HTTP {code} for {repo}:{what}: {message}"
                )),
            },
            OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
                Error::Unavailable(format!(
                    "registry {host} is unreachable: {}",
                    error_chain(&e)
                ))
            }
            OciDistributionError::RequestError(e) => Error::Unavailable(format!(
                "registry {host}: request failed: {}",
                error_chain(&e)
            )),
            OciDistributionError::DigestError(e) => {
                Error::BadImage(format!("{repo}:{what} from {host}: {e}"))
            }
            other => Error::Internal(format!("registry {host}, {repo}:{what}: {other}")),
        }
    }
}

/// `reqwest` hides the useful part (refused, TLS) in its sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn is_loopback(host: &str) -> bool {
    let h = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
