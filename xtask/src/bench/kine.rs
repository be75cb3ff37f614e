//! `cargo xtask bench kine`: openshell-init's `kine` phase against the old way (the sqlite3 CLI
//! running the old DELETE statements, checkpoint and VACUUM) on copies of the same database.
//! Both are timed as whole processes; the phase's own duration is shown too.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use super::stats::stats;
use crate::error::{Error, Result};
use crate::fixtures::crashed_root::{kine_database, STALE_ROWS};
use crate::process::{self, run_output};
use crate::tools;

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

pub fn run(rows: u64, runs: usize) -> Result<()> {
    let init = tools::init_native()?;
    let work = tempfile::tempdir().map_err(|e| Error::io("create", &std::env::temp_dir(), e))?;
    let work = work.path();
    let template = work.join("template.db");
    eprintln!("xtask bench: generating a {rows}-row kine database");
    kine_database(&template, rows)?;
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
        let phase = tools::run_phase(&init, &root, "kine")?;
        ours.push(start.elapsed().as_secs_f64() * 1000.0);
        if !phase.status.success() {
            return Err(Error::msg(format!(
                "{} phase kine --root {} failed ({}): {}",
                init.display(),
                root.display(),
                phase.status,
                phase.stderr.trim()
            )));
        }
        let finished = phase
            .finished
            .ok_or_else(|| Error::msg(format!("no phase_finished in: {}", phase.stdout)))?;
        ours_phase.push(finished["msg"]["duration_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        // Old: the same statements through the sqlite3 CLI on another copy.
        let old_db = work.join(format!("old{i}.db"));
        std::fs::copy(&template, &old_db).map_err(|e| Error::io("copy", &template, e))?;
        let start = Instant::now();
        process::run(Command::new("sqlite3").arg(&old_db).arg(OLD_WAY))?;
        old.push(start.elapsed().as_secs_f64() * 1000.0);
        // Correctness: every row of every pruned key gone, the rest identical.
        let q = |db: &Path, sql: &str| {
            run_output(Command::new("sqlite3").arg(db).arg(sql)).map(|s| s.trim().to_string())
        };
        let digest = "SELECT count(*), sum(length(value)), max(id) FROM kine";
        checks.push((
            q(&ours_db, STALE_ROWS)? == "0",
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
    if correct {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "kine pruning was not correct: {checks:?}"
        )))
    }
}
