//! The host with a bundle built in (feature `embedded-bundle`, as a release would ship it):
//! built in the background lane's target directory around the x86_64 base bundle, copied alone
//! into an empty directory (no bundle beside it) and booted with none of `--bundle`,
//! `--kernel`, `--rootfs`. It must unpack the bundle it carries and pass its workload's exit
//! status through. One arch: the embedding is the same for both.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::paths::target_dir;

/// The exit status the workload ends with, so a pass cannot be a boot that never ran it.
const STATUS: i32 = 6;

/// Builds the host with `bundle` in it (through `build`, the lane's cargo), boots it, and returns
/// its output.
pub fn check(build: &mut Command, bundle: &Path, vsock_helper: &Path) -> Result<String> {
    super::logged::run(
        "embedded-bundle-build",
        build
            .args([
                "build",
                "-p",
                "openshell-host",
                "--features",
                "embedded-bundle",
            ])
            .env("OPENSHELL_EMBED_BUNDLE", bundle),
    )?;
    let built = target_dir().join("beside/debug/openshell-host");
    // Short path: the run directory's sockets must stay under 104 bytes.
    let dir = tempfile::Builder::new()
        .prefix("osh-embedded-")
        .tempdir_in("/tmp")
        .map_err(|e| Error::io("create", Path::new("/tmp"), e))?;
    let host = dir.path().join("openshell-host");
    std::fs::copy(&built, &host).map_err(|e| Error::io("copy", &built, e))?;
    let out = Command::new(&host)
        .args(["up", "--arch", "x86_64", "--no-state-disk", "--net", "none"])
        .args(["--accel", "tcg", "--vsock-helper"])
        .arg(vsock_helper)
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .args(["--exec", "/bin/sh", "-c", &format!("exit {STATUS}")])
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env("HOME", dir.path().join("home"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::msg(format!("cannot run {}: {e}", host.display())))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let unpacked = text.contains("from built into openshell-host): checked and unpacked");
    if out.status.code() != Some(STATUS) || !unpacked {
        return Err(Error::msg(format!(
            "the host with a built-in bundle: {} (wanted exit {STATUS} after unpacking its own bundle):\n{text}",
            out.status
        )));
    }
    Ok(text)
}
