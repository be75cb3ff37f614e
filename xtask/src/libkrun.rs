//! `cargo xtask libkrun`: libkrun's shared library, built from the `libkrun` crate on crates.io
//! (its own `cdylib` target, its own `Cargo.lock`) into the artifact cache. Nothing of libkrun's
//! source enters the checkout.
//!
//! Features: `net` (virtio-net over unix sockets, for passt and gvproxy), `blk` (virtio-blk, for
//! the state disk: `krun_add_disk3`) and not the default
//! `init-blob`: that one compiles libkrun's C init statically with `cc` and serves it as
//! `/init.krun`, but our kernel command line names `init=/sbin/openshell-init`, which replaces
//! libkrun's `init=/init.krun`, so it would never run.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{self, Key};
use crate::error::{Error, Result};
use crate::process::{run, run_output};
use crate::tools::cargo;

pub const VERSION: &str = "1.19.7";
const FEATURES: &str = "net,blk";
/// Bumped when the steps below change what they produce.
const RECIPE: &str = "libkrun-v1";

#[cfg(target_os = "macos")]
const LIB_FILE: &str = "libkrun.dylib";
#[cfg(not(target_os = "macos"))]
const LIB_FILE: &str = "libkrun.so";

/// Builds the library unless the cache has it; returns its path.
pub fn build() -> Result<PathBuf> {
    let rustc = run_output(
        Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into())).arg("-V"),
    )?;
    let mut key = Key::new(RECIPE);
    key.str(VERSION)
        .str(FEATURES)
        .str(rustc.trim())
        .str(std::env::consts::ARCH)
        .str(std::env::consts::OS);
    let dir = cache::root()
        .join("libkrun")
        .join(format!("{VERSION}-{}", key.finish()));
    let dir = cache::entry(&dir, |tmp| {
        eprintln!("xtask: building libkrun {VERSION} from crates.io (a minute or two, once)");
        let src = fetch(tmp)?;
        let target = tmp.join("target");
        run(Command::new(cargo())
            .args([
                "build",
                "--quiet",
                "--release",
                "--locked",
                "--no-default-features",
            ])
            .args(["--features", FEATURES, "--lib", "--manifest-path"])
            .arg(src.join("Cargo.toml"))
            // Outside the checkout: our .cargo/config.toml does not apply.
            .current_dir(&src)
            // Its own target dir: the workspace's must not be locked or polluted.
            .env("CARGO_TARGET_DIR", &target))?;
        let built = target.join("release").join(LIB_FILE);
        std::fs::copy(&built, tmp.join(LIB_FILE)).map_err(|e| Error::io("copy", &built, e))?;
        for scratch in [target, src, tmp.join("fetch")] {
            std::fs::remove_dir_all(&scratch).map_err(|e| Error::io("remove", &scratch, e))?;
        }
        Ok(())
    })?;
    Ok(dir.join(LIB_FILE))
}

/// Downloads the crate through cargo (a throwaway package depending on it) and copies its source
/// to `<tmp>/src`, which is made a workspace of its own so a cache under a checkout still builds.
fn fetch(tmp: &Path) -> Result<PathBuf> {
    let pkg = tmp.join("fetch");
    std::fs::create_dir_all(&pkg).map_err(|e| Error::io("create", &pkg, e))?;
    let manifest = pkg.join("Cargo.toml");
    let text = format!(
        "[package]\nname = \"libkrun-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         [lib]\npath = \"lib.rs\"\n\
         [dependencies]\nlibkrun = {{ version = \"={VERSION}\", default-features = false }}\n\
         [workspace]\n"
    );
    std::fs::write(&manifest, text).map_err(|e| Error::io("write", &manifest, e))?;
    std::fs::write(pkg.join("lib.rs"), "").map_err(|e| Error::io("write", &pkg, e))?;
    let json = run_output(
        Command::new(cargo())
            .args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(&manifest),
    )?;
    let source = crate_dir(&json)?;
    let src = tmp.join("src");
    crate::rootfs::copy_tree(&source, &src)?;
    let copied = src.join("Cargo.toml");
    let mut text = std::fs::read_to_string(&copied).map_err(|e| Error::io("read", &copied, e))?;
    text.push_str("\n[workspace]\n");
    std::fs::write(&copied, text).map_err(|e| Error::io("write", &copied, e))?;
    Ok(src)
}

/// The source directory of libkrun `VERSION` in `cargo metadata` output.
fn crate_dir(metadata: &str) -> Result<PathBuf> {
    let value: serde_json::Value = serde_json::from_str(metadata)
        .map_err(|e| Error::msg(format!("cargo metadata printed no JSON: {e}")))?;
    value["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "libkrun" && p["version"] == VERSION)
        .and_then(|p| p["manifest_path"].as_str())
        .and_then(|m| Path::new(m).parent())
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::msg(format!("cargo metadata lists no libkrun {VERSION}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_crate_in_metadata() {
        let json = format!(
            r#"{{"packages":[{{"name":"libc","version":"0.2.1","manifest_path":"/r/libc/Cargo.toml"}},
            {{"name":"libkrun","version":"{VERSION}","manifest_path":"/r/libkrun-{VERSION}/Cargo.toml"}}]}}"#
        );
        assert_eq!(
            crate_dir(&json).expect("found"),
            PathBuf::from(format!("/r/libkrun-{VERSION}"))
        );
        assert!(crate_dir(r#"{"packages":[]}"#).is_err());
    }
}
