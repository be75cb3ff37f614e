//! A gateway's root as a crash leaves it (the VM killed with k3s running): a kine database with
//! stale revision chains and a bootstrap lock, containerd task and shim leftovers with their
//! sockets, IPAM files, the node password, the bundled manifests and a chart, and files that must
//! survive a boot byte for byte. One builder for the VM crash test (`vm/crash.rs`) and for
//! `cargo xtask bench state` and `bench kine`, which include this file with `#[path]`: it uses
//! std and the sqlite3 CLI only (the prefixes come from the caller), nothing of either crate, so
//! neither crate depends on the other.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// kine's schema as k3s creates it: the workspace's one copy.
pub const KINE_SCHEMA: &str = include_str!("../../guest-init/tests/fixtures/kine-schema.sql");

/// Where k3s keeps its kine database, relative to the root.
pub const KINE_DB: &str = "var/lib/rancher/k3s/server/db/state.db";

/// An SQL condition true for the rows of keys under any of `prefixes` (literal prefixes).
fn under(prefixes: &[String]) -> String {
    let terms: Vec<String> = prefixes
        .iter()
        .map(|p| format!("substr(name, 1, {}) = '{}'", p.len(), p.replace('\'', "''")))
        .collect();
    if terms.is_empty() {
        "0".into()
    } else {
        format!("({})", terms.join(" OR "))
    }
}

/// Counts the rows under `prefixes` (the kine phase's default configuration: its
/// `Kine::default().prune_prefixes`).
pub fn stale_rows(prefixes: &[String]) -> String {
    format!("SELECT count(*) FROM kine WHERE {}", under(prefixes))
}

/// Every row of every key outside `prefixes`, all columns, in a form that changes if any byte
/// of them does; kine's gap markers aside (the phase may add one to keep the revision).
pub fn kept_rows(prefixes: &[String]) -> String {
    format!(
        "SELECT group_concat(id || ' ' || name || ' ' || created || ' ' || deleted || ' ' || \
         ifnull(create_revision, '-') || ' ' || prev_revision || ' ' || lease || ' ' || \
         ifnull(hex(value), '-') || ' ' || ifnull(hex(old_value), '-'), char(10)) \
         FROM (SELECT * FROM kine WHERE NOT {} AND name NOT LIKE 'gap-%' ORDER BY id)",
        under(prefixes)
    )
}

const CONTAINERD: &str = "var/lib/rancher/k3s/agent/containerd";

/// What could not be done, and to which path.
#[derive(Debug)]
pub struct SeedError {
    pub what: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl fmt::Display for SeedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot {} {}: {}",
            self.what,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for SeedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

type Result<T> = std::result::Result<T, SeedError>;

fn fail(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SeedError {
    let path = path.to_path_buf();
    move |source| SeedError { what, path, source }
}

/// Appends `rows` rows to the kine database at `db` (created with kine's schema if missing; its
/// directory must exist), in kine's own row format: per key a create row, updates that point
/// at their previous row and carry its value as `old_value`, tombstones; a key that already
/// has rows (written by real kine, say) continues its chain. The mix a gateway's k3s
/// accumulates: pods, events created and expired, lease renewals, endpoint slices, config maps,
/// the node, secrets and a custom resource; plus compaction's key and a bootstrap lock when
/// missing. Written by the sqlite3 CLI, checkpointed.
pub fn kine_database(db: &Path, rows: u64) -> Result<()> {
    let sql = format!(
        "PRAGMA journal_mode=WAL;
         {KINE_SCHEMA}
         INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value, old_value)
           SELECT 'compact_rev_key', 1, 0, NULL, 0, 0, x'', NULL
           WHERE NOT EXISTS (SELECT 1 FROM kine WHERE name = 'compact_rev_key');
         INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value, old_value)
           SELECT '/bootstrap/2a5f0c1d', 1, 0, NULL, 0, 0, x'', NULL
           WHERE NOT EXISTS (SELECT 1 FROM kine WHERE name LIKE '/bootstrap/%');
         CREATE TEMP TABLE bulk AS
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
         SELECT i, CASE i % 10
             WHEN 0 THEN '/registry/pods/openshell/p' || (i / 40)
             WHEN 1 THEN '/registry/events/openshell/e' || (i / 20)
             WHEN 2 THEN '/registry/events/kube-system/e' || (i / 20)
             WHEN 3 THEN '/registry/leases/kube-node-lease/openshell-vm'
             WHEN 4 THEN '/registry/leases/kube-system/l' || (i / 5000)
             WHEN 5 THEN '/registry/endpointslices/openshell/s' || (i / 200)
             WHEN 6 THEN '/registry/configmaps/openshell/c' || (i / 100)
             WHEN 7 THEN '/registry/minions/openshell-vm'
             WHEN 8 THEN '/registry/secrets/openshell/s' || (i / 500)
             ELSE '/registry/helm.cattle.io/helmcharts/openshell/h' || (i / 1000) END AS name,
           -- An event is written twice: created, then deleted when it expires.
           i % 10 IN (1, 2) AND i % 20 >= 10 AS del,
           randomblob(180 + i % 200) AS value
         FROM n;
         INSERT INTO kine (id, name, created, deleted, create_revision, prev_revision, lease, value, old_value)
         SELECT base + w.i, w.name,
           w.prev_i IS NULL AND (h.id IS NULL OR h.deleted),
           w.del,
           CASE WHEN w.prev_i IS NOT NULL
                THEN coalesce(CASE WHEN h.deleted THEN NULL ELSE h.create_rev END, base + w.first_i)
                WHEN h.deleted THEN NULL ELSE h.create_rev END,
           coalesce(base + w.prev_i, h.id, 0),
           0,
           CASE WHEN w.del THEN NULL ELSE w.value END,
           CASE WHEN w.prev_i IS NOT NULL THEN w.prev_value WHEN h.deleted THEN NULL ELSE h.value END
         FROM (SELECT i, name, del, value, lag(i) OVER win AS prev_i,
                 lag(value) OVER win AS prev_value, first_value(i) OVER win AS first_i
               FROM bulk WINDOW win AS (PARTITION BY name ORDER BY i)) AS w
         LEFT JOIN (SELECT name, id, deleted, coalesce(nullif(create_revision, 0), id) AS create_rev, value
                    FROM kine WHERE id IN (SELECT max(id) FROM kine GROUP BY name)) AS h USING (name),
           (SELECT max((SELECT coalesce(max(id), 0) FROM kine),
                       (SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'kine')) AS base)
         ORDER BY w.i;
         DROP TABLE bulk;
         PRAGMA wal_checkpoint(TRUNCATE);"
    );
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .map_err(fail("run sqlite3 (Debian package sqlite3) on", db))?;
    if out.status.success() {
        Ok(())
    } else {
        let why = format!(
            "sqlite3 {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Err(fail("fill", db)(std::io::Error::other(why)))
    }
}

/// How big a crashed root to build.
pub struct CrashedRoot {
    /// Rows in the kine database.
    pub kine_rows: u64,
    /// containerd tasks (each with its shim and socket) left behind.
    pub tasks: usize,
}

impl CrashedRoot {
    /// Builds the crashed state under `root`; returns the files a boot must leave unchanged
    /// (path relative to `root`, bytes). Everything else it writes is stale: the kine rows
    /// [`stale_rows`] counts for the boot policy, the containerd task and shim directories, the ingest directory, the
    /// sockets, the node password and the IPAM files.
    pub fn build(&self, root: &Path) -> Result<Vec<(String, Vec<u8>)>> {
        let db = root.join(KINE_DB);
        if let Some(dir) = db.parent() {
            std::fs::create_dir_all(dir).map_err(fail("create", dir))?;
        }
        kine_database(&db, self.kine_rows)?;
        self.runtime_leftovers(root)?;
        bundled(root)?;
        let kept = kept();
        for (rel, bytes) in &kept {
            write(&root.join(rel), bytes)?;
        }
        Ok(kept)
    }

    /// containerd's and the CNI plugin's state from the run that was killed.
    fn runtime_leftovers(&self, root: &Path) -> Result<()> {
        let ctrd = root.join(CONTAINERD);
        for i in 0..self.tasks {
            let id = format!("{i:064x}");
            let task = ctrd.join(format!("io.containerd.runtime.v2.task/k8s.io/{id}"));
            write(&task.join("config.json"), &[b'{'; 4096])?;
            write(&task.join("init.pid"), b"4242")?;
            write(&task.join("rootfs/.keep"), b"")?;
            let shim = ctrd.join(format!(
                "io.containerd.sandbox.controller.v1.shim/k8s.io/{id}"
            ));
            write(&shim.join("bootstrap.json"), b"{}")?;
            socket(&root.join(format!("run/containerd/s/{i:08x}")))?;
        }
        write(
            &ctrd.join("io.containerd.content.v1.content/ingest/x/data"),
            &[0; 65536],
        )?;
        socket(&ctrd.join("containerd.sock"))?;
        socket(&root.join("var/lib/rancher/k3s/server/kine.sock"))?;
        write(
            &root.join("var/lib/rancher/k3s/server/cred/node-passwd"),
            b"openshell-vm:hash\n",
        )?;
        for i in 0..8 {
            write(
                &root.join(format!("var/lib/cni/networks/cbr0/10.42.0.{}", i + 2)),
                b"ctr\neth0",
            )?;
        }
        Ok(())
    }
}

/// The gateway root's bundled manifests (from the checkout) and a chart.
fn bundled(root: &Path) -> Result<()> {
    let from =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../rootfs/gateway/opt/openshell/manifests");
    let dest = root.join("opt/openshell/manifests");
    std::fs::create_dir_all(&dest).map_err(fail("create", &dest))?;
    for entry in std::fs::read_dir(&from).map_err(fail("read", &from))? {
        let entry = entry.map_err(fail("read", &from))?;
        let to = dest.join(entry.file_name());
        std::fs::copy(entry.path(), &to).map_err(fail("copy", &to))?;
    }
    write(
        &root.join("opt/openshell/charts/openshell-0.1.0.tgz"),
        &[3; 200_000],
    )
}

/// What a boot must keep: containerd's metadata and content blobs, and a file of the user's.
fn kept() -> Vec<(String, Vec<u8>)> {
    let mut kept = vec![(
        format!("{CONTAINERD}/io.containerd.metadata.v1.bolt/meta.db"),
        (0..1u32 << 20).map(|i| (i % 251) as u8).collect(),
    )];
    for i in 0..20u8 {
        kept.push((
            format!("{CONTAINERD}/io.containerd.content.v1.content/blobs/sha256/{i:064x}"),
            vec![i.wrapping_add(1); 16384],
        ));
    }
    kept.push((
        "root/notes.txt".to_string(),
        b"the user's own file\n".to_vec(),
    ));
    kept
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail("create", dir))?;
    }
    std::fs::write(path, bytes).map_err(fail("write", path))
}

/// A socket file nobody listens on: bound and dropped, as after a crash.
fn socket(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail("create", dir))?;
    }
    std::os::unix::net::UnixListener::bind(path)
        .map(drop)
        .map_err(fail("bind", path))
}

/// What the sqlite3 CLI prints for `sql` on `db`, trimmed; for tests, so a failure panics with
/// the statement and sqlite3's message.
pub fn query(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("sqlite3 (Debian package sqlite3)");
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefixes the kine phase prunes at boot by default.
    fn boot_prefixes() -> Vec<String> {
        openshell_shared::config::Kine::default().prune_prefixes
    }

    #[test]
    fn the_root_holds_stale_state_and_the_files_to_keep() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        let kept = CrashedRoot {
            kine_rows: 100,
            tasks: 3,
        }
        .build(root)
        .expect("built");
        let db = root.join(KINE_DB);
        assert_eq!(query(&db, "PRAGMA integrity_check"), "ok");
        assert_eq!(query(&db, "SELECT count(*) FROM kine"), "102");
        // Of 100: 20 events, 20 leases, 10 endpoint slices; and the bootstrap lock. Pods are
        // kept at boot.
        assert_eq!(query(&db, &stale_rows(&boot_prefixes())), "51");
        assert_eq!(
            query(
                &db,
                "SELECT count(*) FROM kine WHERE name LIKE '/registry/pods/%'"
            ),
            "10"
        );
        assert!(!query(&db, &kept_rows(&boot_prefixes())).is_empty());
        let ctrd = root.join(CONTAINERD);
        let tasks = ctrd.join("io.containerd.runtime.v2.task/k8s.io");
        assert_eq!(std::fs::read_dir(tasks).expect("tasks").count(), 3);
        use std::os::unix::fs::FileTypeExt;
        for sock in [
            ctrd.join("containerd.sock"),
            root.join("var/lib/rancher/k3s/server/kine.sock"),
            root.join("run/containerd/s/00000002"),
        ] {
            let meta = std::fs::symlink_metadata(&sock).expect("socket file");
            assert!(meta.file_type().is_socket(), "{}", sock.display());
        }
        assert!(ctrd
            .join("io.containerd.content.v1.content/ingest/x/data")
            .is_file());
        assert!(root
            .join("var/lib/rancher/k3s/server/cred/node-passwd")
            .is_file());
        assert!(root.join("var/lib/cni/networks/cbr0/10.42.0.9").is_file());
        assert!(root
            .join("opt/openshell/manifests/openshell-helmchart.yaml")
            .is_file());
        assert_eq!(kept.len(), 22);
        for (rel, bytes) in &kept {
            assert_eq!(
                &std::fs::read(root.join(rel)).expect("kept file"),
                bytes,
                "{rel}"
            );
        }
    }

    /// The rows follow kine's format, and a second fill continues the first one's chains.
    #[test]
    fn rows_are_in_kines_row_format() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = dir.path().join("state.db");
        kine_database(&db, 400).expect("first");
        kine_database(&db, 400).expect("second");
        assert_eq!(query(&db, "SELECT count(*) FROM kine"), "802");
        for (what, sql) in [
            (
                "a row's previous revision is its key's row before it",
                "SELECT count(*) FROM kine k WHERE prev_revision != coalesce((SELECT max(id) FROM kine p WHERE p.name = k.name AND p.id < k.id), 0)",
            ),
            (
                "an update carries its previous value",
                "SELECT count(*) FROM kine k JOIN kine p ON p.id = k.prev_revision WHERE k.created = 0 AND k.old_value IS NOT p.value",
            ),
            (
                "a create has no create revision and no old value",
                "SELECT count(*) FROM kine WHERE created = 1 AND (create_revision IS NOT NULL OR old_value IS NOT NULL)",
            ),
            (
                "an update or tombstone names its key's create row",
                "SELECT count(*) FROM kine k WHERE created = 0 AND create_revision IS NOT (SELECT max(id) FROM kine c WHERE c.name = k.name AND c.created = 1 AND c.id < k.id)",
            ),
            (
                "a tombstone has no value",
                "SELECT count(*) FROM kine WHERE deleted = 1 AND value IS NOT NULL",
            ),
        ] {
            assert_eq!(query(&db, sql), "0", "{what}");
        }
        assert!(
            query(&db, "SELECT count(*) FROM kine WHERE deleted = 1")
                .parse::<u32>()
                .expect("n")
                > 10
        );
        assert_eq!(
            query(&db, "SELECT count(*) FROM kine WHERE created = 1 AND prev_revision != 0"),
            query(&db, "SELECT count(DISTINCT name) FROM kine WHERE deleted = 1 AND name IN (SELECT name FROM kine WHERE id > 402)"),
            "an expired event written again is created anew"
        );
    }

    #[test]
    fn a_database_that_cannot_be_written_names_its_path() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = dir.path().join("no/such/dir/state.db");
        let err = kine_database(&db, 1).unwrap_err();
        assert_eq!(err.path, db);
        assert!(err.to_string().contains("state.db"), "{err}");
    }
}
