//! The CRI socket and the gRPC server on it.
//!
//! The socket lives in a directory only root can write, is created mode 0660
//! (never wider, not even for an instant: the umask is tightened around
//! `bind`), and is guarded by an exclusive lock so two daemons never share it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_cri::v1::image_service_server::ImageServiceServer;
use berth_cri::v1::runtime_service_server::RuntimeServiceServer;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{Mode, umask};
use tokio::net::UnixListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use crate::cri::{ImageService, RuntimeService};
use crate::daemon::Daemon;
use crate::error::{Error, IoContext, Result};
use crate::h2_authority::{self, AuthorityFix};

/// The bound, locked CRI socket. Dropping it removes the socket file.
pub struct CriSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
    _lock: Flock<File>,
}

impl CriSocket {
    /// Takes the socket's lock and binds it, replacing a stale socket file
    /// only when nothing answers on it.
    pub fn bind(path: &Path) -> Result<CriSocket> {
        let dir = path.parent().ok_or_else(|| {
            Error::InvalidArgument(format!("socket path {} has no directory", path.display()))
        })?;
        prepare_private_dir(dir)?;

        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .context(|| format!("open {}", lock_path.display()))?;
        let mut lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((file, _)) => {
                let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
                drop(file);
                return Err(Error::AlreadyRunning {
                    socket: path.to_path_buf(),
                    detail: format!(
                        "its lock {} is held by pid {}",
                        lock_path.display(),
                        holder.trim()
                    ),
                });
            }
        };
        lock.set_len(0)
            .context(|| format!("truncate {}", lock_path.display()))?;
        write!(*lock, "{}", std::process::id())
            .context(|| format!("write {}", lock_path.display()))?;

        remove_stale_socket(path)?;

        let old_mask = umask(Mode::from_bits_truncate(0o117));
        let bound = std::os::unix::net::UnixListener::bind(path);
        umask(old_mask);
        let listener = bound.context(|| format!("bind {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .context(|| format!("chmod {}", path.display()))?;
        nix::unistd::chown(path, Some(0.into()), Some(0.into()))
            .map_err(|e| Error::io(format!("chown {}", path.display()), e.into()))?;
        listener
            .set_nonblocking(true)
            .context(|| "socket nonblocking".into())?;
        let listener = UnixListener::from_std(listener).context(|| "register socket".into())?;
        Ok(CriSocket {
            path: path.to_path_buf(),
            listener: Some(listener),
            _lock: lock,
        })
    }

    fn take_listener(&mut self) -> UnixListener {
        self.listener.take().expect("listener taken once")
    }
}

impl Drop for CriSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates `dir` (mode 0711) if needed, and refuses one that others could
/// write into: whoever can write there could swap the socket.
fn prepare_private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .context(|| format!("chmod {}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).context(|| format!("stat {}", dir.display()))?;
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(Error::InvalidArgument(format!(
            "socket directory {} must be owned by root and writable only by root (owner uid {}, mode {:o})",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

fn remove_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("stat {}", path.display()), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::InvalidArgument(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        )));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::AlreadyRunning {
            socket: path.to_path_buf(),
            detail: "a live process answers on it".into(),
        });
    }
    tracing::info!(socket = %path.display(), "removing stale socket");
    std::fs::remove_file(path).context(|| format!("remove stale socket {}", path.display()))
}

/// How long in-flight calls get to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves CRI on `socket` until `shutdown` resolves, then lets in-flight
/// calls finish. Containers are not touched: they belong to their shims.
pub async fn serve(
    daemon: Arc<Daemon>,
    streaming: Arc<crate::streaming::Server>,
    mut socket: CriSocket,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    // Every connection goes through `AuthorityFix`, so that h2 accepts the
    // `:authority` any gRPC client sends on a unix socket (see its module).
    let incoming =
        UnixListenerStream::new(socket.take_listener()).map(|conn| conn.map(AuthorityFix::new));
    tracing::info!(socket = %socket.path.display(), "serving CRI v1");
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        // The adapter must know the largest frame h2 accepts.
        .max_frame_size(h2_authority::MAX_FRAME_SIZE)
        .trace_fn(|req| {
            tracing::info_span!(
                "cri",
                rpc = req.uri().path(),
                pod_id = tracing::field::Empty,
                container_id = tracing::field::Empty,
                image = tracing::field::Empty,
            )
        })
        .layer(crate::rpc_log::RpcLogLayer {
            metrics: daemon.metrics.clone(),
        })
        .add_service(RuntimeServiceServer::new(RuntimeService::new(
            daemon.clone(),
            streaming,
        )))
        .add_service(ImageServiceServer::new(ImageService::new(daemon)))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            let _ = stopping_tx.send(());
        });
    // Graceful shutdown waits for clients to acknowledge it; one that never
    // does (a hung kubelet) must not keep berthd from exiting.
    let deadline = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result.map_err(|e| Error::Internal(format!("gRPC server: {e}")))?,
        _ = deadline => tracing::warn!(grace = ?SHUTDOWN_GRACE, "in-flight calls did not finish in time; exiting anyway"),
    }
    tracing::info!("CRI server stopped");
    drop(socket);
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
