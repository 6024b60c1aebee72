//! The single place where berthd errors become gRPC statuses.

use tonic::{Code, Status};

use crate::error::Error;

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = match &err {
            Error::InvalidArgument(_) | Error::Config { .. } | Error::BadImage(_) => {
                Code::InvalidArgument
            }
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Store(_)
            | Error::Io { .. }
            | Error::Internal(_)
            | Error::Process(_)
            | Error::AlreadyRunning { .. } => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!(error = %err, "request failed");
        }
        Status::new(code, err.to_string())
    }
}
