//! The `network-cleanup` phase: pod-network state a crashed boot leaves behind. On a persistent
//! root that is files: host-local IPAM allocations (a full /24 of stale leases means "no IP
//! addresses available in range set"), the CNI results cache, and network namespace files under
//! /run/netns and /var/run/netns (nsfs bind mounts, unmounted before removal). Links (`cni0`,
//! `flannel.1`, veths) cannot survive a reboot, but where the running kernel still has them
//! (init restarted, a phase run by hand) they go too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::k3s::paths::{CNI_IPAM_DIR, CNI_RESULTS_DIR, NETNS_DIRS};
use crate::netlink;
use crate::remove::{empty_dir, remove_tree, CleanupError};
use openshell_init::guest_path::under;

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
}

impl Cleaned {
    pub fn total(&self) -> usize {
        self.ipam_entries + self.results + self.netns + self.links.len()
    }

    fn describe(&self) -> String {
        if self.total() == 0 {
            return "nothing stale to remove".into();
        }
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
    }
}

fn run(ctx: &Ctx) -> PhaseResult {
    let mut cleaned = clean_files(&ctx.root)?;
    cleaned.links = clean_links()?;
    Ok(Done::Ok(Some(cleaned.describe())))
}

/// The on-disk part, under `root`.
pub fn clean_files(root: &Path) -> Result<Cleaned, NetCleanupError> {
    let mut cleaned = Cleaned {
        ipam_entries: empty_dir(&under(root, CNI_IPAM_DIR))?,
        results: empty_dir(&under(root, CNI_RESULTS_DIR))?,
        ..Cleaned::default()
    };
    // /var/run is usually a link to /run: visit each real directory once.
    let mut seen = HashSet::new();
    for dir in NETNS_DIRS.map(|d| under(root, d)) {
        let Ok(real) = std::fs::canonicalize(&dir) else {
            continue;
        };
        if !real.starts_with(root) || !seen.insert(real.clone()) {
            continue;
        }
        cleaned.netns += clean_netns_dir(&real)?;
    }
    Ok(cleaned)
}

/// Each entry is a bind mount of a namespace file: detach it, then remove the file.
fn clean_netns_dir(dir: &Path) -> Result<usize, NetCleanupError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut n = 0;
    for e in entries.flatten() {
        let path = e.path();
        match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
            // EINVAL: not a mount point (a plain leftover file).
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(errno) => return Err(NetCleanupError::Unmount { path, errno }),
        }
        n += remove_tree(&path)?;
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
}
