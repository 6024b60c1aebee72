use std::path::PathBuf;
use std::process::ExitCode;

use berth_runtime::config::Config;
use berth_runtime::daemon::Daemon;
use berth_runtime::error::Result;
use std::sync::Arc;

use berth_runtime::{logging, server};
use clap::{Parser, Subcommand};

/// berthd: the Berth Kubernetes container runtime (CRI v1 over a unix socket).
#[derive(Parser)]
#[command(name = "berthd", version)]
struct Cli {
    /// Config file; every key is optional.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the full default configuration.
    Default,
    /// Load the configuration and print it with defaults filled in.
    Show,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Config {
            action: ConfigAction::Default,
        }) => {
            print!("{}", Config::default_toml());
            Ok(())
        }
        Some(Command::Config {
            action: ConfigAction::Show,
        }) => Config::load(cli.config.as_deref())
            .map(|c| print!("{}", toml::to_string_pretty(&c).unwrap_or_default())),
        None => run(cli.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berthd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config_path: Option<PathBuf>) -> Result<()> {
    let config = Config::load(config_path.as_deref())?;
    logging::init(&config.log);
    // Domain work runs on blocking threads, up to one per call in flight;
    // glibc would give each of them a malloc arena of its own that is kept
    // after the thread is idle. Two arenas serve a daemon that mostly waits.
    // SAFETY: mallopt only tunes the allocator; called before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Idle blocking threads go soon, so a burst of calls does not keep
        // its threads' memory.
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .enable_all()
        .build()
        .map_err(|e| berth_runtime::error::Error::io("start tokio runtime", e))?;
    runtime.block_on(async move {
        // The socket lock comes first so a second daemon is told about the
        // socket, not about the store being busy.
        let socket = server::CriSocket::bind(&config.socket_path())?;
        let daemon = Daemon::open(config)?;
        daemon.run(berth_runtime::recovery::recover).await?;
        // Exits that happened while berthd was down are recorded (and
        // published) now, before the first call is served.
        berth_runtime::container::exits::ExitWatcher::start(&daemon)?;
        // What a killed pull or removal left unreferenced goes now.
        daemon.images.collect_garbage().await?;
        tracing::info!(
            version = berth_runtime::daemon::RUNTIME_VERSION,
            cgroup = daemon.cgroups.version().name(),
            root = %daemon.config.root_dir.display(),
            "berthd started"
        );
        let backend = Arc::new(berth_runtime::streaming::backend::DaemonBackend {
            daemon: daemon.clone(),
        });
        let streaming =
            berth_runtime::streaming::Server::start(&daemon.config.streaming, backend).await?;
        // Bound before CRI is served, so a bad address stops berthd early;
        // dropped (stopped) when serving ends.
        let _metrics = berth_runtime::metrics::http::start(&daemon).await?;
        server::serve(daemon, streaming, socket, server::termination_signal()).await
    })
}
