//! The gateway profile's steps of `cargo xtask test`: builds the gateway root with the stand-in
//! k3s (`guest-init/tests/fixtures/fake-k3s.sh`) and an images directory holding one small file,
//! checks its manifest, and boots a copy to the last ready stage (`gateway-ready`, answered by
//! the stand-in). Reproducibility is proven once, on x86_64: a second build from the same inputs
//! in a fresh cache (debootstrap included, in a process of its own) must give a byte-identical
//! manifest, the same cache key and the same tree hash. Skipped, with a message, when
//! debootstrap cannot reach the Debian mirror.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use openshell_shared::Arch;

use super::logged;
use super::timing::Clock;
use crate::artifacts::artifacts;
use crate::error::{Error, Result};
use crate::paths::workspace;
use crate::{cache, gateway, rootfs, tools};

fn fail(what: impl Into<String>) -> Error {
    Error::msg(format!("gateway root filesystem test: {}", what.into()))
}

/// Whether the Debian mirror answers; says so when it does not.
fn mirror_or_skip() -> bool {
    let ok = gateway::mirror_reachable();
    if !ok {
        eprintln!(
            "xtask test: SKIPPED the gateway root filesystem test: {} is not reachable, so debootstrap cannot run",
            gateway::MIRROR
        );
    }
    ok
}

/// The Debian stage of each arch's gateway root (cached); false when the mirror is unreachable.
pub fn debootstrap_all(clock: &Clock, lane: &'static str, arches: &[Arch]) -> Result<bool> {
    if !mirror_or_skip() {
        return Ok(false);
    }
    for arch in arches {
        clock.step(lane, &format!("debootstrap {}", arch.name()), || {
            gateway::debootstrap(*arch)
        })?;
    }
    Ok(true)
}

/// Each arch's built gateway root.
pub type Roots = Vec<(Arch, PathBuf)>;

/// The stand-in inputs: the fake k3s and an images directory with one small file.
struct StandIns {
    fake: PathBuf,
    images: tempfile::TempDir,
    image: PathBuf,
}

impl StandIns {
    fn new() -> Result<Self> {
        let fake = workspace().join("guest-init/tests/fixtures/fake-k3s.sh");
        let images = tempfile::tempdir().map_err(|e| fail(e.to_string()))?;
        let image = images.path().join("stand-in-images.tar");
        // A docker-archive k3s's import would read (one empty layer, not runnable): the build
        // refuses anything that is not an image archive.
        let bytes = crate::image_archive::docker_archive_bytes(&["docker.io/library/stand-in:v1"]);
        std::fs::write(&image, bytes).map_err(|e| Error::io("write", &image, e))?;
        Ok(Self {
            fake,
            images,
            image,
        })
    }

    fn inputs(&self) -> gateway::Inputs {
        gateway::Inputs {
            k3s: Some(self.fake.clone()),
            images: Some(self.images.path().to_path_buf()),
            state_db: None,
        }
    }
}

/// Builds and checks every arch's gateway root with `inits` (each arch's openshell-init), the
/// x86_64 one twice; `None` when the mirror is unreachable.
pub fn build_all(
    clock: &Clock,
    lane: &'static str,
    inits: &[(Arch, PathBuf)],
) -> Result<Option<Roots>> {
    if !mirror_or_skip() {
        return Ok(None);
    }
    let stand_ins = StandIns::new()?;
    let mut roots = Vec::new();
    for (arch, init) in inits {
        let first = clock.step(lane, &format!("gateway root {}", arch.name()), || {
            gateway::build(*arch, || Ok(init.clone()), &stand_ins.inputs())
        })?;
        let text = check_manifest(&first.root, &stand_ins.fake, &stand_ins.image, init)?;
        eprintln!(
            "xtask test: gateway manifest checked ({})",
            first.root.display()
        );
        if *arch == Arch::X86_64 {
            clock.step(lane, "gateway root x86_64 again from scratch", || {
                rebuild_is_identical(*arch, &stand_ins, init, &first, &text)
            })?;
        }
        roots.push((*arch, first.root));
    }
    Ok(Some(roots))
}

/// Boots each root with the stand-in k3s to `gateway-ready`.
pub fn boot_all(clock: &Clock, lane: &'static str, roots: &[(Arch, PathBuf)]) -> Result<()> {
    for (arch, root) in roots {
        clock.step(lane, &format!("gateway boot {}", arch.name()), || {
            boot(*arch, root)
        })?;
    }
    Ok(())
}

/// Same inputs, fresh cache: debootstrap and assembly run again, in a process of its own (the
/// cache is chosen by the environment), and must give the same tree.
fn rebuild_is_identical(
    arch: Arch,
    stand_ins: &StandIns,
    init: &Path,
    first: &gateway::Built,
    text: &str,
) -> Result<()> {
    let other = tempfile::Builder::new()
        .prefix("openshell-cache-")
        .tempdir_in(cache::root())
        .map_err(|e| fail(e.to_string()))?;
    let xtask = std::env::current_exe().map_err(|e| fail(format!("this program's path: {e}")))?;
    let out = logged::run(
        "gateway-rebuild",
        Command::new(xtask)
            .args(["rootfs", "--profile", "gateway", "--arch", arch.name()])
            .arg("--k3s")
            .arg(&stand_ins.fake)
            .arg("--images")
            .arg(stand_ins.images.path())
            .arg("--init")
            .arg(init)
            .env("OPENSHELL_CACHE_DIR", other.path()),
    )?;
    let second_root = out
        .lines()
        .rev()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .ok_or_else(|| fail(format!("the rebuild printed no root directory:\n{out}")))?;
    let second_key = second_root
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.rsplit('-').next())
        .unwrap_or_default()
        .to_string();
    if second_key != first.key {
        return Err(fail(format!(
            "the same inputs gave cache keys {} and {second_key}",
            first.key
        )));
    }
    compare_trees(&first.root, &second_root, text, other)
}

/// The two builds' manifests and trees must be identical; on a difference the second cache is
/// kept for inspection.
fn compare_trees(first: &Path, second: &Path, text: &str, other: tempfile::TempDir) -> Result<()> {
    let text2 = read(&second.join("manifest.json"))?;
    let (h1, h2) = (gateway::tree_hash(first)?, gateway::tree_hash(second)?);
    if text2 != text || h1 != h2 {
        let (ea, eb) = (
            gateway::tree_entries(first)?,
            gateway::tree_entries(second)?,
        );
        let differ: Vec<String> = ea
            .keys()
            .chain(eb.keys())
            .filter(|k| ea.get(*k) != eb.get(*k))
            .take(20)
            .cloned()
            .collect();
        let kept = other.keep();
        return Err(fail(format!(
            "two builds from the same inputs differ ({} and {}, under {}): manifest.json {}; files: {}",
            first.display(),
            second.display(),
            kept.display(),
            first_difference(text, &text2),
            differ.join(", ")
        )));
    }
    eprintln!("xtask test: gateway root rebuilt from scratch: identical manifest, tree {h1}");
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

/// A private scratch directory for one boot, with a copy of the built root in `root/` that the
/// stand-in k3s can run in.
fn scratch_root(arch: Arch, built: &Path) -> Result<tempfile::TempDir> {
    let work = tempfile::Builder::new()
        .prefix("osh-gw-")
        .tempdir_in("/tmp")
        .map_err(|e| fail(e.to_string()))?;
    // Closed to other users: as root, `up` refuses a root filesystem they can reach.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
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
    Ok(work)
}

/// Boots a copy of the root with the stand-in k3s until the host reports `ready` (after
/// `gateway-ready`), then takes it down.
fn boot(arch: Arch, built: &Path) -> Result<()> {
    let a = artifacts(arch)?;
    let host = tools::host(false)?;
    let work = scratch_root(arch, built)?;
    let root = work.path().join("root");
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
    .args(["--detach", "--ready-timeout", "600"])
    // The stand-in k3s needs what the base root does, not the gateway's 4 vCPUs and 8 GiB.
    .args(["--cpus", "1", "--memory", "512"]);
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
            logged::tail(&console, 40)
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
            logged::tail(&stages, 40)
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
