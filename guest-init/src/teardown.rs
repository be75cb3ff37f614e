//! Unmounting before power-off: every mount under a root except the ones to keep (the root
//! itself and the pseudo filesystems), children before parents. What the workload left mounted
//! (containers' overlays, pods' volumes) goes first, then the state disk's binds, then the disk,
//! so its ext4 is cleanly unmounted and its journal has nothing to replay on the next boot.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::MntFlags;

/// What [`unmount_all`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Teardown {
    pub unmounted: usize,
    /// Mounts that stayed busy, with the error; each was then detached (its filesystem goes
    /// once nothing uses it, which may be too late for a clean unmount).
    pub busy: Vec<(PathBuf, Errno)>,
}

/// Unmounts every mount below `root` whose mount point is not `root` or one of `keep` (guest
/// paths), last mounted first. A mount still busy after every other went is detached.
pub fn unmount_all(root: &Path, keep: &[&str]) -> Teardown {
    let keep: Vec<PathBuf> = keep
        .iter()
        .map(|k| openshell_init::guest_path::under(root, k))
        .collect();
    let mut done = Teardown::default();
    let mut busy: Vec<(PathBuf, Errno)> = Vec::new();
    // Mounts hold each other busy in ways their order in the table does not always show
    // (propagation): a second pass takes what the first could not.
    for _ in 0..2 {
        let table = crate::mountinfo::read().unwrap_or_default();
        busy.clear();
        for e in table.iter().rev() {
            let p = PathBuf::from(&e.mount_point);
            if !p.starts_with(root) || p == root || keep.contains(&p) {
                continue;
            }
            match nix::mount::umount2(&p, MntFlags::empty()) {
                Ok(()) => done.unmounted += 1,
                // Gone already: unmounted with its parent, or by propagation.
                Err(Errno::EINVAL | Errno::ENOENT) => {}
                Err(e) => busy.push((p, e)),
            }
        }
        if busy.is_empty() {
            break;
        }
    }
    for (p, e) in busy {
        let _ = nix::mount::umount2(&p, MntFlags::MNT_DETACH);
        done.busy.push((p, e));
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::mount::MsFlags;

    /// In a private mount namespace: stacked and nested mounts under a root all go, the kept
    /// ones stay, nothing outside the root is touched.
    #[test]
    fn everything_under_the_root_but_the_kept_goes() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().to_path_buf();
        let result = crate::mountinfo::in_private_mount_ns(move || {
            for d in ["proc", "disk", "bound"] {
                std::fs::create_dir_all(root.join(d)).expect("mkdir");
            }
            let tmpfs = |at: &Path| {
                nix::mount::mount(
                    Some("tmpfs"),
                    at,
                    Some("tmpfs"),
                    MsFlags::empty(),
                    None::<&str>,
                )
                .expect("tmpfs")
            };
            tmpfs(&root.join("proc"));
            tmpfs(&root.join("disk"));
            std::fs::create_dir_all(root.join("disk/state/inner")).expect("mkdir");
            tmpfs(&root.join("disk/state/inner"));
            nix::mount::mount(
                Some(&root.join("disk/state")),
                &root.join("bound"),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .expect("bind");
            tmpfs(&root.join("bound")); // stacked on the bind
            let before = crate::mountinfo::read().expect("table").len();
            let result = unmount_all(&root, &["/proc"]);
            let table = crate::mountinfo::read().expect("table");
            let under: Vec<String> = table
                .iter()
                .map(|e| e.mount_point.clone())
                .filter(|m| Path::new(m).starts_with(&root))
                .collect();
            (result, under, before - table.len())
        });
        let Some((result, under, gone)) = result else {
            return;
        };
        assert_eq!(under, vec![t.path().join("proc").display().to_string()]);
        assert!(result.busy.is_empty(), "{result:?}");
        assert_eq!(result.unmounted, 4);
        assert_eq!(gone, 4);
    }
}
