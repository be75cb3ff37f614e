//! Which bundle `up` boots and where it unpacks: `--bundle FILE`; else, when `--kernel` or
//! `--rootfs` is missing, `openshell-gateway-<arch>.bundle` next to this program; else the
//! bundle built into it (feature `embedded-bundle`). It is checked and unpacked once per version
//! into `<state dir>/bundles/<version>/` (`openshell_shared::bundle::install`), under the
//! instance's lock, and the missing `--kernel`/`--rootfs` point into it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use openshell_shared::bundle::error::BundleError;
use openshell_shared::bundle::install::{install, Installed};
use openshell_shared::bundle::owners::Owners;

use crate::lifecycle::state::StateDir;
use crate::up::args::UpArgs;

/// The bundle's file name next to the host binary.
pub fn sibling_name(arch: openshell_shared::Arch) -> String {
    format!("openshell-gateway-{}.bundle", arch.name())
}

#[cfg(feature = "embedded-bundle")]
static EMBEDDED: &[u8] = include_bytes!(env!("OPENSHELL_EMBEDDED_BUNDLE_PATH"));
#[cfg(not(feature = "embedded-bundle"))]
static EMBEDDED: &[u8] = &[];

#[derive(Debug, thiserror::Error)]
pub enum HostBundleError {
    #[error("bundle {}: {source}", origin)]
    Bundle { origin: String, source: BundleError },
    #[error("bundle {origin} is for {found}, not --arch {wanted}")]
    Arch {
        origin: String,
        found: String,
        wanted: String,
    },
    #[error(
        "no --kernel and --rootfs, and no bundle: give --bundle FILE, or put {name} next to {exe}"
    )]
    None { name: String, exe: String },
}

/// Where the bytes come from.
enum Source {
    File(PathBuf),
    Embedded,
}

impl Source {
    fn origin(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Embedded => "built into openshell-host".into(),
        }
    }
}

/// The bundle `args` ask for, if any.
fn source(args: &UpArgs) -> Result<Option<Source>, HostBundleError> {
    if let Some(file) = &args.bundle {
        return Ok(Some(Source::File(file.clone())));
    }
    if args.kernel.is_some() && args.rootfs.is_some() {
        return Ok(None);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let name = sibling_name(args.arch);
    let sibling = exe.with_file_name(&name);
    if exe.parent().is_some() && sibling.is_file() {
        return Ok(Some(Source::File(sibling)));
    }
    if !EMBEDDED.is_empty() {
        return Ok(Some(Source::Embedded));
    }
    Err(HostBundleError::None {
        name,
        exe: exe.display().to_string(),
    })
}

/// Unpacks (or reuses) the bundle `args` ask for into `sdir` and fills in the kernel and root
/// filesystem not given on the command line. Returns a line for the user, none without a bundle.
pub fn resolve(args: &mut UpArgs, sdir: &StateDir) -> Result<Option<String>, HostBundleError> {
    let Some(source) = source(args)? else {
        return Ok(None);
    };
    let origin = source.origin();
    let wrap = |source| HostBundleError::Bundle {
        origin: origin.clone(),
        source,
    };
    let started = Instant::now();
    let bundles = sdir.path.join("bundles");
    let installed = match &source {
        Source::File(path) => {
            let file = open_file(path).map_err(wrap)?;
            install(file, &bundles, Owners::for_this_process())
        }
        Source::Embedded => install(EMBEDDED, &bundles, Owners::for_this_process()),
    }
    .map_err(wrap)?;
    let found = &installed.manifest.arch;
    if found != args.arch.name() {
        return Err(HostBundleError::Arch {
            origin,
            found: found.clone(),
            wanted: args.arch.name().into(),
        });
    }
    args.kernel.get_or_insert_with(|| installed.kernel());
    args.rootfs.get_or_insert_with(|| installed.rootfs());
    Ok(Some(note(&installed, &origin, started)))
}

fn open_file(path: &Path) -> Result<std::fs::File, BundleError> {
    std::fs::File::open(path).map_err(|e| BundleError::io("open", path, e))
}

fn note(installed: &Installed, origin: &str, started: Instant) -> String {
    let m = &installed.manifest;
    let what = if installed.reused {
        "reused the copy unpacked in".to_string()
    } else {
        format!(
            "checked and unpacked in {:.1} s into",
            started.elapsed().as_secs_f64()
        )
    };
    let mut line = format!(
        "bundle {} ({} {}, from {origin}): {what} {}",
        m.version,
        m.profile,
        m.arch,
        installed.dir.display()
    );
    if installed.skipped_xattrs > 0 {
        line.push_str(&format!(
            "; {} xattrs outside user.* not restored (not root)",
            installed.skipped_xattrs
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::up::args::parse;

    #[test]
    fn kernel_and_rootfs_given_need_no_bundle() {
        let args = parse(&["--kernel", "/k", "--rootfs", "/r"]).expect("parse");
        assert!(source(&args).expect("ok").is_none());
    }

    #[test]
    fn without_either_and_no_bundle_the_error_names_the_file_looked_for() {
        let args = parse(&["--arch", "aarch64"]).expect("parse");
        if EMBEDDED.is_empty() {
            let err = source(&args).err().expect("no bundle").to_string();
            assert!(
                err.contains("openshell-gateway-aarch64.bundle next to"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_damaged_bundle_file_is_named_with_its_path() {
        let tmp = tempfile::tempdir().expect("tmp");
        let file = tmp.path().join("x.bundle");
        std::fs::write(&file, b"not zstd").expect("write");
        let mut args = parse(&["--bundle", file.to_str().expect("utf8")]).expect("parse");
        let sdir = StateDir::at("t", tmp.path().join("state"));
        let err = resolve(&mut args, &sdir).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("bundle {}:", file.display())),
            "{err}"
        );
        assert!(args.kernel.is_none() && args.rootfs.is_none());
    }
}
