//! Removal under a trusted root that never follows a link, for the cleanup phases. Every path is
//! walked from the root's descriptor one component at a time (`openat` with `O_NOFOLLOW |
//! O_DIRECTORY`) and every entry goes with `unlinkat` relative to its parent's descriptor, so a
//! link planted anywhere (a component of a cleanup path, or an entry inside a tree) can neither
//! point a cleanup outside its trees nor be swapped in between a check and the removal.
//!
//! A link inside a tree is removed as a link. A link (or a file) where a cleanup path expects a
//! directory stops that path: nothing beyond it is touched, and the link is recorded
//! ([`Root::refused`]) for the phase to report.

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Trees deeper than this are refused: a hostile one must not exhaust descriptors or stack.
pub const MAX_DEPTH: usize = 256;

#[derive(Debug, thiserror::Error)]
#[error("cannot remove {path}: {source}")]
pub struct CleanupError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl CleanupError {
    fn new(path: PathBuf, errno: Errno) -> Self {
        Self {
            path,
            source: std::io::Error::from(errno),
        }
    }
}

/// A directory reached from the root without crossing a link, and its host path for errors.
pub struct Dir {
    fd: OwnedFd,
    pub path: PathBuf,
}

impl Dir {
    /// A path naming `name` inside this directory through its descriptor (`/proc/self/fd/N/name`),
    /// for calls that take only paths (umount): whatever replaces the directory meanwhile, the
    /// path still leads into this one.
    pub fn fd_path(&self, name: &OsStr) -> PathBuf {
        Path::new(&format!("/proc/self/fd/{}", self.fd.as_raw_fd())).join(name)
    }

    /// The names inside, `.` and `..` left out.
    pub fn names(&self) -> Result<Vec<OsString>, CleanupError> {
        let err = |e| CleanupError::new(self.path.clone(), e);
        let dup = nix::unistd::dup(self.fd.as_raw_fd()).map_err(err)?;
        let mut listing = nix::dir::Dir::from_fd(dup).map_err(err)?;
        let mut names = Vec::new();
        for entry in listing.iter() {
            let name = entry.map_err(err)?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(<OsString as std::os::unix::ffi::OsStringExt>::from_vec(
                    name,
                ));
            }
        }
        Ok(names)
    }

    /// Removes `name` (file, link, or directory tree) and returns how many entries went; a
    /// missing one removes nothing.
    pub fn remove(&self, name: &OsStr) -> Result<usize, CleanupError> {
        self.remove_at(name, 0)
    }

    /// Removes everything inside and returns how many entries went.
    pub fn empty(&self) -> Result<usize, CleanupError> {
        self.empty_at(0)
    }

    fn empty_at(&self, depth: usize) -> Result<usize, CleanupError> {
        let mut count = 0;
        for name in self.names()? {
            count += self.remove_at(&name, depth)?;
        }
        Ok(count)
    }

    fn remove_at(&self, name: &OsStr, depth: usize) -> Result<usize, CleanupError> {
        let path = self.path.join(name);
        // Twice at most: a directory swapped for a link between the two calls is unlinked then.
        for _ in 0..2 {
            match unlinkat(Some(self.raw()), name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) => return Ok(1),
                Err(Errno::ENOENT) => return Ok(0),
                Err(Errno::EISDIR) => {}
                Err(e) => return Err(CleanupError::new(path, e)),
            }
            let sub = match self.open_dir(name) {
                Ok(sub) => sub,
                Err(Errno::ENOENT) => return Ok(0),
                Err(Errno::ELOOP | Errno::ENOTDIR) => continue,
                Err(e) => return Err(CleanupError::new(path, e)),
            };
            if depth >= MAX_DEPTH {
                return Err(CleanupError {
                    path,
                    source: std::io::Error::other(format!(
                        "more than {MAX_DEPTH} levels deep: not removed"
                    )),
                });
            }
            let count = sub.empty_at(depth + 1)?;
            return match unlinkat(Some(self.raw()), name, UnlinkatFlags::RemoveDir) {
                Ok(()) => Ok(count + 1),
                Err(Errno::ENOENT) => Ok(count),
                Err(e) => Err(CleanupError::new(path, e)),
            };
        }
        Err(CleanupError::new(path, Errno::EAGAIN))
    }

    /// Removes every non-directory entry below whose name `matches`, descending into real
    /// directories only; returns how many went.
    pub fn remove_matching(&self, matches: &dyn Fn(&OsStr) -> bool) -> Result<usize, CleanupError> {
        self.remove_matching_at(matches, 0)
    }

    fn remove_matching_at(
        &self,
        matches: &dyn Fn(&OsStr) -> bool,
        depth: usize,
    ) -> Result<usize, CleanupError> {
        let mut count = 0;
        for name in self.names()? {
            match self.open_dir(&name) {
                Ok(sub) if depth < MAX_DEPTH => {
                    count += sub.remove_matching_at(matches, depth + 1)?
                }
                Ok(_) => {}
                Err(_) if matches(&name) => {
                    match unlinkat(
                        Some(self.raw()),
                        name.as_os_str(),
                        UnlinkatFlags::NoRemoveDir,
                    ) {
                        Ok(()) => count += 1,
                        Err(Errno::ENOENT | Errno::EISDIR) => {}
                        Err(e) => return Err(CleanupError::new(self.path.join(&name), e)),
                    }
                }
                Err(_) => {}
            }
        }
        Ok(count)
    }

    /// The directory `name` inside this one, never through a link.
    fn open_dir(&self, name: &OsStr) -> Result<Dir, Errno> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(Some(self.raw()), name, flags, Mode::empty())?;
        Ok(Dir {
            // SAFETY: openat just returned this descriptor; nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: self.path.join(name),
        })
    }

    /// Whether `name` is a symbolic link (not followed).
    fn is_link(&self, name: &OsStr) -> bool {
        fstatat(
            Some(self.raw()),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Where a walk along a cleanup path ended.
pub enum Walk {
    Dir(Dir),
    /// Some component does not exist.
    Missing,
    /// Some component is a link or not a directory: not crossed.
    Blocked,
}

/// Whether `p` is a directory and not a link (by its last component: for paths the caller
/// built under a directory it trusts, such as the state disk's own mount).
pub fn is_real_dir(p: &Path) -> bool {
    p.symlink_metadata().is_ok_and(|m| m.is_dir())
}

/// Removes `path` (file, link or tree) relative to its parent's descriptor, never following a
/// link inside it; the parent is trusted (the caller built it). Returns how many entries went;
/// a missing path, or a missing parent, removes nothing.
pub fn remove_tree(path: &Path) -> Result<usize, CleanupError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(0);
    };
    // Nothing there is nothing to do, also on a read-only filesystem (where unlinkat of a
    // missing name fails with EROFS, not ENOENT).
    match path.symlink_metadata() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        _ => {}
    }
    match Root::open(parent) {
        Ok(root) => root.top.remove(name),
        Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// The trusted directory every cleanup path is walked from, and the links it refused to cross.
pub struct Root {
    top: Dir,
    refused: RefCell<Vec<String>>,
}

impl Root {
    /// Opens `path` (trusted: it is the root the phase was given) as the walks' starting point.
    pub fn open(path: &Path) -> Result<Self, CleanupError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::open(path, flags, Mode::empty())
            .map_err(|e| CleanupError::new(path.to_path_buf(), e))?;
        Ok(Self {
            top: Dir {
                // SAFETY: open just returned this descriptor; nothing else owns it.
                fd: unsafe { OwnedFd::from_raw_fd(fd) },
                path: path.to_path_buf(),
            },
            refused: RefCell::new(Vec::new()),
        })
    }

    /// The guest paths of links a walk met where it needed a directory, in order.
    pub fn refused(&self) -> Vec<String> {
        self.refused.borrow().clone()
    }

    /// Walks to the directory at `guest_path` (e.g. `/var/lib/cni/networks`) component by
    /// component. A link on the way is recorded in [`Root::refused`].
    pub fn dir(&self, guest_path: &str) -> Result<Walk, CleanupError> {
        let mut walked = String::new();
        let mut at: Option<Dir> = None;
        for comp in components(guest_path) {
            let parent = at.as_ref().unwrap_or(&self.top);
            walked.push('/');
            walked.push_str(comp);
            match parent.open_dir(OsStr::new(comp)) {
                Ok(next) => at = Some(next),
                Err(Errno::ENOENT) => return Ok(Walk::Missing),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    if parent.is_link(OsStr::new(comp)) {
                        self.refused.borrow_mut().push(walked);
                    }
                    return Ok(Walk::Blocked);
                }
                Err(e) => return Err(CleanupError::new(parent.path.join(comp), e)),
            }
        }
        Ok(match at {
            Some(dir) => Walk::Dir(dir),
            None => Walk::Dir(Dir {
                fd: self.top.fd.try_clone().map_err(|source| CleanupError {
                    path: self.top.path.clone(),
                    source,
                })?,
                path: self.top.path.clone(),
            }),
        })
    }

    /// Whether `guest_path` is a directory reached without crossing a link.
    pub fn is_dir(&self, guest_path: &str) -> Result<bool, CleanupError> {
        Ok(matches!(self.dir(guest_path)?, Walk::Dir(_)))
    }

    /// Removes the entry at `guest_path` (file, link or tree); returns how many entries went.
    pub fn remove(&self, guest_path: &str) -> Result<usize, CleanupError> {
        let (parent, name) = split(guest_path);
        match self.dir(parent)? {
            Walk::Dir(dir) => match name {
                Some(name) => dir.remove(OsStr::new(name)),
                None => Ok(0),
            },
            Walk::Missing | Walk::Blocked => Ok(0),
        }
    }

    /// Removes what is inside the directory at `guest_path`; the directory stays. A link or
    /// file in its place is removed as such, never followed.
    pub fn empty(&self, guest_path: &str) -> Result<usize, CleanupError> {
        let (parent, name) = split(guest_path);
        let (Walk::Dir(parent), Some(name)) = (self.dir(parent)?, name) else {
            return Ok(0);
        };
        match parent.open_dir(OsStr::new(name)) {
            Ok(dir) => dir.empty(),
            Err(Errno::ENOENT) => Ok(0),
            Err(Errno::ELOOP | Errno::ENOTDIR) => parent.remove(OsStr::new(name)),
            Err(e) => Err(CleanupError::new(parent.path.join(name), e)),
        }
    }

    /// Creates the directory at `guest_path` and any missing parents (mode 0755), never
    /// through a link: a link on the way is an error naming it.
    pub fn create_dirs(&self, guest_path: &str) -> Result<(), CleanupError> {
        let mut at: Option<Dir> = None;
        for comp in components(guest_path) {
            let parent = at.as_ref().unwrap_or(&self.top);
            let name = OsStr::new(comp);
            match mkdirat(Some(parent.raw()), name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(CleanupError::new(parent.path.join(comp), e)),
            }
            let next = parent.open_dir(name).map_err(|e| {
                let path = parent.path.join(comp);
                match e {
                    Errno::ELOOP | Errno::ENOTDIR => CleanupError {
                        path,
                        source: std::io::Error::other("a link or file, not a directory"),
                    },
                    e => CleanupError::new(path, e),
                }
            })?;
            at = Some(next);
        }
        Ok(())
    }
}

/// The components of a guest path; `.`, `..` and empty ones are dropped (a cleanup path never
/// climbs).
fn components(guest_path: &str) -> impl Iterator<Item = &str> {
    guest_path
        .split('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
}

/// A guest path's parent and last component (`None` for the root itself).
fn split(guest_path: &str) -> (&str, Option<&str>) {
    let trimmed = guest_path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some((parent, name)) if !name.is_empty() && name != "." && name != ".." => {
            (parent, Some(name))
        }
        Some(_) => (trimmed, None),
        None if trimmed.is_empty() || trimmed == "." || trimmed == ".." => ("", None),
        None => ("", Some(trimmed)),
    }
}

/// Whether `name` ends in `.sock`.
pub fn is_socket_name(name: &OsStr) -> bool {
    name.as_bytes().ends_with(b".sock") && name.len() > 5
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn root(t: &tempfile::TempDir) -> Root {
        Root::open(t.path()).expect("root")
    }

    #[test]
    fn a_missing_path_removes_nothing() {
        let t = tempfile::tempdir().expect("tmp");
        let r = root(&t);
        assert_eq!(r.remove("/none").expect("missing"), 0);
        assert_eq!(r.empty("/none/deeper").expect("missing"), 0);
        assert!(!r.is_dir("/none").expect("walk"));
        assert!(r.refused().is_empty());
    }

    #[test]
    fn trees_are_counted_and_links_removed_as_links() {
        let t = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("kept"), "mine").expect("write");
        let dir = t.path().join("dir");
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("sub/f"), "x").expect("write");
        std::os::unix::fs::symlink(outside.path(), dir.join("link")).expect("link");
        let r = root(&t);
        // sub/f, sub, link: emptied, the directory stays.
        assert_eq!(r.empty("/dir").expect("empty"), 3);
        assert!(r.is_dir("/dir").expect("walk"));
        assert_eq!(std::fs::read_dir(&dir).expect("ls").count(), 0);
        assert!(outside.path().join("kept").exists());
        // A link in the directory's place goes as a link.
        std::fs::remove_dir(&dir).expect("rmdir");
        std::os::unix::fs::symlink(outside.path(), &dir).expect("link");
        assert!(!r.is_dir("/dir").expect("walk"));
        assert_eq!(r.refused(), ["/dir"], "the walk met the link");
        assert_eq!(r.empty("/dir").expect("link"), 1);
        assert!(dir.symlink_metadata().is_err());
        assert!(outside.path().join("kept").exists());
    }

    /// A link as a component of the path: nothing beyond it is touched, and it is named.
    #[test]
    fn a_link_on_the_way_stops_the_walk_and_is_recorded() {
        let t = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("outside");
        std::fs::create_dir_all(outside.path().join("lib/cni/networks")).expect("mkdir");
        std::fs::write(outside.path().join("lib/cni/networks/lease"), "x").expect("write");
        std::fs::create_dir(t.path().join("var")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path().join("lib"), t.path().join("var/lib"))
            .expect("link");
        let r = root(&t);
        assert_eq!(r.empty("/var/lib/cni/networks").expect("empty"), 0);
        assert_eq!(r.remove("/var/lib/cni/networks/lease").expect("remove"), 0);
        assert_eq!(r.refused(), ["/var/lib", "/var/lib"]);
        assert!(outside.path().join("lib/cni/networks/lease").exists());
        let err = r.create_dirs("/var/lib/x").expect_err("through a link");
        assert!(err.to_string().contains("var/lib"), "{err}");
        assert!(!outside.path().join("lib/x").exists());
    }

    #[test]
    fn sockets_by_name_below_real_directories_only() {
        let t = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("theirs.sock"), "").expect("write");
        let run = t.path().join("run");
        std::fs::create_dir_all(run.join("a/b")).expect("mkdir");
        for f in [
            "x.sock",
            "a/y.sock",
            "a/b/z.sock",
            "a/keep",
            ".sock",
            "a/b/sock",
        ] {
            std::fs::write(run.join(f), "").expect("write");
        }
        std::fs::create_dir(run.join("dir.sock")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), run.join("a/out")).expect("link");
        let r = root(&t);
        let Walk::Dir(dir) = r.dir("/run").expect("walk") else {
            panic!("no /run")
        };
        assert_eq!(dir.remove_matching(&is_socket_name).expect("sockets"), 3);
        assert!(run.join("a/keep").exists() && run.join(".sock").exists());
        assert!(run.join("a/b/sock").exists() && run.join("dir.sock").is_dir());
        assert!(outside.path().join("theirs.sock").exists());
    }

    #[test]
    fn a_tree_deeper_than_the_limit_is_refused_by_name() {
        let t = tempfile::tempdir().expect("tmp");
        let mut deep = t.path().join("top");
        for _ in 0..=MAX_DEPTH + 1 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).expect("mkdir");
        let err = root(&t).remove("/top").expect_err("too deep");
        assert!(err.to_string().contains("levels deep"), "{err}");
    }

    /// What a directory holds, links and all, without following any: kind, content or target.
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
        let mut seen = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("ls") {
                let p = e.expect("entry").path();
                let meta = p.symlink_metadata().expect("meta");
                let what = if meta.file_type().is_symlink() {
                    format!("link {}", std::fs::read_link(&p).expect("link").display())
                } else if meta.is_dir() {
                    stack.push(p.clone());
                    "dir".into()
                } else {
                    format!("file {:?}", std::fs::read(&p).expect("read"))
                };
                seen.insert(p.strip_prefix(dir).expect("inside").to_path_buf(), what);
            }
        }
        seen
    }

    /// One planted entry: where (names from a small set, so paths collide and nest) and what.
    fn entry() -> impl Strategy<Value = (Vec<usize>, u8)> {
        (proptest::collection::vec(0usize..3, 1..6), 0u8..5)
    }

    const NAMES: [&str; 3] = ["x", "y", "lib"];

    /// Plants `what` at `rel` unless something that is not a directory is already on the way.
    fn plant(base: &Path, rel: &[usize], what: u8, outside: &Path) {
        let mut p = base.to_path_buf();
        for (i, n) in rel.iter().enumerate() {
            p.push(NAMES[*n]);
            let last = i + 1 == rel.len();
            match p.symlink_metadata() {
                Ok(m) if m.is_dir() && !last => continue,
                Ok(_) => return,
                Err(_) if !last => std::fs::create_dir(&p).expect("mkdir"),
                Err(_) => {}
            }
        }
        match what {
            0 => std::fs::write(&p, b"inside").expect("write"),
            1 => std::fs::create_dir(&p).expect("mkdir"),
            2 => std::os::unix::fs::symlink(outside, &p).expect("link"),
            3 => std::os::unix::fs::symlink(outside.join("lib/file"), &p).expect("link"),
            _ => std::os::unix::fs::symlink("../../../../..", &p).expect("link"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Trees with links to outside directories planted at random depths, inside the tree
        /// and in place of any component of the cleanup path: after the cleanup the outside
        /// directories are byte for byte what they were, and the tree is gone or empty unless
        /// a link on the path stopped the walk (then it is named).
        #[test]
        fn nothing_outside_the_intended_tree_is_touched(
            entries in proptest::collection::vec(entry(), 0..24),
            planted in proptest::option::of(0usize..4),
            empty in any::<bool>(),
        ) {
            let outside = tempfile::tempdir().expect("outside");
            // What a followed link would find: the same names the cleanup looks for.
            for rel in ["lib/file", "x/lib/file", "var/lib/cni/networks/lease"] {
                let p = outside.path().join(rel);
                std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
                std::fs::write(&p, b"precious").expect("write");
            }
            let before = snapshot(outside.path());
            let t = tempfile::tempdir().expect("root");
            let path = ["var", "lib", "cni", "networks"];
            let target = t.path().join(path.join("/"));
            std::fs::create_dir_all(&target).expect("mkdir");
            for (rel, what) in &entries {
                plant(&target, rel, *what, outside.path());
            }
            if let Some(at) = planted {
                let comp: PathBuf = path[..=at].iter().collect();
                let p = t.path().join(&comp);
                std::fs::remove_dir_all(&p).expect("rm");
                // Followed, it would lead to the same path outside, with a lease in it.
                std::os::unix::fs::symlink(outside.path().join(&comp), &p).expect("link");
            }
            let r = Root::open(t.path()).expect("root");
            let guest = "/var/lib/cni/networks";
            if empty { r.empty(guest).expect("empty"); } else { r.remove(guest).expect("remove"); }
            prop_assert_eq!(snapshot(outside.path()), before);
            match planted {
                // The last component a link: removed as a link, nothing followed.
                Some(3) => prop_assert!(target.symlink_metadata().is_err()),
                Some(at) => {
                    let comp = format!("/{}", path[..=at].join("/"));
                    prop_assert_eq!(r.refused(), vec![comp]);
                }
                None if empty => prop_assert_eq!(std::fs::read_dir(&target).expect("ls").count(), 0),
                None => prop_assert!(target.symlink_metadata().is_err()),
            }
        }
    }
}
