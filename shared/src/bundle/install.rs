//! A bundle unpacked once per version under a directory of its own (the host gives each
//! instance `<state dir>/bundles/`): into `.partial-<version>` first, synced, then renamed to
//! `<version>`, whose `COMPLETE` file (the manifest as stored) is written last. A later install
//! of the same version reuses that copy after comparing the marker with the bundle's manifest
//! and re-hashing the kernels and init (cheap); the root is not re-hashed: the guest writes to
//! it, so its digest is the bundle's only until the first boot. Callers hold the instance's
//! lock, so no other install runs in the same directory.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::error::BundleError;
use super::manifest::{Manifest, INIT, KERNEL, ROOTFS};
use super::owners::Owners;
use super::unpack::{check_digest, file_digest, open};

/// The completion marker inside an unpacked version.
pub const COMPLETE: &str = "COMPLETE";
const PARTIAL: &str = ".partial-";

/// An unpacked bundle ready to boot.
#[derive(Debug)]
pub struct Installed {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// An earlier install's copy was used.
    pub reused: bool,
    /// xattrs outside `user.*` left out (non-root unpack).
    pub skipped_xattrs: u64,
}

impl Installed {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join(KERNEL)
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn init(&self) -> PathBuf {
        self.dir.join(INIT)
    }
}

/// Unpacks the bundle read from `bundle` into `bundles_dir`, or reuses the copy there (then
/// only the manifest is read); removes other versions and partial unpacks.
pub fn install<R: Read>(
    bundle: R,
    bundles_dir: &Path,
    owners: Owners,
) -> Result<Installed, BundleError> {
    std::fs::create_dir_all(bundles_dir).map_err(|e| BundleError::io("create", bundles_dir, e))?;
    let opened = open(bundle)?;
    let manifest = opened.manifest.clone();
    let dir = bundles_dir.join(&manifest.version);
    if reusable(&dir, &opened.manifest_bytes, &manifest)? {
        remove_others(bundles_dir, &manifest.version)?;
        return Ok(Installed {
            dir,
            manifest,
            reused: true,
            skipped_xattrs: 0,
        });
    }
    remove_others(bundles_dir, "")?;
    let partial = bundles_dir.join(format!("{PARTIAL}{}", manifest.version));
    std::fs::create_dir(&partial).map_err(|e| BundleError::io("create", &partial, e))?;
    let marker = opened.manifest_bytes.clone();
    let unpacked = opened.unpack_into(&partial, owners).and_then(|summary| {
        let path = partial.join(COMPLETE);
        write_marker(&path, &marker)?;
        sync_tree(&partial)?;
        Ok(summary)
    });
    let summary = match unpacked {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, &dir).map_err(|e| BundleError::io("rename into place", &dir, e))?;
    sync_dir(bundles_dir)?;
    Ok(Installed {
        dir,
        manifest,
        reused: false,
        skipped_xattrs: summary.skipped_xattrs,
    })
}

/// A complete copy of this very manifest whose kernels and init still match it.
fn reusable(dir: &Path, manifest_bytes: &[u8], manifest: &Manifest) -> Result<bool, BundleError> {
    match std::fs::read(dir.join(COMPLETE)) {
        Ok(marker) if marker == manifest_bytes => {}
        _ => return Ok(false),
    }
    if !dir.join("rootfs").is_dir() {
        return Ok(false);
    }
    for member in &manifest.members {
        if member.name == ROOTFS {
            continue;
        }
        let path = dir.join(&member.name);
        if check_digest(member, file_digest(&path)?).is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Removes every entry of `bundles_dir` but `keep`: other versions (roots of earlier bundles;
/// the state disk keeps the cluster) and partial unpacks a killed install left.
fn remove_others(bundles_dir: &Path, keep: &str) -> Result<(), BundleError> {
    let entries =
        std::fs::read_dir(bundles_dir).map_err(|e| BundleError::io("list", bundles_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| BundleError::io("list", bundles_dir, e))?;
        if entry.file_name() == keep {
            continue;
        }
        let path = entry.path();
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        removed.map_err(|e| BundleError::io("remove", &path, e))?;
    }
    Ok(())
}

fn write_marker(path: &Path, bytes: &[u8]) -> Result<(), BundleError> {
    std::fs::write(path, bytes).map_err(|e| BundleError::io("write", path, e))
}

/// Everything written under `dir` on disk: Linux syncs the file system once (syncfs); elsewhere
/// the files were fsynced as written and the directories are here.
fn sync_tree(dir: &Path) -> Result<(), BundleError> {
    let file = std::fs::File::open(dir).map_err(|e| BundleError::io("open", dir, e))?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the duration of the call.
        if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
            return Err(BundleError::io(
                "syncfs",
                dir,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        drop(file);
        sync_dirs(dir)
    }
}

#[cfg(not(target_os = "linux"))]
fn sync_dirs(dir: &Path) -> Result<(), BundleError> {
    let entries = std::fs::read_dir(dir).map_err(|e| BundleError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| BundleError::io("list", dir, e))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            sync_dirs(&entry.path())?;
        } else if entry.file_name() == COMPLETE {
            let f = std::fs::File::open(entry.path())
                .map_err(|e| BundleError::io("open", entry.path(), e))?;
            f.sync_all()
                .map_err(|e| BundleError::io("fsync", entry.path(), e))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), BundleError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| BundleError::io("fsync", dir, e))
}
