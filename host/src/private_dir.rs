//! Directories the host keeps secrets and sockets in, made so that no other local user can own,
//! replace or redirect them: each component below a trusted base is created with `mkdirat` and
//! opened with `O_NOFOLLOW` relative to its parent's descriptor, then checked on that descriptor
//! (a directory, owned by us, none of the forbidden mode bits). Anything else is refused with the
//! path and what is wrong with it, never repaired: a directory someone else made first may hold
//! their sockets or links.
//!
//! The base itself (`$XDG_RUNTIME_DIR`, `/tmp`, `$HOME`) may be reached through links, but it and
//! every directory above it must be owned by root or by us and not writable by others unless
//! sticky (`/tmp`): otherwise another user could rename the whole chain away under us.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// Mode bits nobody but the owner may have: run directories (sockets, the boot channel).
pub const PRIVATE: u32 = 0o077;
/// Mode bits that let others write: the state and configuration directories of a root host.
pub const NO_SHARED_WRITE: u32 = 0o022;

/// What makes a directory unsafe to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Link,
    NotDirectory,
    Owner {
        uid: u32,
        ours: u32,
    },
    Mode {
        mode: u32,
        forbidden: u32,
    },
    /// Every directory on the path lets other users through.
    Reachable,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Link => write!(f, "it is a symbolic link"),
            Problem::NotDirectory => write!(f, "it is not a directory"),
            Problem::Owner { uid, ours } => {
                write!(f, "it is owned by uid {uid}, not by this user (uid {ours})")
            }
            Problem::Mode { mode, forbidden } if forbidden & 0o055 != 0 => write!(
                f,
                "its mode {mode:04o} lets other users in (expected {:04o})",
                0o777 & !forbidden
            ),
            Problem::Mode { mode, .. } => {
                write!(f, "its mode {mode:04o} lets other users write to it")
            }
            Problem::Reachable => write!(
                f,
                "other users can reach it (no directory on its path is closed to them)"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing {path}: {problem}; remove it or choose another location")]
    Unsafe { path: PathBuf, problem: Problem },
    #[error("refusing {path}: {problem}, so another user could replace what is below it")]
    UnsafeBase { path: PathBuf, problem: Problem },
}

/// The effective uid: the owner every directory made here must have.
pub fn our_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Creates `base/rel` one component at a time (mode 0700) without following links below `base`,
/// checks every component of `rel`, new or found, against `forbidden`, and checks `base` with
/// [`check_base`]. Returns the directory's path. `rel` must be relative and plain (no `..`).
pub fn ensure(base: &Path, rel: &Path, forbidden: u32) -> Result<PathBuf, DirError> {
    check_base(base)?;
    let mut fd = open_dir(None, base.as_os_str()).map_err(|e| DirError::Io {
        path: base.to_path_buf(),
        source: e.into(),
    })?;
    let mut at = base.to_path_buf();
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            return Err(DirError::Io {
                path: base.join(rel),
                source: std::io::Error::other("not a plain relative path"),
            });
        };
        at.push(name);
        fd = step(&fd, name, &at, forbidden)?;
    }
    Ok(at)
}

/// One component: made if missing, opened without following a link, checked.
fn step(parent: &OwnedFd, name: &OsStr, path: &Path, forbidden: u32) -> Result<OwnedFd, DirError> {
    let io = |e: Errno| DirError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    };
    match nix::sys::stat::mkdirat(Some(parent.as_raw_fd()), name, Mode::S_IRWXU) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(io(e)),
    }
    let fd = match open_dir(Some(parent), name) {
        Ok(fd) => fd,
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            let st = nix::sys::stat::fstatat(
                Some(parent.as_raw_fd()),
                name,
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(io)?;
            let problem = if file_type(&st) == SFlag::S_IFLNK {
                Problem::Link
            } else {
                Problem::NotDirectory
            };
            return Err(DirError::Unsafe {
                path: path.to_path_buf(),
                problem,
            });
        }
        Err(e) => return Err(io(e)),
    };
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(io)?;
    judge(st.st_uid, st.st_mode as u32, forbidden).map_err(|problem| DirError::Unsafe {
        path: path.to_path_buf(),
        problem,
    })?;
    Ok(fd)
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn open_dir(parent: Option<&OwnedFd>, name: &OsStr) -> Result<OwnedFd, Errno> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let raw = nix::fcntl::openat(parent.map(|p| p.as_raw_fd()), name, flags, Mode::empty())?;
    // SAFETY: openat just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Owned by us, and none of the `forbidden` mode bits.
fn judge(uid: u32, mode: u32, forbidden: u32) -> Result<(), Problem> {
    let ours = our_uid();
    if uid != ours {
        return Err(Problem::Owner { uid, ours });
    }
    if mode & forbidden != 0 {
        return Err(Problem::Mode {
            mode: mode & 0o7777,
            forbidden,
        });
    }
    Ok(())
}

/// `base` (links resolved) and every directory above it: owned by root or by us, and not
/// writable by group or others unless sticky, so nobody else can move what we create below.
pub fn check_base(base: &Path) -> Result<(), DirError> {
    let real = base.canonicalize().map_err(|source| DirError::Io {
        path: base.to_path_buf(),
        source,
    })?;
    let ours = our_uid();
    for dir in real.ancestors() {
        let meta = std::fs::metadata(dir).map_err(|source| DirError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let unsafe_base = |problem| DirError::UnsafeBase {
            path: dir.to_path_buf(),
            problem,
        };
        if !meta.is_dir() {
            return Err(unsafe_base(Problem::NotDirectory));
        }
        if meta.uid() != 0 && meta.uid() != ours {
            return Err(unsafe_base(Problem::Owner {
                uid: meta.uid(),
                ours,
            }));
        }
        let sticky = meta.mode() & 0o1000 != 0;
        if meta.mode() & NO_SHARED_WRITE != 0 && !sticky {
            return Err(unsafe_base(Problem::Mode {
                mode: meta.mode() & 0o7777,
                forbidden: NO_SHARED_WRITE,
            }));
        }
    }
    Ok(())
}

/// `path` (links resolved) sits below, or is, a directory other users cannot pass: one without
/// search permission for others, and for its group unless that is root's. A guest's setuid
/// files in a tree only root can reach give nobody anything root does not have.
pub fn check_closed_to_others(path: &Path) -> Result<(), DirError> {
    use std::os::unix::fs::MetadataExt;
    let real = path.canonicalize().map_err(|source| DirError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let closed = real.ancestors().any(|dir| {
        std::fs::metadata(dir)
            .is_ok_and(|m| m.mode() & 0o001 == 0 && (m.mode() & 0o010 == 0 || m.gid() == 0))
    });
    if closed {
        return Ok(());
    }
    Err(DirError::Unsafe {
        path: real,
        problem: Problem::Reachable,
    })
}

/// Opens `path` with `opts` but never through a link at its last component (`O_NOFOLLOW`): a
/// link planted where a log or lock goes is refused, not written through.
pub fn open_no_follow(
    path: &Path,
    opts: &mut std::fs::OpenOptions,
) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    opts.custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::other("it is a symbolic link: not followed"),
            _ => e,
        })
}

/// Splits `path` into its longest existing ancestor (the base: the user chose it) and the rest,
/// which [`ensure`] creates and checks; the last component is always in the rest.
pub fn split_existing(path: &Path) -> (PathBuf, PathBuf) {
    let mut base = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut rest = PathBuf::from(path.file_name().unwrap_or_default());
    while std::fs::symlink_metadata(&base).is_err() {
        let Some(parent) = base.parent() else { break };
        let mut r = PathBuf::from(base.file_name().unwrap_or_default());
        r.push(&rest);
        rest = r;
        base = parent.to_path_buf();
    }
    if base.as_os_str().is_empty() {
        base = PathBuf::from(".");
    }
    (base, rest)
}

/// For tests of the files kept under a home: `alice`, a home in `tmp` that another user
/// (nobody, uid 65534) owns, as under `sudo` keeping `$HOME`. `None` when not root (only root
/// can make one).
#[cfg(test)]
pub(crate) fn home_of_another_user(tmp: &Path) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to make a home another user owns");
        return None;
    }
    let home = tmp.join("alice");
    std::fs::create_dir(&home).expect("home");
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    nix::unistd::chown(&home, Some(65534.into()), None).expect("chown");
    Some(home)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn private_tmp() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        t
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).expect("meta").mode() & 0o7777
    }

    #[test]
    fn components_are_made_private_and_found_again() {
        let t = private_tmp();
        let dir = ensure(t.path(), Path::new("a/b"), PRIVATE).expect("made");
        assert_eq!(dir, t.path().join("a/b"));
        assert_eq!(mode(&t.path().join("a")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        ensure(t.path(), Path::new("a/b"), PRIVATE).expect("found again");
    }

    #[test]
    fn a_link_a_file_or_a_loose_mode_is_refused_naming_the_path() {
        let t = private_tmp();
        let outside = private_tmp();
        std::os::unix::fs::symlink(outside.path(), t.path().join("link")).expect("link");
        std::fs::write(t.path().join("file"), b"x").expect("file");
        std::fs::create_dir(t.path().join("loose")).expect("dir");
        std::fs::set_permissions(
            t.path().join("loose"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        for (rel, want) in [
            ("link/x", Problem::Link),
            ("file", Problem::NotDirectory),
            (
                "loose/x",
                Problem::Mode {
                    mode: 0o755,
                    forbidden: PRIVATE,
                },
            ),
        ] {
            let first = rel.split('/').next().expect("first");
            match ensure(t.path(), Path::new(rel), PRIVATE) {
                Err(DirError::Unsafe { path, problem }) => {
                    assert_eq!(path, t.path().join(first), "{rel}");
                    assert_eq!(problem, want, "{rel}");
                }
                other => panic!("{rel}: {other:?}"),
            }
        }
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("ls").count(),
            0,
            "nothing made through the link"
        );
        assert!(!t.path().join("loose/x").exists(), "nothing made below");
        let msg = ensure(t.path(), Path::new("loose"), PRIVATE)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&t.path().join("loose").display().to_string())
                && msg.contains("0755")
                && msg.contains("lets other users in"),
            "{msg}"
        );
    }

    /// As root, a directory another user made first is refused (the hint's attack: a pre-made
    /// run directory); the owner is named.
    #[test]
    fn another_users_directory_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let t = private_tmp();
        let theirs = t.path().join("theirs");
        std::fs::create_dir(&theirs).expect("dir");
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        nix::unistd::chown(&theirs, Some(65534.into()), None).expect("chown");
        let err = ensure(t.path(), Path::new("theirs/x"), PRIVATE).unwrap_err();
        assert!(
            matches!(&err, DirError::Unsafe { path, problem: Problem::Owner { uid: 65534, ours: 0 } } if *path == theirs),
            "{err:?}"
        );
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        assert!(!theirs.join("x").exists());
    }

    #[test]
    fn a_base_others_can_write_to_is_refused_unless_sticky() {
        let t = private_tmp();
        let open = t.path().join("open");
        std::fs::create_dir(&open).expect("dir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        match check_base(&open) {
            Err(DirError::UnsafeBase { path, problem }) => {
                assert_eq!(path, open.canonicalize().expect("real"));
                assert!(matches!(problem, Problem::Mode { mode: 0o777, .. }));
            }
            other => panic!("{other:?}"),
        }
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        check_base(&open).expect("sticky, like /tmp");
        check_base(Path::new("/tmp")).expect("/tmp");
    }

    #[test]
    fn a_tree_others_can_reach_is_named() {
        let t = private_tmp();
        check_closed_to_others(&t.path().join(".")).expect("below a 0700 directory");
        let open = tempfile::tempdir_in("/tmp").expect("tmp");
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let root = open.path().join("root");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        if check_closed_to_others(Path::new("/tmp")).is_ok() {
            eprintln!("skipped: / or /tmp is closed to others here");
            return;
        }
        let err = check_closed_to_others(&root).unwrap_err();
        assert!(
            err.to_string().contains(&root.display().to_string())
                && err.to_string().contains("other users can reach it"),
            "{err}"
        );
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        check_closed_to_others(&root).expect("closed above it");
    }

    #[test]
    fn a_link_is_not_opened_through() {
        let t = private_tmp();
        let target = t.path().join("precious");
        std::fs::write(&target, b"mine").expect("write");
        let link = t.path().join("host.log");
        std::os::unix::fs::symlink(&target, &link).expect("link");
        let err = open_no_follow(
            &link,
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true),
        )
        .unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&target).expect("read"), b"mine");
    }

    #[test]
    fn the_existing_part_of_a_path_is_the_base() {
        let t = private_tmp();
        let (base, rest) = split_existing(&t.path().join("a/b/c"));
        assert_eq!(
            (base.as_path(), rest.as_path()),
            (t.path(), Path::new("a/b/c"))
        );
        std::fs::create_dir_all(t.path().join("a/b/c")).expect("mkdir");
        let (base, rest) = split_existing(&t.path().join("a/b/c"));
        assert_eq!((base, rest), (t.path().join("a/b"), PathBuf::from("c")));
    }
}
