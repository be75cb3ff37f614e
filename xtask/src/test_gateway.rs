//! The gateway profile's step of `cargo xtask test`: builds the gateway root with the stand-in
//! k3s (`guest-init/tests/fixtures/fake-k3s.sh`) and an images directory holding one small file,
//! checks its manifest, and boots a copy to the last ready stage (`gateway-ready`, answered by
//! the stand-in). For x86_64 it also checks that a second build from the same inputs (in a fresh
//! cache, debootstrap included) gives a byte-identical manifest, the same cache key and the same
//! tree hash; aarch64 (debootstrap under qemu-user, about 6 minutes) is built and booted once.
//! Skipped, with a message, when debootstrap cannot reach the Debian mirror.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use openshell_shared::Arch;

use crate::artifacts::artifacts;
use crate::error::{Error, Result};
use crate::paths::workspace;
use crate::{cache, gateway, rootfs, tools};

fn fail(what: impl Into<String>) -> Error {
    Error::msg(format!("gateway root filesystem test: {}", what.into()))
}

pub fn run(arches: &[Arch]) -> Result<()> {
    if !gateway::mirror_reachable() {
        eprintln!(
            "xtask test: SKIPPED the gateway root filesystem test: {} is not reachable, so debootstrap cannot run",
            gateway::MIRROR
        );
        return Ok(());
    }
    for arch in arches {
        eprintln!("xtask test: gateway root filesystem for {}", arch.name());
        one(*arch, *arch == Arch::X86_64)?;
    }
    Ok(())
}

fn one(arch: Arch, twice: bool) -> Result<()> {
    let fake = workspace().join("guest-init/tests/fixtures/fake-k3s.sh");
    let images = tempfile::tempdir().map_err(|e| fail(e.to_string()))?;
    let image = images.path().join("stand-in-images.tar");
    std::fs::write(&image, b"a small stand-in for an airgap image tarball\n")
        .map_err(|e| Error::io("write", &image, e))?;
    let inputs = gateway::Inputs {
        k3s: Some(fake.clone()),
        images: Some(images.path().to_path_buf()),
        state_db: None,
    };
    let init = tools::init(arch)?;
    let first = gateway::build(arch, || Ok(init.clone()), &inputs)?;
    let text = check_manifest(&first.root, &fake, &image, &init)?;
    eprintln!(
        "xtask test: gateway manifest checked ({})",
        first.root.display()
    );

    if twice {
        rebuild_is_identical(arch, &inputs, &init, &first, &text)?;
    }
    boot(arch, &first.root)
}

/// Same inputs, fresh cache: debootstrap and assembly run again and must give the same tree.
fn rebuild_is_identical(
    arch: Arch,
    inputs: &gateway::Inputs,
    init: &Path,
    first: &gateway::Built,
    text: &str,
) -> Result<()> {
    let other = tempfile::Builder::new()
        .prefix("openshell-cache-")
        .tempdir_in(cache::root())
        .map_err(|e| fail(e.to_string()))?;
    let saved = std::env::var_os("OPENSHELL_CACHE_DIR");
    std::env::set_var("OPENSHELL_CACHE_DIR", other.path());
    let second = gateway::build(arch, || Ok(init.to_path_buf()), inputs);
    match saved {
        Some(v) => std::env::set_var("OPENSHELL_CACHE_DIR", v),
        None => std::env::remove_var("OPENSHELL_CACHE_DIR"),
    }
    let second = second?;
    if second.key != first.key {
        return Err(fail(format!(
            "the same inputs gave cache keys {} and {}",
            first.key, second.key
        )));
    }
    let text2 = read(&second.root.join("manifest.json"))?;
    let (h1, h2) = (
        gateway::tree_hash(&first.root)?,
        gateway::tree_hash(&second.root)?,
    );
    if text2 != text || h1 != h2 {
        let (ea, eb) = (
            gateway::tree_entries(&first.root)?,
            gateway::tree_entries(&second.root)?,
        );
        let differ: Vec<String> = ea
            .keys()
            .chain(eb.keys())
            .filter(|k| ea.get(*k) != eb.get(*k))
            .take(20)
            .cloned()
            .collect();
        // Kept for inspection.
        let kept = other.keep();
        return Err(fail(format!(
            "two builds from the same inputs differ ({} and {}, under {}): manifest.json {}; files: {}",
            first.root.display(),
            second.root.display(),
            kept.display(),
            first_difference(text, &text2),
            differ.join(", ")
        )));
    }
    eprintln!(
        "xtask test: gateway root rebuilt from scratch: same key {}, identical manifest, tree {h1}",
        first.key
    );
    drop(other);
    Ok(())
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| Error::io("read", p, e))
}

fn first_difference(a: &str, b: &str) -> String {
    a.lines()
        .zip(b.lines())
        .enumerate()
        .find(|(_, (x, y))| x != y)
        .map(|(i, (x, y))| format!("line {}: `{}` vs `{}`", i + 1, x.trim(), y.trim()))
        .unwrap_or_else(|| "different lengths".into())
}

/// The manifest's claims against the tree and the inputs; returns its text.
fn check_manifest(root: &Path, fake: &Path, image: &Path, init: &Path) -> Result<String> {
    let text = read(&root.join("manifest.json"))?;
    let m: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| fail(format!("manifest.json: {e}")))?;
    let want = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(fail(what.to_string()))
        }
    };
    let packages = &m["debian"]["packages"];
    for p in gateway::PACKAGES.iter().chain(&["dpkg", "libc6"]) {
        want(
            packages[*p].as_str().is_some_and(|v| !v.is_empty()),
            &format!("package {p} not listed with a version in manifest.json"),
        )?;
    }
    for p in ["python3", "sqlite3", "systemd"] {
        want(
            packages.get(p).is_none(),
            &format!("{p} must not be in the root"),
        )?;
    }
    let fake_sha = cache::sha256_file(fake)?;
    want(
        m["k3s"]["sha256"] == fake_sha.as_str(),
        "k3s.sha256 is not the stand-in's",
    )?;
    want(
        m["k3s"]["pinned"] == false,
        "the stand-in k3s is not flagged unpinned",
    )?;
    want(
        m["unpinned"]
            .as_array()
            .is_some_and(|u| u.iter().any(|x| x == "usr/local/bin/k3s")),
        "`unpinned` does not list usr/local/bin/k3s",
    )?;
    let img_sha = cache::sha256_file(image)?;
    want(
        m["images"]["files"][0]["sha256"] == img_sha.as_str(),
        "the image's SHA-256 is not recorded",
    )?;
    want(
        m["openshell-init"]["sha256"] == cache::sha256_file(init)?.as_str(),
        "openshell-init's SHA-256 is not recorded",
    )?;
    want(
        m["tree_sha256"] == gateway::tree_hash(root)?.as_str(),
        "tree_sha256 does not match the tree",
    )?;
    want(
        cache::sha256_file(&root.join("usr/local/bin/k3s"))? == fake_sha,
        "usr/local/bin/k3s is not the stand-in",
    )?;
    want(
        std::fs::read_link(root.join("usr/local/bin/kubectl")).is_ok_and(|t| t == Path::new("k3s")),
        "usr/local/bin/kubectl is not a link to k3s",
    )?;
    for f in [
        "sbin/openshell-init",
        "etc/openshell/init.yaml",
        "opt/openshell/manifests/openshell-helmchart.yaml",
        // Pre-deployed at build time by the root's own init.
        "var/lib/rancher/k3s/server/manifests/openshell-helmchart.yaml",
        "var/lib/rancher/k3s/server/manifests/agent-sandbox.yaml",
        "var/lib/rancher/k3s/agent/images/stand-in-images.tar",
        "usr/sbin/nft",
        "usr/sbin/iptables",
    ] {
        want(
            root.join(f).exists(),
            &format!("{f} is missing from the root"),
        )?;
    }
    for gone in [
        "var/log/dpkg.log",
        "var/cache/ldconfig/aux-cache",
        "etc/resolv.conf",
    ] {
        want(
            !root.join(gone).exists(),
            &format!("{gone} should have been removed"),
        )?;
    }
    let lists = root.join("var/lib/apt/lists");
    want(
        rootfs::walk(&lists)?.iter().all(|p| p.is_dir()),
        "apt lists were left in the root",
    )?;
    Ok(text)
}

/// Boots a copy of the root with the stand-in k3s until the host reports `ready` (after
/// `gateway-ready`), then takes it down.
fn boot(arch: Arch, built: &Path) -> Result<()> {
    let a = artifacts(arch)?;
    let host = tools::host(false)?;
    let work = tempfile::Builder::new()
        .prefix("osh-gw-")
        .tempdir_in("/tmp")
        .map_err(|e| fail(e.to_string()))?;
    let root = work.path().join("root");
    rootfs::copy_tree(built, &root)?;
    // The stand-in needs busybox's nc for its gateway listener and its state directory.
    let (busybox, _) = rootfs::busybox(arch)?;
    rootfs::copy(&busybox, &root.join("usr/bin/busybox"), 0o755)?;
    let state = root.join("fake-k3s");
    std::fs::create_dir_all(&state).map_err(|e| Error::io("create", &state, e))?;
    std::fs::write(state.join("gateway-port"), "30051")
        .map_err(|e| Error::io("write", &state, e))?;
    let env = |c: &mut Command| {
        c.env("XDG_STATE_HOME", work.path().join("state"))
            .env("XDG_CONFIG_HOME", work.path().join("config"))
            .env("HOME", work.path().join("home"));
    };
    let report = work.path().join("report.json");
    let log = work.path().join("up.log");
    let mut up = Command::new(&host);
    up.args([
        "up",
        "--arch",
        arch.name(),
        "--name",
        "gateway-test",
        "--net",
        "none",
    ])
    .arg("--kernel")
    .arg(&a.kernel)
    .arg("--rootfs")
    .arg(&root)
    .arg("--vsock-helper")
    .arg(&a.vsock_helper)
    .arg("--run-dir")
    .arg(work.path().join("run"))
    .arg("--report")
    .arg(&report)
    .args(["--detach", "--ready-timeout", "600"]);
    env(&mut up);
    let started = Instant::now();
    let out = up
        .output()
        .map_err(|e| fail(format!("cannot run {}: {e}", host.display())))?;
    let took = started.elapsed();
    std::fs::write(
        &log,
        [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
    )
    .map_err(|e| Error::io("write", &log, e))?;
    let mut down = Command::new(&host);
    down.args(["down", "--name", "gateway-test", "--timeout", "60"]);
    env(&mut down);
    let down_ok = down.status().is_ok_and(|s| s.success());
    let console = std::fs::read_to_string(work.path().join("run/console.log")).unwrap_or_default();
    if !out.status.success() {
        return Err(fail(format!(
            "booting the gateway root did not reach ready ({}):\n{}{}\n--- console (end) ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&console, 40)
        )));
    }
    let stages = read(
        &work
            .path()
            .join("state/openshell/gateway-test/last-boot.json"),
    )
    .or_else(|_| read(&report))
    .unwrap_or_default();
    if !stages.contains("gateway-ready") {
        return Err(fail(format!(
            "ready without a gateway-ready stage in the boot report:\n{}",
            tail(&stages, 40)
        )));
    }
    // The build pre-deployed the manifests with the root's own init: the boot must find them
    // byte for byte as it would write them (a rewrite would make k3s redeploy them).
    let line = console
        .lines()
        .find(|l| l.contains("manifests:") && l.contains("manifests unchanged"))
        .unwrap_or("");
    if !line.contains(" 0 written, 0 removed") {
        return Err(fail(format!(
            "the boot rewrote the pre-deployed manifests (console: `{}`)",
            line.trim()
        )));
    }
    if !down_ok {
        return Err(fail("`openshell-host down` failed after the boot"));
    }
    eprintln!(
        "xtask test: gateway root booted to gateway-ready with the stand-in k3s in {:.1} s",
        took.as_secs_f64()
    );
    Ok(())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
