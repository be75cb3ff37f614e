//! `cargo xtask bundle`: the base or gateway profile of one arch as one file a user downloads
//! (format: docs/bundle.md), written from the artifacts already built or built here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use openshell_shared::bundle::manifest::{Manifest, VmSizing};
use openshell_shared::bundle::pack::{write_bundle, Inputs};
use openshell_shared::Arch;

use crate::artifacts::{artifacts, Artifacts};
use crate::error::{Error, Result};
use crate::paths::target_dir;
use crate::up::Profile;
use crate::{gateway, payload};

/// zstd level: 3 (zstd's default). Measured on the base root (docs/bundle.md): higher levels
/// cost seconds for a few percent.
pub const LEVEL: i32 = 3;

#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    #[arg(long, default_value_t = Arch::host())]
    pub arch: Arch,
    #[arg(long, value_enum, default_value_t = Profile::Base)]
    pub profile: Profile,
    /// Output file; `<target>/bundles/openshell-<profile>-<arch>.bundle` by default.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// This root filesystem, already built (e.g. `cargo xtask rootfs --profile gateway`),
    /// instead of building `--profile`'s; `--profile` still names it in the manifest.
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    #[command(flatten)]
    pub gateway: gateway::Inputs,
    #[command(flatten)]
    pub payload: payload::Args,
}

pub fn run(args: BundleArgs) -> Result<()> {
    let mut a = artifacts(args.arch)?;
    if let Some(root) = args.rootfs {
        a.rootfs = root;
    } else if args.profile == Profile::Gateway {
        let init = a.init.clone();
        a.rootfs = gateway::build_with(args.arch, || Ok(init), &args.gateway, &args.payload)?.root;
    }
    let out = args
        .out
        .unwrap_or_else(|| default_path(profile_name(args.profile), args.arch));
    let start = Instant::now();
    let manifest = write(&a, args.arch, profile_name(args.profile), &out)?;
    let size = std::fs::metadata(&out)
        .map_err(|e| Error::io("stat", &out, e))?
        .len();
    eprintln!(
        "xtask: bundle {} ({} {}, {:.1} MiB) in {:.1}s",
        manifest.version,
        manifest.profile,
        manifest.arch,
        size as f64 / (1 << 20) as f64,
        start.elapsed().as_secs_f64()
    );
    println!("{}", out.display());
    Ok(())
}

/// Writes the bundle of `a` (its root being `profile`'s) to `out`.
pub fn write(a: &Artifacts, arch: Arch, profile: &str, out: &Path) -> Result<Manifest> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    }
    let inputs = Inputs {
        crate_version: env!("CARGO_PKG_VERSION"),
        arch,
        profile,
        kernel: &a.kernel,
        init: &a.init,
        rootfs: &a.rootfs,
        vm: sizing(&a.rootfs)?,
        level: LEVEL,
    };
    write_bundle(&inputs, out).map_err(|e| Error::msg(e.to_string()))
}

pub fn default_path(profile: &str, arch: Arch) -> PathBuf {
    target_dir()
        .join("bundles")
        .join(format!("openshell-{profile}-{}.bundle", arch.name()))
}

fn profile_name(p: Profile) -> &'static str {
    match p {
        Profile::Base => "base",
        Profile::Gateway => "gateway",
    }
}

/// The `vm` field of the root's `manifest.json`, when the root has one with it.
fn sizing(root: &Path) -> Result<Option<VmSizing>> {
    let path = root.join("manifest.json");
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let value: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::msg(format!("{}: not JSON: {e}", path.display())))?;
    match value.get(openshell_shared::sizing::MANIFEST_KEY) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(vm) => VmSizing::from_json(vm)
            .map(Some)
            .map_err(|e| Error::msg(format!("{}: field vm: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizing_comes_from_the_root_manifest_when_present() {
        let tmp = tempfile::tempdir().expect("tmp");
        assert_eq!(sizing(tmp.path()).expect("none"), None);
        let m = tmp.path().join("manifest.json");
        std::fs::write(&m, br#"{"packages": {}}"#).expect("write");
        assert_eq!(sizing(tmp.path()).expect("no vm"), None);
        std::fs::write(&m, br#"{"vm": {"cpus": 4, "memory_mib": 8192}}"#).expect("write");
        assert_eq!(
            sizing(tmp.path()).expect("vm"),
            Some(VmSizing {
                cpus: 4,
                memory_mib: 8192
            })
        );
        std::fs::write(&m, br#"{"vm": {"cpus": "four"}}"#).expect("write");
        let err = sizing(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("manifest.json: field vm"), "{err}");
    }
}
