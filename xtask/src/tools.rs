//! Programs the boot needs besides the kernel and root filesystem: openshell-init for the guest,
//! openshell-host, and the vhost-user vsock device from crates.io; also openshell-init for this
//! machine (benchmarks) and one of its phases run on a directory.

use std::path::PathBuf;
use std::process::Command;

use openshell_shared::Arch;

use crate::cache;
use crate::error::{Error, Result};
use crate::paths::target_dir;
use crate::process::run;

const VSOCK_HELPER: &str = "vhost-device-vsock";
const VSOCK_HELPER_VERSION: &str = "0.3.0";

/// Builds openshell-init for the guest (static musl, release: stripped, size-optimised).
pub fn init(arch: Arch) -> Result<PathBuf> {
    build_init(arch, None)
}

/// The same with its symbols kept, in a target directory of its own (for `bench profile`).
pub fn init_unstripped(arch: Arch) -> Result<PathBuf> {
    build_init(arch, Some(target_dir().join("profile")))
}

fn build_init(arch: Arch, unstripped_in: Option<PathBuf>) -> Result<PathBuf> {
    let triple = format!("{}-unknown-linux-musl", arch.name());
    let mut cmd = Command::new(cargo());
    cmd.args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "openshell-init",
        "--target",
        &triple,
    ]);
    if let Some(dir) = &unstripped_in {
        cmd.env("CARGO_PROFILE_RELEASE_STRIP", "false")
            .env("CARGO_TARGET_DIR", dir);
    }
    run(&mut cmd)?;
    let bin = unstripped_in
        .unwrap_or_else(target_dir)
        .join(&triple)
        .join("release/openshell-init");
    if !bin.is_file() {
        return Err(Error::msg(format!("cargo built no {}", bin.display())));
    }
    Ok(bin)
}

/// Builds openshell-init for this machine (release), for the benchmarks that run its phases
/// outside a VM; returns the binary's path.
pub fn init_native() -> Result<PathBuf> {
    run(Command::new(cargo()).args(["build", "--quiet", "--release", "-p", "openshell-init"]))?;
    Ok(target_dir().join("release/openshell-init"))
}

/// Builds openshell-host for this machine; `release` for measurements.
pub fn host(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new(cargo());
    cmd.args(["build", "--quiet", "-p", "openshell-host"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("openshell-host"))
}

/// vhost-device-vsock, installed from crates.io into the cache once.
pub fn vsock_helper() -> Result<PathBuf> {
    let root = cache::root()
        .join("tools")
        .join(format!("{VSOCK_HELPER}-{VSOCK_HELPER_VERSION}"));
    let root = cache::entry(&root, |tmp| {
        eprintln!("xtask: installing {VSOCK_HELPER} {VSOCK_HELPER_VERSION} from crates.io (a few minutes, once)");
        run(Command::new(cargo())
            .args([
                "install",
                "--quiet",
                "--locked",
                &format!("{VSOCK_HELPER}@{VSOCK_HELPER_VERSION}"),
                "--root",
            ])
            .arg(tmp)
            // Its own target dir: the workspace's must not be locked or polluted.
            .env("CARGO_TARGET_DIR", tmp.join("target")))?;
        let _ = std::fs::remove_dir_all(tmp.join("target"));
        Ok(())
    })?;
    Ok(root.join("bin").join(VSOCK_HELPER))
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// What `openshell-init phase NAME --root ROOT` printed and how it ended.
pub struct PhaseRun {
    pub status: std::process::ExitStatus,
    /// Its JSON lines.
    pub stdout: String,
    pub stderr: String,
    /// The `phase_finished` event, when the phase got that far.
    pub finished: Option<serde_json::Value>,
}

/// Runs one init phase on a root directory (the same code the guest runs at boot).
pub fn run_phase(init: &std::path::Path, root: &std::path::Path, name: &str) -> Result<PhaseRun> {
    run_phase_with(init, root, name, None)
}

/// The same with a configuration file instead of the root's own.
pub fn run_phase_with(
    init: &std::path::Path,
    root: &std::path::Path,
    name: &str,
    config: Option<&std::path::Path>,
) -> Result<PhaseRun> {
    let mut cmd = Command::new(init);
    cmd.args(["phase", name, "--root"]).arg(root);
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let out = cmd
        .output()
        .map_err(|e| Error::msg(format!("cannot run {}: {e}", init.display())))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let finished = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["msg"]["type"] == "phase_finished");
    Ok(PhaseRun {
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout,
        finished,
    })
}
