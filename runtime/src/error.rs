//! The one error type of berthd. Its mapping to gRPC codes lives in
//! `cri/status.rs` and nowhere else.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {origin}: {message}")]
    Config { origin: String, message: String },

    #[error("metadata store: {0}")]
    Store(String),

    /// A metadata store operation failed in redb.
    #[error("metadata store: {op}: {source}")]
    StoreDb {
        op: String,
        #[source]
        source: redb::Error,
    },

    /// A stored record that cannot be encoded or decoded.
    #[error("metadata store: {table} record {key}: {source}")]
    StoreRecord {
        table: &'static str,
        key: String,
        #[source]
        source: crate::store::RecordError,
    },

    /// The filesystem (or quota) has no room for something berthd must write.
    #[error("{what}: {source}")]
    NoSpace {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("another berthd is already serving {}: {detail}", socket.display())]
    AlreadyRunning { socket: PathBuf, detail: String },

    #[error("{0}")]
    InvalidArgument(String),

    #[error("{0}")]
    NotFound(String),

    #[error("{0}")]
    AlreadyExists(String),

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("{0}")]
    Unauthenticated(String),

    /// A limit on concurrent work was reached (streaming sessions, pending
    /// streaming requests).
    #[error("{0}")]
    ResourceExhausted(String),

    #[error("{0}")]
    Unavailable(String),

    #[error("{0}")]
    DeadlineExceeded(String),

    #[error("{0} is not implemented by berth yet")]
    Unimplemented(&'static str),

    /// An image whose content cannot be used safely (a layer entry escaping
    /// its snapshot, a digest mismatch, a malformed manifest).
    #[error("{0}")]
    BadImage(String),

    #[error("{0}")]
    Internal(String),

    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),

    #[error("shim at {} is not reachable", socket.display())]
    ShimUnreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A shim could not be talked to: the request or its answer broke off.
    #[error("shim at {}: {what}", socket.display())]
    ShimProtocol {
        socket: PathBuf,
        what: &'static str,
        #[source]
        source: berth_proto::FrameError,
    },

    /// The shim refused a request, with its own code and reason.
    #[error("shim at {}: {message}", socket.display())]
    Shim {
        socket: PathBuf,
        code: berth_proto::shim::shim_error::Code,
        message: String,
    },

    /// A kernel call on a path failed.
    #[error("{op} {}", path.display())]
    Kernel {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },

    /// A record or spec could not be (de)serialized.
    #[error("{what}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },

    /// A sandbox or container that does not exist (any more).
    #[error("{kind} {id} not found")]
    Missing { kind: &'static str, id: String },

    /// An operation the object's current state does not allow.
    #[error("{kind} {id} is {state}, {wanted}")]
    WrongState {
        kind: &'static str,
        id: String,
        state: String,
        wanted: &'static str,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<berth_cgroup::Error> for Error {
    fn from(e: berth_cgroup::Error) -> Self {
        match e {
            berth_cgroup::Error::Invalid(message) => Error::InvalidArgument(message),
            berth_cgroup::Error::Io { what, source } => Error::io(what, source),
        }
    }
}

/// Adds a description of what was being done to an `io::Result`.
pub trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

/// An error with its causes, `outer: inner: ...`, for logs.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // thiserror messages often embed their source already.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
