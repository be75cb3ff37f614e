//! The `mounts` phase: the pseudo filesystems every later step needs, with explicit hardening
//! flags (the old shell init mounted them all without any), plus the /dev symlinks programs expect.
//!
//! A target that is already mounted with the expected filesystem (a VMM's own init, or a second
//! run) is fine; any other failure names the target and the errno.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::MsFlags;
use openshell_init::guest_path::under;

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};

pub const PHASE: Phase = Phase {
    name: "mounts",
    after: &[],
    fatal: true,
    waits: false,
    purpose: "mount proc, sys, dev, devpts, shm, run, tmp and cgroup2",
    run,
};

/// One entry of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub fstype: &'static str,
    pub target: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The table in dependency order: /dev before /dev/pts and /dev/shm, /sys before its cgroup.
pub const TABLE: &[Mount] = &[
    Mount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// Symlinks under /dev that devtmpfs does not create.
const DEV_LINKS: &[(&str, &str)] = &[
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
    ("/dev/ptmx", "pts/ptmx"),
];

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mount point {path}: {source}")]
    MountPoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mount {fstype} on {target} failed: {errno} ({desc})", desc = errno.desc())]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        errno: Errno,
    },
    #[error("{target} is already mounted, but as {found}, not {fstype}")]
    WrongFs {
        fstype: &'static str,
        target: PathBuf,
        found: String,
    },
    #[error("cannot create symlink {path}: {source}")]
    Link {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What happened to one entry of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mounted {
    Fresh,
    Already,
}

fn run(ctx: &Ctx) -> PhaseResult {
    let mut fresh = 0;
    let mut already = Vec::new();
    let mut slowest = (0u64, "");
    // What is mounted already (by a VMM's own init, or an earlier run), read once: each read of
    // mountinfo costs more than a mount.
    let existing = std::fs::read_to_string(ctx.path("/proc/self/mountinfo"))
        .or_else(|_| std::fs::read_to_string("/proc/self/mountinfo"))
        .unwrap_or_default();
    for m in TABLE {
        let watch = openshell_init::clock::Stopwatch::start();
        match mount_one(&ctx.root, m, &existing)? {
            Mounted::Fresh => fresh += 1,
            Mounted::Already => already.push(m.target),
        }
        slowest = slowest.max((watch.elapsed_us(), m.target));
    }
    let links = dev_links(&ctx.root)?;
    if ctx.pid1 {
        crate::console::ensure_stdio(&ctx.path("/dev/console"));
    }
    let mut detail = format!("{fresh} mounted");
    if !already.is_empty() {
        detail.push_str(&format!(", already mounted: {}", already.join(" ")));
    }
    if links > 0 {
        detail.push_str(&format!(", {links} /dev links"));
    }
    detail.push_str(&format!(
        "; slowest {} ({:.3} ms)",
        slowest.1,
        slowest.0 as f64 / 1000.0
    ));
    Ok(Done::Ok(Some(detail)))
}

pub fn mount_one(root: &Path, m: &Mount, mountinfo: &str) -> Result<Mounted, MountError> {
    let target = under(root, m.target);
    if let Err(source) = std::fs::create_dir_all(&target) {
        return Err(MountError::MountPoint {
            path: target,
            source,
        });
    }
    if let Some(found) = find_mount(mountinfo, &target) {
        return if found == m.fstype {
            Ok(Mounted::Already)
        } else {
            Err(MountError::WrongFs {
                fstype: m.fstype,
                target,
                found,
            })
        };
    }
    match nix::mount::mount(Some(m.fstype), &target, Some(m.fstype), m.flags, m.data) {
        Ok(()) => Ok(Mounted::Fresh),
        // Mounted by someone else between our check and the call, or no /proc to check with.
        Err(Errno::EBUSY) => Ok(Mounted::Already),
        Err(errno) => Err(MountError::Mount {
            fstype: m.fstype,
            target,
            errno,
        }),
    }
}

/// Looks `target` up in mountinfo text; the last matching line wins (the top of a stack).
pub fn find_mount(mountinfo: &str, target: &Path) -> Option<String> {
    crate::mountinfo::find(&crate::mountinfo::parse(mountinfo), target).map(|e| e.fstype.clone())
}

fn dev_links(root: &Path) -> Result<usize, MountError> {
    let mut made = 0;
    for (link, dest) in DEV_LINKS {
        let path = under(root, link);
        if path.symlink_metadata().is_ok() {
            continue;
        }
        std::os::unix::fs::symlink(dest, &path)
            .map_err(|source| MountError::Link { path, source })?;
        made += 1;
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_hardened_and_ordered() {
        let find = |t: &str| TABLE.iter().position(|m| m.target == t).expect(t);
        assert!(find("/dev") < find("/dev/pts"));
        assert!(find("/dev") < find("/dev/shm"));
        assert!(find("/sys") < find("/sys/fs/cgroup"));
        for m in TABLE {
            assert!(
                m.flags.contains(MsFlags::MS_NOSUID),
                "{} lacks nosuid",
                m.target
            );
        }
        let shm = &TABLE[find("/dev/shm")];
        assert_eq!(shm.data, Some("mode=1777"));
        assert!(TABLE[find("/dev/pts")]
            .data
            .unwrap_or("")
            .contains("ptmxmode=0666"));
        assert!(TABLE[find("/proc")].flags.contains(MsFlags::MS_NOEXEC));
        // Programs run from /dev/shm and /tmp in containers' build steps; /dev holds no programs.
        assert!(!TABLE[find("/tmp")].flags.contains(MsFlags::MS_NOEXEC));
    }

    #[test]
    fn failures_name_the_target_and_errno() {
        let root = tempfile::tempdir().expect("tmp");
        let bogus = Mount {
            fstype: "nosuchfs",
            target: "/x",
            flags: MsFlags::empty(),
            data: None,
        };
        match mount_one(root.path(), &bogus, "") {
            Err(MountError::Mount { target, errno, .. }) => {
                assert_eq!(target, root.path().join("x"));
                // ENODEV: unknown filesystem type; EPERM where mounting is not allowed at all.
                assert!(matches!(errno, Errno::ENODEV | Errno::EPERM), "{errno}");
            }
            other => panic!("expected a mount error, got {other:?}"),
        }
        let text = format!("{}", mount_one(root.path(), &bogus, "").unwrap_err());
        assert!(text.contains("nosuchfs") && text.contains("/x"), "{text}");
    }

    #[test]
    fn already_mounted_targets_are_fine_and_other_types_are_not() {
        let root = tempfile::tempdir().expect("tmp");
        let proc_dir = root.path().join("proc");
        let info = format!("22 1 0:21 / {} rw - proc proc rw\n", proc_dir.display());
        assert_eq!(
            mount_one(root.path(), &TABLE[0], &info).expect("fine"),
            Mounted::Already
        );
        let sys = Mount {
            fstype: "sysfs",
            target: "/proc",
            flags: MsFlags::empty(),
            data: None,
        };
        assert!(matches!(
            mount_one(root.path(), &sys, &info),
            Err(MountError::WrongFs { .. })
        ));
    }

    #[test]
    fn mountinfo_lookup() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    30 22 0:30 / /my\\040dir rw - tmpfs tmpfs rw\n\
                    31 30 0:31 / /my\\040dir rw - sysfs sysfs rw\n";
        assert_eq!(find_mount(text, Path::new("/proc")), Some("proc".into()));
        assert_eq!(find_mount(text, Path::new("/my dir")), Some("sysfs".into()));
        assert_eq!(find_mount(text, Path::new("/sys")), None);
    }
}
