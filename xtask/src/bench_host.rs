//! `cargo xtask bench host`: what the host itself costs a user. Time from `openshell-host up`
//! starting to the VMM process being started (the host's own timeline, for each backend-independent
//! step before the VM runs: arguments, run directory, helpers, network), over N boots of the base
//! profile; target under 20 ms.

use crate::bench::stats;
use crate::{artifacts, tools, up, Arch, Error, Result};

const TARGET_MS: f64 = 20.0;

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
            let text =
                std::fs::read_to_string(&report).map_err(|e| Error::io("read", &report, e))?;
            let t: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::msg(format!("{}: {e}", report.display())))?;
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
    Ok(())
}
