//! The overlay check that proves what containerd's overlayfs snapshotter will do: an overlay
//! with two lower layers and its upper and work directories in the snapshotter's own directory
//! (on the state disk when one is bound there), written through (a file created, a lower file
//! deleted, which leaves a whiteout in the upper layer) and unmounted; and directory entries
//! that carry their type (d_type), without which containerd refuses the snapshotter. Finding
//! `overlay` in /proc/filesystems proves none of this: virtio-fs has the filesystem type and
//! still fails as an upper directory.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

use crate::remove::remove_tree;

/// The probe's directory inside the snapshotter's; removed after each check.
const PROBE: &str = ".openshell-overlay-probe";

/// A filesystem's name from its statfs magic, for the report.
pub fn fs_name(dir: &Path) -> String {
    #[allow(clippy::unnecessary_cast)] // the type's width differs between libcs
    let magic = match nix::sys::statfs::statfs(dir) {
        Ok(s) => s.filesystem_type().0 as i64,
        Err(e) => return format!("unknown ({e})"),
    };
    match magic {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x6573_5546 => "virtiofs/fuse".into(),
        0x794C_7630 => "overlay".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        other => format!("filesystem type {other:#x}"),
    }
}

/// Checks that an overlay with its upper directory under `dir` works as containerd will use
/// it. `Err` names the step that failed and the error.
pub fn check(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create the directory: {e}"))?;
    let probe = dir.join(PROBE);
    remove_tree(&probe).map_err(|e| format!("remove an earlier probe: {e}"))?;
    let merged = probe.join("merged");
    let result = exercise(&probe, &merged);
    // Whatever happened: nothing mounted, nothing left behind.
    let _ = nix::mount::umount2(&merged, MntFlags::MNT_DETACH);
    let cleaned = remove_tree(&probe);
    result?;
    cleaned
        .map(|_| ())
        .map_err(|e| format!("remove the probe: {e}"))
}

fn exercise(probe: &Path, merged: &Path) -> Result<(), String> {
    let step = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    for d in ["lower1/dir", "lower2", "upper", "work", "merged"] {
        std::fs::create_dir_all(probe.join(d)).map_err(step("create the probe directories"))?;
    }
    std::fs::write(probe.join("lower1/gone"), b"lower").map_err(step("write a lower file"))?;
    check_d_type(probe)?;
    let p = |d: &str| probe.join(d).display().to_string();
    // `volatile`: unmounting an overlay otherwise syncs its upper filesystem, a flush of the
    // whole disk to the host at every boot for a probe whose files are deleted right after.
    // What is checked (whiteouts, xattrs, d_type) is the same with or without it.
    let data = format!(
        "volatile,lowerdir={}:{},upperdir={},workdir={}",
        p("lower2"),
        p("lower1"),
        p("upper"),
        p("work")
    );
    nix::mount::mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| format!("mount overlay: {e} ({})", e.desc()))?;
    std::fs::write(merged.join("dir/new"), b"upper").map_err(step("write through the overlay"))?;
    std::fs::remove_file(merged.join("gone"))
        .map_err(step("delete a lower file through the overlay"))?;
    let whiteout = probe.join("upper/gone").symlink_metadata();
    if !whiteout.is_ok_and(|m| {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        m.file_type().is_char_device() && m.rdev() == 0
    }) {
        return Err("deleting a lower file left no whiteout in the upper directory".into());
    }
    nix::mount::umount2(merged, MntFlags::empty()).map_err(|e| format!("unmount the overlay: {e}"))
}

/// Directory entries must carry their type: containerd's overlay snapshotter refuses a
/// filesystem without d_type (overlay itself only warns, then misbehaves).
fn check_d_type(probe: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(probe.as_os_str().as_bytes())
        .map_err(|_| format!("{}: NUL in path", probe.display()))?;
    // SAFETY: opendir/readdir/closedir on a NUL-terminated path; each entry is read before
    // the next readdir call, and the stream is closed once.
    let typed = unsafe {
        let dir = libc::opendir(path.as_ptr());
        if dir.is_null() {
            return Err(format!(
                "open {}: {}",
                probe.display(),
                std::io::Error::last_os_error()
            ));
        }
        let mut typed = None;
        loop {
            let entry = libc::readdir(dir);
            if entry.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*entry).d_name.as_ptr());
            if name.to_bytes() == b"upper" {
                typed = Some((*entry).d_type != libc::DT_UNKNOWN);
                break;
            }
        }
        libc::closedir(dir);
        typed
    };
    match typed {
        Some(true) => Ok(()),
        Some(false) => Err("the filesystem does not record file types in directory entries (d_type), which containerd's overlayfs snapshotter requires".into()),
        None => Err(format!("{}: the probe's upper directory is not listed", probe.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::mountinfo::in_private_mount_ns as in_mount_ns;

    fn tmpfs(at: &Path, flags: MsFlags) {
        std::fs::create_dir_all(at).expect("mkdir");
        nix::mount::mount(Some("tmpfs"), at, Some("tmpfs"), flags, None::<&str>).expect("tmpfs");
    }

    /// On tmpfs, which has everything: passes and leaves nothing behind.
    #[test]
    fn an_upper_on_tmpfs_works_and_is_cleaned_up() {
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path().join("snap");
        let r = in_mount_ns(move || {
            tmpfs(&dir, MsFlags::empty());
            let r = check(&dir.join("overlayfs"));
            let left: Vec<_> = std::fs::read_dir(dir.join("overlayfs"))
                .expect("ls")
                .flatten()
                .map(|e| e.file_name())
                .collect();
            (r, left, fs_name(&dir))
        });
        let Some((r, left, name)) = r else { return };
        assert_eq!(r, Ok(()));
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(name, "tmpfs");
    }

    /// On a read-only filesystem the check fails and says at which step.
    #[test]
    fn an_upper_on_a_read_only_filesystem_fails() {
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path().join("snap");
        let r = in_mount_ns(move || {
            tmpfs(&dir, MsFlags::empty());
            std::fs::create_dir(dir.join("overlayfs")).expect("mkdir");
            nix::mount::mount(
                None::<&str>,
                &dir,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .expect("remount ro");
            check(&dir.join("overlayfs"))
        });
        let Some(r) = r else { return };
        let e = r.unwrap_err();
        assert!(
            e.starts_with("create the probe directories: ") && e.contains("Read-only"),
            "{e}"
        );
    }
}
