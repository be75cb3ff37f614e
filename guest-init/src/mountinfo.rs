//! `/proc/self/mountinfo` read into entries: the one parser for the phases that look up what
//! is mounted and for the unmounting before power-off.

use std::path::Path;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u32,
    /// The device of the filesystem (`major:minor`); a bind mount shows its source's.
    pub dev: String,
    /// Where in its filesystem the mount starts (`/` unless a bind of a subdirectory).
    pub root: String,
    pub mount_point: String,
    pub fstype: String,
    /// The source as the filesystem names it (`/dev/vdb`, `overlay`, `proc`).
    pub source: String,
}

/// Parses mountinfo text; lines that do not parse are skipped. Entries keep the kernel's
/// order: a mount comes after the one it is mounted on.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let id = l.next()?.parse().ok()?;
    let _parent = l.next()?;
    let dev = l.next()?.to_string();
    let root = unescape(l.next()?);
    let mount_point = unescape(l.next()?);
    let mut r = right.split(' ');
    let fstype = r.next()?.to_string();
    let source = unescape(r.next().unwrap_or(""));
    Some(MountEntry {
        id,
        dev,
        root,
        mount_point,
        fstype,
        source,
    })
}

/// The calling thread's mount table (a thread may have a mount namespace of its own, which
/// `/proc/self` would not show).
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    std::fs::read_to_string("/proc/thread-self/mountinfo").map(|t| parse(&t))
}

/// Whether something is mounted on `path` (it is the root of a mount), from statx's
/// STATX_ATTR_MOUNT_ROOT (Linux 5.8): a lookup, where reading the table makes the kernel print
/// every mount, which under emulation costs more than a mount. `None` when the path cannot be
/// looked up or the kernel does not report the attribute; callers then read the table.
pub fn is_mount_point(path: &Path) -> Option<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: all-zero bytes are a valid statx (plain integers).
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and outlives the call; `buf` is a live statx the kernel
    // fills. A raw syscall: not every libc we link has a statx wrapper.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_statx,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            0u32,
            &mut buf as *mut libc::statx,
        )
    };
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    (rc == 0 && buf.stx_attributes_mask & bit != 0).then_some(buf.stx_attributes & bit != 0)
}

/// The topmost mount at `target`, if any.
pub fn find<'a>(entries: &'a [MountEntry], target: &Path) -> Option<&'a MountEntry> {
    let want = target.to_str()?;
    entries.iter().rev().find(|e| e.mount_point == want)
}

/// Runs `f` on a thread of its own in a private mount namespace (no propagation to the
/// host's), for tests that mount; `None`, said on stderr, where none can be made.
#[cfg(test)]
pub fn in_private_mount_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        use nix::mount::MsFlags;
        use nix::sched::{unshare, CloneFlags};
        let private = unshare(CloneFlags::CLONE_NEWNS).and_then(|()| {
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
        });
        if let Err(e) = private {
            eprintln!("skipped: no private mount namespace here ({e}; needs root)");
            return None;
        }
        Some(f())
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_point_is_told_from_a_plain_directory() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(is_mount_point(dir.path()), Some(false));
        assert_eq!(is_mount_point(Path::new("/")), Some(true));
        assert_eq!(is_mount_point(&dir.path().join("missing")), None);
        let target = dir.path().to_path_buf();
        let seen = in_private_mount_ns(move || {
            nix::mount::mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .expect("mount tmpfs");
            let on = is_mount_point(&target);
            // A bind of a directory of the same filesystem is a mount root too.
            let sub = target.join("sub");
            std::fs::create_dir(&sub).expect("mkdir");
            nix::mount::mount(
                Some(&target),
                &sub,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .expect("bind");
            (on, is_mount_point(&sub))
        });
        if let Some(seen) = seen {
            assert_eq!(seen, (Some(true), Some(true)));
        }
    }

    #[test]
    fn lines_parse_with_escapes_and_optional_fields() {
        let text = "22 1 0:21 / /proc rw,nosuid shared:5 - proc proc rw\n\
                    30 22 254:16 /state/k3s-agent /var/lib/my\\040dir rw,noatime - ext4 /dev/vdb rw\n\
                    garbage\n";
        let e = parse(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].fstype, "proc");
        assert_eq!(e[1].id, 30);
        assert_eq!(e[1].dev, "254:16");
        assert_eq!(e[1].root, "/state/k3s-agent");
        assert_eq!(e[1].mount_point, "/var/lib/my dir");
        assert_eq!(e[1].source, "/dev/vdb");
        assert_eq!(
            find(&e, Path::new("/var/lib/my dir")).map(|m| m.id),
            Some(30)
        );
        assert_eq!(find(&e, Path::new("/sys")), None);
    }

    #[test]
    fn this_process_has_a_root_mount() {
        let entries = read().expect("mountinfo");
        assert!(entries.iter().any(|e| e.mount_point == "/"), "{entries:?}");
    }
}
