//! A directory tree copied with everything containerd's snapshots and k3s's state depend on:
//! file types (overlay whiteouts are character devices 0:0), hard links, owners, modes (set-id
//! bits after the owner, which would clear them), extended attributes (overlay's `trusted.*`,
//! file capabilities, ACLs) and times. Links are copied as links and never followed. Sockets
//! are skipped and counted: they belong to the process that made them.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::AtFlags;
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}: {source}")]
pub struct CopyError {
    pub path: PathBuf,
    pub what: &'static str,
    pub source: std::io::Error,
}

/// What a copy made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub entries: u64,
    pub bytes: u64,
    pub sockets_skipped: u64,
}

impl std::ops::AddAssign for Copied {
    fn add_assign(&mut self, o: Copied) {
        self.entries += o.entries;
        self.bytes += o.bytes;
        self.sockets_skipped += o.sockets_skipped;
    }
}

fn err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> CopyError {
    let path = path.to_path_buf();
    move |source| CopyError { path, what, source }
}

fn errno(path: &Path, what: &'static str) -> impl FnOnce(nix::errno::Errno) -> CopyError {
    let path = path.to_path_buf();
    move |e| CopyError {
        path,
        what,
        source: e.into(),
    }
}

/// Copies the directory `src` to `dst`, which must not exist.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<Copied, CopyError> {
    let mut c = Copier::default();
    let meta = src.symlink_metadata().map_err(err(src, "stat"))?;
    c.dir(src, dst, &meta)?;
    Ok(c.copied)
}

#[derive(Default)]
struct Copier {
    copied: Copied,
    /// The first copy of each multiply-linked inode, by (device, inode).
    links: BTreeMap<(u64, u64), PathBuf>,
}

impl Copier {
    fn dir(&mut self, src: &Path, dst: &Path, meta: &std::fs::Metadata) -> Result<(), CopyError> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dst)
            .map_err(err(dst, "create directory"))?;
        self.copied.entries += 1;
        let mut names: Vec<_> = std::fs::read_dir(src)
            .map_err(err(src, "list"))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(err(src, "list"))?;
        names.sort();
        for name in names {
            self.entry(&src.join(&name), &dst.join(&name))?;
        }
        // After the contents: their creation would change the directory's times.
        finish(src, dst, meta)
    }

    fn entry(&mut self, src: &Path, dst: &Path) -> Result<(), CopyError> {
        let meta = src.symlink_metadata().map_err(err(src, "stat"))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return self.dir(src, dst, &meta);
        }
        if meta.nlink() > 1 {
            if let Some(first) = self.links.get(&(meta.dev(), meta.ino())) {
                std::fs::hard_link(first, dst).map_err(err(dst, "link"))?;
                self.copied.entries += 1;
                return Ok(());
            }
        }
        let kind = SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
        if kind == SFlag::S_IFSOCK {
            self.copied.sockets_skipped += 1;
            return Ok(());
        }
        if ft.is_file() {
            self.copied.bytes += file(src, dst)?;
        } else if ft.is_symlink() {
            let to = std::fs::read_link(src).map_err(err(src, "read link"))?;
            std::os::unix::fs::symlink(&to, dst).map_err(err(dst, "create link"))?;
        } else {
            let perm = Mode::from_bits_truncate(meta.mode() & 0o7777);
            nix::sys::stat::mknod(dst, kind, perm, meta.rdev()).map_err(errno(dst, "mknod"))?;
        }
        finish(src, dst, &meta)?;
        self.copied.entries += 1;
        if meta.nlink() > 1 {
            self.links
                .insert((meta.dev(), meta.ino()), dst.to_path_buf());
        }
        Ok(())
    }
}

/// Copies a regular file's bytes into a new file; returns how many.
fn file(src: &Path, dst: &Path) -> Result<u64, CopyError> {
    let mut from = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(src)
        .map_err(err(src, "open"))?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(err(dst, "create"))?;
    std::io::copy(&mut from, &mut to).map_err(err(dst, "copy"))
}

/// Owner, extended attributes, mode and times of `src` onto `dst`, in that order: a change of
/// owner clears set-id bits and file capabilities, so those come after it.
fn finish(src: &Path, dst: &Path, meta: &std::fs::Metadata) -> Result<(), CopyError> {
    let link = meta.file_type().is_symlink();
    nix::unistd::fchownat(
        None,
        dst,
        Some(Uid::from_raw(meta.uid())),
        Some(Gid::from_raw(meta.gid())),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(errno(dst, "set owner"))?;
    copy_xattrs(src, dst)?;
    if !link {
        nix::sys::stat::fchmodat(
            None,
            dst,
            Mode::from_bits_truncate(meta.mode() & 0o7777),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(errno(dst, "set mode"))?;
    }
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    nix::sys::stat::utimensat(None, dst, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
        .map_err(errno(dst, "set times"))
}

fn c_path(p: &Path) -> Result<CString, CopyError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| CopyError {
        path: p.to_path_buf(),
        what: "path",
        source: std::io::ErrorKind::InvalidInput.into(),
    })
}

/// Every extended attribute of `src` (not following a link) onto `dst`. A source filesystem
/// without attributes has none to copy.
fn copy_xattrs(src: &Path, dst: &Path) -> Result<(), CopyError> {
    let (s, d) = (c_path(src)?, c_path(dst)?);
    let names = xattr_call(|buf, len| {
        // SAFETY: `s` is a NUL-terminated path; the kernel writes at most `len` bytes to `buf`.
        unsafe { libc::llistxattr(s.as_ptr(), buf.cast(), len) }
    });
    let names = match names {
        Ok(n) => n,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP)) => return Ok(()),
        Err(e) => return Err(err(src, "list extended attributes")(e)),
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).unwrap_or_default();
        let value = xattr_call(|buf, len| {
            // SAFETY: as above, with a NUL-terminated attribute name.
            unsafe { libc::lgetxattr(s.as_ptr(), cname.as_ptr(), buf.cast(), len) }
        })
        .map_err(err(src, "read extended attribute"))?;
        // SAFETY: paths and name are NUL-terminated; `value` is read for its length.
        let rc = unsafe {
            libc::lsetxattr(
                d.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let shown = OsStr::from_bytes(name).to_string_lossy().into_owned();
            return Err(CopyError {
                path: dst.join(format!("[xattr {shown}]")),
                what: "write extended attribute",
                source: e,
            });
        }
    }
    Ok(())
}

/// Calls a list/get xattr function twice: for the size, then for the bytes (again when the
/// value grew in between).
fn xattr_call(f: impl Fn(*mut u8, usize) -> isize) -> std::io::Result<Vec<u8>> {
    loop {
        let size = f(std::ptr::null_mut(), 0);
        if size < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        let got = f(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn xattr_of(p: &Path, name: &str) -> Option<Vec<u8>> {
        let (s, n) = (c_path(p).ok()?, CString::new(name).ok()?);
        xattr_call(|buf, len| unsafe { libc::lgetxattr(s.as_ptr(), n.as_ptr(), buf.cast(), len) })
            .ok()
    }

    fn set_xattr(p: &Path, name: &str, v: &[u8]) -> bool {
        let (s, n) = (c_path(p).expect("path"), CString::new(name).expect("name"));
        unsafe { libc::lsetxattr(s.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) == 0 }
    }

    /// A tree like a containerd snapshot's, on this machine's filesystems: every kind of entry
    /// and every piece of metadata arrives; the source is untouched.
    #[test]
    fn everything_a_snapshot_holds_is_copied() {
        let t = tempfile::tempdir().expect("tmp");
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("a/b")).expect("mkdir");
        std::fs::write(src.join("a/b/file"), b"hello").expect("write");
        std::fs::set_permissions(
            src.join("a/b/file"),
            std::fs::Permissions::from_mode(0o4750),
        )
        .expect("chmod");
        std::fs::hard_link(src.join("a/b/file"), src.join("a/hard")).expect("hard link");
        std::os::unix::fs::symlink("/etc/passwd", src.join("a/link")).expect("symlink");
        std::fs::set_permissions(src.join("a"), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        let root = nix::unistd::geteuid().is_root();
        if root {
            // An overlay whiteout, and a file owned by someone else.
            nix::sys::stat::mknod(&src.join("wh"), SFlag::S_IFCHR, Mode::empty(), 0)
                .expect("whiteout");
            nix::unistd::chown(
                &src.join("a/b/file"),
                Some(Uid::from_raw(1234)),
                Some(Gid::from_raw(99)),
            )
            .expect("chown");
            std::fs::set_permissions(
                src.join("a/b/file"),
                std::fs::Permissions::from_mode(0o4750),
            )
            .expect("chmod");
        }
        let xattrs = set_xattr(&src.join("a/b/file"), "user.osh", b"v1")
            & (!root || set_xattr(&src.join("a"), "trusted.overlay.opaque", b"y"));
        let sock = std::os::unix::net::UnixListener::bind(src.join("sock")).expect("socket");
        let old = filetime(&src.join("a/b/file"));
        let copied = copy_tree(&src, &t.path().join("dst")).expect("copy");
        drop(sock);
        let dst = t.path().join("dst");
        assert_eq!(std::fs::read(dst.join("a/b/file")).expect("read"), b"hello");
        assert_eq!(copied.bytes, 5);
        assert_eq!(copied.sockets_skipped, 1);
        assert_eq!(copied.entries, if root { 7 } else { 6 });
        let m = std::fs::metadata(dst.join("a/b/file")).expect("meta");
        assert_eq!(m.mode() & 0o7777, 0o4750);
        assert_eq!(m.nlink(), 2, "hard link kept");
        assert_eq!(
            m.ino(),
            std::fs::metadata(dst.join("a/hard")).expect("meta").ino()
        );
        assert_eq!(filetime(&dst.join("a/b/file")), old);
        assert_eq!(
            std::fs::read_link(dst.join("a/link")).expect("link"),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            std::fs::metadata(dst.join("a")).expect("meta").mode() & 0o7777,
            0o711
        );
        assert!(!dst.join("sock").exists());
        if root {
            assert_eq!((m.uid(), m.gid()), (1234, 99));
            let wh = std::fs::symlink_metadata(dst.join("wh")).expect("whiteout");
            assert_eq!((wh.mode() & libc::S_IFMT, wh.rdev()), (libc::S_IFCHR, 0));
        }
        if xattrs {
            assert_eq!(
                xattr_of(&dst.join("a/b/file"), "user.osh").as_deref(),
                Some(&b"v1"[..])
            );
            if root {
                assert_eq!(
                    xattr_of(&dst.join("a"), "trusted.overlay.opaque").as_deref(),
                    Some(&b"y"[..])
                );
            }
        } else {
            eprintln!("extended attributes not checked: this filesystem has none");
        }
    }

    #[test]
    fn errors_name_the_path_and_step() {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(t.path().join("src")).expect("mkdir");
        std::fs::create_dir(t.path().join("dst")).expect("mkdir");
        let e = copy_tree(&t.path().join("src"), &t.path().join("dst")).unwrap_err();
        assert_eq!(e.path, t.path().join("dst"));
        assert!(e.to_string().contains("create directory"), "{e}");
        let e = copy_tree(&t.path().join("none"), &t.path().join("d2")).unwrap_err();
        assert!(e.to_string().contains("stat"), "{e}");
    }

    fn filetime(p: &Path) -> (i64, i64) {
        let m = std::fs::symlink_metadata(p).expect("meta");
        (m.mtime(), m.mtime_nsec())
    }
}
