//! The single place where berthd errors become gRPC statuses.

use tonic::{Code, Status};

use crate::error::Error;

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = match &err {
            Error::InvalidArgument(_) | Error::Config { .. } | Error::BadImage(_) => {
                Code::InvalidArgument
            }
            Error::NotFound(_) | Error::Missing { .. } => Code::NotFound,
            Error::ShimUnreachable { .. } | Error::WrongState { .. } => Code::FailedPrecondition,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Shim { code, .. } => {
                use berth_proto::shim::shim_error::Code as Shim;
                match code {
                    Shim::InvalidArgument => Code::InvalidArgument,
                    Shim::FailedPrecondition => Code::FailedPrecondition,
                    Shim::NotFound => Code::NotFound,
                    Shim::DeadlineExceeded => Code::DeadlineExceeded,
                    Shim::Internal | Shim::ExecFailed => Code::Internal,
                }
            }
            Error::Kernel {
                source: nix::errno::Errno::ENOSPC | nix::errno::Errno::EDQUOT,
                ..
            } => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            // A full disk, not a bug: removals, which free space, still work
            // (the store keeps a reserve for its deletes).
            Error::NoSpace { .. } => Code::ResourceExhausted,
            Error::Io { source, .. }
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT)
                ) =>
            {
                Code::ResourceExhausted
            }
            // The store has reopened its file after the I/O error, so a retry
            // may succeed: transient, not a bug.
            Error::StoreDb {
                source: redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed,
                ..
            } => Code::Unavailable,
            Error::Store(_)
            | Error::StoreDb { .. }
            | Error::StoreRecord { .. }
            | Error::Io { .. }
            | Error::Internal(_)
            | Error::Process(_)
            | Error::ShimProtocol { .. }
            | Error::Kernel { .. }
            | Error::Json { .. }
            | Error::AlreadyRunning { .. } => Code::Internal,
        };
        let message = crate::error::chain(&err);
        if code == Code::Internal {
            tracing::error!(error = %message, "request failed");
        }
        Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_by_cause() {
        let no_space = Error::NoSpace {
            what: "metadata store: no space left on device for put sandboxes a".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(Status::from(no_space).code(), Code::ResourceExhausted);
        let io = Error::StoreDb {
            op: "get sandboxes a".into(),
            source: redb::Error::PreviousIo,
        };
        assert_eq!(Status::from(io).code(), Code::Unavailable);
        let corrupt = Error::StoreDb {
            op: "get sandboxes a".into(),
            source: redb::Error::Corrupted("bad page".into()),
        };
        assert_eq!(Status::from(corrupt).code(), Code::Internal);
    }
}
