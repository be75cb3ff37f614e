//! The `kine` phase: k3s's SQLite database, checked and pruned before k3s starts, in process
//! (bundled SQLite: no sqlite3 binary in the guest).
//!
//! Order matters and every step keeps the user's data: a free-space guard first; then
//! `PRAGMA quick_check`, and on failure a timestamped copy of the database files before the one
//! documented recovery (drop `-wal`/`-shm`, falling back to the last checkpoint); then pruning in
//! one transaction. kine is log-structured (a key's value is its newest row, older rows are its
//! history), so an object is dropped by deleting every row of its key: deleting only the newest
//! would resurrect the previous revision. What is pruned is configured (`kine.prune_prefixes`):
//! by default what a restart makes stale, never Pod objects. `compact_rev_key` and every other
//! key stay untouched, and so does the current revision (see [`prune`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use openshell_shared::config::Kine;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::context::{Ctx, StateDiskInUse};
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::k3s::paths::KINE_DB;

pub const PHASE: Phase = Phase {
    name: "kine",
    after: &["config", "state-disk"],
    fatal: true,
    waits: false,
    purpose:
        "check the k3s database, keep a copy if corrupt, prune stale objects and bootstrap locks",
    run,
};

#[derive(Debug, thiserror::Error)]
pub enum KineError {
    #[error("{path}: only {free_mib} MiB free{on}, {min_mib} MiB needed: not touching the database and not starting k3s")]
    NoSpace {
        path: PathBuf,
        free_mib: u64,
        min_mib: u64,
        /// Which disk, when it is the state disk (empty otherwise).
        on: String,
    },
    #[error("{path}: cannot check free space: {errno}")]
    Statvfs {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("{path}: database is corrupt ({first_error}) and dropping its WAL did not help; copies kept in {backup}; k3s not started")]
    Corrupt {
        path: PathBuf,
        first_error: String,
        backup: PathBuf,
    },
    #[error("{path}: cannot keep a copy of the damaged database in {backup}: {source}")]
    Backup {
        path: PathBuf,
        backup: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}: {source}")]
    Sql {
        path: PathBuf,
        what: &'static str,
        source: rusqlite::Error,
    },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// What the phase did, for the report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KineReport {
    /// (prefix, rows deleted, distinct keys deleted)
    pub pruned: Vec<(String, u64, u64)>,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub vacuumed: bool,
    /// Set when the database failed its check and was recovered by dropping the WAL.
    pub recovered_from: Option<PathBuf>,
    /// Set when the newest row was pruned: the revision kept with kine's gap marker.
    pub revision_kept: Option<i64>,
}

impl KineReport {
    pub fn rows(&self) -> u64 {
        self.pruned.iter().map(|p| p.1).sum()
    }

    fn describe(&self) -> String {
        let mut out = if self.rows() == 0 {
            "nothing to prune".to_string()
        } else {
            let parts: Vec<String> = self
                .pruned
                .iter()
                .filter(|p| p.1 > 0)
                .map(|(prefix, rows, keys)| format!("{prefix} {rows} rows/{keys} keys"))
                .collect();
            format!("pruned {}", parts.join(", "))
        };
        out.push_str(&format!(
            "; {} -> {} KiB{}",
            self.bytes_before / 1024,
            self.bytes_after / 1024,
            if self.vacuumed { " (vacuumed)" } else { "" }
        ));
        if let Some(rev) = self.revision_kept {
            out.push_str(&format!("; revision {rev} kept with a gap marker"));
        }
        if let Some(copy) = &self.recovered_from {
            out.push_str(&format!(
                "; failed its check: recovered from the last checkpoint, damaged files kept in {}",
                copy.display()
            ));
        }
        out
    }
}

fn run(ctx: &Ctx) -> PhaseResult {
    let db = ctx.path(KINE_DB);
    if !db.exists() {
        return Ok(Done::Skipped("no kine database yet".into()));
    }
    let report = maintain(&db, &ctx.config().kine).map_err(|e| e.on(ctx.state_disk.get()))?;
    Ok(Done::Ok(Some(report.describe())))
}

impl KineError {
    /// A space error names the state disk when the database lives on it: that disk, not the
    /// root, is the one to make bigger.
    fn on(self, disk: Option<&StateDiskInUse>) -> Self {
        match (self, disk) {
            (
                KineError::NoSpace {
                    path,
                    free_mib,
                    min_mib,
                    ..
                },
                Some(d),
            ) if d.holds(KINE_DB) => KineError::NoSpace {
                path,
                free_mib,
                min_mib,
                on: if d.named == d.device {
                    format!(" on the state disk {}", d.device)
                } else {
                    format!(" on the state disk {} (serial {})", d.device, d.named)
                },
            },
            (e, _) => e,
        }
    }
}

/// Checks, recovers if needed, and prunes the database at `db`.
pub fn maintain(db: &Path, cfg: &Kine) -> Result<KineReport, KineError> {
    let dir = db.parent().unwrap_or(Path::new("/"));
    check_space(dir, cfg.min_free_mib)?;
    let mut report = KineReport {
        bytes_before: files_size(db),
        recovered_from: recover_if_damaged(db)?,
        ..KineReport::default()
    };
    let mut conn = open(db).map_err(sql(db, "open"))?;
    prune(&mut conn, db, cfg, &mut report)?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(sql(db, "checkpoint"))?;
    let (free, total): (u64, u64) = conn
        .query_row(
            "SELECT (SELECT freelist_count FROM pragma_freelist_count), (SELECT page_count FROM pragma_page_count)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sql(db, "page counts"))?;
    if total > 0 && free * 100 > total * u64::from(cfg.vacuum_free_percent) {
        conn.execute_batch("VACUUM").map_err(sql(db, "vacuum"))?;
        report.vacuumed = true;
    }
    drop(conn);
    report.bytes_after = files_size(db);
    Ok(report)
}

/// The error for a failed statement: the database and what the statement was for.
fn sql(db: &Path, what: &'static str) -> impl FnOnce(rusqlite::Error) -> KineError {
    let path = db.to_path_buf();
    move |source| KineError::Sql { path, what, source }
}

/// `None` when the database passes its check; the copy of the damaged files when dropping the
/// WAL (falling back to the last checkpoint) made it pass; an error when nothing did.
fn recover_if_damaged(db: &Path) -> Result<Option<PathBuf>, KineError> {
    let Err(first_error) = quick_check(db) else {
        return Ok(None);
    };
    let backup = keep_copy(db)?;
    for suffix in ["-wal", "-shm"] {
        let p = sibling(db, suffix);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|source| KineError::Io {
                path: p.clone(),
                what: "drop for recovery",
                source,
            })?;
        }
    }
    if quick_check(db).is_err() {
        return Err(KineError::Corrupt {
            path: db.to_path_buf(),
            first_error,
            backup,
        });
    }
    Ok(Some(backup))
}

/// Deletes every row of every key under the configured prefixes, in one transaction. kine's
/// current revision is its highest row id, and it replays a watch row by row from there,
/// filling every missing id with a `gap-<id>` row first: so when the newest row is pruned, the
/// same marker kine would write takes its place, and the revision neither goes back (clients
/// have seen it) nor leaves a gap at the tail that kine must fill before any watch moves on.
fn prune(
    conn: &mut Connection,
    db: &Path,
    cfg: &Kine,
    report: &mut KineReport,
) -> Result<(), KineError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql(db, "begin transaction (is k3s running?)"))?;
    let newest = |what| {
        tx.query_row("SELECT max(id) FROM kine", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .map_err(sql(db, what))
    };
    let revision = newest("read the current revision")?;
    for prefix in &cfg.prune_prefixes {
        // A range on kine's name index where the prefix allows one; a scan otherwise.
        let (filter, params) = match prefix_end(prefix) {
            Some(end) => ("name >= ?1 AND name < ?2", vec![prefix.clone(), end]),
            None => ("substr(name, 1, length(?1)) = ?1", vec![prefix.clone()]),
        };
        let params = rusqlite::params_from_iter(params.iter());
        let (rows, keys): (u64, u64) = tx
            .query_row(
                &format!("SELECT count(*), count(DISTINCT name) FROM kine WHERE {filter}"),
                params.clone(),
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(sql(db, "count stale rows"))?;
        if rows > 0 {
            tx.execute(&format!("DELETE FROM kine WHERE {filter}"), params)
                .map_err(sql(db, "prune"))?;
        }
        report.pruned.push((prefix.clone(), rows, keys));
    }
    if let Some(rev) = revision.filter(|_| report.rows() > 0) {
        if newest("read the new revision")? != Some(rev) {
            tx.execute(
                "INSERT INTO kine (id, name, created, deleted, create_revision, prev_revision, lease, value, old_value)
                 VALUES (?1, 'gap-' || ?1, 0, 1, 0, 0, 0, NULL, NULL)",
                [rev],
            )
            .map_err(sql(db, "keep the current revision"))?;
            report.revision_kept = Some(rev);
        }
    }
    tx.commit().map_err(sql(db, "commit"))
}

/// The smallest string above every string that starts with `prefix`, under SQLite's binary
/// collation: the prefix with its last byte raised by one. Only for a last byte that stays ASCII
/// when raised (every key prefix k3s uses ends in `/`); `None` means scan instead.
pub fn prefix_end(prefix: &str) -> Option<String> {
    let last = *prefix.as_bytes().last()?;
    if last >= 0x7e {
        return None;
    }
    let mut end = prefix[..prefix.len() - 1].to_string();
    end.push(char::from(last + 1));
    Some(end)
}

fn open(db: &Path) -> rusqlite::Result<Connection> {
    // Never create: a missing database is k3s's to make.
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    // The file is data, not code we trust: its schema (views, triggers) may not call functions
    // or virtual tables with side effects, and no statement may corrupt it on purpose (writable
    // schema, journal off). A database crafted by whoever could write the root stays data.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.pragma_update(None, "trusted_schema", false)?;
    // k3s is not running yet, so a lock is someone else's: wait briefly, then say so.
    conn.busy_timeout(Duration::from_secs(2))?;
    Ok(conn)
}

/// `Ok` when SQLite's quick check passes; otherwise its first complaint.
pub fn quick_check(db: &Path) -> Result<(), String> {
    let conn = open(db).map_err(|e| e.to_string())?;
    let first: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if first == "ok" {
        Ok(())
    } else {
        Err(first)
    }
}

fn sibling(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

fn files_size(db: &Path) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|s| std::fs::metadata(sibling(db, s)).ok())
        .map(|m| m.len())
        .sum()
}

/// Copies the database and its WAL/SHM into a new `corrupt-<unix time>` directory beside them.
fn keep_copy(db: &Path) -> Result<PathBuf, KineError> {
    let dir = db.parent().unwrap_or(Path::new("/"));
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut backup = dir.join(format!("corrupt-{stamp}"));
    let mut n = 1;
    while backup.exists() {
        backup = dir.join(format!("corrupt-{stamp}-{n}"));
        n += 1;
    }
    let err = |source| KineError::Backup {
        path: db.to_path_buf(),
        backup: backup.clone(),
        source,
    };
    std::fs::create_dir(&backup).map_err(err)?;
    for suffix in ["", "-wal", "-shm"] {
        let from = sibling(db, suffix);
        if let Some(name) = from.file_name().filter(|_| from.exists()) {
            std::fs::copy(&from, backup.join(name)).map_err(err)?;
        }
    }
    // The copy must be on disk before anything is dropped.
    nix::unistd::sync();
    Ok(backup)
}

fn check_space(dir: &Path, min_mib: u64) -> Result<(), KineError> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|errno| KineError::Statvfs {
        path: dir.to_path_buf(),
        errno,
    })?;
    #[allow(clippy::unnecessary_cast)] // field widths differ between libcs
    let free_mib = (st.blocks_available() as u64 * st.fragment_size() as u64) >> 20;
    if free_mib < min_mib {
        return Err(KineError::NoSpace {
            path: dir.to_path_buf(),
            free_mib,
            min_mib,
            on: String::new(),
        });
    }
    Ok(())
}

#[cfg(test)]
pub mod fixture {
    //! Databases with kine's real schema and realistic keys and revision chains.

    use super::*;

    /// kine's schema: the workspace's one copy, shared with the VM crash test and the benches.
    pub const SCHEMA: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kine-schema.sql"
    ));

    /// Appends `revisions` rows for `name` in kine's row format: a create (no create revision,
    /// no previous row), updates that point at their previous row and carry its value, and
    /// optionally a tombstone (deleted, no value).
    pub fn object(conn: &Connection, name: &str, revisions: u32, tombstone: bool) {
        let mut prev: i64 = 0;
        let mut create: Option<i64> = None;
        let mut old: Option<Vec<u8>> = None;
        for r in 0..revisions {
            let deleted = tombstone && r + 1 == revisions;
            let value = (!deleted).then(|| format!("{name}#{r}").into_bytes());
            conn.execute(
                "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value, old_value)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7)",
                rusqlite::params![name, r == 0, deleted, create, prev, value, old],
            )
            .expect("insert");
            prev = conn.last_insert_rowid();
            create.get_or_insert(prev);
            old = value;
        }
    }

    /// A database like a k3s that ran a while and was killed: pods, events, leases with history,
    /// a bootstrap lock, compaction and gap rows, and keys that must survive.
    pub fn realistic(db: &Path) -> Connection {
        let conn = Connection::open(db).expect("open");
        conn.execute_batch("PRAGMA journal_mode=WAL;").expect("wal");
        conn.execute_batch(SCHEMA).expect("schema");
        object(&conn, "compact_rev_key", 1, false);
        object(&conn, "/bootstrap/2a5f0c1d", 1, false);
        for i in 0..20 {
            object(
                &conn,
                &format!("/registry/pods/openshell/gateway-{i}"),
                4,
                i % 5 == 0,
            );
            object(
                &conn,
                &format!("/registry/events/openshell/gateway-{i}.17a"),
                1,
                false,
            );
        }
        object(
            &conn,
            "/registry/leases/kube-node-lease/openshell-vm",
            30,
            false,
        );
        object(&conn, "/registry/masterleases/192.168.127.2", 3, false);
        object(
            &conn,
            "/registry/endpointslices/default/kubernetes",
            2,
            false,
        );
        gap(&conn);
        object(&conn, "/registry/minions/openshell-vm", 5, false);
        object(&conn, "/registry/secrets/openshell/gateway-tls", 2, false);
        object(&conn, "/registry/podtemplates/default/t", 1, false);
        object(
            &conn,
            "/registry/configmaps/kube-system/cluster-dns",
            1,
            false,
        );
        // Leases renew all the time: the newest rows are usually theirs.
        object(
            &conn,
            "/registry/leases/kube-system/kube-scheduler",
            3,
            false,
        );
        conn
    }

    /// The row kine writes for a revision it found missing (`Generic::Fill`).
    pub fn gap(conn: &Connection) {
        conn.execute(
            "INSERT INTO kine (id, name, created, deleted, create_revision, prev_revision, lease, value, old_value)
             SELECT n, 'gap-' || n, 0, 1, 0, 0, 0, NULL, NULL FROM (SELECT coalesce(max(id), 0) + 1 AS n FROM kine)",
            [],
        )
        .expect("gap");
    }

    pub fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).expect("count")
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().expect("tmp");
        let db = t.path().join("state.db");
        (t, db)
    }

    type Row = (
        i64,
        String,
        bool,
        bool,
        Option<i64>,
        i64,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
    );

    /// Every row, in id order, of every key outside `prefixes`.
    fn kept_rows(db: &Path, prefixes: &[String]) -> Vec<Row> {
        let conn = Connection::open(db).expect("open");
        let mut stmt = conn
            .prepare("SELECT id, name, created, deleted, create_revision, prev_revision, value, old_value FROM kine ORDER BY id")
            .expect("prepare");
        stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })
        .expect("query")
        .map(|r| r.expect("row"))
        .filter(|row: &Row| !prefixes.iter().any(|p| row.1.starts_with(p.as_str())))
        .collect()
    }

    fn newest(conn: &Connection) -> i64 {
        count(conn, "SELECT max(id) FROM kine")
    }

    #[test]
    fn prefix_ranges_cover_exactly_the_prefix() {
        assert_eq!(
            prefix_end("/registry/pods/").as_deref(),
            Some("/registry/pods0")
        );
        assert_eq!(prefix_end("a~"), None, "0x7f is not a printable bound");
        assert_eq!(prefix_end("é"), None, "non-ASCII last byte: scan");
        assert_eq!(prefix_end(""), None);
        let end = prefix_end("/bootstrap/").expect("end");
        for inside in ["/bootstrap/", "/bootstrap/x", "/bootstrap/\u{10ffff}"] {
            assert!(inside >= "/bootstrap/" && inside < end.as_str(), "{inside}");
        }
        for outside in ["/bootstrap", "/bootstrap0", "/bootstrapx", "/bootstrap0/x"] {
            assert!(
                !(outside >= "/bootstrap/" && outside < end.as_str()),
                "{outside}"
            );
        }
    }

    /// Prunes `cfg`'s prefixes from the realistic database and checks what a restarted kine
    /// would see: no row of a pruned key, every other row as it was, the same newest revision.
    fn prune_and_check(cfg: &Kine) -> KineReport {
        let (_t, db) = setup();
        let conn = realistic(&db);
        let revision = newest(&conn);
        drop(conn);
        let before_kept = kept_rows(&db, &cfg.prune_prefixes);
        let report = maintain(&db, cfg).expect("maintain");
        let conn = Connection::open(&db).expect("open");
        for prefix in &cfg.prune_prefixes {
            let left = count(
                &conn,
                &format!("SELECT count(*) FROM kine WHERE name LIKE '{prefix}%'"),
            );
            assert_eq!(left, 0, "{prefix} rows left: no revision may come back");
        }
        let mut after_kept = kept_rows(&db, &cfg.prune_prefixes);
        // The newest row was a lease's: kine's gap marker holds its revision now.
        assert_eq!(report.revision_kept, Some(revision), "{report:?}");
        assert_eq!(newest(&conn), revision, "the revision went back");
        let marker = after_kept.pop().expect("marker");
        let gap_name = format!("gap-{revision}");
        assert_eq!(
            marker,
            (revision, gap_name, false, true, Some(0), 0, None, None)
        );
        assert_eq!(
            after_kept, before_kept,
            "kept keys are byte for byte the same"
        );
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM pragma_integrity_check WHERE integrity_check != 'ok'"
            ),
            0
        );
        // The WAL was checkpointed into the main file and truncated.
        assert_eq!(
            std::fs::metadata(sibling(&db, "-wal"))
                .map(|m| m.len())
                .unwrap_or(0),
            0
        );
        report
    }

    fn pruned(report: &KineReport, prefix: &str) -> Option<(u64, u64)> {
        report
            .pruned
            .iter()
            .find(|p| p.0 == prefix)
            .map(|p| (p.1, p.2))
    }

    #[test]
    fn boot_policy_prunes_what_a_restart_makes_stale_and_keeps_pods() {
        let report = prune_and_check(&Kine::default());
        assert_eq!(pruned(&report, "/registry/pods/"), None, "pods are kept");
        assert_eq!(pruned(&report, "/registry/leases/"), Some((33, 2)));
        assert_eq!(pruned(&report, "/registry/events/"), Some((20, 20)));
        assert_eq!(pruned(&report, "/bootstrap/"), Some((1, 1)));
        assert!(
            report.describe().contains("kept with a gap marker"),
            "{}",
            report.describe()
        );
    }

    #[test]
    fn build_time_policy_prunes_pods_too() {
        let report = prune_and_check(&Kine::default().pruning_pods());
        assert_eq!(pruned(&report, "/registry/pods/"), Some((80, 20)));
        assert_eq!(pruned(&report, "/registry/leases/"), Some((33, 2)));
    }

    #[test]
    fn no_marker_when_the_newest_row_is_kept() {
        let (_t, db) = setup();
        let conn = realistic(&db);
        object(&conn, "/registry/configmaps/openshell/late", 2, false);
        let revision = newest(&conn);
        drop(conn);
        let report = maintain(&db, &Kine::default()).expect("maintain");
        assert!(report.rows() > 0);
        assert_eq!(report.revision_kept, None);
        let conn = Connection::open(&db).expect("open");
        assert_eq!(newest(&conn), revision);
        assert_eq!(
            count(&conn, "SELECT count(*) FROM kine WHERE name LIKE 'gap-%'"),
            1,
            "only the fixture's own gap row"
        );
    }

    #[test]
    fn second_run_prunes_nothing_and_says_so() {
        let (_t, db) = setup();
        drop(realistic(&db));
        assert!(maintain(&db, &Kine::default()).expect("first").rows() > 0);
        let again = maintain(&db, &Kine::default()).expect("second");
        assert_eq!(again.rows(), 0);
        assert!(
            again.describe().starts_with("nothing to prune"),
            "{}",
            again.describe()
        );
    }

    #[test]
    fn prefixes_are_literal_not_patterns() {
        let (_t, db) = setup();
        let conn = realistic(&db);
        // `_` and `%` are LIKE wildcards; a prefix must only match itself.
        object(&conn, "/registry/pods_x/keep", 1, false);
        object(&conn, "/registry/podsZ/keep", 1, false);
        drop(conn);
        let cfg = Kine {
            prune_prefixes: vec!["/registry/pods/".into()],
            ..Kine::default()
        };
        maintain(&db, &cfg).expect("maintain");
        let conn = Connection::open(&db).expect("open");
        assert_eq!(
            count(&conn, "SELECT count(*) FROM kine WHERE name LIKE '%/keep'"),
            2
        );
    }

    #[test]
    fn vacuum_only_past_the_free_page_threshold() {
        let (_t, db) = setup();
        let conn = realistic(&db);
        for i in 0..400 {
            object(&conn, &format!("/registry/events/bulk/e{i}"), 2, false);
        }
        drop(conn);
        let never = Kine {
            vacuum_free_percent: 100,
            ..Kine::default()
        };
        let r = maintain(&db, &never).expect("maintain");
        assert!(!r.vacuumed);
        let (_t2, db2) = setup();
        let conn = realistic(&db2);
        for i in 0..400 {
            object(&conn, &format!("/registry/events/bulk/e{i}"), 2, false);
        }
        drop(conn);
        let r = maintain(&db2, &Kine::default()).expect("maintain");
        assert!(r.vacuumed, "{r:?}");
        assert!(r.bytes_after < r.bytes_before, "{r:?}");
    }

    #[test]
    fn garbage_file_is_kept_and_reported_never_deleted() {
        let (t, db) = setup();
        std::fs::write(&db, vec![0x5a; 8192]).expect("write");
        let err = maintain(&db, &Kine::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("state.db") && text.contains("k3s not started"),
            "{text}"
        );
        assert_eq!(std::fs::read(&db).expect("still there"), vec![0x5a; 8192]);
        let KineError::Corrupt { backup, .. } = err else {
            panic!("expected corrupt")
        };
        assert_eq!(
            std::fs::read(backup.join("state.db")).expect("copy"),
            vec![0x5a; 8192]
        );
        assert!(backup.starts_with(t.path()));
    }

    #[test]
    fn truncated_file_is_reported() {
        let (_t, db) = setup();
        drop(realistic(&db));
        // Fold the WAL in, then cut the file in half.
        maintain(
            &db,
            &Kine {
                prune_prefixes: vec![],
                ..Kine::default()
            },
        )
        .expect("checkpoint");
        let bytes = std::fs::read(&db).expect("read");
        std::fs::write(&db, &bytes[..bytes.len() / 2]).expect("truncate");
        assert!(matches!(
            maintain(&db, &Kine::default()),
            Err(KineError::Corrupt { .. })
        ));
        assert_eq!(std::fs::read(&db).expect("kept").len(), bytes.len() / 2);
    }

    #[test]
    fn stale_wal_from_a_crash_is_folded_in_not_lost() {
        let (t, db) = setup();
        let conn = realistic(&db);
        conn.execute_batch("PRAGMA wal_autocheckpoint=0;")
            .expect("pragma");
        object(
            &conn,
            "/registry/configmaps/late/written-before-crash",
            1,
            false,
        );
        object(&conn, "/registry/leases/late/l", 1, false);
        // The "crash": copy the files while the connection is live, WAL unmerged.
        let crashed = t.path().join("crashed");
        std::fs::create_dir(&crashed).expect("mkdir");
        for suffix in ["", "-wal", "-shm"] {
            let from = sibling(&db, suffix);
            std::fs::copy(&from, sibling(&crashed.join("state.db"), suffix)).expect("copy");
        }
        drop(conn);
        let db = crashed.join("state.db");
        assert!(std::fs::metadata(sibling(&db, "-wal")).expect("wal").len() > 0);
        let report = maintain(&db, &Kine::default()).expect("maintain");
        assert!(report.recovered_from.is_none());
        let conn = Connection::open(&db).expect("open");
        assert_eq!(
            count(&conn, "SELECT count(*) FROM kine WHERE name = '/registry/configmaps/late/written-before-crash'"),
            1
        );
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM kine WHERE name LIKE '/registry/leases/%'"
            ),
            0
        );
        assert_eq!(
            std::fs::metadata(sibling(&db, "-wal"))
                .map(|m| m.len())
                .unwrap_or(0),
            0
        );
    }

    #[test]
    fn database_locked_by_another_connection_is_an_error_and_unchanged() {
        let (_t, db) = setup();
        drop(realistic(&db));
        let holder = Connection::open(&db).expect("open");
        holder.execute_batch("BEGIN EXCLUSIVE;").expect("lock");
        let started = std::time::Instant::now();
        let err = maintain(&db, &Kine::default()).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        let text = err.to_string();
        assert!(
            text.contains("state.db") && text.contains("locked"),
            "{text}"
        );
        holder.execute_batch("ROLLBACK;").expect("unlock");
        let conn = Connection::open(&db).expect("open");
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM kine WHERE name LIKE '/registry/events/%'"
            ),
            20
        );
    }

    /// The database is opened as untrusted data: its views and triggers may not reach virtual
    /// tables or functions with side effects, and the schema cannot be rewritten by a statement.
    #[test]
    fn a_crafted_schema_is_not_trusted_and_cannot_be_rewritten() {
        let (_t, db) = setup();
        let conn = realistic(&db);
        conn.execute_batch(
            "CREATE VIEW peek AS SELECT name FROM pragma_table_info('kine');
             CREATE TABLE seen (n TEXT);
             CREATE TRIGGER spy AFTER DELETE ON kine BEGIN
               INSERT INTO seen SELECT name FROM pragma_table_info('kine');
             END;",
        )
        .expect("hostile schema");
        assert!(
            count(&conn, "SELECT count(*) FROM peek") > 0,
            "trusted by default"
        );
        drop(conn);
        let conn = open(&db).expect("open");
        assert!(conn
            .db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE)
            .expect("defensive"));
        let trusted: i64 = conn
            .query_row("PRAGMA trusted_schema", [], |r| r.get(0))
            .expect("pragma");
        assert_eq!(trusted, 0);
        let err = conn
            .query_row("SELECT count(*) FROM peek", [], |r| r.get::<_, i64>(0))
            .expect_err("the view may not use a pragma table");
        assert!(err.to_string().contains("unsafe use"), "{err}");
        let err = conn
            .execute_batch("PRAGMA writable_schema=ON; UPDATE sqlite_master SET sql = 'x';")
            .expect_err("defensive mode");
        assert!(err.to_string().contains("may not be modified"), "{err}");
        drop(conn);
        // Pruning fires the trigger: refused, and the transaction leaves every row in place.
        let err = maintain(&db, &Kine::default()).expect_err("trigger refused");
        assert!(err.to_string().contains("unsafe use"), "{err}");
        let conn = Connection::open(&db).expect("open");
        assert_eq!(count(&conn, "SELECT count(*) FROM seen"), 0);
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM kine WHERE name LIKE '/registry/events/%'"
            ),
            20
        );
    }

    #[test]
    fn not_enough_space_refuses_before_touching_anything() {
        let (_t, db) = setup();
        drop(realistic(&db));
        let greedy = Kine {
            min_free_mib: u64::MAX >> 21,
            ..Kine::default()
        };
        match maintain(&db, &greedy) {
            Err(KineError::NoSpace { .. }) => {}
            other => panic!("expected no space, got {other:?}"),
        }
        // The phase names the state disk when the database lives on it, and only then.
        let disk = |bound| StateDiskInUse {
            device: "/dev/vdb".into(),
            named: "openshell-state".into(),
            bound,
        };
        let on_disk = maintain(&db, &greedy)
            .unwrap_err()
            .on(Some(&disk(vec![crate::k3s::paths::K3S_SERVER_DB])))
            .to_string();
        assert!(
            on_disk.contains(" MiB free on the state disk /dev/vdb (serial openshell-state), "),
            "{on_disk}"
        );
        for elsewhere in [Some(disk(vec![crate::k3s::paths::K3S_AGENT])), None] {
            let text = maintain(&db, &greedy)
                .unwrap_err()
                .on(elsewhere.as_ref())
                .to_string();
            assert!(!text.contains("state disk"), "{text}");
        }
        let conn = Connection::open(&db).expect("open");
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM kine WHERE name LIKE '/bootstrap/%'"
            ),
            1
        );
    }
}
