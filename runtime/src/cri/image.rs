//! CRI v1 ImageService.

use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageService as CriImageService;
use k8s_cri::v1::*;

use super::cri_service;
use crate::daemon::Daemon;

pub struct ImageService {
    #[allow(dead_code)] // used once image pulls land
    daemon: Arc<Daemon>,
}

impl ImageService {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        ImageService { daemon }
    }
}

cri_service! {
    impl CriImageService for ImageService {}
    unimplemented "ImageService" {
        list_images(ListImagesRequest) -> ListImagesResponse = "ListImages";
        image_status(ImageStatusRequest) -> ImageStatusResponse = "ImageStatus";
        pull_image(PullImageRequest) -> PullImageResponse = "PullImage";
        remove_image(RemoveImageRequest) -> RemoveImageResponse = "RemoveImage";
        image_fs_info(ImageFsInfoRequest) -> ImageFsInfoResponse = "ImageFsInfo";
    }
}
