//! The `runtime-cleanup` phase: what containerd and k3s leave behind on a persistent root when
//! the VM was killed. Stale shim state makes containerd reuse network namespaces of the previous
//! boot (the bridge plugin then fails with "file exists"); a stale node password no longer matches
//! the one k3s generates. The image metadata (`meta.db`), content blobs and snapshots are kept:
//! losing them costs minutes of image re-extraction.
//!
//! Symlinks are removed as links and never followed, so a planted link cannot point the cleanup
//! at anything outside these directories.

use std::path::Path;

use openshell_init::guest_path::under;

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::k3s::paths::{
    CONTAINERD_INGEST, CONTAINERD_OVERLAYFS, CONTAINERD_ROOT, CONTAINERD_SHIMS, CONTAINERD_TASKS,
    K3S_ROOT, K3S_RUN_DIR, NODE_PASSWD,
};
use crate::remove::{empty_dir, is_real_dir, remove_tree, CleanupError};

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
        if self.entries.is_empty() {
            return "nothing stale to remove".into();
        }
        let parts: Vec<String> = self
            .entries
            .iter()
            .map(|(what, n)| format!("{what}: {n}"))
            .collect();
        format!("removed {} entries ({})", self.total(), parts.join(", "))
    }
}

fn run(ctx: &Ctx) -> PhaseResult {
    Ok(Done::Ok(Some(clean(&ctx.root)?.describe())))
}

/// Cleans the runtime leftovers under `root`.
pub fn clean(root: &Path) -> Result<Removed, CleanupError> {
    let mut removed = Removed::default();
    let containerd = under(root, CONTAINERD_ROOT);
    if is_real_dir(&containerd) {
        for dir in CONTAINERD_STALE {
            removed.add(dir, remove_tree(&containerd.join(dir))?);
        }
        // Emptied but kept (containerd expects it).
        let ingest = containerd.join(CONTAINERD_INGEST);
        removed.add("content ingest", empty_dir(&ingest)?);
        for dir in [ingest, containerd.join(CONTAINERD_OVERLAYFS)] {
            std::fs::create_dir_all(&dir).map_err(|source| CleanupError { path: dir, source })?;
        }
    }
    removed.add("node-passwd", remove_tree(&under(root, NODE_PASSWD))?);
    removed.add(K3S_RUN_DIR, remove_tree(&under(root, K3S_RUN_DIR))?);
    let mut sockets = 0;
    for dir in [under(root, K3S_ROOT), under(root, "/run")] {
        sockets += remove_sockets(&dir)?;
    }
    removed.add("sockets", sockets);
    Ok(removed)
}

/// Removes every `*.sock` below `dir` (sockets or anything else so named, links included),
/// without descending through links.
fn remove_sockets(dir: &Path) -> Result<usize, CleanupError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(CleanupError {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut count = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if path.extension().is_some_and(|e| e == "sock") && !is_dir {
            std::fs::remove_file(&path).map_err(|source| CleanupError {
                path: path.clone(),
                source,
            })?;
            count += 1;
        } else if is_dir {
            count += remove_sockets(&path)?;
        }
    }
    Ok(count)
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

    #[test]
    fn empty_root_is_fine() {
        let t = tempfile::tempdir().expect("tmp");
        assert_eq!(clean(t.path()).expect("clean").total(), 0);
    }
}
