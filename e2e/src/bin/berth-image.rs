//! berth-image: builds the Berth node image (deploy/image/files) with the
//! harness image builder, no Docker daemon, and pushes it with skopeo, or
//! writes it as an OCI layout or as a plain file tree. scripts/build-image
//! is the documented way to run it.

use std::path::PathBuf;

use berth_e2e::Compression;
use berth_e2e::deploy;
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, ValueEnum)]
enum Layers {
    Gzip,
    Zstd,
    None,
}

#[derive(Parser)]
#[command(name = "berth-image")]
struct Args {
    /// The repository (deploy/image/files and the files it names).
    #[arg(long, value_name = "DIR")]
    repo: Option<PathBuf>,
    /// Where the built binaries are (berthd, berth-shim, the CNI plugins).
    #[arg(long, value_name = "DIR")]
    bin_dir: PathBuf,
    /// Layer compression.
    #[arg(long, value_enum, default_value = "gzip")]
    compression: Layers,
    /// Push over plain http / without TLS verification.
    #[arg(long)]
    insecure: bool,
    /// Push to this reference (`registry.example.com/berth/berth:0.1.0`).
    #[arg(long, value_name = "REFERENCE", group = "out")]
    push: Option<String>,
    /// Write an OCI image layout (tag `berth`) here instead.
    #[arg(long, value_name = "DIR", group = "out")]
    layout: Option<PathBuf>,
    /// Write the image's Berth files as a plain tree here instead
    /// (DIR/berth/berth-node install then installs from it).
    #[arg(long, value_name = "DIR", group = "out")]
    tree: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let repo = args.repo.unwrap_or_else(deploy::repo_root);
    let compression = match args.compression {
        Layers::Gzip => Compression::Gzip,
        Layers::Zstd => Compression::Zstd,
        Layers::None => Compression::None,
    };
    if let Some(dir) = &args.tree {
        deploy::write_tree(&repo, &args.bin_dir, dir)?;
        eprintln!("berth-image: wrote the Berth files under {}", dir.display());
        return Ok(());
    }
    let image = deploy::node_image(&repo, &args.bin_dir, compression)?;
    if let Some(dir) = &args.layout {
        image.write_layout(dir, "berth")?;
        eprintln!(
            "berth-image: wrote {} (manifest {}) as {}:berth",
            dir.display(),
            image.manifest_digest(),
            dir.display()
        );
    } else if let Some(reference) = &args.push {
        let work = tempfile::Builder::new().prefix("berth-image-").tempdir()?;
        deploy::push(&image, reference, work.path(), args.insecure)?;
        println!("{reference}@{}", image.manifest_digest());
    } else {
        anyhow::bail!("say where the image goes: --push REFERENCE, --layout DIR or --tree DIR");
    }
    Ok(())
}
