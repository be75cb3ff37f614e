//! `cargo xtask rootfs`: guest root filesystems. The `base` profile is busybox-static from
//! Debian, openshell-init as /sbin/openshell-init, and the files under `rootfs/base/`. It is
//! small enough to copy per test and boots in about a second under emulation.
//!
//! Reproducible: entries are written in sorted order with fixed timestamps, and `manifest.json`
//! at the root records the SHA-256 of every file, the versions of what went in and the VM's
//! sizing (`vm`, [`VmSizing::BASE`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{self, Key};
use openshell_shared::sizing::{self, VmSizing};
use openshell_shared::Arch;

use crate::build_names::BuildNames;
use crate::error::{Error, Result};
use crate::paths::workspace;
use crate::process::{run, run_output};

const RECIPE: &str = "rootfs-base-v3";

/// Directories every root needs (mount points and the like), with their modes.
const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("sbin", 0o755),
    ("etc", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("var", 0o755),
    ("opt", 0o755),
];

/// Where Debian's busybox-static for `arch` is, fetching the arm64 package when needed.
pub fn busybox(arch: Arch) -> Result<(PathBuf, String)> {
    if arch == Arch::host() {
        let version = run_output(Command::new("dpkg-query").args([
            "-W",
            "-f",
            "${Version}",
            "busybox-static",
        ]))?;
        return Ok((PathBuf::from("/bin/busybox"), version));
    }
    let dir = cache::root()
        .join("debs")
        .join(format!("busybox-static-{}", arch.debian()));
    let dir = cache::entry(&dir, |tmp| {
        eprintln!("xtask: downloading busybox-static:{}", arch.debian());
        run(Command::new("apt-get")
            .current_dir(tmp)
            .args(["download", &format!("busybox-static:{}", arch.debian())]))
        .map_err(|e| {
            Error::msg(format!(
            "{e}\n(the {} package list is needed: dpkg --add-architecture {} && apt-get update)",
            arch.debian(),
            arch.debian()
        ))
        })?;
        let deb = std::fs::read_dir(tmp)
            .map_err(|e| Error::io("list", tmp, e))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| Error::msg("apt-get download produced no .deb"))?;
        let version = run_output(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?;
        std::fs::write(tmp.join("version"), version.trim())
            .map_err(|e| Error::io("write", tmp, e))?;
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(tmp.join("x")))
    })?;
    let version =
        std::fs::read_to_string(dir.join("version")).map_err(|e| Error::io("read", &dir, e))?;
    Ok((dir.join("x/bin/busybox"), version.trim().to_string()))
}

/// Applet names to link, from busybox itself (under qemu-user for a foreign arch).
fn applets(arch: Arch, busybox: &Path) -> Result<Vec<String>> {
    let mut cmd = if arch == Arch::host() {
        Command::new(busybox)
    } else {
        let mut c = Command::new(format!("qemu-{}-static", arch.name()));
        c.arg(busybox);
        c
    };
    cmd.arg("--list");
    Ok(filter_applets(&run_output(&mut cmd)?))
}

/// Keeps plain applet names (no paths, no init: PID 1 is ours) in sorted order.
pub fn filter_applets(list: &str) -> Vec<String> {
    let mut names: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|n| {
            !n.is_empty() && !n.contains('/') && *n != "init" && *n != "linuxrc" && *n != "busybox"
        })
        .map(String::from)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Files under `rootfs/<profile>/`, sorted, as (relative path, absolute path).
pub fn overlay_files(profile: &str) -> Result<Vec<(String, PathBuf)>> {
    let base = workspace().join("rootfs").join(profile);
    let mut out = Vec::new();
    for p in walk(&base)? {
        if p.is_dir() {
            continue;
        }
        let rel = p
            .strip_prefix(&base)
            .map_err(|_| Error::msg("path outside base"))?;
        out.push((rel.to_string_lossy().into_owned(), p.clone()));
    }
    Ok(out)
}

/// Builds (or finds) the base root filesystem with `init` as PID 1; returns its directory.
pub fn build_base(arch: Arch, init: &Path) -> Result<PathBuf> {
    let (busybox, bb_version) = busybox(arch)?;
    let overlay = overlay_files("base")?;
    let mut key = Key::new(RECIPE);
    key.str(arch.name()).file(init)?.file(&busybox)?;
    key.str(&VmSizing::BASE.to_json().to_string());
    for (rel, path) in &overlay {
        key.str(rel).file(path)?;
    }
    let key = key.finish();
    let dest = cache::root()
        .join("rootfs")
        .join(format!("base-{}-{key}", arch.name()));
    cache::entry(&dest, |root| {
        eprintln!("xtask: assembling base root filesystem for {}", arch.name());
        for (dir, mode) in DIRS {
            let p = root.join(dir);
            std::fs::create_dir_all(&p).map_err(|e| Error::io("create", &p, e))?;
            set_mode(&p, *mode)?;
        }
        copy(&busybox, &root.join("bin/busybox"), 0o755)?;
        for name in applets(arch, &busybox)? {
            let link = root.join("bin").join(&name);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", &link)
                    .map_err(|e| Error::io("symlink", &link, e))?;
            }
        }
        copy(init, &root.join("sbin/openshell-init"), 0o755)?;
        install_overlay(root, &overlay)?;
        // The kernel opens /dev/console for PID 1 before devtmpfs exists; the benchmark's shell
        // init logs to /dev/kmsg before it mounts anything.
        for (name, major, minor, mode) in [
            ("console", 5, 1, 0o600),
            ("null", 1, 3, 0o666),
            ("kmsg", 1, 11, 0o644),
        ] {
            let p = root.join("dev").join(name);
            nix::sys::stat::mknod(
                &p,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(mode),
                // libc's, not nix's: nix has none on macOS, where xtask builds for `sign`.
                libc::makedev(major, minor),
            )
            .map_err(|e| Error::msg(format!("mknod {} (needs root): {e}", p.display())))?;
        }
        let manifest = manifest(root, arch, &bb_version)?;
        let mpath = root.join("manifest.json");
        std::fs::write(&mpath, manifest).map_err(|e| Error::io("write", &mpath, e))?;
        fix_mtimes(root)
    })
}

/// Copies overlay files (from [`overlay_files`]) into `root`, 0755 when executable in the
/// checkout (git keeps the bit), else 0644.
pub fn install_overlay(root: &Path, overlay: &[(String, PathBuf)]) -> Result<()> {
    for (rel, path) in overlay {
        let to = root.join(rel);
        let exec = std::fs::metadata(path)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
            .map_err(|e| Error::io("stat", path, e))?;
        copy(path, &to, if exec { 0o755 } else { 0o644 })?;
    }
    Ok(())
}

fn manifest(root: &Path, arch: Arch, bb_version: &str) -> Result<String> {
    let mut files = BTreeMap::new();
    for path in walk(root)? {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io("stat", &path, e))?;
        if meta.file_type().is_file() {
            let rel = path
                .strip_prefix(root)
                .map_err(|_| Error::msg("outside root"))?;
            files.insert(
                rel.to_string_lossy().into_owned(),
                cache::sha256_file(&path)?,
            );
        }
    }
    let doc = serde_json::json!({
        "profile": "base",
        "arch": arch.name(),
        "recipe": RECIPE,
        "versions": {
            "busybox-static": bb_version,
            "openshell-init": env!("CARGO_PKG_VERSION"),
        },
        "files": files,
        sizing::MANIFEST_KEY: VmSizing::BASE.to_json(),
    });
    serde_json::to_string_pretty(&doc).map_err(|e| Error::msg(e.to_string()))
}

/// Every path under `root`, sorted, without following symlinks.
pub fn walk(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)
            .map_err(|e| Error::io("list", &dir, e))?
            .flatten()
        {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Timestamp 0 on everything, symlinks included, so two builds of the same inputs are identical.
pub fn fix_mtimes(root: &Path) -> Result<()> {
    let zero = nix::sys::time::TimeSpec::new(0, 0);
    let mut all = walk(root)?;
    all.push(root.to_path_buf());
    // Children first: setting a directory's time before writing into it would be undone.
    all.reverse();
    for p in all {
        nix::sys::stat::utimensat(
            None,
            &p,
            &zero,
            &zero,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| Error::msg(format!("set mtime of {}: {e}", p.display())))?;
    }
    Ok(())
}

/// Copies one file to `to` (its directory made when missing) with `mode`.
pub fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    }
    std::fs::copy(from, to).map_err(|e| Error::io("copy", from, e))?;
    set_mode(to, mode)
}

pub fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("chmod", p, e))
}

/// Copies a cached tree (device nodes, links and modes kept) to `dest` for a boot to write to.
pub fn copy_tree(from: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| Error::io("create", dest, e))?;
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(dest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applet_list_is_cleaned() {
        let list = "sh\ninit\n[\nls\n/bin/odd\nls\n\nlinuxrc\n";
        assert_eq!(filter_applets(list), vec!["[", "ls", "sh"]);
    }

    /// The base manifest lists the files and carries the small sizing the host boots it with.
    #[test]
    fn the_base_manifest_records_files_and_sizing() {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::write(root.path().join("hello"), "hi").expect("write");
        let text = manifest(root.path(), Arch::X86_64, "1:1.36").expect("manifest");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["profile"], "base");
        assert_eq!(
            v["files"]["hello"],
            "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4"
        );
        assert_eq!(VmSizing::from_json(&v["vm"]), Ok(VmSizing::BASE));
    }
}
