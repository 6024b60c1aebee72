//! CRI v1 ImageService: translation between CRI messages and `image::Images`.

use std::sync::Arc;

use berth_cri::v1::image_service_server::ImageService as CriImageService;
use berth_cri::v1::*;
use tonic::{Request, Response, Status};

use super::cri_service;
use crate::daemon::Daemon;
use crate::error::Error;
use crate::image::{Credentials, Usage};
use crate::store::ImageRecord;

pub struct ImageService {
    daemon: Arc<Daemon>,
}

impl ImageService {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        ImageService { daemon }
    }
}

fn image_ref(spec: Option<&ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.as_str()) {
        Some(r) if !r.is_empty() => {
            tracing::Span::current().record("image", r);
            Ok(r)
        }
        _ => Err(Error::InvalidArgument("image reference is required".into()).into()),
    }
}

/// `USER` of the image config as CRI wants it: a numeric uid, or a name.
fn image_user(user: &str) -> (Option<i64>, String) {
    let user = user.split(':').next().unwrap_or_default();
    if user.is_empty() {
        return (None, String::new());
    }
    match user.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, user.to_string()),
    }
}

fn to_cri(record: &ImageRecord) -> Image {
    let (uid, username) = image_user(&record.process_config().user);
    Image {
        id: record.id.clone(),
        repo_tags: record.repo_tags.clone(),
        repo_digests: record.repo_digests.clone(),
        size: record.size,
        uid: uid.map(|value| Int64Value { value }),
        username,
        spec: Some(ImageSpec {
            image: record.id.clone(),
            ..Default::default()
        }),
        pinned: record.pinned,
    }
}

fn fs_usage(now: i64, (mountpoint, usage): (std::path::PathBuf, Usage)) -> FilesystemUsage {
    FilesystemUsage {
        timestamp: now,
        fs_id: Some(FilesystemIdentifier {
            mountpoint: mountpoint.display().to_string(),
        }),
        used_bytes: Some(UInt64Value { value: usage.bytes }),
        inodes_used: Some(UInt64Value {
            value: usage.inodes,
        }),
    }
}

cri_service! {
    impl CriImageService for ImageService {
        type StreamImagesStream = super::list_stream::ListStream<StreamImagesResponse>;

        async fn pull_image(&self, request: Request<PullImageRequest>) -> Result<Response<PullImageResponse>, Status> {
            let request = request.into_inner();
            let reference = image_ref(request.image.as_ref())?;
            let creds = request
                .auth
                .map(|a| Credentials {
                    username: a.username,
                    password: a.password,
                    auth: a.auth,
                    server_address: a.server_address,
                    identity_token: a.identity_token,
                    registry_token: a.registry_token,
                })
                .unwrap_or_default();
            // Detached: a pull the client gives up on still finishes (or
            // cleans up after itself) instead of being dropped half way.
            let daemon = self.daemon.clone();
            let reference = reference.to_string();
            let record = tokio::spawn(async move { daemon.images.pull(&reference, &creds).await })
                .await
                .map_err(|e| Status::internal(format!("pull task: {e}")))??;
            Ok(Response::new(PullImageResponse { image_ref: record.id }))
        }

        async fn list_images(&self, request: Request<ListImagesRequest>) -> Result<Response<ListImagesResponse>, Status> {
            let wanted = request
                .into_inner()
                .filter
                .and_then(|f| f.image)
                .map(|s| s.image)
                .filter(|s| !s.is_empty());
            let images = self
                .daemon
                .run(move |d| match wanted {
                    Some(reference) => Ok(d.images.resolve(&reference)?.into_iter().collect()),
                    None => d.images.list(),
                })
                .await?;
            Ok(Response::new(ListImagesResponse {
                images: images.iter().map(to_cri).collect(),
            }))
        }

        // The same answer as ListImages, in chunks (CRI 1.36).
        async fn stream_images(&self, request: Request<StreamImagesRequest>) -> Result<Response<Self::StreamImagesStream>, Status> {
            let filter = request.into_inner().filter;
            let images = self.list_images(Request::new(ListImagesRequest { filter })).await?.into_inner().images;
            Ok(Response::new(super::list_stream::chunked(images, |images| StreamImagesResponse { images })))
        }

        async fn image_status(&self, request: Request<ImageStatusRequest>) -> Result<Response<ImageStatusResponse>, Status> {
            let request = request.into_inner();
            let reference = image_ref(request.image.as_ref())?.to_string();
            let found = self
                .daemon
                .run(move |d| {
                    Ok(d.images
                        .resolve(&reference)?
                        .map(|r| {
                            let dirs = d.images.snapshot_dirs(&r);
                            (r, dirs)
                        }))
                })
                .await?;
            let Some((record, snapshot_dirs)) = found else {
                return Ok(Response::new(ImageStatusResponse::default()));
            };
            let mut info = std::collections::HashMap::new();
            if request.verbose {
                let config: serde_json::Value = serde_json::from_str(&record.config_json).unwrap_or_default();
                let detail = serde_json::json!({
                    "imageSpec": config,
                    "chainIDs": record.chain_ids,
                    "diffIDs": record.diff_ids,
                    "layers": record.layers,
                    "manifestDigests": record.manifest_digests,
                    "snapshotDirs": snapshot_dirs,
                    "size": record.size,
                });
                info.insert("info".to_string(), detail.to_string());
            }
            Ok(Response::new(ImageStatusResponse {
                image: Some(to_cri(&record)),
                info,
            }))
        }

        async fn remove_image(&self, request: Request<RemoveImageRequest>) -> Result<Response<RemoveImageResponse>, Status> {
            let request = request.into_inner();
            let reference = image_ref(request.image.as_ref())?.to_string();
            // The record goes before the answer, the files after it.
            if self.daemon.run(move |d| d.images.forget(&reference)).await?.is_some() {
                self.daemon.collect_garbage_soon();
            }
            Ok(Response::new(RemoveImageResponse {}))
        }

        async fn image_fs_info(&self, _request: Request<ImageFsInfoRequest>) -> Result<Response<ImageFsInfoResponse>, Status> {
            let (image_fs, container_fs) = self
                .daemon
                .run(|d| Ok((d.images.image_fs_usage(), d.images.container_fs_usage())))
                .await?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or_default();
            Ok(Response::new(ImageFsInfoResponse {
                image_filesystems: vec![fs_usage(now, image_fs)],
                container_filesystems: vec![fs_usage(now, container_fs)],
            }))
        }
    }
    unimplemented "ImageService" {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users() {
        assert_eq!(image_user(""), (None, String::new()));
        assert_eq!(image_user("1000"), (Some(1000), String::new()));
        assert_eq!(image_user("1000:2000"), (Some(1000), String::new()));
        assert_eq!(image_user("berth"), (None, "berth".to_string()));
        assert_eq!(image_user("berth:extra"), (None, "berth".to_string()));
    }
}
