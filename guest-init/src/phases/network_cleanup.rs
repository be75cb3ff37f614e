//! The `network-cleanup` phase: pod-network state a crashed boot leaves behind. On a persistent
//! root that is files: host-local IPAM allocations (a full /24 of stale leases means "no IP
//! addresses available in range set"), the CNI results cache, and network namespace files under
//! /run/netns and /var/run/netns (nsfs bind mounts, unmounted before removal). Links (`cni0`,
//! `flannel.1`, veths) cannot survive a reboot, but where the running kernel still has them
//! (init restarted, a phase run by hand) they go too.
//!
//! Every path is walked from the root without following links ([`crate::remove`]): a link where
//! a directory belongs is left alone and named in the phase's report, except `/var/run` as a
//! link to `/run` (every Debian root has it; `/run/netns` is cleaned directly).

use std::path::{Path, PathBuf};

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::k3s::paths::{CNI_IPAM_DIR, CNI_RESULTS_DIR, NETNS_DIRS};
use crate::netlink;
use crate::remove::{CleanupError, Dir, Root, Walk};

pub const PHASE: Phase = Phase {
    name: "network-cleanup",
    after: &["mounts"],
    fatal: false,
    waits: false,
    purpose: "remove stale IPAM leases, CNI results, netns files and pod links",
    run,
};

/// Links CNI and flannel create, removed by name; veths are removed by kind.
const POD_LINKS: &[&str] = &["cni0", "flannel.1"];

#[derive(Debug, thiserror::Error)]
pub enum NetCleanupError {
    #[error(transparent)]
    Files(#[from] CleanupError),
    #[error("cannot list links: {0}")]
    List(netlink::NetlinkError),
    #[error("cannot delete link {name}: {source}")]
    Delete {
        name: String,
        source: netlink::NetlinkError,
    },
    #[error("cannot unmount netns file {path}: {errno}")]
    Unmount {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    pub ipam_entries: usize,
    pub results: usize,
    pub netns: usize,
    pub links: Vec<String>,
    /// Guest paths where a link stood in place of a directory: not followed, nothing beyond.
    pub not_followed: Vec<String>,
}

impl Cleaned {
    pub fn total(&self) -> usize {
        self.ipam_entries + self.results + self.netns + self.links.len()
    }

    fn describe(&self) -> String {
        let mut text = if self.total() == 0 {
            "nothing stale to remove".to_string()
        } else {
            let mut parts = Vec::new();
            for (what, n) in [
                ("IPAM entries", self.ipam_entries),
                ("CNI results", self.results),
                ("netns files", self.netns),
            ] {
                if n > 0 {
                    parts.push(format!("{what}: {n}"));
                }
            }
            if !self.links.is_empty() {
                parts.push(format!("links: {}", self.links.join(" ")));
            }
            format!("removed {}", parts.join(", "))
        };
        if !self.not_followed.is_empty() {
            text.push_str(&format!(
                "; links not followed: {}",
                self.not_followed.join(" ")
            ));
        }
        text
    }
}

fn run(ctx: &Ctx) -> PhaseResult {
    let mut cleaned = clean_files(&ctx.root)?;
    cleaned.links = clean_links()?;
    Ok(Done::Ok(Some(cleaned.describe())))
}

/// The on-disk part, under `root`.
pub fn clean_files(root: &Path) -> Result<Cleaned, NetCleanupError> {
    let tree = Root::open(root)?;
    let mut cleaned = Cleaned {
        ipam_entries: tree.empty(CNI_IPAM_DIR)?,
        results: tree.empty(CNI_RESULTS_DIR)?,
        ..Cleaned::default()
    };
    for dir in NETNS_DIRS {
        if let Walk::Dir(d) = tree.dir(dir)? {
            cleaned.netns += clean_netns_dir(&d)?;
        }
    }
    cleaned.not_followed = tree
        .refused()
        .into_iter()
        .filter(|p| !(p == "/var/run" && run_alias(root)))
        .collect();
    Ok(cleaned)
}

/// Whether `<root>/var/run` is the usual link to `/run` (its text read, never followed).
fn run_alias(root: &Path) -> bool {
    std::fs::read_link(root.join("var/run"))
        .is_ok_and(|t| t == Path::new("/run") || t == Path::new("../run"))
}

/// Each entry is a bind mount of a namespace file: detach it, then remove the file.
fn clean_netns_dir(dir: &Dir) -> Result<usize, NetCleanupError> {
    use nix::mount::MntFlags;
    let mut n = 0;
    for name in dir.names()? {
        // Through the directory's descriptor; the entry itself is never followed.
        let path = dir.fd_path(&name);
        match nix::mount::umount2(&path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            // EINVAL: not a mount point (a plain leftover file).
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(errno) => {
                return Err(NetCleanupError::Unmount {
                    path: dir.path.join(&name),
                    errno,
                })
            }
        }
        n += dir.remove(&name)?;
    }
    Ok(n)
}

/// Deletes pod links in the calling thread's network namespace; returns their names.
pub fn clean_links() -> Result<Vec<String>, NetCleanupError> {
    let links = netlink::links().map_err(NetCleanupError::List)?;
    let mut removed = Vec::new();
    for link in links {
        let stale = POD_LINKS.contains(&link.name.as_str()) || link.kind.as_deref() == Some("veth");
        if !stale {
            continue;
        }
        match netlink::delete_link(&link.name) {
            Ok(()) => removed.push(link.name),
            // The peer of a veth deleted just before goes with it.
            Err(netlink::NetlinkError::Refused(nix::errno::Errno::ENODEV)) => {}
            Err(source) => {
                return Err(NetCleanupError::Delete {
                    name: link.name,
                    source,
                })
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, rel: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, "x").expect("write");
    }

    #[test]
    fn files_go_the_rest_stays_and_a_second_run_finds_nothing() {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path();
        put(r, "var/lib/cni/networks/cbr0/10.42.0.5");
        put(r, "var/lib/cni/networks/cbr0/last_reserved_ip.0");
        put(r, "var/lib/cni/networks/cbr0/lock");
        put(r, "var/lib/cni/results/cbr0-abc-eth0");
        put(r, "var/lib/cni/cache/keep");
        put(r, "run/netns/cni-1234");
        std::fs::create_dir_all(r.join("var")).expect("mkdir");
        std::os::unix::fs::symlink("../run", r.join("var/run")).expect("link");
        let cleaned = clean_files(r).expect("clean");
        assert_eq!(
            (cleaned.ipam_entries, cleaned.results, cleaned.netns),
            (4, 1, 1)
        );
        assert!(r.join("var/lib/cni/networks").is_dir());
        assert!(r.join("var/lib/cni/cache/keep").exists());
        assert!(r
            .join("var/run")
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink()));
        let again = clean_files(r).expect("again");
        assert_eq!(again.total(), 0);
        assert_eq!(again.describe(), "nothing stale to remove");
    }

    /// A link planted where the cleanup expects a directory (`/var/lib/cni`, `/run/netns`) is
    /// not followed: what it points at stays, and the report names it. `/var/run` linked
    /// elsewhere than `/run` is named too.
    #[test]
    fn planted_links_on_the_paths_are_named_and_not_followed() {
        let t = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("outside");
        let r = t.path();
        put(outside.path(), "networks/cbr0/10.42.0.5");
        put(outside.path(), "netns/precious");
        std::fs::create_dir_all(r.join("var/lib")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), r.join("var/lib/cni")).expect("link");
        std::fs::create_dir_all(r.join("run")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path().join("netns"), r.join("run/netns"))
            .expect("link");
        std::os::unix::fs::symlink(outside.path(), r.join("var/run")).expect("link");
        let cleaned = clean_files(r).expect("clean");
        assert_eq!(cleaned.total(), 0);
        assert_eq!(
            cleaned.describe(),
            "nothing stale to remove; links not followed: /var/lib/cni /var/lib/cni /run/netns /var/run"
        );
        assert!(outside.path().join("networks/cbr0/10.42.0.5").exists());
        assert!(outside.path().join("netns/precious").exists());
    }
}
