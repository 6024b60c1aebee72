//! The metadata store on a full filesystem: writes fail with `NoSpace`
//! (gRPC RESOURCE_EXHAUSTED), reads and deletes keep working, and once space
//! is freed the same `Store` writes again. Needs root (it mounts a tmpfs).

use std::io::Write;
use std::path::{Path, PathBuf};

use berth_runtime::error::Error;
use berth_runtime::store::{RESERVE_BYTES, SandboxRecord, Store};

/// Unmounts the tmpfs however the test ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap();
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn record(n: usize) -> SandboxRecord {
    SandboxRecord {
        id: format!("sandbox-{n:04}"),
        name: format!("pod-{n}"),
        namespace: "full".into(),
        config_json: "x".repeat(8192),
        ..Default::default()
    }
}

/// Writes `path` until the filesystem is full.
fn fill(path: &Path) -> std::fs::File {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            break;
        }
    }
    // Then the last partial blocks.
    while f.write_all(&[0x5a; 512]).is_ok() {}
    f
}

fn assert_no_space(err: Error) {
    assert!(matches!(err, Error::NoSpace { .. }), "not NoSpace: {err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("metadata store: no space left on device"),
        "{message}"
    );
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
}

#[test]
fn full_filesystem_keeps_reads_and_deletes_and_recovers() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _tmpfs = Tmpfs::mount(dir.path(), "8m");
    let path = dir.path().join("meta.redb");
    let filler_path = dir.path().join("filler");

    let store = Store::open(&path).unwrap();
    for n in 0..30 {
        store.put(&record(n)).unwrap();
    }
    assert!(store.is_writable());

    // Full: a put fails with NoSpace.
    let filler = fill(&filler_path);
    let mut n = 30;
    let err = loop {
        match store.put(&record(n)) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 1000, "puts never failed on a full filesystem");
    };
    assert_no_space(err);
    assert!(!store.is_writable());
    // Small writes may still fit in free pages of the file; if not, they
    // fail the same way.
    if let Err(e) = store.set_setting("probe", "x") {
        assert_no_space(e);
    }
    let update = store.update::<SandboxRecord>("sandbox-0000", |r| {
        r.attempt = 9;
        Ok(())
    });
    if let Err(e) = update {
        assert_no_space(e);
    }

    // Use up the free pages left in the file too, so that a delete needs new
    // space.
    let mut small = 0;
    while store
        .set_setting(&format!("small-{small}"), &"s".repeat(600))
        .is_ok()
    {
        small += 1;
        assert!(small < 100_000, "small writes never failed");
    }

    // Reads work, and deletes work while still full (using the reserve).
    assert_eq!(
        store.get::<SandboxRecord>("sandbox-0001").unwrap(),
        Some(record(1))
    );
    let before = store.list::<SandboxRecord>().unwrap().len();
    assert_eq!(before, n);
    for k in 0..5 {
        assert!(store.delete::<SandboxRecord>(&record(k).id).unwrap());
    }
    assert_eq!(store.list::<SandboxRecord>().unwrap().len(), before - 5);
    assert!(!store.is_writable());
    let reserve = dir.path().join("meta.redb.reserve");
    assert!(!reserve.exists(), "the deletes did not need the reserve");

    // Room for the reserve, but not for a big record: the put gets past the
    // reserve and fails inside redb, which latches the handle. The store
    // reopens it: the next calls, a delete included, work.
    filler
        .set_len(filler.metadata().unwrap().len() - 3 * RESERVE_BYTES / 2)
        .unwrap();
    let mut big = record(5000);
    big.config_json = "y".repeat(4 << 20);
    assert_no_space(store.put(&big).unwrap_err());
    assert!(reserve.exists(), "the put did not take the reserve back");
    assert_eq!(store.get::<SandboxRecord>(&big.id).unwrap(), None);
    assert_eq!(
        store.get::<SandboxRecord>("sandbox-0006").unwrap(),
        Some(record(6))
    );
    assert!(store.delete::<SandboxRecord>(&record(6).id).unwrap());
    assert_eq!(store.list::<SandboxRecord>().unwrap().len(), before - 6);

    // Space freed: the same Store writes again and says so.
    drop(filler);
    std::fs::remove_file(&filler_path).unwrap();
    assert!(store.is_writable());
    assert!(reserve.exists());
    store.put(&record(6)).unwrap();
    store.set_setting("pod_cidr", "10.0.0.0/8").unwrap();
    let updated = store
        .update::<SandboxRecord>("sandbox-0006", |r| {
            r.attempt = 2;
            Ok(())
        })
        .unwrap();
    assert_eq!(updated.attempt, 2);
    let after = store.list::<SandboxRecord>().unwrap().len();
    drop(store);

    // All of it durable.
    let store = Store::open(&path).unwrap();
    assert_eq!(store.list::<SandboxRecord>().unwrap().len(), after);
    assert_eq!(
        store
            .get::<SandboxRecord>("sandbox-0006")
            .unwrap()
            .unwrap()
            .attempt,
        2
    );
    assert_eq!(
        store.setting("pod_cidr").unwrap().as_deref(),
        Some("10.0.0.0/8")
    );
    assert_eq!(store.get::<SandboxRecord>("sandbox-0000").unwrap(), None);
}
