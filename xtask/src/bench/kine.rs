//! `cargo xtask bench kine`: openshell-init's `kine` phase against the old way (the sqlite3 CLI
//! running the old DELETE statements, checkpoint and VACUUM) on copies of one database whose
//! schema and first rows real kine wrote through etcdctl, the bulk added in kine's own row format
//! (and real kine checked to serve the result). Both policies, each against the old statements
//! for the same prefixes: the boot's (pods kept) and the build's (pods pruned too: the old
//! build-time set). Timed as whole processes; the phase's own duration is shown too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use openshell_shared::config::Kine as Policy;

use super::stats::stats;
use crate::error::{Error, Result};
use crate::fixtures::crashed_root::{kept_rows, kine_database, stale_rows};
use crate::fixtures::kine_peer::{gateway_keys, object, Kine, LEADERS, NODE_LEASE, PODS};
use crate::process::run_output;
use crate::{peers, tools};

/// The old system's statements for `prefixes`: DELETE ... LIKE per prefix, checkpoint, VACUUM.
fn old_way(prefixes: &[String]) -> String {
    let mut sql: String = prefixes
        .iter()
        .map(|p| format!("DELETE FROM kine WHERE name LIKE '{p}%';\n"))
        .collect();
    sql.push_str("PRAGMA wal_checkpoint(TRUNCATE);\nVACUUM;\n");
    sql
}

pub fn run(rows: u64, runs: usize) -> Result<()> {
    let init = tools::init_native()?;
    let kine = peers::KINE.build()?;
    let work = tempfile::tempdir().map_err(|e| Error::io("create", &std::env::temp_dir(), e))?;
    let work = work.path();
    let template = template(&kine, work, rows)?;
    let boot = Policy::default();
    let build = boot.pruning_pods();
    let config = work.join("build-policy.yaml");
    // JSON is YAML: the configuration's own serialisation.
    let text = serde_json::json!({ "kine": build }).to_string();
    std::fs::write(&config, text).map_err(|e| Error::io("write", &config, e))?;
    println!("kine benchmark: {rows} bulk rows, {runs} runs; milliseconds (min / median / max)");
    let mut ok = true;
    for (label, policy, config) in [
        ("boot policy (pods kept)", &boot, None),
        (
            "build policy (pods pruned too)",
            &build,
            Some(config.as_path()),
        ),
    ] {
        let bench = Bench {
            init: &init,
            template: &template,
            work,
            prefixes: &policy.prune_prefixes,
            config,
        };
        ok &= bench.run(label, runs)?;
    }
    if ok {
        Ok(())
    } else {
        Err(Error::msg("kine pruning was not correct (see FAIL above)"))
    }
}

/// The database every run copies: real kine's schema and first rows (a gateway's objects and
/// some history), then `rows` more in kine's row format. Real kine must then start on it
/// without a complaint and serve it.
fn template(kine_bin: &Path, work: &Path, rows: u64) -> Result<PathBuf> {
    let server = work.join("template");
    eprintln!("xtask bench: real kine writes the schema and first rows");
    let peer = |e: String| Error::msg(format!("kine: {e}"));
    let kine = Kine::start(kine_bin, &server, &[]).map_err(peer)?;
    let keys = gateway_keys();
    for (i, key) in keys.iter().enumerate() {
        kine.put(key, &object(key, i)).map_err(peer)?;
    }
    for i in 0..20 {
        for key in [
            NODE_LEASE.to_string(),
            format!("/registry/leases/{}", LEADERS[i % LEADERS.len()]),
            format!("/registry/pods/{}", PODS[i % PODS.len()]),
            format!("/registry/events/openshell/openshell-0.{i:x}"),
        ] {
            kine.put(&key, &object(&key, 100 + i)).map_err(peer)?;
        }
    }
    kine.stop().map_err(peer)?;
    let db = server.join(crate::fixtures::kine_peer::DB);
    eprintln!("xtask bench: adding {rows} rows in kine's row format");
    kine_database(&db, rows)?;
    // Real kine serves what the bulk made, on a copy (it vacuums at start).
    let check = work.join("check");
    let check_db = check.join(crate::fixtures::kine_peer::DB);
    if let Some(dir) = check_db.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    }
    std::fs::copy(&db, &check_db).map_err(|e| Error::io("copy", &db, e))?;
    let kine = Kine::start(kine_bin, &check, &[]).map_err(peer)?;
    let served = kine.range("/registry/", None).map_err(peer)?;
    let complaints = kine.complaints();
    kine.stop().map_err(peer)?;
    if !complaints.is_empty() || served.kvs.len() < keys.len() {
        return Err(Error::msg(format!(
            "real kine does not serve the benchmark's database as it should ({} keys): {complaints:?}",
            served.kvs.len()
        )));
    }
    eprintln!(
        "xtask bench: real kine serves it: {} keys at revision {}",
        served.kvs.len(),
        served.revision
    );
    Ok(db)
}

struct Bench<'a> {
    init: &'a Path,
    template: &'a Path,
    work: &'a Path,
    prefixes: &'a [String],
    config: Option<&'a Path>,
}

impl Bench<'_> {
    fn sql(db: &Path, sql: &str) -> Result<String> {
        run_output(Command::new("sqlite3").arg(db).arg(sql)).map(|s| s.trim().to_string())
    }

    fn copy(&self, to: &Path) -> Result<()> {
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
        }
        std::fs::copy(self.template, to)
            .map(drop)
            .map_err(|e| Error::io("copy", self.template, e))
    }

    /// Times ours and the old way `runs` times each and prints them; whether every result was
    /// correct.
    fn run(&self, label: &str, runs: usize) -> Result<bool> {
        let revision = Self::sql(self.template, "SELECT max(id) FROM kine")?;
        let (mut ours, mut phase, mut old) = (Vec::new(), Vec::new(), Vec::new());
        let mut problems = Vec::new();
        let mut old_revision = String::new();
        for i in 0..runs {
            eprintln!("xtask bench: {label}, run {}/{runs}", i + 1);
            let root = self.work.join(format!("root-{}-{i}", self.prefixes.len()));
            let ours_db = root.join(crate::fixtures::crashed_root::KINE_DB);
            self.copy(&ours_db)?;
            let start = Instant::now();
            let run = tools::run_phase_with(self.init, &root, "kine", self.config)?;
            ours.push(start.elapsed().as_secs_f64() * 1000.0);
            let finished = run
                .finished
                .filter(|_| run.status.success())
                .ok_or_else(|| {
                    Error::msg(format!(
                        "{} phase kine --root {} failed ({}): {}{}",
                        self.init.display(),
                        root.display(),
                        run.status,
                        run.stdout,
                        run.stderr.trim()
                    ))
                })?;
            phase.push(finished["msg"]["duration_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
            let old_db = self
                .work
                .join(format!("old-{}-{i}.db", self.prefixes.len()));
            self.copy(&old_db)?;
            let start = Instant::now();
            run_output(
                Command::new("sqlite3")
                    .arg(&old_db)
                    .arg(old_way(self.prefixes)),
            )?;
            old.push(start.elapsed().as_secs_f64() * 1000.0);
            old_revision = Self::sql(&old_db, "SELECT max(id) FROM kine")?;
            let kept = kept_rows(self.prefixes);
            for (what, good) in [
                (
                    "stale rows left",
                    Self::sql(&ours_db, &stale_rows(self.prefixes))? == "0",
                ),
                (
                    "integrity",
                    Self::sql(&ours_db, "PRAGMA integrity_check")? == "ok",
                ),
                (
                    "kept rows differ from the old way's",
                    Self::sql(&ours_db, &kept)? == Self::sql(&old_db, &kept)?,
                ),
                (
                    "revision moved",
                    Self::sql(&ours_db, "SELECT max(id) FROM kine")? == revision,
                ),
            ] {
                if !good {
                    problems.push(format!("run {i}: {what}"));
                }
            }
        }
        let (lo, mid, hi) = stats(&ours);
        let (plo, pmid, phi) = stats(&phase);
        let (olo, omid, ohi) = stats(&old);
        println!("{label}:");
        println!("  openshell-init phase kine (whole process) {lo:>9.1} {mid:>9.1} {hi:>9.1}");
        println!("    of which the phase itself               {plo:>9.1} {pmid:>9.1} {phi:>9.1}");
        println!("  old way: sqlite3 DELETEs + VACUUM         {olo:>9.1} {omid:>9.1} {ohi:>9.1}");
        println!(
            "  {} every revision of every pruned key gone, integrity ok, kept rows as the old way's, revision {revision} kept (the old way leaves {old_revision}) {problems:?}",
            if problems.is_empty() { "PASS" } else { "FAIL" },
        );
        println!(
            "  {} no slower than the old way (median {mid:.1} ms vs {omid:.1} ms)",
            if mid <= omid { "PASS" } else { "MISS" }
        );
        Ok(problems.is_empty())
    }
}
