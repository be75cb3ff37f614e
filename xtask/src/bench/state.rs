//! `cargo xtask bench state`: the boot phases that put a persistent root's state in order before
//! k3s starts (kine, runtime-cleanup, manifests, capabilities; pki and network-cleanup shown too),
//! each run as `openshell-init phase NAME --root` on a fresh copy of a realistic root as a crashed
//! gateway leaves it (the builder the VM crash test uses too: a kine database with stale revision
//! chains and a bootstrap lock, containerd task and shim leftovers with their sockets, IPAM files,
//! the node password), with the bundled manifests already deployed by the boot before (so they
//! are compared, not copied). Outside a VM, on this machine; the phases' own durations are summed
//! (process start is not part of a boot).

use std::path::Path;
use std::process::Command;

use super::stats::stats;
use crate::error::{Error, Result};
use crate::fixtures::crashed_root::CrashedRoot;
use crate::process::run as exec;
use crate::tools;

/// The four the target covers.
const STATE: &[&str] = &["kine", "runtime-cleanup", "manifests", "capabilities"];
/// Also state work at boot, shown beside them.
const ALSO: &[&str] = &["pki", "network-cleanup"];
const TARGET_MS: f64 = 50.0;

/// The crashed gateway's root: `rows` kine rows, `tasks` containerd tasks; then what the boot
/// before left too: the bundled manifests deployed and the PKI made (by init's own phases).
fn template(root: &Path, init: &Path, rows: u64, tasks: usize) -> Result<()> {
    CrashedRoot {
        kine_rows: rows,
        tasks,
    }
    .build(root)?;
    // The probes read /proc and /sys under the root, as in the guest: this machine's own.
    for dir in ["proc", "sys", "dev"] {
        let link = root.join(dir);
        std::os::unix::fs::symlink(format!("/{dir}"), &link)
            .map_err(|e| Error::io("link", &link, e))?;
    }
    for phase in ["manifests", "pki"] {
        exec(
            Command::new(init)
                .args(["phase", phase, "--root"])
                .arg(root),
        )?;
    }
    Ok(())
}

/// One phase on `root`: its own duration in ms, from its `phase_finished` event, and what it
/// reported missing when it failed. Only `capabilities` may fail: it probes this machine's kernel,
/// which is not the guest's (it lacks virtiofs, for one), and its time is what counts here.
fn phase(init: &Path, root: &Path, name: &str) -> Result<(f64, Option<String>)> {
    let run = tools::run_phase(init, root, name)?;
    let text = run.stdout;
    let Some(v) = run.finished else {
        return Err(Error::msg(format!("phase {name} did not finish:\n{text}")));
    };
    let failed = v["msg"]["outcome"]["kind"] == "failed";
    if failed && name != "capabilities" {
        return Err(Error::msg(format!("phase {name} failed:\n{text}")));
    }
    let us = v["msg"]["duration_us"].as_f64().unwrap_or(f64::NAN);
    let detail = failed.then(|| {
        v["msg"]["outcome"]["detail"]
            .as_str()
            .unwrap_or("")
            .to_string()
    });
    Ok((us / 1000.0, detail))
}

pub fn run(rows: u64, tasks: usize, runs: usize) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::msg(
            "bench state needs root (the phases run in private namespaces)",
        ));
    }
    let init = tools::init_native()?;
    let work = tempfile::tempdir().map_err(|e| Error::io("create", &std::env::temp_dir(), e))?;
    let tpl = work.path().join("template");
    eprintln!("xtask bench: a crashed gateway's root: {rows} kine rows, {tasks} containerd tasks");
    template(&tpl, &init, rows, tasks)?;
    let all: Vec<&str> = STATE.iter().chain(ALSO).copied().collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
    let (mut state_sum, mut all_sum) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let root = work.path().join(format!("run{i}"));
        exec(Command::new("cp").arg("-a").arg(&tpl).arg(&root))?;
        let mut sum = (0.0, 0.0);
        for (k, name) in all.iter().enumerate() {
            let (ms, missing) = phase(&init, &root, name)?;
            if let (Some(m), 0) = (missing, i) {
                eprintln!(
                    "xtask bench: capabilities on this machine's kernel (not the guest's): {m}"
                );
            }
            samples[k].push(ms);
            sum.1 += ms;
            if STATE.contains(name) {
                sum.0 += ms;
            }
        }
        state_sum.push(sum.0);
        all_sum.push(sum.1);
        let _ = std::fs::remove_dir_all(&root);
    }
    println!("bench state: {runs} runs on a crashed gateway's root; ms (min / median / max)");
    for (name, v) in all.iter().zip(&samples) {
        let (lo, mid, hi) = stats(v);
        println!("{name:<40} {lo:>9.2} {mid:>9.2} {hi:>9.2}");
    }
    let (lo, mid, hi) = stats(&state_sum);
    println!("{:<40} {lo:>9.2} {mid:>9.2} {hi:>9.2}", STATE.join(" + "));
    let (alo, amid, ahi) = stats(&all_sum);
    println!("{:<40} {alo:>9.2} {amid:>9.2} {ahi:>9.2}", "all six");
    println!(
        "{} state phases under {TARGET_MS} ms together (median {mid:.1} ms)",
        if mid < TARGET_MS { "PASS" } else { "MISS" }
    );
    Ok(())
}
