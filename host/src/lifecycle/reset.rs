//! `up --reset`: removes the guest's runtime state before a boot, so the next boot starts a fresh
//! cluster. Removes the instance's state disk image (k3s, containerd, the PKI when the guest
//! keeps them there) and, from the root filesystem, pod directories, CNI state and the k3s
//! server database; never the rootfs itself, never `var/run` (a symlink on many distributions
//! that the guest needs), and never anything reached through a symlink: links are removed as
//! links, and a target whose parent directory is a symlink is left alone.
//!
//! Everything is done relative to directory descriptors opened once, while planning, with
//! `O_NOFOLLOW`: what is removed is what was listed for the user, even if a path is swapped for
//! a link between the question and the removal. And it is done only while no VM uses the root:
//! every `up` holds a shared `flock` on the root directory for the VM's life ([`lock_root`]), a
//! reset takes it exclusively, so a reset is refused while any instance, of any name, boots
//! from that root.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufRead, IsTerminal, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, Flock, FlockArg, OFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::UnlinkatFlags;

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
    #[error("cannot open root filesystem {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing to reset {rootfs}: a VM is using it (an openshell-host up of some instance holds it); stop that instance first")]
    InUse { rootfs: PathBuf },
    #[error("root filesystem {rootfs} is being reset by another openshell-host up; try again once it boots")]
    Resetting { rootfs: PathBuf },
    #[error("refusing to reset {rootfs} without confirmation: not on a terminal; pass --yes")]
    NotConfirmed { rootfs: PathBuf },
    #[error("reset of {rootfs} declined")]
    Declined { rootfs: PathBuf },
    #[error(transparent)]
    Disk(#[from] StateDiskError),
}

/// A VM's claim on its root filesystem: shared by every `up` booting from it, exclusive for
/// the one that resets it. The kernel drops it when the process dies, however it dies.
#[derive(Debug)]
pub struct RootLock {
    _lock: Flock<File>,
}

/// Takes the root's lock without waiting: exclusive to reset it, shared to boot from it.
pub fn lock_root(rootfs: &Path, exclusive: bool) -> Result<RootLock, ResetError> {
    let dir = File::open(rootfs).map_err(|source| ResetError::Open {
        path: rootfs.to_path_buf(),
        source,
    })?;
    let arg = if exclusive {
        FlockArg::LockExclusiveNonblock
    } else {
        FlockArg::LockSharedNonblock
    };
    match Flock::lock(dir, arg) {
        Ok(lock) => Ok(RootLock { _lock: lock }),
        Err((_, Errno::EWOULDBLOCK)) if exclusive => Err(ResetError::InUse {
            rootfs: rootfs.to_path_buf(),
        }),
        Err((_, Errno::EWOULDBLOCK)) => Err(ResetError::Resetting {
            rootfs: rootfs.to_path_buf(),
        }),
        Err((_, errno)) => Err(ResetError::Open {
            path: rootfs.to_path_buf(),
            source: errno.into(),
        }),
    }
}

/// One entry to remove: a name in a directory opened while planning.
struct Item {
    parent: Rc<OwnedFd>,
    name: OsString,
    /// Relative to the rootfs, for the user and for errors.
    shown: PathBuf,
}

/// What a reset removes, held as descriptors: see the module doc.
pub struct Plan {
    rootfs: PathBuf,
    items: Vec<Item>,
}

fn open_dir_at(parent: Option<&OwnedFd>, name: &OsStr, follow: bool) -> Result<OwnedFd, Errno> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    if !follow {
        flags |= OFlag::O_NOFOLLOW;
    }
    let raw = nix::fcntl::openat(parent.map(|p| p.as_raw_fd()), name, flags, Mode::empty())?;
    // SAFETY: openat just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Walks the directories of `rel` from `root` without following links; `None` when one is
/// missing, a link, or not a directory.
fn walk(root: &OwnedFd, rel: &Path) -> Option<OwnedFd> {
    let mut fd = open_dir_at(Some(root), OsStr::new("."), false).ok()?;
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            return None;
        };
        fd = open_dir_at(Some(&fd), name, false).ok()?;
    }
    Some(fd)
}

fn exists_at(parent: &OwnedFd, name: &OsStr) -> bool {
    nix::sys::stat::fstatat(Some(parent.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
}

/// Names in the directory `fd`, without `.` and `..`.
fn names(fd: &OwnedFd) -> Result<Vec<OsString>, Errno> {
    use std::os::unix::ffi::OsStrExt;
    let mut dir = nix::dir::Dir::from_fd(nix::unistd::dup(fd.as_raw_fd())?)?;
    let mut out = Vec::new();
    for entry in dir.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(&name).to_os_string());
        }
    }
    Ok(out)
}

/// What a reset of `rootfs` would remove: existing entries only, reached without links.
pub fn plan(rootfs: &Path) -> Result<Plan, ResetError> {
    let root = open_dir_at(None, rootfs.as_os_str(), true).map_err(|e| ResetError::Open {
        path: rootfs.to_path_buf(),
        source: e.into(),
    })?;
    let mut items = Vec::new();
    for rel in TREES.map(Path::new) {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        if let Some(fd) = walk(&root, parent) {
            if exists_at(&fd, name) {
                items.push(Item {
                    parent: Rc::new(fd),
                    name: name.to_os_string(),
                    shown: rel.to_path_buf(),
                });
            }
        }
    }
    if let Some(db) = walk(&root, Path::new(DB_DIR)).map(Rc::new) {
        let mut files: Vec<OsString> = names(&db)
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.to_string_lossy().starts_with(DB_PREFIX))
            .collect();
        files.sort();
        for name in files {
            items.push(Item {
                parent: Rc::clone(&db),
                shown: Path::new(DB_DIR).join(&name),
                name,
            });
        }
    }
    Ok(Plan {
        rootfs: rootfs.to_path_buf(),
        items,
    })
}

impl Plan {
    /// The planned entries, as paths under the rootfs.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.items
            .iter()
            .map(|i| self.rootfs.join(&i.shown))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Removes every planned entry from the directory it was found in: directories whole,
    /// anything else, links included, as one entry. Nothing is followed.
    pub fn remove(&self) -> Result<(), ResetError> {
        for item in &self.items {
            remove_at(&item.parent, &item.name).map_err(|e| ResetError::Remove {
                path: self.rootfs.join(&item.shown),
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

/// Removes `name` in `parent`: a directory with all it holds, anything else as itself. Gone
/// already is fine.
fn remove_at(parent: &OwnedFd, name: &OsStr) -> Result<(), Errno> {
    let st =
        match nix::sys::stat::fstatat(Some(parent.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    if kind != SFlag::S_IFDIR {
        return nix::unistd::unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir);
    }
    let dir = open_dir_at(Some(parent), name, false)?;
    for child in names(&dir)? {
        remove_at(&dir, &child)?;
    }
    nix::unistd::unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::RemoveDir)
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
/// in `sdir`; returns a note for the user. The caller holds the root's exclusive lock
/// ([`lock_root`]).
pub fn run(rootfs: &Path, sdir: &StateDir, yes: bool) -> Result<String, ResetError> {
    // No VM may have the disk open while it goes (a VMM of a killed `up` may still).
    let _disk = state_disk::lock(sdir)?;
    let plan = plan(rootfs)?;
    let disk = state_disk::reset_paths(sdir);
    if plan.is_empty() && disk.is_empty() {
        return Ok(format!(
            "reset: no runtime state in {} and no state disk to remove",
            rootfs.display()
        ));
    }
    let mut shown = plan.paths();
    shown.extend(disk.iter().cloned());
    confirm(rootfs, &shown, yes)?;
    plan.remove()?;
    for path in &disk {
        // Files of the state directory, checked as ours when it was opened; a link goes as one.
        std::fs::remove_file(path).map_err(|source| ResetError::Remove {
            path: path.clone(),
            source,
        })?;
    }
    let mut names: Vec<String> = plan
        .items
        .iter()
        .map(|i| i.shown.display().to_string())
        .collect();
    names.extend(disk.iter().map(|p| p.display().to_string()));
    Ok(format!(
        "reset: removed {} ({} entries)",
        names.join(", "),
        names.len()
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

        let planned = plan(&root).expect("plan").paths();
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
        assert!(
            plan(&root).expect("plan").is_empty(),
            "second reset has nothing to do"
        );
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
        assert!(plan(&root).expect("plan").is_empty());
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
        let planned = plan(&root).expect("plan").paths();
        match confirm(&root, &planned, false) {
            Err(ResetError::NotConfirmed { rootfs }) => assert_eq!(rootfs, root),
            other => panic!("{other:?}"),
        }
        assert!(root.join("var/lib/cni/net").exists());
        confirm(&root, &planned, true).expect("--yes");
    }

    /// Planned, then (while the user is asked) `var/lib/kubelet` swapped for a link to a
    /// directory outside with a `pods` of its own: the removal still takes the planned tree,
    /// through the descriptor opened while planning, and never the outside one.
    #[test]
    fn a_path_swapped_for_a_link_after_planning_is_not_followed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("rootfs");
        let outside = tmp.path().join("outside");
        touch(&outside.join("pods/precious"));
        touch(&root.join("var/lib/kubelet/pods/p1/f"));
        let planned = plan(&root).expect("plan");
        assert_eq!(planned.paths(), [root.join("var/lib/kubelet/pods")]);
        std::fs::rename(
            root.join("var/lib/kubelet"),
            root.join("var/lib/kubelet.old"),
        )
        .expect("rename");
        symlink(&outside, root.join("var/lib/kubelet")).expect("link");
        planned.remove().expect("remove");
        assert!(
            outside.join("pods/precious").exists(),
            "the outside tree survives"
        );
        assert!(
            !root.join("var/lib/kubelet.old/pods").exists(),
            "the planned tree went"
        );
    }

    /// While any `up` boots from the root (a shared lock, as a running VM holds), a reset is
    /// refused naming the root and nothing is removed; a reset in progress keeps `up` out.
    #[test]
    fn a_reset_is_refused_while_a_vm_uses_the_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("rootfs");
        touch(&root.join("var/lib/cni/net"));
        let running = lock_root(&root, false).expect("a VM boots from it");
        let another = lock_root(&root, false).expect("shared with another instance");
        match lock_root(&root, true) {
            Err(ResetError::InUse { rootfs }) => assert_eq!(rootfs, root),
            other => panic!("{other:?}"),
        }
        assert!(root.join("var/lib/cni/net").exists());
        drop((running, another));
        let resetting = lock_root(&root, true).expect("free");
        let msg = lock_root(&root, false).unwrap_err().to_string();
        assert!(msg.contains("being reset"), "{msg}");
        drop(resetting);
        lock_root(&root, false).expect("free again");
        assert!(matches!(
            lock_root(&tmp.path().join("none"), false),
            Err(ResetError::Open { .. })
        ));
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
