//! Mounting and unmounting: what `augur mount` and `augur dev` call.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use augur_meta::MetaClient;
use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::blocks::{BlockClient, BlockError};
use crate::fs::{AugurFs, Inner, MountOptions};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("opening volume {volume:?}: {source}")]
    Volume { volume: String, source: BlockError },
    #[error("mount point {path}: {what}")]
    MountPoint { path: PathBuf, what: String },
    #[error("mounting at {path}: {source} (is /dev/fuse there, and fuse3 installed?)")]
    Fuse { path: PathBuf, source: std::io::Error },
    #[error("trace file {path}: {source}")]
    Trace { path: PathBuf, source: std::io::Error },
}

/// A mounted volume: served by fuser threads until `run_until` returns.
pub struct Mounted {
    pub inner: Arc<Inner>,
    pub mountpoint: PathBuf,
    unmounter: SessionUnmounter,
    ended: oneshot::Receiver<std::io::Result<()>>,
}

/// Mounts `volume` at `mountpoint`. Call from within a tokio runtime (its handle serves the
/// file system).
pub async fn mount(
    meta: Arc<MetaClient>,
    volume: &str,
    mountpoint: &Path,
    opts: MountOptions,
) -> Result<Mounted, MountError> {
    clear_stale_mount(mountpoint);
    match std::fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(MountError::MountPoint { path: mountpoint.into(), what: "not a directory".into() });
        }
        Err(e) => return Err(MountError::MountPoint { path: mountpoint.into(), what: e.to_string() }),
    }
    let blocks = BlockClient::open(meta.clone(), meta.rpc().clone(), volume)
        .await
        .map_err(|source| MountError::Volume { volume: volume.into(), source })?;
    let trace = match &opts.trace {
        Some(path) => Some(
            crate::trace::TraceRecorder::create(path)
                .map_err(|source| MountError::Trace { path: path.clone(), source })?,
        ),
        None => None,
    };
    let inner = Arc::new(Inner::new(meta, Arc::new(blocks), opts.clone(), trace));
    inner.start_engine();
    inner.start_write_back();
    let fs = AugurFs::new(inner.clone(), tokio::runtime::Handle::current());

    let mut config = Config::default();
    config.mount_options =
        vec![MountOption::FSName(format!("augur:{volume}")), MountOption::Subtype("augur".into())];
    if opts.default_permissions {
        config.mount_options.push(MountOption::DefaultPermissions);
    }
    config.acl = if opts.allow_other { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(opts.fuse_threads.max(1));
    config.clone_fd = true;

    let path = mountpoint.to_path_buf();
    let session = tokio::task::spawn_blocking(move || Session::new(fs, &path, &config))
        .await
        .map_err(|e| MountError::Fuse { path: mountpoint.into(), source: std::io::Error::other(e) })?
        .map_err(|source| MountError::Fuse { path: mountpoint.into(), source })?;
    let _ = inner.notifier.set(session.notifier());
    let mut session = session;
    let unmounter = session.unmount_callable();
    let (tx, ended) = oneshot::channel();
    std::thread::Builder::new()
        .name("augur-fuse".into())
        .spawn(move || {
            let _ = tx.send(session.run());
        })
        .map_err(|source| MountError::Fuse { path: mountpoint.into(), source })?;
    info!(volume, mountpoint = %mountpoint.display(), "mounted");
    Ok(Mounted { inner, mountpoint: mountpoint.to_path_buf(), unmounter, ended })
}

impl Mounted {
    /// Serves until `shutdown` is cancelled (then flushes and unmounts) or until the file
    /// system is unmounted from outside (`umount`, `fusermount3 -u`).
    pub async fn run_until(mut self, shutdown: CancellationToken) -> std::io::Result<()> {
        tokio::select! {
            r = &mut self.ended => {
                info!(mountpoint = %self.mountpoint.display(), "unmounted from outside");
                return r.unwrap_or(Ok(()));
            }
            () = shutdown.cancelled() => {}
        }
        self.inner.flush_all().await;
        if let Err(e) = self.unmounter.unmount() {
            warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed (busy?); detaching lazily");
            lazy_unmount(&self.mountpoint);
        }
        match tokio::time::timeout(std::time::Duration::from_secs(30), &mut self.ended).await {
            Ok(r) => r.unwrap_or(Ok(())),
            Err(_) => Err(std::io::Error::other("the FUSE session did not end within 30 s of unmounting")),
        }
    }
}

/// A mount point left by a client that died reports "transport endpoint is not connected":
/// detach it so the new mount can take its place.
pub fn clear_stale_mount(mountpoint: &Path) {
    if let Err(e) = std::fs::metadata(mountpoint)
        && e.raw_os_error() == Some(libc::ENOTCONN)
    {
        warn!(mountpoint = %mountpoint.display(), "detaching a stale mount left by a dead client");
        lazy_unmount(mountpoint);
    }
}

fn lazy_unmount(mountpoint: &Path) {
    for (cmd, args) in [("fusermount3", &["-u", "-z"][..]), ("umount", &["-l"][..])] {
        if Command::new(cmd).args(args).arg(mountpoint).status().is_ok_and(|s| s.success()) {
            return;
        }
    }
}
