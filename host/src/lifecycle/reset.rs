//! `up --reset`: removes the guest's runtime state before a boot, so the next boot starts a fresh
//! cluster. Removes the instance's state disk image (k3s, containerd, the PKI when the guest
//! keeps them there) and, from the root filesystem, pod directories, CNI state and the k3s
//! server database; never the rootfs itself, never `var/run` (a symlink on many distributions
//! that the guest needs), and never anything reached through a symlink: links are removed as
//! links, and a target whose parent directory is a symlink is left alone.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use super::state::StateDir;
use super::state_disk::{self, StateDiskError};

/// Removed whole, relative to the rootfs.
const TREES: [&str; 2] = ["var/lib/kubelet/pods", "var/lib/cni"];
/// Directory of k3s's SQLite database; every `state.db*` file in it goes (db, -wal, -shm).
const DB_DIR: &str = "var/lib/rancher/k3s/server/db";
const DB_PREFIX: &str = "state.db";

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing to reset {rootfs} without confirmation: not on a terminal; pass --yes")]
    NotConfirmed { rootfs: PathBuf },
    #[error("reset of {rootfs} declined")]
    Declined { rootfs: PathBuf },
    #[error(transparent)]
    Disk(#[from] StateDiskError),
}

/// True when every directory between `root` and `rel`'s last component is a real directory:
/// then removing `root/rel` cannot reach outside `root`.
fn parents_are_real_dirs(root: &Path, rel: &Path) -> bool {
    let mut at = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// What a reset of `rootfs` would remove: existing entries only.
pub fn plan(rootfs: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let exists = |p: &Path| std::fs::symlink_metadata(p).is_ok();
    for rel in TREES {
        if parents_are_real_dirs(rootfs, Path::new(rel)) && exists(&rootfs.join(rel)) {
            out.push(rootfs.join(rel));
        }
    }
    let db = Path::new(DB_DIR);
    let db_dir = rootfs.join(db);
    let db_dir_real = parents_are_real_dirs(rootfs, &db.join("x"))
        && std::fs::symlink_metadata(&db_dir).is_ok_and(|m| m.is_dir());
    if db_dir_real {
        if let Ok(entries) = std::fs::read_dir(&db_dir) {
            let mut files: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(DB_PREFIX))
                .map(|e| e.path())
                .collect();
            files.sort();
            out.extend(files);
        }
    }
    out
}

/// Removes `paths`: directories recursively (std does not follow symlinks inside), anything
/// else, symlinks included, as a single entry.
pub fn remove(paths: &[PathBuf]) -> Result<(), ResetError> {
    for path in paths {
        let result = match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
            Ok(m) if m.file_type().is_dir() => std::fs::remove_dir_all(path),
            Ok(_) => std::fs::remove_file(path),
        };
        result.map_err(|source| ResetError::Remove {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Asks on a terminal (y/N) listing what goes; without a terminal only `--yes` allows it.
pub fn confirm(rootfs: &Path, paths: &[PathBuf], yes: bool) -> Result<(), ResetError> {
    if yes || paths.is_empty() {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(ResetError::NotConfirmed {
            rootfs: rootfs.to_path_buf(),
        });
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "--reset removes:");
    for p in paths {
        let _ = writeln!(err, "  {}", p.display());
    }
    let _ = write!(err, "Remove these? [y/N] ");
    let _ = err.flush();
    let mut answer = String::new();
    let _ = stdin.lock().read_line(&mut answer);
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(ResetError::Declined {
            rootfs: rootfs.to_path_buf(),
        }),
    }
}

/// Plans, confirms and removes the runtime state in `rootfs` and the state disk of the instance
/// in `sdir` (whose lock the caller holds); returns a note for the user.
pub fn run(rootfs: &Path, sdir: &StateDir, yes: bool) -> Result<String, ResetError> {
    // No VM may have the disk open while it goes (a VMM of a killed `up` may still).
    let _disk = state_disk::lock(sdir)?;
    let mut paths = plan(rootfs);
    paths.extend(state_disk::reset_paths(sdir));
    if paths.is_empty() {
        return Ok(format!(
            "reset: no runtime state in {} and no state disk to remove",
            rootfs.display()
        ));
    }
    confirm(rootfs, &paths, yes)?;
    remove(&paths)?;
    Ok(format!(
        "reset: removed {} ({} entries)",
        paths
            .iter()
            .map(|p| p.strip_prefix(rootfs).unwrap_or(p).display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        paths.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// An instance state directory without a state disk.
    fn no_disk(tmp: &tempfile::TempDir) -> StateDir {
        let dir = StateDir::at("t", tmp.path().join("state"));
        dir.create().expect("state dir");
        dir
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, b"x").expect("write");
    }

    #[test]
    fn reset_removes_runtime_state_and_nothing_through_links() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("rootfs");
        let outside = tmp.path().join("outside");
        touch(&outside.join("precious"));
        touch(&root.join("var/lib/kubelet/pods/p1/volumes/v"));
        // A link inside a removed tree pointing outside: removed as a link, target survives.
        symlink(&outside, root.join("var/lib/kubelet/pods/p1/escape")).expect("link");
        // var/lib/cni is itself a link to outside: the link goes, the target stays.
        symlink(&outside, root.join("var/lib/cni")).expect("link");
        for f in ["state.db", "state.db-wal", "state.db-shm", "other.db"] {
            touch(&root.join(DB_DIR).join(f));
        }
        std::fs::create_dir_all(root.join("run")).expect("run");
        symlink("/run", root.join("var/run")).expect("var/run");
        touch(&root.join("var/lib/kubelet/config.yaml"));

        let planned = plan(&root);
        assert_eq!(planned.len(), 5, "{planned:?}");
        run(&root, &no_disk(&tmp), true).expect("reset");

        assert!(!root.join("var/lib/kubelet/pods").exists());
        assert!(std::fs::symlink_metadata(root.join("var/lib/cni")).is_err());
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            assert!(!root.join(DB_DIR).join(f).exists(), "{f}");
        }
        assert!(root.join(DB_DIR).join("other.db").exists());
        assert!(root.join("var/lib/kubelet/config.yaml").exists());
        assert!(outside.join("precious").exists(), "link target survives");
        let run_link = std::fs::symlink_metadata(root.join("var/run")).expect("var/run kept");
        assert!(run_link.file_type().is_symlink());
        assert!(plan(&root).is_empty(), "second reset has nothing to do");
    }

    #[test]
    fn a_symlinked_parent_is_never_followed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("rootfs");
        let outside = tmp.path().join("outside");
        touch(&outside.join("kubelet/pods/keep"));
        touch(&outside.join("rancher/k3s/server/db/state.db"));
        std::fs::create_dir_all(root.join("var")).expect("var");
        symlink(&outside, root.join("var/lib")).expect("link");
        assert!(plan(&root).is_empty());
        run(&root, &no_disk(&tmp), true).expect("reset");
        assert!(outside.join("kubelet/pods/keep").exists());
        assert!(outside.join("rancher/k3s/server/db/state.db").exists());
    }

    #[test]
    fn without_a_terminal_reset_needs_yes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("rootfs");
        touch(&root.join("var/lib/cni/net"));
        if std::io::stdin().is_terminal() {
            return; // interactive test run: the refusal path is not reachable
        }
        match confirm(&root, &plan(&root), false) {
            Err(ResetError::NotConfirmed { rootfs }) => assert_eq!(rootfs, root),
            other => panic!("{other:?}"),
        }
        assert!(root.join("var/lib/cni/net").exists());
        confirm(&root, &plan(&root), true).expect("--yes");
    }

    /// The state disk goes with the rootfs state, its lock file stays; while another VM holds
    /// the disk's lock nothing at all is removed.
    #[test]
    fn reset_removes_the_state_disk_unless_a_vm_holds_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("rootfs");
        touch(&root.join("var/lib/cni/net"));
        let sdir = no_disk(&tmp);
        {
            let lock = state_disk::lock(&sdir).expect("lock");
            let req = state_disk::Request {
                size: 16 << 20,
                explicit: true,
            };
            state_disk::prepare(&sdir, req, &lock).expect("disk");
            let err = run(&root, &sdir, true).unwrap_err();
            assert!(
                matches!(err, ResetError::Disk(StateDiskError::Busy { .. })),
                "{err}"
            );
            assert!(root.join("var/lib/cni/net").exists());
            assert_eq!(state_disk::reset_paths(&sdir).len(), 2);
        }
        let note = run(&root, &sdir, true).expect("reset");
        assert!(
            note.contains("state.img") && note.contains("(3 entries)"),
            "{note}"
        );
        assert!(state_disk::reset_paths(&sdir).is_empty());
        assert!(state_disk::usage(&sdir).is_none());
        assert!(!root.join("var/lib/cni").exists());
        assert!(sdir.path.join("state.img.lock").exists());
    }
}
