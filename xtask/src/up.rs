//! `cargo xtask up`: builds whatever is missing and boots the VM with openshell-host.
//!
//! Each instance boots from its own copy of the root filesystem (the guest writes to it),
//! replaced when the cached base it came from changes (a new openshell-init, say). A gateway keeps
//! its cluster on the state disk, which lives in openshell-host's state directory for the
//! instance, so a new root never touches it. The base root boots without a state disk: it has no
//! mke2fs to format one.

use std::path::{Path, PathBuf};
use std::process::Command;

use openshell_shared::Arch;

use crate::artifacts::{artifacts, Artifacts};
use crate::error::{Error, Result};
use crate::{cache, gateway, k3s, payload, peers, rootfs, tools};

/// Which root filesystem `up` boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    Base,
    Gateway,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[arg(long, default_value_t = Arch::host())]
    pub arch: Arch,
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Extra options for `openshell-host up` (e.g. `--host-arg=--report=/tmp/r.json`).
    #[arg(long = "host-arg", allow_hyphen_values = true)]
    pub host_args: Vec<String>,
    /// Force a profile (default: `gateway` when k3s is available, else `base`).
    #[arg(long, value_enum)]
    pub profile: Option<Profile>,
    #[command(flatten)]
    pub gateway: gateway::Inputs,
    #[command(flatten)]
    pub payload: payload::Args,
    /// Boot this bundle (`cargo xtask bundle`) instead of building: openshell-host checks and
    /// unpacks it; its manifest gives the arch and profile.
    #[arg(long, value_name = "FILE", conflicts_with = "profile")]
    pub bundle: Option<PathBuf>,
    /// Command to run in the guest instead of the configured workload (k3s on a gateway root).
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "CMD")]
    pub exec: Vec<String>,
}

/// The profile to boot and the one-line reason, from the flags and whether a verified k3s
/// download is already in the cache.
pub fn choose(
    forced: Option<Profile>,
    inputs: &gateway::Inputs,
    payload: &payload::Args,
    cached_k3s: bool,
) -> Result<(Profile, String)> {
    Ok(match forced {
        Some(Profile::Base) => {
            if inputs.given() || payload.given() {
                return Err(Error::msg(
                    "--k3s, --state-db, --chart, --images and --sandbox-bin are for the gateway profile, not --profile base",
                ));
            }
            (Profile::Base, "asked for with --profile base".into())
        }
        Some(Profile::Gateway) => (Profile::Gateway, "asked for with --profile gateway".into()),
        None if inputs.k3s.is_some() => (Profile::Gateway, "k3s given with --k3s".into()),
        None if cached_k3s => (
            Profile::Gateway,
            format!("a verified k3s {} is in the cache", k3s::VERSION),
        ),
        None if inputs.images.is_some() || payload.given() => (
            Profile::Gateway,
            "a payload given with --chart, --images or --sandbox-bin (k3s must come from the pinned download)".into(),
        ),
        None => (
            Profile::Base,
            format!(
                "no k3s: neither --k3s FILE nor a verified k3s {} download in the cache",
                k3s::VERSION
            ),
        ),
    })
}

pub fn run(args: UpArgs) -> Result<i32> {
    if let Some(bundle) = &args.bundle {
        return run_bundle(&args, bundle);
    }
    let (profile, why) = choose(
        args.profile,
        &args.gateway,
        &args.payload,
        k3s::available(args.arch),
    )?;
    if profile == Profile::Gateway {
        // Before anything is built: no k3s is the same clear error as `rootfs` gives.
        k3s::resolve_k3s(args.arch, args.gateway.k3s.as_deref())
            .map_err(|e| Error::msg(e.to_string()))?;
    }
    let mut a = artifacts(args.arch)?;
    // The writable copies of the two profiles live apart, so booting one never wipes the
    // other's state (a gateway keeps its cluster in its root).
    let (disk, disk_why) = state_disk_args(profile, &args.host_args);
    let copy_name = match profile {
        Profile::Base => {
            eprintln!(
                "xtask: booting profile `base` ({}): {why}; {disk_why}",
                args.arch.name()
            );
            args.name.clone()
        }
        Profile::Gateway => {
            eprintln!(
                "xtask: booting profile `gateway` ({}): {why}; {disk_why}",
                args.arch.name()
            );
            let init = a.init.clone();
            a.rootfs =
                gateway::build_with(args.arch, || Ok(init), &args.gateway, &args.payload)?.root;
            format!("{}-gateway", args.name)
        }
    };
    let host = tools::host(true)?;
    let root = instance_root(&copy_name, args.arch, &a.rootfs)?;
    let mut cmd = host_cmd(&host, args.arch, &args.name, &a, &root);
    cmd.args(disk);
    boot(cmd, &args)
}

/// `up --bundle`: only the host and its helpers are built; the kernel, root and init are the
/// bundle's.
fn run_bundle(args: &UpArgs, bundle: &Path) -> Result<i32> {
    let opened = std::fs::File::open(bundle)
        .map_err(|e| Error::io("open", bundle, e))
        .and_then(|f| {
            openshell_shared::bundle::unpack::open(f).map_err(|e| Error::msg(e.to_string()))
        })?;
    let m = &opened.manifest;
    let profile = match m.profile.as_str() {
        "base" => Profile::Base,
        _ => Profile::Gateway,
    };
    let (disk, disk_why) = state_disk_args(profile, &args.host_args);
    eprintln!(
        "xtask: booting bundle {} (profile `{}`, {}); {disk_why}",
        m.version, m.profile, m.arch
    );
    let host = tools::host(true)?;
    let mut cmd = Command::new(host);
    cmd.args(["up", "--arch", &m.arch, "--name", &args.name])
        .arg("--bundle")
        .arg(bundle)
        .arg("--vsock-helper")
        .arg(tools::vsock_helper()?)
        .args(disk);
    boot(cmd, args)
}

/// Adds what every `up` shares to `cmd` (the pinned gvproxy, the user's host arguments, the
/// workload) and runs it; its exit status.
fn boot(mut cmd: Command, args: &UpArgs) -> Result<i32> {
    if let Some(gvproxy) = pinned_gvproxy(&args.host_args) {
        cmd.arg("--gvproxy").arg(gvproxy);
    }
    cmd.args(&args.host_args);
    if !args.exec.is_empty() {
        cmd.arg("--exec").args(&args.exec);
    }
    let status = cmd
        .status()
        .map_err(|e| Error::msg(format!("cannot run openshell-host: {e}")))?;
    Ok(status.code().unwrap_or(1))
}

/// The pinned gvproxy CI runs, built into the cache once, so `up` boots the network every macOS
/// user gets; none when the host arguments name one already or it cannot be built (no Go
/// toolchain), and then `openshell-host` picks the network itself and says which.
fn pinned_gvproxy(host_args: &[String]) -> Option<PathBuf> {
    if host_args.iter().any(|a| a.starts_with("--gvproxy")) {
        return None;
    }
    match peers::GVPROXY.build() {
        Ok(path) => Some(path),
        Err(e) => {
            eprintln!("xtask: no pinned gvproxy ({e}); openshell-host picks the network");
            None
        }
    }
}

/// The state disk options for a profile, and the words for the summary line. The base root
/// boots without one (it has no mke2fs to format it) unless the host arguments ask for a size.
fn state_disk_args(profile: Profile, host_args: &[String]) -> (&'static [&'static str], String) {
    let sized = host_args.iter().any(|a| a.starts_with("--state-disk-size"));
    match profile {
        Profile::Base if !sized => (
            &["--no-state-disk"],
            "no state disk (the base root cannot format one)".into(),
        ),
        _ if host_args.iter().any(|a| a == "--no-state-disk") => {
            (&[], "no state disk (--no-state-disk)".into())
        }
        _ => (
            &[],
            "state disk in openshell-host's state directory, kept when the root is replaced".into(),
        ),
    }
}

/// `openshell-host up` for instance `name` booting the base root `root` (or a copy of it) with
/// the kernel and helpers of `a`, without a state disk: the base root cannot format one. For the
/// benchmarks: under software emulation (`--accel tcg`), what their recorded numbers measure,
/// whether or not KVM runs guests on the machine.
pub fn host_up(host: &Path, arch: Arch, name: &str, a: &Artifacts, root: &Path) -> Command {
    let mut cmd = host_cmd(host, arch, name, a, root);
    cmd.args(["--no-state-disk", "--accel", "tcg"]);
    cmd
}

/// `openshell-host up` for instance `name` booting `root` (one that can format a disk) with a
/// state disk of `size`, under software emulation as [`host_up`].
pub fn host_up_with_disk(
    host: &Path,
    arch: Arch,
    name: &str,
    a: &Artifacts,
    root: &Path,
    size: &str,
) -> Command {
    let mut cmd = host_cmd(host, arch, name, a, root);
    cmd.args(["--state-disk-size", size, "--accel", "tcg"]);
    cmd
}

/// `openshell-host up` for instance `name` booting `root` with the kernel and helpers of `a`.
fn host_cmd(host: &Path, arch: Arch, name: &str, a: &Artifacts, root: &Path) -> Command {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn inputs(k3s: bool) -> gateway::Inputs {
        gateway::Inputs {
            k3s: k3s.then(|| PathBuf::from("/x/k3s")),
            images: None,
            state_db: None,
        }
    }

    fn payload(images: bool) -> payload::Args {
        payload::Args {
            images: if images {
                vec![PathBuf::from("/x/images")]
            } else {
                Vec::new()
            },
            ..Default::default()
        }
    }

    #[test]
    fn gateway_when_k3s_is_available_base_otherwise() {
        let pick =
            |forced, k, i, cached| choose(forced, &inputs(k), &payload(i), cached).map(|c| c.0);
        assert_eq!(pick(None, false, false, false).expect("ok"), Profile::Base);
        assert_eq!(
            pick(None, true, false, false).expect("ok"),
            Profile::Gateway
        );
        assert_eq!(
            pick(None, false, true, false).expect("ok"),
            Profile::Gateway
        );
        assert_eq!(
            pick(None, false, false, true).expect("ok"),
            Profile::Gateway
        );
        assert_eq!(
            pick(Some(Profile::Base), false, false, true).expect("ok"),
            Profile::Base
        );
        assert_eq!(
            pick(Some(Profile::Gateway), false, false, false).expect("ok"),
            Profile::Gateway
        );
        assert!(pick(Some(Profile::Base), true, false, false).is_err());
        assert!(pick(Some(Profile::Base), false, true, false).is_err());
        let (_, why) = choose(None, &inputs(false), &payload(false), false).expect("ok");
        assert!(why.contains("--k3s FILE"), "{why}");
    }

    #[test]
    fn the_gateway_gets_a_state_disk_and_the_base_root_none() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (base, why) = state_disk_args(Profile::Base, &[]);
        assert_eq!(base, ["--no-state-disk"]);
        assert!(why.starts_with("no state disk"), "{why}");
        let (gw, why) = state_disk_args(Profile::Gateway, &[]);
        assert!(gw.is_empty());
        assert!(why.contains("kept when the root is replaced"), "{why}");
        let (gw, why) = state_disk_args(Profile::Gateway, &args(&["--no-state-disk"]));
        assert!(gw.is_empty() && why.contains("(--no-state-disk)"), "{why}");
        let (base, _) = state_disk_args(Profile::Base, &args(&["--state-disk-size=64G"]));
        assert!(base.is_empty(), "a size asked for is a disk asked for");
    }
}
