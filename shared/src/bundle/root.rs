//! Unpacking the root filesystem member (a tar, hostile until proven otherwise) into an empty
//! directory: every path relative and plain (no `..`, no `.`, no empty component), every parent
//! a directory this same archive made earlier (so nothing is reached through a symlink or an
//! earlier file), no name twice, hard links only to regular files made earlier. Owners, modes,
//! xattrs and device nodes as [`Owners`] says.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::BundleError;
use super::manifest::ROOTFS;
use super::owners::{override_value, Owners, OVERRIDE_STAT};
use super::tar::{Header, Kind, Reader};

/// Most entries a root may hold (the gateway's has about 60 000).
pub const MAX_ENTRIES: u64 = 4_000_000;

/// What an unpack could not carry over, for a warning.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RootSummary {
    pub entries: u64,
    /// xattrs outside `user.*` left out because the unpacking user may not set them.
    pub skipped_xattrs: u64,
}

/// Unpacks the tar read from `input` into `root` (an existing, empty directory of ours).
/// Stops at the archive's end marker; what follows it is the caller's.
pub fn unpack_root<R: Read>(
    input: R,
    root: &Path,
    owners: Owners,
) -> Result<(RootSummary, R), BundleError> {
    let mut u = Unpacker {
        root,
        owners,
        seen: HashSet::new(),
        dirs: HashSet::from([Vec::new()]),
        files: HashSet::new(),
        dir_meta: Vec::new(),
        summary: RootSummary::default(),
    };
    let mut tar = Reader::new(input);
    while let Some(h) = tar.next_entry().map_err(|source| BundleError::Tar {
        member: ROOTFS.into(),
        source,
    })? {
        u.summary.entries += 1;
        if u.summary.entries > MAX_ENTRIES {
            return Err(entry_err(
                &h.path,
                format!("more than {MAX_ENTRIES} entries"),
            ));
        }
        u.entry(&h, &mut tar)?;
    }
    // Parents last: a directory without write permission must not stop its children.
    for (path, h) in std::mem::take(&mut u.dir_meta).iter().rev() {
        u.meta(path, h)?;
    }
    Ok((u.summary, tar.into_inner()))
}

struct Unpacker<'a> {
    root: &'a Path,
    owners: Owners,
    seen: HashSet<Vec<u8>>,
    /// Directories made so far ("" is the root itself).
    dirs: HashSet<Vec<u8>>,
    /// Regular files made so far: the only hard link targets.
    files: HashSet<Vec<u8>>,
    dir_meta: Vec<(PathBuf, Header)>,
    summary: RootSummary,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, h: &Header, tar: &mut Reader<R>) -> Result<(), BundleError> {
        let name = normalize(&h.path).map_err(|what| entry_err(&h.path, what))?;
        if !self.seen.insert(name.clone()) {
            return Err(entry_err(&h.path, "a second entry of the same name"));
        }
        if name.is_empty() {
            // "." describes the root directory itself.
            if h.kind != Kind::Dir {
                return Err(entry_err(&h.path, "the root entry is not a directory"));
            }
            self.dir_meta.push((self.root.to_path_buf(), h.clone()));
            return Ok(());
        }
        let parent = name
            .iter()
            .rposition(|b| *b == b'/')
            .map_or(&name[..0], |i| &name[..i]);
        if !self.dirs.contains(parent) {
            return Err(entry_err(
                &h.path,
                "its parent is not a directory made earlier in the archive",
            ));
        }
        let path = self.root.join(OsStr::from_bytes(&name));
        let io = |e| BundleError::io("unpack", &path, e);
        match h.kind {
            Kind::Dir => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(io)?;
                self.dirs.insert(name);
                self.dir_meta.push((path, h.clone()));
                return Ok(());
            }
            Kind::File => {
                self.write_file(&path, h, tar)?;
                self.files.insert(name);
            }
            Kind::HardLink => {
                let target = normalize(&h.link).map_err(|what| entry_err(&h.path, what))?;
                if !self.files.contains(&target) {
                    return Err(entry_err(
                        &h.path,
                        "a hard link to something other than a regular file made earlier",
                    ));
                }
                let target = self.root.join(OsStr::from_bytes(&target));
                std::fs::hard_link(target, &path).map_err(io)?;
                return Ok(()); // the inode's metadata came with its first name
            }
            Kind::Symlink => {
                std::os::unix::fs::symlink(OsStr::from_bytes(&h.link), &path).map_err(io)?;
            }
            Kind::Char | Kind::Block | Kind::Fifo => self.make_node(&path, h)?,
        }
        self.meta(&path, h)
    }

    fn write_file<R: Read>(
        &self,
        path: &Path,
        h: &Header,
        tar: &mut Reader<R>,
    ) -> Result<(), BundleError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| BundleError::io("create", path, e))?;
        io::copy(&mut tar.body(), &mut file).map_err(|e| BundleError::Entry {
            member: ROOTFS.into(),
            entry: lossy(&h.path),
            what: format!("reading its content (truncated or damaged bundle): {e}"),
        })?;
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(h.mtime);
        file.set_modified(mtime)
            .map_err(|e| BundleError::io("set the time of", path, e))?;
        sync_file(&file, path)
    }

    fn make_node(&self, path: &Path, h: &Header) -> Result<(), BundleError> {
        let io = |e| BundleError::io("unpack", path, e);
        match self.owners {
            Owners::Real => {
                mknod(path, node_type(h.kind) | 0o600, makedev(h.dev.0, h.dev.1)).map_err(io)
            }
            // A regular file whose xattr (set in `meta`) says what it is, as libkrun's mknod
            // leaves one (Linux takes no user.* xattr on a real fifo or device node).
            Owners::Xattr => File::create_new(path).map(drop).map_err(io),
        }
    }

    /// Owner, mode and xattrs, in the order that keeps them: chown clears set-id bits and
    /// file capabilities, so it comes first.
    fn meta(&mut self, path: &Path, h: &Header) -> Result<(), BundleError> {
        let io = |what, e| BundleError::io(what, path, e);
        let is_link = h.kind == Kind::Symlink;
        match self.owners {
            Owners::Real => {
                std::os::unix::fs::lchown(path, Some(h.uid), Some(h.gid))
                    .map_err(|e| io("chown", e))?;
                if !is_link {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(h.mode))
                        .map_err(|e| io("chmod", e))?;
                }
            }
            Owners::Xattr => {
                let (own, st_mode) = match h.kind {
                    Kind::Dir => (0o700, h.mode & 0o7777),
                    Kind::Char | Kind::Block | Kind::Fifo => {
                        (0o600, node_type(h.kind) | (h.mode & 0o7777))
                    }
                    _ => (0o600, h.mode & 0o7777),
                };
                if !is_link {
                    let real = (h.mode & 0o777) | own;
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(real))
                        .map_err(|e| io("chmod", e))?;
                }
                let value = override_value(h.uid, h.gid, st_mode);
                match xattr::set(path, OVERRIDE_STAT, value.as_bytes()) {
                    Ok(()) => {}
                    // Linux allows no user.* xattr on a symlink; libkrun reads this one on
                    // macOS only, where symlinks take it.
                    Err(_) if is_link && cfg!(target_os = "linux") => {}
                    Err(e) => return Err(io("set the owner xattr on", e)),
                }
            }
        }
        for (name, value) in &h.xattrs {
            if self.owners == Owners::Xattr
                && (!name.starts_with(b"user.") || name == OVERRIDE_STAT.as_bytes())
            {
                self.summary.skipped_xattrs += 1;
                continue;
            }
            xattr::set(path, OsStr::from_bytes(name), value)
                .map_err(|e| io("set an xattr on", e))?;
        }
        Ok(())
    }
}

/// The archive path as a plain relative name without a trailing '/' ("" for "." or "./").
fn normalize(path: &[u8]) -> Result<Vec<u8>, String> {
    if path.first() == Some(&b'/') {
        return Err("an absolute path".into());
    }
    let trimmed = path.strip_prefix(b"./").unwrap_or(path);
    let trimmed = trimmed.strip_suffix(b"/").unwrap_or(trimmed);
    if trimmed == b"." || trimmed.is_empty() {
        return Ok(Vec::new());
    }
    for part in trimmed.split(|b| *b == b'/') {
        match part {
            b"" => return Err("an empty path component".into()),
            b"." | b".." => return Err(format!("a '{}' path component", lossy(part))),
            _ => {}
        }
    }
    Ok(trimmed.to_vec())
}

fn entry_err(path: &[u8], what: impl Into<String>) -> BundleError {
    BundleError::Entry {
        member: ROOTFS.into(),
        entry: lossy(path),
        what: what.into(),
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

/// The `st_mode` type bits of a node entry (`mode_t` is u16 on macOS).
#[allow(clippy::unnecessary_cast)]
fn node_type(kind: Kind) -> u32 {
    (match kind {
        Kind::Char => libc::S_IFCHR,
        Kind::Block => libc::S_IFBLK,
        _ => libc::S_IFIFO,
    }) as u32
}

fn mknod(path: &Path, mode: u32, dev: libc::dev_t) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, dev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Linux's device number encoding (the roots are built on Linux; only root unpacks real nodes).
#[allow(clippy::unnecessary_cast)]
fn makedev(major: u32, minor: u32) -> libc::dev_t {
    let (major, minor) = (u64::from(major), u64::from(minor));
    (((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12))
        as libc::dev_t
}

/// Regular files are fsynced one by one where there is no syncfs (macOS); on Linux the install
/// syncs the whole file system once at the end.
fn sync_file(file: &File, path: &Path) -> Result<(), BundleError> {
    if cfg!(target_os = "linux") {
        return Ok(());
    }
    file.sync_all()
        .map_err(|e| BundleError::io("fsync", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_escape_or_hide_are_refused() {
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert_eq!(normalize(b"etc/").unwrap(), b"etc");
        assert_eq!(normalize(b"./etc/passwd").unwrap(), b"etc/passwd");
        for bad in [&b"/etc"[..], b"../x", b"a/../../x", b"a//b", b"a/./b"] {
            assert!(normalize(bad).is_err(), "{}", lossy(bad));
        }
    }

    #[test]
    fn makedev_matches_linux() {
        assert_eq!(makedev(1, 3) as u64, 0x103);
        assert_eq!(
            makedev(259, 70000) as u64,
            (259 << 8) | (70000 & 0xff) | ((70000 & !0xff) << 12)
        );
    }
}
