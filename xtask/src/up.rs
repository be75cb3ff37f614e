//! `cargo xtask up`: builds whatever is missing and boots the VM with openshell-host.
//!
//! Each instance boots from its own copy of the root filesystem (the guest writes to it, and a
//! gateway keeps its state there), refreshed when the cached base it came from changes.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{artifacts, cache, rootfs, tools, Arch, Artifacts, Error, Result};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[arg(long, default_value_t = Arch::host())]
    pub arch: Arch,
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Extra options for `openshell-host up` (e.g. `--host-arg=--report=/tmp/r.json`).
    #[arg(long = "host-arg", allow_hyphen_values = true)]
    pub host_args: Vec<String>,
    /// Command to run in the guest instead of the configured workload.
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "CMD")]
    pub exec: Vec<String>,
}

pub fn run(args: UpArgs) -> Result<i32> {
    let a = artifacts(args.arch)?;
    let host = tools::host(true)?;
    let root = instance_root(&args.name, args.arch, &a.rootfs)?;
    eprintln!(
        "xtask: booting profile `base` ({}): k3s cannot be downloaded on this machine, so the gateway profile is not built yet",
        args.arch.name()
    );
    let mut cmd = host_up(&host, args.arch, &args.name, &a, &root);
    cmd.args(&args.host_args);
    if !args.exec.is_empty() {
        cmd.arg("--exec").args(&args.exec);
    }
    let status = cmd
        .status()
        .map_err(|e| Error::msg(format!("cannot run openshell-host: {e}")))?;
    Ok(status.code().unwrap_or(1))
}

/// `openshell-host up` for instance `name` booting `root` with the kernel and helpers of `a`.
pub fn host_up(host: &Path, arch: Arch, name: &str, a: &Artifacts, root: &Path) -> Command {
    let mut cmd = Command::new(host);
    cmd.args(["up", "--arch", arch.name(), "--name", name])
        .arg("--kernel")
        .arg(&a.kernel)
        .arg("--rootfs")
        .arg(root)
        .arg("--vsock-helper")
        .arg(&a.vsock_helper);
    cmd
}

/// The instance's writable root, copied from `base` unless it already came from it.
pub fn instance_root(name: &str, arch: Arch, base: &Path) -> Result<PathBuf> {
    let dir = cache::root()
        .join("instances")
        .join(format!("{name}-{}", arch.name()));
    let root = dir.join("rootfs");
    let marker = dir.join("base");
    let from = base.display().to_string();
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(from.as_str()) && root.is_dir() {
        return Ok(root);
    }
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(|e| Error::io("remove", &root, e))?;
    }
    rootfs::copy_tree(base, &root)?;
    std::fs::write(&marker, from).map_err(|e| Error::io("write", &marker, e))?;
    Ok(root)
}
