//! The CRI v1 gRPC layer: thin services that translate CRI messages into calls
//! on berthd's domain modules and their answers back into CRI messages.

mod convert;
mod events;
mod image;
mod list_stream;
mod metrics;
mod runtime;
mod status;

pub use image::ImageService;
pub use runtime::RuntimeService;

/// Writes an `impl` of a tonic service trait whose listed RPCs answer
/// UNIMPLEMENTED with the RPC's name. The implemented methods are passed
/// through untouched; generating them inside one macro keeps `async_trait`
/// seeing every method.
macro_rules! cri_service {
    (
        impl $trait:ident for $ty:ty {
            $($implemented:tt)*
        }
        unimplemented $service:literal {
            $($method:ident($req:ty) -> $resp:ty = $rpc:literal;)*
        }
    ) => {
        #[tonic::async_trait]
        impl $trait for $ty {
            $($implemented)*

            $(
                async fn $method(
                    &self,
                    _request: tonic::Request<$req>,
                ) -> Result<tonic::Response<$resp>, tonic::Status> {
                    Err($crate::error::Error::Unimplemented(concat!($service, "/", $rpc)).into())
                }
            )*
        }
    };
}
pub(crate) use cri_service;
