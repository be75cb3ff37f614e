//! `cargo xtask rootfs --profile containerd-test`: the gateway's Debian stage with Debian's
//! `containerd` and `runc` added, openshell-init as PID 1 and the base profile's boot
//! configuration (no `k3s` section: the workload is whatever `up --exec` runs). The VM tests
//! that run real containers boot it (`tests/vm/containerd.rs`).
//!
//! Two cache entries, like the gateway's: the package stage (the cached debootstrap stage plus
//! `apt-get install` of [`EXTRA`] in a chroot, keyed by that stage, the list and the recipe), so
//! a new openshell-init does not run apt-get again; and the assembled root (keyed by the package
//! stage and every other input). The package stage gets the gateway's cleanup (logs, apt lists
//! and caches, machine-id, ...) and mtime 0; `manifest.json` records every Debian package version
//! (apt-get takes the mirror's current ones), openshell-init and the configuration with their
//! SHA-256, and a hash of the tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use openshell_shared::Arch;

use crate::build_names::BuildNames;
use crate::cache::{self, Key};
use crate::error::{Error, Result};
use crate::{gateway, rootfs};

pub const PROFILE: &str = "containerd-test";
const STAGE_RECIPE: &str = "apt-extra-v1";
const RECIPE: &str = "rootfs-containerd-test-v2";
/// Installed on top of the gateway's Debian stage (their dependencies come along; e2fsprogs,
/// for the state disk, is already in the stage).
pub const EXTRA: &[&str] = &["containerd", "runc"];
/// k3s's agent directory, where k3s keeps containerd's root: the guest's `state-disk` phase binds
/// it onto the state disk in a root that has k3s's data directory, and the tests put their
/// containerd there (no k3s runs).
const K3S_AGENT: &str = "var/lib/rancher/k3s/agent";
/// The one file taken from `rootfs/base/`: a configuration without k3s.
const CONFIG: &str = "etc/openshell/init.yaml";

/// Builds (or finds) the root for `arch` with openshell-init (built by `init`) as PID 1; returns
/// its directory.
pub fn build(arch: Arch, init: impl FnOnce() -> Result<PathBuf>) -> Result<PathBuf> {
    let config = rootfs::overlay_files("base")?
        .into_iter()
        .find(|(rel, _)| rel == CONFIG)
        .ok_or_else(|| Error::msg(format!("rootfs/base/{CONFIG} is missing")))?;
    let init = init()?;
    let stage = package_stage(arch)?;
    let mut key = Key::new(RECIPE);
    key.str(arch.name()).str(&file_name(&stage)).file(&init)?;
    key.str(&config.0).file(&config.1)?;
    let dest =
        cache::root()
            .join("rootfs")
            .join(format!("{PROFILE}-{}-{}", arch.name(), key.finish()));
    cache::entry(&dest, |root| assemble(root, arch, &stage, &init, &config))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn assemble(
    root: &Path,
    arch: Arch,
    stage: &Path,
    init: &Path,
    config: &(String, PathBuf),
) -> Result<()> {
    eprintln!(
        "xtask: assembling {PROFILE} root filesystem for {}",
        arch.name()
    );
    rootfs::copy_tree(&stage.join("root"), root)?;
    rootfs::install_overlay(root, std::slice::from_ref(config))?;
    let agent = root.join(K3S_AGENT);
    std::fs::create_dir_all(&agent).map_err(|e| Error::io("create", &agent, e))?;
    rootfs::copy(init, &root.join("sbin/openshell-init"), 0o755)?;
    let cfg_path = root.join(CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io("read", &cfg_path, e))?;
    let cfg = openshell_shared::config::BootConfig::from_yaml(&text, &cfg_path)
        .map_err(|e| Error::msg(e.to_string()))?;
    if cfg.k3s.is_some() {
        return Err(Error::msg(format!(
            "{}: the {PROFILE} profile runs no k3s, but the configuration has a `k3s` section",
            config.1.display()
        )));
    }
    let hostname = root.join("etc/hostname");
    std::fs::write(&hostname, format!("{}\n", cfg.hostname))
        .map_err(|e| Error::io("write", &hostname, e))?;
    let tsv = stage.join("packages.tsv");
    let packages = std::fs::read_to_string(&tsv).map_err(|e| Error::io("read", &tsv, e))?;
    let doc = manifest(&Manifest {
        arch,
        stage: &file_name(stage),
        packages: gateway::parse_packages(&packages),
        init_sha256: &cache::sha256_file(init)?,
        config_sha256: &cache::sha256_file(&config.1)?,
        tree_sha256: &gateway::tree_hash(root)?,
    })?;
    let mpath = root.join("manifest.json");
    std::fs::write(&mpath, doc).map_err(|e| Error::io("write", &mpath, e))?;
    rootfs::fix_mtimes(root)
}

/// The package stage for `arch`: `<entry>/root` (the gateway's Debian stage with [`EXTRA`]
/// installed) and `<entry>/packages.tsv`.
pub fn package_stage(arch: Arch) -> Result<PathBuf> {
    let debootstrap = gateway::debootstrap(arch)?;
    let mut key = Key::new(STAGE_RECIPE);
    key.str(&file_name(&debootstrap));
    for p in EXTRA {
        key.str(p);
    }
    for c in gateway::CLEANUP {
        key.str(&format!("{c:?}"));
    }
    let dest = cache::root().join("debian").join(format!(
        "{}-{}-{}-{}",
        gateway::SUITE,
        arch.debian(),
        EXTRA.join("-"),
        key.finish()
    ));
    cache::entry(&dest, |tmp| {
        let root = tmp.join("root");
        rootfs::copy_tree(&debootstrap.join("root"), &root)?;
        if arch != Arch::host() {
            // apt-get and the maintainer scripts are the target's binaries.
            gateway::ensure_binfmt(arch)?;
        }
        let started = std::time::Instant::now();
        let result = apt_install(&root, arch);
        // Nothing may stay mounted in a tree that is removed or kept.
        gateway::unmount_below(&root)?;
        result?;
        eprintln!(
            "xtask: apt-get install {} for {} done in {:.0} s",
            EXTRA.join(" "),
            arch.debian(),
            started.elapsed().as_secs_f64()
        );
        gateway::cleanup(&root)?;
        gateway::write_package_list(&root, &tmp.join("packages.tsv"))?;
        rootfs::fix_mtimes(&root)
    })
}

/// Keeps the maintainer scripts from starting services in the chroot (invoke-rc.d asks it).
const POLICY_RC_D: &str = "usr/sbin/policy-rc.d";

/// `apt-get update` and `apt-get install --no-install-recommends` [`EXTRA`] in a chroot of
/// `root`, with the build host's resolver and /proc mounted (both gone afterwards).
fn apt_install(root: &Path, arch: Arch) -> Result<()> {
    let resolv = root.join("etc/resolv.conf");
    std::fs::copy("/etc/resolv.conf", &resolv).map_err(|e| Error::io("copy", &resolv, e))?;
    let policy = root.join(POLICY_RC_D);
    std::fs::write(&policy, "#!/bin/sh\nexit 101\n").map_err(|e| Error::io("write", &policy, e))?;
    rootfs::set_mode(&policy, 0o755)?;
    let proc_dir = root.join("proc");
    #[cfg(target_os = "linux")]
    let mounted = nix::mount::mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    // Roots are built on Linux only; this lets xtask build on macOS for `sign`.
    #[cfg(not(target_os = "linux"))]
    let mounted: nix::Result<()> = Err(nix::errno::Errno::ENOTSUP);
    mounted.map_err(|e| {
        Error::msg(format!(
            "mount proc on {} (needs root): {e}",
            proc_dir.display()
        ))
    })?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend_from_slice(EXTRA);
    let result =
        chroot_apt(root, arch, &["update"]).and_then(|()| chroot_apt(root, arch, &install));
    std::fs::remove_file(&policy).map_err(|e| Error::io("remove", &policy, e))?;
    result
}

/// One `apt-get` in a chroot of `root`; a failure carries the end of its output.
fn chroot_apt(root: &Path, arch: Arch, args: &[&str]) -> Result<()> {
    let out = Command::new("chroot")
        .arg(root)
        .arg("apt-get")
        .args([
            "-q",
            "-o",
            "Acquire::Languages=none",
            "-o",
            "APT::Sandbox::User=root",
        ])
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C.UTF-8")
        // debconf (Perl) writes its databases in hash order: fixed, as for debootstrap.
        .env("PERL_HASH_SEED", "0")
        .env("PERL_PERTURB_KEYS", "0")
        .env("SOURCE_DATE_EPOCH", "0")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::msg(format!("cannot run chroot: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    Err(Error::msg(format!(
        "apt-get {} in a chroot of {} ({}, from {}) failed ({}):\n{}",
        args.join(" "),
        root.display(),
        arch.debian(),
        gateway::MIRROR,
        out.status,
        lines[lines.len().saturating_sub(20)..].join("\n")
    )))
}

/// What `manifest.json` records.
struct Manifest<'a> {
    arch: Arch,
    stage: &'a str,
    packages: BTreeMap<String, String>,
    init_sha256: &'a str,
    config_sha256: &'a str,
    tree_sha256: &'a str,
}

fn manifest(m: &Manifest) -> Result<String> {
    let mut requested: Vec<&str> = gateway::PACKAGES.to_vec();
    requested.extend_from_slice(EXTRA);
    let doc = serde_json::json!({
        "profile": PROFILE,
        "arch": m.arch.name(),
        "recipe": RECIPE,
        "debian": {
            "suite": gateway::SUITE,
            "variant": gateway::VARIANT,
            "mirror": gateway::MIRROR,
            "stage": m.stage,
            "requested": requested,
            "packages": m.packages,
        },
        "openshell-init": {
            "version": env!("CARGO_PKG_VERSION"),
            "sha256": m.init_sha256,
            "path": "sbin/openshell-init",
        },
        "overlay": { CONFIG: m.config_sha256 },
        "tree_sha256": m.tree_sha256,
    });
    serde_json::to_string_pretty(&doc)
        .map(|s| s + "\n")
        .map_err(|e| Error::msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names_the_extra_packages_and_their_versions() {
        let text = manifest(&Manifest {
            arch: Arch::Aarch64,
            stage: "bookworm-arm64-containerd-runc-0123",
            packages: gateway::parse_packages(
                "runc\t1.1.5+ds1-1+deb12u1\tarm64\ncontainerd\t1.6.20~ds1-1+b1\tarm64\n",
            ),
            init_sha256: "aa11",
            config_sha256: "bb22",
            tree_sha256: "cc33",
        })
        .expect("json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("parses");
        assert_eq!(v["profile"], "containerd-test");
        assert_eq!(v["arch"], "aarch64");
        assert_eq!(
            v["debian"]["packages"]["containerd"],
            "1.6.20~ds1-1+b1 arm64"
        );
        assert_eq!(v["debian"]["packages"]["runc"], "1.1.5+ds1-1+deb12u1 arm64");
        let requested = v["debian"]["requested"].as_array().expect("list");
        for p in ["containerd", "runc", "e2fsprogs"] {
            assert!(requested.contains(&serde_json::json!(p)), "{p} requested");
        }
        assert_eq!(v["overlay"]["etc/openshell/init.yaml"], "bb22");
        assert_eq!(v["openshell-init"]["sha256"], "aa11");
        assert_eq!(v["tree_sha256"], "cc33");
    }

    /// The configuration the profile takes from the base root must be one init accepts and must
    /// not start k3s: `assemble` refuses one that does.
    #[test]
    fn the_base_configuration_runs_no_k3s() {
        let path = crate::paths::workspace().join("rootfs/base").join(CONFIG);
        let text = std::fs::read_to_string(&path).expect("base init.yaml");
        let cfg = openshell_shared::config::BootConfig::from_yaml(&text, &path).expect("valid");
        assert!(cfg.k3s.is_none());
    }
}
