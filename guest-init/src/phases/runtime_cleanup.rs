//! The `runtime-cleanup` phase: what containerd and k3s leave behind on a persistent root when
//! the VM was killed. Stale shim state makes containerd reuse network namespaces of the previous
//! boot (the bridge plugin then fails with "file exists"); a stale node password no longer matches
//! the one k3s generates. The image metadata (`meta.db`), content blobs and snapshots are kept:
//! losing them costs minutes of image re-extraction.
//!
//! Every path is walked from the root without following links ([`crate::remove`]): a link inside
//! a tree is removed as a link, and a link where a directory belongs is left alone and named in
//! the phase's report, so a planted link cannot point the cleanup at anything outside these
//! directories.

use std::path::Path;

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::k3s::paths::{
    CONTAINERD_INGEST, CONTAINERD_OVERLAYFS, CONTAINERD_ROOT, CONTAINERD_SHIMS, CONTAINERD_TASKS,
    K3S_ROOT, K3S_RUN_DIR, NODE_PASSWD,
};
use crate::remove::{is_socket_name, CleanupError, Root, Walk};

pub const PHASE: Phase = Phase {
    name: "runtime-cleanup",
    after: &["mounts", "state-disk"],
    fatal: false,
    waits: false,
    purpose: "remove stale containerd task/shim state, sockets and the k3s node password",
    run,
};

/// Directories removed whole, relative to the containerd root.
const CONTAINERD_STALE: &[&str] = &[CONTAINERD_TASKS, CONTAINERD_SHIMS];

/// What one run removed, by kind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub entries: Vec<(&'static str, usize)>,
    /// Guest paths where a link stood in place of a directory: not followed, nothing beyond.
    pub not_followed: Vec<String>,
}

impl Removed {
    fn add(&mut self, what: &'static str, n: usize) {
        if n > 0 {
            self.entries.push((what, n));
        }
    }

    pub fn total(&self) -> usize {
        self.entries.iter().map(|(_, n)| n).sum()
    }

    fn describe(&self) -> String {
        let mut text = if self.entries.is_empty() {
            "nothing stale to remove".to_string()
        } else {
            let parts: Vec<String> = self
                .entries
                .iter()
                .map(|(what, n)| format!("{what}: {n}"))
                .collect();
            format!("removed {} entries ({})", self.total(), parts.join(", "))
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
    Ok(Done::Ok(Some(clean(&ctx.root)?.describe())))
}

/// Cleans the runtime leftovers under `root`.
pub fn clean(root: &Path) -> Result<Removed, CleanupError> {
    let tree = Root::open(root)?;
    let mut removed = Removed::default();
    if tree.is_dir(CONTAINERD_ROOT)? {
        for dir in CONTAINERD_STALE {
            removed.add(dir, tree.remove(&format!("{CONTAINERD_ROOT}/{dir}"))?);
        }
        // Emptied but kept (containerd expects it).
        let ingest = format!("{CONTAINERD_ROOT}/{CONTAINERD_INGEST}");
        removed.add("content ingest", tree.empty(&ingest)?);
        for dir in [ingest, format!("{CONTAINERD_ROOT}/{CONTAINERD_OVERLAYFS}")] {
            tree.create_dirs(&dir)?;
        }
    }
    removed.add("node-passwd", tree.remove(NODE_PASSWD)?);
    removed.add(K3S_RUN_DIR, tree.remove(K3S_RUN_DIR)?);
    let mut sockets = 0;
    for dir in [K3S_ROOT, "/run"] {
        // Every `*.sock` below (sockets or anything else so named, links included).
        if let Walk::Dir(d) = tree.dir(dir)? {
            sockets += d.remove_matching(&is_socket_name)?;
        }
    }
    removed.add("sockets", sockets);
    removed.not_followed = tree.refused();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    fn put(root: &Path, rel: &str, content: &str) -> PathBuf {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, content).expect("write");
        p
    }

    /// A persistent root as a killed VM leaves it.
    fn crashed_root() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path();
        let c = "var/lib/rancher/k3s/agent/containerd";
        put(
            r,
            &format!("{c}/io.containerd.runtime.v2.task/k8s.io/abc/init.pid"),
            "42",
        );
        put(
            r,
            &format!("{c}/io.containerd.runtime.v2.task/k8s.io/abc/config.json"),
            "{}",
        );
        put(
            r,
            &format!("{c}/io.containerd.sandbox.controller.v1.shim/sb1/state"),
            "x",
        );
        put(
            r,
            &format!("{c}/io.containerd.content.v1.content/ingest/partial/data"),
            "half",
        );
        put(
            r,
            &format!("{c}/io.containerd.content.v1.content/blobs/sha256/aa"),
            "blob",
        );
        put(
            r,
            &format!("{c}/io.containerd.metadata.v1.bolt/meta.db"),
            "metadata",
        );
        put(
            r,
            &format!("{c}/io.containerd.snapshotter.v1.overlayfs/snapshots/1/fs/f"),
            "layer",
        );
        put(r, "var/lib/rancher/k3s/server/cred/node-passwd", "hash");
        put(r, "var/lib/rancher/k3s/server/cred/passwd", "keep");
        put(r, "run/k3s/containerd/containerd.pid", "7");
        std::fs::create_dir_all(r.join("var/lib/rancher/k3s/agent/containerd/x")).expect("mkdir");
        let _ =
            UnixListener::bind(r.join("var/lib/rancher/k3s/agent/containerd/x/containerd.sock"))
                .expect("socket");
        put(r, "var/lib/rancher/k3s/server/kine.sock", "");
        put(r, "run/other.sock", "");
        put(r, "var/lib/rancher/k3s/server/db/state.db", "db");
        t
    }

    #[test]
    fn stale_state_goes_and_kept_state_stays() {
        let t = crashed_root();
        let r = t.path();
        let removed = clean(r).expect("clean");
        let c = r.join("var/lib/rancher/k3s/agent/containerd");
        assert!(!c.join("io.containerd.runtime.v2.task").exists());
        assert!(!c.join("io.containerd.sandbox.controller.v1.shim").exists());
        let ingest = c.join("io.containerd.content.v1.content/ingest");
        assert!(ingest.is_dir() && std::fs::read_dir(&ingest).expect("ls").next().is_none());
        assert!(!r
            .join("var/lib/rancher/k3s/server/cred/node-passwd")
            .exists());
        assert!(!r.join("run/k3s").exists());
        assert!(!r.join("var/lib/rancher/k3s/server/kine.sock").exists());
        assert!(!c.join("x/containerd.sock").exists());
        assert!(!r.join("run/other.sock").exists());
        for (rel, content) in [
            ("io.containerd.metadata.v1.bolt/meta.db", "metadata"),
            ("io.containerd.content.v1.content/blobs/sha256/aa", "blob"),
            (
                "io.containerd.snapshotter.v1.overlayfs/snapshots/1/fs/f",
                "layer",
            ),
        ] {
            assert_eq!(std::fs::read_to_string(c.join(rel)).expect(rel), content);
        }
        assert!(r.join("var/lib/rancher/k3s/server/cred/passwd").exists());
        assert!(r.join("var/lib/rancher/k3s/server/db/state.db").exists());
        // task: abc dir + k8s.io dir + 2 files + the dir itself = 5
        assert!(
            removed
                .entries
                .contains(&("io.containerd.runtime.v2.task", 5)),
            "{removed:?}"
        );
        assert!(removed.entries.contains(&("sockets", 3)), "{removed:?}");
    }

    #[test]
    fn second_run_removes_nothing_and_says_so() {
        let t = crashed_root();
        assert!(clean(t.path()).expect("first").total() > 0);
        let again = clean(t.path()).expect("second");
        assert_eq!(again.total(), 0);
        assert_eq!(again.describe(), "nothing stale to remove");
    }

    #[test]
    fn links_are_removed_never_followed() {
        let t = crashed_root();
        let outside = tempfile::tempdir().expect("outside");
        let precious = put(outside.path(), "precious/data", "mine");
        put(outside.path(), "precious/important.sock", "");
        let c = t.path().join("var/lib/rancher/k3s/agent/containerd");
        // The stale directory itself is a link, and a link inside /run points outside.
        std::fs::remove_dir_all(c.join("io.containerd.sandbox.controller.v1.shim")).expect("rm");
        std::os::unix::fs::symlink(
            outside.path().join("precious"),
            c.join("io.containerd.sandbox.controller.v1.shim"),
        )
        .expect("link");
        std::os::unix::fs::symlink(outside.path().join("precious"), t.path().join("run/evil"))
            .expect("link");
        clean(t.path()).expect("clean");
        assert!(c
            .join("io.containerd.sandbox.controller.v1.shim")
            .symlink_metadata()
            .is_err());
        assert_eq!(std::fs::read_to_string(&precious).expect("kept"), "mine");
        assert!(outside.path().join("precious/important.sock").exists());
    }

    /// A link in place of the containerd root or a directory on the way to the node password:
    /// nothing behind it is removed or created, and the report names it.
    #[test]
    fn links_on_the_way_are_named_and_not_followed() {
        let t = crashed_root();
        let r = t.path();
        let outside = tempfile::tempdir().expect("outside");
        let theirs = put(
            outside.path(),
            "io.containerd.runtime.v2.task/k8s.io/x/init.pid",
            "1",
        );
        put(outside.path(), "cred/node-passwd", "theirs");
        std::fs::remove_dir_all(r.join("var/lib/rancher/k3s/agent/containerd")).expect("rm");
        std::os::unix::fs::symlink(
            outside.path(),
            r.join("var/lib/rancher/k3s/agent/containerd"),
        )
        .expect("link");
        std::fs::remove_dir_all(r.join("var/lib/rancher/k3s/server/cred")).expect("rm");
        std::os::unix::fs::symlink(
            outside.path().join("cred"),
            r.join("var/lib/rancher/k3s/server/cred"),
        )
        .expect("link");
        let removed = clean(r).expect("clean");
        assert_eq!(std::fs::read_to_string(&theirs).expect("kept"), "1");
        assert!(outside.path().join("cred/node-passwd").exists());
        assert!(!outside
            .path()
            .join("io.containerd.content.v1.content")
            .exists());
        assert_eq!(
            removed.not_followed,
            [
                "/var/lib/rancher/k3s/agent/containerd",
                "/var/lib/rancher/k3s/server/cred"
            ]
        );
        assert!(removed.describe().ends_with(
            "; links not followed: /var/lib/rancher/k3s/agent/containerd /var/lib/rancher/k3s/server/cred"
        ), "{}", removed.describe());
    }

    #[test]
    fn empty_root_is_fine() {
        let t = tempfile::tempdir().expect("tmp");
        assert_eq!(clean(t.path()).expect("clean").total(), 0);
    }
}
