//! The state disk's layout: where it is mounted, what its top directory holds, and which guest
//! paths are bound onto which of its directories.
//!
//! ```text
//! <mount point>/seeded              the marker: present once the seed is complete
//! <mount point>/state/<name>        one directory per bind (BINDS), bound onto its target
//! <mount point>/.seed-incomplete/   a seed being copied (a crash leaves it; it is redone)
//! ```

use crate::k3s::paths::{
    K3S_AGENT, K3S_ROOT, K3S_SERVER_CRED, K3S_SERVER_DB, K3S_SERVER_ETC, K3S_SERVER_TLS,
    K3S_STORAGE,
};
use crate::phases::pki::{GATEWAY_TREE, PKI_DIR};

/// Where the disk is mounted: on tmpfs, so the mount point costs the root nothing.
pub const MOUNT_POINT: &str = "/run/openshell/state-disk";
/// The seeded tree, renamed into place whole.
pub const STATE_DIR: &str = "state";
/// The seed while it is being copied.
pub const SEED_TMP: &str = ".seed-incomplete";
/// Written last: the seed is complete.
pub const MARKER: &str = "seeded";
/// The marker's first line; a disk with another layout is not ours to reinterpret.
pub const MARKER_HEADER: &str = "openshell state disk, layout 1";

/// A guest directory kept on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind {
    /// Its directory under [`STATE_DIR`].
    pub name: &'static str,
    /// The guest path bound onto it.
    pub target: &'static str,
    /// Bound only in a root that has this directory: a root without k3s or without the
    /// gateway tree gets neither created (the `pki` phase tells a gateway root by its tree).
    pub anchor: &'static str,
    /// The mode of a directory the root did not ship.
    pub mode: u32,
}

/// Everything k3s, containerd and the PKI write. The agent directory holds containerd's
/// content, snapshots and metadata and the airgap images; `server/manifests` and
/// `server/static` stay in the root (the `manifests` phase deploys them at every boot).
pub const BINDS: &[Bind] = &[
    Bind {
        name: "k3s-agent",
        target: K3S_AGENT,
        anchor: K3S_ROOT,
        mode: 0o755,
    },
    Bind {
        name: "k3s-server-db",
        target: K3S_SERVER_DB,
        anchor: K3S_ROOT,
        mode: 0o700,
    },
    Bind {
        name: "k3s-server-tls",
        target: K3S_SERVER_TLS,
        anchor: K3S_ROOT,
        mode: 0o700,
    },
    Bind {
        name: "k3s-server-cred",
        target: K3S_SERVER_CRED,
        anchor: K3S_ROOT,
        mode: 0o700,
    },
    Bind {
        name: "k3s-server-etc",
        target: K3S_SERVER_ETC,
        anchor: K3S_ROOT,
        mode: 0o700,
    },
    Bind {
        name: "local-path-storage",
        target: K3S_STORAGE,
        anchor: K3S_ROOT,
        mode: 0o755,
    },
    Bind {
        name: "pki",
        target: PKI_DIR,
        anchor: GATEWAY_TREE,
        mode: 0o700,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// No target lies under another (a bind would hide the other's), each lies under its
    /// anchor, and names are unique.
    #[test]
    fn binds_are_disjoint_and_under_their_anchors() {
        for (i, a) in BINDS.iter().enumerate() {
            assert!(a.target.starts_with(&format!("{}/", a.anchor)), "{a:?}");
            for b in &BINDS[i + 1..] {
                assert_ne!(a.name, b.name);
                for (x, y) in [(a, b), (b, a)] {
                    assert!(
                        !y.target.starts_with(&format!("{}/", x.target)) && x.target != y.target,
                        "{x:?} / {y:?}"
                    );
                }
            }
        }
        assert!(MOUNT_POINT.starts_with("/run/"));
    }
}
