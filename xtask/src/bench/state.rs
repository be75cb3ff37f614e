//! `cargo xtask bench state`: the boot phases that put a persistent root's state in order before
//! k3s starts (kine, runtime-cleanup, manifests, capabilities; pki and network-cleanup shown too),
//! each run as `openshell-init phase NAME --root` on a fresh copy of a realistic root as a crashed
//! gateway leaves it: a kine database with stale revision chains and a bootstrap lock, containerd
//! task and shim leftovers with their sockets, the node password, and the bundled manifests
//! already deployed by the boot before (so they are compared, not copied). Outside a VM, on this
//! machine; the phases' own durations are summed (process start is not part of a boot).

use std::path::Path;
use std::process::Command;

use crate::bench::stats;
use crate::{run as exec, target_dir, workspace, Error, Result};

/// The four the target covers.
const STATE: &[&str] = &["kine", "runtime-cleanup", "manifests", "capabilities"];
/// Also state work at boot, shown beside them.
const ALSO: &[&str] = &["pki", "network-cleanup"];
const TARGET_MS: f64 = 50.0;

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| Error::io("write", path, e))
}

fn socket(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    }
    // Bound and dropped: the file stays, as after a crash.
    std::os::unix::net::UnixListener::bind(path)
        .map(drop)
        .map_err(|e| Error::io("bind", path, e))
}

/// The crashed gateway's root: `rows` kine rows, `tasks` containerd tasks.
fn template(root: &Path, init: &Path, rows: u64, tasks: usize) -> Result<()> {
    let k3s = root.join("var/lib/rancher/k3s");
    let db = k3s.join("server/db");
    std::fs::create_dir_all(&db).map_err(|e| Error::io("create", &db, e))?;
    crate::bench_kine::generate(&db.join("state.db"), rows)?;
    let ctrd = k3s.join("agent/containerd");
    for i in 0..tasks {
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
        &ctrd.join("io.containerd.content.v1.content/ingest/a/data"),
        &[0; 65536],
    )?;
    write(
        &ctrd.join("io.containerd.metadata.v1.bolt/meta.db"),
        &[7; 1 << 20],
    )?;
    for i in 0..20 {
        write(
            &ctrd.join(format!(
                "io.containerd.content.v1.content/blobs/sha256/{i:064x}"
            )),
            &[1; 16384],
        )?;
    }
    socket(&k3s.join("agent/containerd/containerd.sock"))?;
    socket(&k3s.join("server/kine.sock"))?;
    write(&k3s.join("server/cred/node-passwd"), b"node:hash\n")?;
    for i in 0..8 {
        write(
            &root.join(format!("var/lib/cni/networks/cbr0/10.42.0.{}", i + 2)),
            b"ctr\neth0",
        )?;
    }
    // The bundled manifests and a chart, deployed (and the PKI made) by the boot before.
    let bundled = workspace().join("rootfs/gateway/opt/openshell/manifests");
    let dest = root.join("opt/openshell/manifests");
    std::fs::create_dir_all(&dest).map_err(|e| Error::io("create", &dest, e))?;
    for entry in std::fs::read_dir(&bundled).map_err(|e| Error::io("read", &bundled, e))? {
        let entry = entry.map_err(|e| Error::io("read", &bundled, e))?;
        let to = dest.join(entry.file_name());
        std::fs::copy(entry.path(), &to).map_err(|e| Error::io("copy", &to, e))?;
    }
    write(
        &root.join("opt/openshell/charts/openshell-0.1.0.tgz"),
        &[3; 200_000],
    )?;
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
    let run = crate::tools::run_phase(init, root, name)?;
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
    exec(Command::new(crate::tools::cargo()).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "openshell-init",
    ]))?;
    let init = target_dir().join("release/openshell-init");
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
