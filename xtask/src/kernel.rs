//! `cargo xtask kernel`: the guest kernel from Debian's linux-source-6.1, `make allnoconfig` plus
//! our fragments, then a check that the resulting `.config` has every option the fragments ask
//! for (allnoconfig silently drops options whose dependencies are missing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{self, Key};
use openshell_shared::Arch;

use crate::build_names::BuildNames;
use crate::error::{Error, Result};
use crate::paths::workspace;
use crate::process::run;

const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Bumped when the build steps below change in a way that changes the output.
const RECIPE: &str = "kernel-v2";

/// What a fragment asks for one option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    Value(String),
    Off,
}

/// Parses `CONFIG_X=v`, `CONFIG_X=n` and `# CONFIG_X is not set` lines; other comments are skipped.
pub fn parse_fragment(text: &str) -> Result<BTreeMap<String, Want>> {
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            if let Some(name) = rest.trim_start().strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") {
                    out.insert(name.to_string(), Want::Off);
                }
            }
            continue;
        }
        let (name, value) = line
            .split_once('=')
            .filter(|(n, _)| n.starts_with("CONFIG_"))
            .ok_or_else(|| Error::msg(format!("line {}: not a config option: {raw}", i + 1)))?;
        let want = if value == "n" {
            Want::Off
        } else {
            Want::Value(value.to_string())
        };
        out.insert(name.to_string(), want);
    }
    Ok(out)
}

/// Options of `wanted` the `.config` text does not satisfy, as "NAME: wanted X, got Y".
pub fn unmet(wanted: &BTreeMap<String, Want>, dot_config: &str) -> Result<Vec<String>> {
    let have = parse_fragment(dot_config)
        .map_err(|e| Error::msg(format!("the generated .config does not parse: {e}")))?;
    Ok(wanted
        .iter()
        .filter_map(|(name, want)| {
            let got = have.get(name).cloned().unwrap_or(Want::Off);
            (got != *want).then(|| format!("{name}: wanted {}, got {}", show(want), show(&got)))
        })
        .collect())
}

fn show(w: &Want) -> String {
    match w {
        Want::Value(v) => v.clone(),
        Want::Off => "not set".into(),
    }
}

pub fn fragments(arch: Arch) -> [PathBuf; 2] {
    let dir = workspace().join("kernel-config");
    [
        dir.join("common.config"),
        dir.join(format!("{}.config", arch.name())),
    ]
}

/// The kernel image files this arch's output holds.
pub fn images(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::X86_64 => &["bzImage", "vmlinux"],
        Arch::Aarch64 => &["Image"],
    }
}

/// Builds (or finds in the cache) the kernel; returns the output directory.
pub fn build(arch: Arch) -> Result<PathBuf> {
    let tarball = Path::new(SOURCE_TARBALL);
    let meta = std::fs::metadata(tarball)
        .map_err(|e| Error::io("read (install Debian's linux-source-6.1)", tarball, e))?;
    let mut merged = String::new();
    for f in fragments(arch) {
        merged.push_str(&std::fs::read_to_string(&f).map_err(|e| Error::io("read", &f, e))?);
        merged.push('\n');
    }
    let wanted = parse_fragment(&merged)?;
    let mut key = Key::new(RECIPE);
    // The options, not the comments: documenting a group must not rebuild the kernel.
    let options: Vec<String> = wanted
        .iter()
        .map(|(k, v)| format!("{k}={}", show(v)))
        .collect();
    key.str(arch.name()).str(&options.join("\n"));
    // The package's size and mtime identify its version without hashing 130 MB on every run.
    key.str(&format!("{}:{:?}", meta.len(), meta.modified().ok()));
    let key = key.finish();
    let dest = cache::root()
        .join("kernel")
        .join(format!("{}-{key}", arch.name()));
    cache::entry(&dest, |out| {
        let src = source_tree(tarball, &meta)?;
        let build = cache::root()
            .join("build")
            .join(format!("kernel-{}-{key}", arch.name()));
        std::fs::create_dir_all(&build).map_err(|e| Error::io("create", &build, e))?;
        let frag = build.join("fragment.config");
        std::fs::write(&frag, &merged).map_err(|e| Error::io("write", &frag, e))?;
        let make = |targets: &[&str]| {
            let mut cmd = Command::new("make");
            cmd.current_dir(&src)
                .arg(format!("O={}", build.display()))
                .arg(format!("ARCH={}", arch.kernel_arch()));
            if arch != Arch::host() {
                cmd.arg(format!("CROSS_COMPILE={}", arch.cross_prefix()));
            }
            cmd.args(targets);
            cmd
        };
        eprintln!(
            "xtask: configuring {} kernel (allnoconfig + fragments)",
            arch.name()
        );
        let mut cfg = make(&["-s", "allnoconfig"]);
        cfg.env("KCONFIG_ALLCONFIG", &frag);
        run(&mut cfg)?;
        let dot_config_path = build.join(".config");
        let dot_config = std::fs::read_to_string(&dot_config_path)
            .map_err(|e| Error::io("read", &dot_config_path, e))?;
        let missing = unmet(&wanted, &dot_config)?;
        if !missing.is_empty() {
            return Err(Error::msg(format!(
                "the {} kernel config lacks {} option(s) the fragments ask for (missing dependencies?):\n  {}",
                arch.name(),
                missing.len(),
                missing.join("\n  ")
            )));
        }
        eprintln!(
            "xtask: all {} requested options set; building {} kernel (minutes)",
            wanted.len(),
            arch.name()
        );
        let jobs = format!(
            "-j{}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        );
        let targets: Vec<&str> = match arch {
            Arch::X86_64 => vec!["-s", &jobs, "bzImage", "vmlinux"],
            Arch::Aarch64 => vec!["-s", &jobs, "Image"],
        };
        run(&mut make(&targets))?;
        let boot = build.join(format!("arch/{}/boot", arch.kernel_arch()));
        for image in images(arch) {
            let from = if *image == "vmlinux" {
                build.join("vmlinux")
            } else {
                boot.join(image)
            };
            let to = out.join(image);
            std::fs::copy(&from, &to).map_err(|e| Error::io("copy", &from, e))?;
        }
        std::fs::copy(&dot_config_path, out.join("config"))
            .map_err(|e| Error::io("copy", &dot_config_path, e))?;
        // The object tree is large and only the images are kept.
        let _ = std::fs::remove_dir_all(&build);
        Ok(())
    })
}

/// The extracted source tree, shared by both arches (builds are out of tree).
fn source_tree(tarball: &Path, meta: &std::fs::Metadata) -> Result<PathBuf> {
    let mut key = Key::new("linux-source");
    key.str(&format!("{}:{:?}", meta.len(), meta.modified().ok()));
    let dest = cache::root()
        .join("src")
        .join(format!("linux-{}", key.finish()));
    cache::entry(&dest, |tmp| {
        eprintln!("xtask: extracting {}", tarball.display());
        run(Command::new("tar")
            .arg("-xf")
            .arg(tarball)
            .arg("-C")
            .arg(tmp)
            .arg("--strip-components=1"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_parsing() {
        let f = parse_fragment(
            "# group: x - y\nCONFIG_A=y\nCONFIG_B=n\n# CONFIG_C is not set\nCONFIG_N=16\n",
        )
        .expect("valid");
        assert_eq!(f["CONFIG_A"], Want::Value("y".into()));
        assert_eq!(f["CONFIG_B"], Want::Off);
        assert_eq!(f["CONFIG_C"], Want::Off);
        assert_eq!(f["CONFIG_N"], Want::Value("16".into()));
        assert!(parse_fragment("FOO=y\n")
            .unwrap_err()
            .to_string()
            .contains("line 1"));
    }

    #[test]
    fn unmet_options_are_listed() {
        let wanted =
            parse_fragment("CONFIG_A=y\nCONFIG_B=n\nCONFIG_C=y\nCONFIG_D=16\n").expect("valid");
        // Shaped like a real .config: banner comments and bare `#` lines.
        let dot = "#\n# Automatically generated file; DO NOT EDIT.\n#\nCONFIG_A=y\n# CONFIG_C is not set\nCONFIG_D=8\n";
        assert_eq!(
            unmet(&wanted, dot).expect("parses"),
            vec![
                "CONFIG_C: wanted y, got not set".to_string(),
                "CONFIG_D: wanted 16, got 8".to_string()
            ]
        );
    }

    #[test]
    fn our_fragments_parse() {
        for arch in [Arch::X86_64, Arch::Aarch64] {
            for f in fragments(arch) {
                let text = std::fs::read_to_string(&f).expect("fragment");
                assert!(
                    !parse_fragment(&text).expect("valid").is_empty(),
                    "{}",
                    f.display()
                );
            }
        }
    }
}
