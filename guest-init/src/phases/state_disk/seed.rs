//! The disk's first use: what the root ships at every bound path (the airgap images, a
//! pre-baked containerd, database, certificates) copied onto the disk before any bind hides it.
//!
//! Crash-safe: everything is copied into [`SEED_TMP`], the disk synced, the directory renamed
//! to [`STATE_DIR`] in one step, and the marker written and synced last. Without the marker
//! the disk counts as unseeded whatever else is on it: a crash anywhere before it leaves
//! leftovers that the next boot removes before copying again, never half a seed that counts
//! as done. k3s only runs after the marker is written, so nothing of value is removed.

use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use openshell_init::guest_path::under;

use super::copy::{copy_tree, Copied, CopyError};
use super::layout::{BINDS, MARKER, MARKER_HEADER, SEED_TMP, STATE_DIR};
use crate::remove::remove_tree;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{device}: seeding {target} from the root failed: {source}{hint}")]
    Copy {
        device: String,
        target: &'static str,
        source: CopyError,
        hint: String,
    },
    #[error("{device}: {path}: {what}: {source}")]
    Io {
        device: String,
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{device}: {target} in the root is {what}, not a directory: neither seeded from nor bound over")]
    NotDir {
        device: String,
        target: &'static str,
        what: &'static str,
    },
    #[error("{device}: its marker says `{header}`, not `{MARKER_HEADER}`: a layout this init does not know; not touching it")]
    Layout { device: String, header: String },
    #[error("{device}: marked as seeded, but its {STATE_DIR}/ directory is missing; `openshell-host up --reset` starts over with a blank disk")]
    StateMissing { device: String },
}

/// What a first use copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seeded {
    pub copied: Copied,
    /// The bound paths the root had something at.
    pub from_root: Vec<&'static str>,
    /// Entries of an interrupted earlier seed removed first.
    pub leftovers_removed: usize,
}

/// Seeds the disk mounted at `mount` from `root` unless its marker says that is done;
/// `None` then. A bind directory missing from a seeded disk (a bind added since) is created
/// empty.
pub fn ensure(root: &Path, mount: &Path, device: &str) -> Result<Option<Seeded>, SeedError> {
    let io = |path: &Path, what| {
        let (device, path) = (device.to_string(), path.to_path_buf());
        move |source| SeedError::Io {
            device,
            path,
            what,
            source,
        }
    };
    let marker = mount.join(MARKER);
    let state = mount.join(STATE_DIR);
    match std::fs::read_to_string(&marker) {
        Ok(text) => {
            let header = text.lines().next().unwrap_or("").to_string();
            if header != MARKER_HEADER {
                return Err(SeedError::Layout {
                    device: device.into(),
                    header,
                });
            }
            if !crate::remove::is_real_dir(&state) {
                return Err(SeedError::StateMissing {
                    device: device.into(),
                });
            }
            for b in BINDS {
                let dir = state.join(b.name);
                if !dir.exists() {
                    make_dir(&dir, b.mode).map_err(io(&dir, "create"))?;
                }
            }
            return Ok(None);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&marker, "read")(e)),
    }
    let tmp = mount.join(SEED_TMP);
    let leftovers_removed = remove_tree(&tmp)
        .and_then(|a| remove_tree(&state).map(|b| a + b))
        .map_err(|e| io(&e.path, "remove the leftovers of an interrupted seed")(e.source))?;
    make_dir(&tmp, 0o755).map_err(io(&tmp, "create"))?;
    let mut seeded = Seeded {
        leftovers_removed,
        ..Seeded::default()
    };
    if let Err(e) = copy_all(root, &tmp, device, &mut seeded) {
        // Leave no partial copy taking space; the next boot would remove it anyway.
        let _ = remove_tree(&tmp);
        return Err(e);
    }
    seal(mount, &tmp, &state, &seeded).map_err(|(path, what, e)| io(&path, what)(e))?;
    Ok(Some(seeded))
}

/// Copies each bound path the root has into `tmp`; an empty directory for the others.
fn copy_all(root: &Path, tmp: &Path, device: &str, seeded: &mut Seeded) -> Result<(), SeedError> {
    for b in BINDS {
        let src = under(root, b.target);
        let dst = tmp.join(b.name);
        match src.symlink_metadata() {
            Ok(m) if m.is_dir() => {
                let copied = copy_tree(&src, &dst).map_err(|source| SeedError::Copy {
                    device: device.into(),
                    target: b.target,
                    hint: full_hint(&source, tmp),
                    source,
                })?;
                seeded.copied += copied;
                seeded.from_root.push(b.target);
            }
            Ok(m) => {
                return Err(SeedError::NotDir {
                    device: device.into(),
                    target: b.target,
                    what: if m.file_type().is_symlink() {
                        "a symbolic link"
                    } else {
                        "not a directory"
                    },
                })
            }
            Err(_) => make_dir(&dst, b.mode).map_err(|source| SeedError::Io {
                device: device.into(),
                path: dst.clone(),
                what: "create",
                source,
            })?,
        }
    }
    Ok(())
}

/// The copy made durable, then renamed into place, then the marker: each step synced before
/// the next, so the marker can never be on the disk without the whole copy.
fn seal(
    mount: &Path,
    tmp: &Path,
    state: &Path,
    seeded: &Seeded,
) -> Result<(), (PathBuf, &'static str, std::io::Error)> {
    let dir = std::fs::File::open(mount).map_err(|e| (mount.to_path_buf(), "open", e))?;
    // SAFETY: syncfs on an open descriptor.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err((mount.to_path_buf(), "sync", std::io::Error::last_os_error()));
    }
    std::fs::rename(tmp, state)
        .map_err(|e| (state.to_path_buf(), "rename the seed into place", e))?;
    dir.sync_all()
        .map_err(|e| (mount.to_path_buf(), "sync", e))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let text = format!(
        "{MARKER_HEADER}\nseeded-at {now}\nentries {}\nbytes {}\nfrom {}\n",
        seeded.copied.entries,
        seeded.copied.bytes,
        seeded.from_root.join(" ")
    );
    let marker = mount.join(MARKER);
    openshell_shared::fsutil::write_atomic(&marker, text.as_bytes())
        .map_err(|e| (marker.clone(), "write", e))?;
    dir.sync_all().map_err(|e| (mount.to_path_buf(), "sync", e))
}

/// For a copy that ran out of space: how much the disk had.
fn full_hint(e: &CopyError, on: &Path) -> String {
    if e.source.raw_os_error() != Some(libc::ENOSPC) {
        return String::new();
    }
    match space(on) {
        Some((total, free)) => format!(
            " (the disk is full: {} MiB free of {} MiB; a bigger disk is needed for what the root ships)",
            free >> 20,
            total >> 20
        ),
        None => " (the disk is full)".into(),
    }
}

/// The size and the space available of the filesystem holding `path`, in bytes.
pub fn space(path: &Path) -> Option<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    #[allow(clippy::unnecessary_cast)] // field widths differ between libcs
    let (blocks, avail, frag) = (
        s.blocks() as u64,
        s.blocks_available() as u64,
        s.fragment_size() as u64,
    );
    Some((blocks * frag, avail * frag))
}

fn make_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(mode).create(path)?;
    // The umask may have narrowed it.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a plain directory standing in for the mounted disk (the loop-device tests in
    /// tests/state_disk.rs run it on real ext4): the first call copies and marks, the second
    /// finds the marker, a crash's leftovers are removed and the copy redone.
    #[test]
    fn seeds_once_and_redoes_an_interrupted_seed() {
        let root = tempfile::tempdir().expect("root");
        let disk = tempfile::tempdir().expect("disk");
        let images = under(root.path(), "/var/lib/rancher/k3s/agent/images");
        std::fs::create_dir_all(&images).expect("mkdir");
        std::fs::write(images.join("a.tar"), b"image").expect("write");
        // A crash during an earlier seed: half a copy, no marker.
        std::fs::create_dir_all(disk.path().join(SEED_TMP).join("k3s-agent")).expect("mkdir");
        std::fs::write(disk.path().join(SEED_TMP).join("junk"), b"x").expect("write");
        let s = ensure(root.path(), disk.path(), "/dev/test")
            .expect("seed")
            .expect("seeded");
        assert_eq!(s.leftovers_removed, 3);
        assert_eq!(s.from_root, vec!["/var/lib/rancher/k3s/agent"]);
        assert_eq!(s.copied.bytes, 5);
        assert!(!disk.path().join(SEED_TMP).exists());
        let state = disk.path().join(STATE_DIR);
        assert_eq!(
            std::fs::read(state.join("k3s-agent/images/a.tar")).expect("copied"),
            b"image"
        );
        for b in BINDS {
            assert!(state.join(b.name).is_dir(), "{}", b.name);
        }
        let marker = std::fs::read_to_string(disk.path().join(MARKER)).expect("marker");
        assert!(marker.starts_with(MARKER_HEADER), "{marker}");
        // Second use: nothing copied, even though the root changed.
        std::fs::write(images.join("b.tar"), b"new").expect("write");
        assert_eq!(
            ensure(root.path(), disk.path(), "/dev/test").expect("again"),
            None
        );
        assert!(!state.join("k3s-agent/images/b.tar").exists());
        // A crash after the rename, before the marker: the copy is done again.
        std::fs::remove_file(disk.path().join(MARKER)).expect("rm");
        let s = ensure(root.path(), disk.path(), "/dev/test")
            .expect("seed")
            .expect("seeded again");
        assert!(s.leftovers_removed > 0);
        assert!(state.join("k3s-agent/images/b.tar").exists());
    }

    #[test]
    fn a_marker_of_another_layout_or_without_state_is_refused() {
        let root = tempfile::tempdir().expect("root");
        let disk = tempfile::tempdir().expect("disk");
        std::fs::write(disk.path().join(MARKER), "someone else's\n").expect("write");
        let e = ensure(root.path(), disk.path(), "/dev/vdb").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/dev/vdb: its marker says `someone else's`"),
            "{e}"
        );
        std::fs::write(disk.path().join(MARKER), format!("{MARKER_HEADER}\n")).expect("write");
        let e = ensure(root.path(), disk.path(), "/dev/vdb").unwrap_err();
        assert!(e.to_string().contains("state/ directory is missing"), "{e}");
    }

    #[test]
    fn a_link_at_a_bound_path_is_neither_followed_nor_seeded() {
        let root = tempfile::tempdir().expect("root");
        let disk = tempfile::tempdir().expect("disk");
        let pki = under(root.path(), "/opt/openshell/pki");
        std::fs::create_dir_all(pki.parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", &pki).expect("link");
        let e = ensure(root.path(), disk.path(), "/dev/vdb").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/dev/vdb: /opt/openshell/pki in the root is a symbolic link, not a directory: neither seeded from nor bound over"
        );
        assert!(!disk.path().join(MARKER).exists());
        assert!(!disk.path().join(SEED_TMP).exists(), "partial copy removed");
    }
}
