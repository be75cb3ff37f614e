//! `cargo xtask bench kine`: openshell-init's `kine` phase against the old way (the sqlite3 CLI
//! running the old DELETE statements, checkpoint and VACUUM) on copies of the same database.
//! Both are timed as whole processes; the phase's own duration is shown too.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::bench::stats;
use crate::tools::cargo;
use crate::{run as exec, run_output, target_dir, Error, Result};

/// kine's schema, as k3s creates it.
const SCHEMA: &str = "
CREATE TABLE kine (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, created INTEGER, deleted INTEGER,
  create_revision INTEGER, prev_revision INTEGER, lease INTEGER, value BLOB, old_value BLOB);
CREATE INDEX kine_name_index ON kine (name);
CREATE INDEX kine_name_id_index ON kine (name, id);
CREATE INDEX kine_id_deleted_index ON kine (id, deleted);
CREATE INDEX kine_prev_revision_index ON kine (prev_revision);
CREATE UNIQUE INDEX kine_name_prev_revision_uindex ON kine (name, prev_revision);
CREATE INDEX kine_list_query_index ON kine (name, id DESC, deleted) WHERE name != 'compact_rev_key';
";

/// What the old system ran at build time, plus the bootstrap-lock DELETE it ran at boot.
const OLD_WAY: &str = "
DELETE FROM kine WHERE name LIKE '/registry/pods/%';
DELETE FROM kine WHERE name LIKE '/registry/events/%';
DELETE FROM kine WHERE name LIKE '/registry/leases/%';
DELETE FROM kine WHERE name LIKE '/registry/endpointslices/%';
DELETE FROM kine WHERE name LIKE '/registry/masterleases/%';
DELETE FROM kine WHERE name LIKE '/bootstrap/%';
PRAGMA wal_checkpoint(TRUNCATE);
VACUUM;
";

/// A database of `rows` rows: revision chains of pods, events, leases and long-lived objects,
/// the mix a gateway's k3s accumulates.
pub fn generate(db: &Path, rows: u64) -> Result<()> {
    let sql = format!(
        "PRAGMA journal_mode=WAL;
         {SCHEMA}
         INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value, old_value)
           VALUES ('compact_rev_key', 0, 0, 0, 0, 0, NULL, NULL);
         INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value, old_value)
           VALUES ('/bootstrap/2a5f0c1d', 1, 0, 0, 0, 0, x'00', NULL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
         INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value, old_value)
         SELECT CASE i % 10
             WHEN 0 THEN '/registry/pods/openshell/p' || (i / 40)
             WHEN 1 THEN '/registry/events/openshell/e' || i
             WHEN 2 THEN '/registry/events/kube-system/e' || i
             WHEN 3 THEN '/registry/leases/kube-node-lease/openshell-vm'
             WHEN 4 THEN '/registry/leases/kube-system/l' || (i / 5000)
             WHEN 5 THEN '/registry/endpointslices/openshell/s' || (i / 200)
             WHEN 6 THEN '/registry/configmaps/openshell/c' || (i / 100)
             WHEN 7 THEN '/registry/minions/openshell-vm'
             WHEN 8 THEN '/registry/secrets/openshell/s' || (i / 500)
             ELSE 'gap-' || i END,
           i % 97 = 0, 0, i, i, 0, randomblob(180), NULL
         FROM n;
         PRAGMA wal_checkpoint(TRUNCATE);"
    );
    exec(Command::new("sqlite3").arg(db).arg(sql))
}

pub fn run(rows: u64, runs: usize) -> Result<()> {
    run_init_build()?;
    let init = target_dir().join("release/openshell-init");
    let work = tempdir()?;
    let template = work.join("template.db");
    eprintln!("xtask bench: generating a {rows}-row kine database");
    generate(&template, rows)?;
    let mut ours = Vec::new();
    let mut ours_phase = Vec::new();
    let mut old = Vec::new();
    let mut checks = Vec::new();
    for i in 0..runs {
        eprintln!("xtask bench: run {}/{runs}", i + 1);
        // Ours: the phase against a root holding a copy.
        let root = work.join(format!("root{i}"));
        let db_dir = root.join("var/lib/rancher/k3s/server/db");
        std::fs::create_dir_all(&db_dir).map_err(|e| Error::io("create", &db_dir, e))?;
        let ours_db = db_dir.join("state.db");
        std::fs::copy(&template, &ours_db).map_err(|e| Error::io("copy", &template, e))?;
        let start = Instant::now();
        let out = run_output(
            Command::new(&init)
                .args(["phase", "kine", "--root"])
                .arg(&root),
        )?;
        ours.push(start.elapsed().as_secs_f64() * 1000.0);
        let finished = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["msg"]["type"] == "phase_finished")
            .ok_or_else(|| Error::msg(format!("no phase_finished in: {out}")))?;
        ours_phase.push(finished["msg"]["duration_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        // Old: the same statements through the sqlite3 CLI on another copy.
        let old_db = work.join(format!("old{i}.db"));
        std::fs::copy(&template, &old_db).map_err(|e| Error::io("copy", &template, e))?;
        let start = Instant::now();
        exec(Command::new("sqlite3").arg(&old_db).arg(OLD_WAY))?;
        old.push(start.elapsed().as_secs_f64() * 1000.0);
        // Correctness: every row of every pruned key gone, the rest identical.
        let q = |db: &Path, sql: &str| {
            run_output(Command::new("sqlite3").arg(db).arg(sql)).map(|s| s.trim().to_string())
        };
        let stale = "SELECT count(*) FROM kine WHERE name LIKE '/registry/pods/%' OR name LIKE '/registry/events/%' OR name LIKE '/registry/leases/%' OR name LIKE '/registry/endpointslices/%' OR name LIKE '/registry/masterleases/%' OR name LIKE '/bootstrap/%'";
        let digest = "SELECT count(*), sum(length(value)), max(id) FROM kine";
        checks.push((
            q(&ours_db, stale)? == "0",
            q(&ours_db, "PRAGMA integrity_check")? == "ok",
            q(&ours_db, digest)? == q(&old_db, digest)?,
        ));
    }
    let (lo, mid, hi) = stats(&ours);
    println!("kine benchmark: {rows} rows, {runs} runs; milliseconds (min / median / max)");
    println!("openshell-init phase kine (whole process)  {lo:>9.1} {mid:>9.1} {hi:>9.1}");
    let (plo, pmid, phi) = stats(&ours_phase);
    println!("  of which the phase itself                {plo:>9.1} {pmid:>9.1} {phi:>9.1}");
    let (olo, omid, ohi) = stats(&old);
    println!("old way: sqlite3 CLI DELETEs + VACUUM      {olo:>9.1} {omid:>9.1} {ohi:>9.1}");
    let correct = checks.iter().all(|(a, b, c)| *a && *b && *c);
    println!(
        "{} every revision of every stale key deleted, integrity ok, kept rows identical to the old way's",
        if correct { "PASS" } else { "FAIL" }
    );
    println!(
        "{} no slower than the old way (median {mid:.1} ms vs {omid:.1} ms)",
        if mid <= omid { "PASS" } else { "MISS" }
    );
    let _ = std::fs::remove_dir_all(&work);
    if correct {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "kine pruning was not correct: {checks:?}"
        )))
    }
}

fn run_init_build() -> Result<()> {
    exec(Command::new(cargo()).args(["build", "--quiet", "--release", "-p", "openshell-init"]))
}

fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("openshell-bench-kine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    Ok(dir)
}
