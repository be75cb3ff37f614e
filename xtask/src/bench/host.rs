//! `cargo xtask bench host`: what the host itself costs a user. Time from `openshell-host up`
//! starting to the VMM process being started (the host's own timeline, for each backend-independent
//! step before the VM runs: arguments, run directory, helpers, network), over N boots of the base
//! profile; target under 20 ms. Then how long `openshell-host status` takes, process spawn to exit
//! as a user sees it, against one detached instance (10 calls per run); target under 20 ms too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use openshell_shared::Arch;

use super::stats::stats;
use super::timeline;
use crate::artifacts::{artifacts, Artifacts};
use crate::error::{Error, Result};
use crate::{cache, tools, up};

const TARGET_MS: f64 = 20.0;
const STATUS_NAME: &str = "bench-status";
/// `status` calls per run: one call is a few milliseconds, so a run buys several samples.
const STATUS_CALLS_PER_RUN: usize = 10;

pub fn run(arch: Arch, runs: usize) -> Result<()> {
    let a = artifacts(arch)?;
    let host = tools::host(true)?;
    let root = up::instance_root("bench-host", arch, &a.rootfs)?;
    let report = root.join("bench-host-report.json");
    let mut to_vmm = Vec::new();
    for (net, label) in [("none", "--net none"), ("passt", "--net passt")] {
        let mut v = Vec::new();
        for _ in 0..runs {
            let status = up::host_up(&host, arch, "bench-host", &a, &root)
                .arg("--report")
                .arg(&report)
                .args(["--net", net, "--json", "--exec", "/bin/true"])
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|e| Error::msg(format!("cannot run openshell-host: {e}")))?;
            if !status.success() {
                return Err(Error::msg(format!("boot failed ({status})")));
            }
            let t = timeline::read(&report)?;
            let us = t["summary"]["vmm_started_us"]
                .as_f64()
                .ok_or_else(|| Error::msg("report lacks vmm_started_us"))?;
            v.push(us / 1000.0);
        }
        to_vmm.push((label, v));
    }
    println!(
        "bench host ({}), {runs} boots each; ms (min / median / max)",
        arch.name()
    );
    let mut pass = true;
    for (label, v) in &to_vmm {
        let (lo, mid, hi) = stats(v);
        println!("up start -> VMM started, {label:<12} {lo:>9.2} {mid:>9.2} {hi:>9.2}");
        pass &= mid < TARGET_MS;
    }
    println!(
        "{} up start to VMM start under {TARGET_MS} ms",
        if pass { "PASS" } else { "MISS" }
    );
    let v = status_latency(&host, arch, &a, runs * STATUS_CALLS_PER_RUN)?;
    let (lo, mid, hi) = stats(&v);
    println!(
        "status (spawn to exit), {:<4} {lo:>9.2} {mid:>9.2} {hi:>9.2}",
        v.len()
    );
    println!(
        "{} status under {TARGET_MS} ms",
        if mid < TARGET_MS { "PASS" } else { "MISS" }
    );
    Ok(())
}

/// Milliseconds of `calls` runs of `openshell-host status` against a detached instance, which
/// runs with its own `XDG_STATE_HOME` so that the user's instances are neither seen nor touched.
fn status_latency(host: &Path, arch: Arch, a: &Artifacts, calls: usize) -> Result<Vec<f64>> {
    let root = up::instance_root(STATUS_NAME, arch, &a.rootfs)?;
    let state = cache::root().join("bench-state");
    std::fs::create_dir_all(&state).map_err(|e| Error::io("create", &state, e))?;
    let started = up::host_up(host, arch, STATUS_NAME, a, &root)
        .env("XDG_STATE_HOME", &state)
        .args(["--detach", "--net", "none", "--exec", "/bin/sleep", "3600"])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| Error::msg(format!("cannot run openshell-host: {e}")))?;
    // From here on the instance may run: `Down` stops it however this function returns.
    let _down = Down {
        host: host.to_path_buf(),
        state: state.clone(),
    };
    if !started.success() {
        return Err(Error::msg(format!("detached boot failed ({started})")));
    }
    let mut v = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let status = Command::new(host)
            .args(["status", "--name", STATUS_NAME])
            .env("XDG_STATE_HOME", &state)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| Error::msg(format!("cannot run openshell-host status: {e}")))?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
        if !status.success() {
            return Err(Error::msg(format!(
                "status says {STATUS_NAME} is not running ({status})"
            )));
        }
    }
    Ok(v)
}

/// Runs `openshell-host down` for the status instance when dropped.
struct Down {
    host: PathBuf,
    state: PathBuf,
}

impl Drop for Down {
    fn drop(&mut self) {
        let res = Command::new(&self.host)
            .args(["down", "--name", STATUS_NAME])
            .env("XDG_STATE_HOME", &self.state)
            .stdout(Stdio::null())
            .status();
        match res {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("xtask: down {STATUS_NAME} failed ({s})"),
            Err(e) => eprintln!("xtask: cannot run openshell-host down: {e}"),
        }
    }
}
