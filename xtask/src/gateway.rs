//! `cargo xtask rootfs --profile gateway`: a Debian bookworm root (debootstrap, variant minbase)
//! with what k3s needs at run time, k3s and its airgap images, the bundled gateway manifests
//! (pre-deployed by this root's own openshell-init), openshell-init as PID 1 and the boot
//! configuration with a `k3s` section; pre-initialised with a kine database when one is given
//! (`--state-db`), pruned at build time by the root's own init; and the gateway's payload
//! (chart, image archives, sandbox supervisor: `payload.rs`).
//!
//! Two cache entries: the debootstrap stage (keyed by suite, arch, mirror, package list and its
//! recipe), so a new openshell-init does not run debootstrap again; and the assembled root
//! (keyed by that stage and every other input). Reproducible as far as debootstrap allows: the
//! files that differ from run to run (logs, apt lists and caches, the ldconfig aux-cache,
//! machine-id, `*-old` backups, the host's resolv.conf and hostname, password-change dates) are
//! removed or normalised, Perl's hash order is fixed while debconf writes its databases, and every
//! mtime is set to 0. `manifest.json` records the Debian package versions (the snapshot used),
//! k3s, the images, the payload, openshell-init and the overlay with their SHA-256, what the
//! gateway lacks, a hash of the tree, and the VM's sizing (`vm`, [`VmSizing::GATEWAY`]).

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::cache::{self, Key};
use crate::k3s::{self, Input};
use openshell_shared::sizing::{self, VmSizing};
use openshell_shared::Arch;

use crate::build_names::BuildNames;
use crate::error::{Error, Result};
use crate::payload::{self, Payload, IMAGES_DIR};
use crate::process::run_output;
use crate::{progress, rootfs};

const DEBOOTSTRAP_RECIPE: &str = "debootstrap-v1";
const RECIPE: &str = "rootfs-gateway-v3";
pub const SUITE: &str = "bookworm";
pub const VARIANT: &str = "minbase";
pub const MIRROR: &str = "http://deb.debian.org/debian";
/// What k3s needs at run time beyond minbase (the legacy list without python3, sqlite3 and
/// busybox-static, which openshell-init replaces; plus nftables for kube-proxy's nftables mode).
pub const PACKAGES: &[&str] = &[
    "ca-certificates",
    "e2fsprogs",
    "iproute2",
    "iptables",
    "nftables",
    "util-linux",
    "zstd",
];
/// Local inputs for the gateway profile (`--k3s`, `--state-db`; the payload flags, `--images`
/// among them, are [`payload::Args`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Inputs {
    /// A local k3s binary instead of the pinned download (its SHA-256 goes into the manifest;
    /// one that differs from the pin is marked unpinned).
    #[arg(long, value_name = "FILE")]
    pub k3s: Option<PathBuf>,
    /// A directory of image archives, as one more `--images DIR` (for callers in code; the
    /// command line's `--images` is [`payload::Args::images`]).
    #[arg(skip)]
    pub images: Option<PathBuf>,
    /// A kine database from a k3s that ran (a gateway root's
    /// `var/lib/rancher/k3s/server/db/state.db`, its `-wal` beside it if there is one): the root
    /// is pre-initialised with it, pruned at build time with pods added to the boot policy.
    #[arg(long, value_name = "FILE")]
    pub state_db: Option<PathBuf>,
}

impl Inputs {
    pub fn given(&self) -> bool {
        self.k3s.is_some() || self.images.is_some() || self.state_db.is_some()
    }
}

/// Where k3s keeps its kine database, relative to the root.
const KINE_DB: &str = "var/lib/rancher/k3s/server/db/state.db";

/// A built gateway root.
pub struct Built {
    pub root: PathBuf,
    pub key: String,
}

/// [`build_with`] without a payload beyond `inputs.images`.
pub fn build(arch: Arch, init: impl FnOnce() -> Result<PathBuf>, inputs: &Inputs) -> Result<Built> {
    build_with(arch, init, inputs, &payload::Args::default())
}

/// Builds (or finds) the gateway root for `arch` with openshell-init (built by `init`, once the
/// inputs are known to be there) as PID 1 and the payload `given`; prints what the gateway
/// lacks, whether the root was built now or found in the cache.
pub fn build_with(
    arch: Arch,
    init: impl FnOnce() -> Result<PathBuf>,
    inputs: &Inputs,
    given: &payload::Args,
) -> Result<Built> {
    // Everything that can be missing is checked before debootstrap runs.
    let k3s =
        k3s::resolve_k3s(arch, inputs.k3s.as_deref()).map_err(|e| Error::msg(e.to_string()))?;
    if !k3s.pinned {
        eprintln!(
            "xtask: warning: k3s {} (SHA-256 {}) is not the pinned {} {}: the root is marked unpinned",
            k3s.path.display(),
            k3s.sha256,
            k3s::k3s_pin(arch).asset,
            k3s::VERSION
        );
    }
    let overlay = rootfs::overlay_files("gateway")?;
    let helmchart = overlay
        .iter()
        .find(|(rel, _)| rel == payload::HELMCHART)
        .map(|(_, p)| p.clone())
        .ok_or_else(|| Error::msg(format!("the gateway overlay has no {}", payload::HELMCHART)))?;
    let payload = payload::resolve(arch, given, inputs.images.as_deref(), &helmchart)
        .map_err(|e| Error::msg(e.to_string()))?;
    if let Some(note) = &payload.images_note {
        eprintln!(
            "xtask: warning: no airgap images ({note}); the first boot pulls k3s's images from the network (give --images FILE to bake them in)"
        );
    }
    for i in payload.images.iter().filter(|i| !i.input.pinned) {
        eprintln!(
            "xtask: note: image archive {} (SHA-256 {}) is unpinned",
            i.input.path.display(),
            i.input.sha256
        );
    }
    if let Some(db) = &inputs.state_db {
        if !db.is_file() {
            return Err(Error::msg(format!(
                "--state-db {}: not a file (a kine database, e.g. a gateway root's {KINE_DB})",
                db.display()
            )));
        }
    }
    let init = init()?;
    let init = init.as_path();
    let stage = debootstrap(arch)?;
    let stage_name = stage
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut key = Key::new(RECIPE);
    key.str(arch.name()).str(&stage_name).file(init)?;
    key.str(&k3s.sha256);
    key.str(&VmSizing::GATEWAY.to_json().to_string());
    payload.key(&mut key);
    for (rel, path) in &overlay {
        key.str(rel).file(path)?;
    }
    if let Some(db) = &inputs.state_db {
        key.str("state-db").file(db)?;
        let wal = sibling(db, "-wal");
        if wal.is_file() {
            key.file(&wal)?;
        }
    }
    let key = key.finish();
    let dest = cache::root()
        .join("rootfs")
        .join(format!("gateway-{}-{key}", arch.name()));
    let root = cache::entry(&dest, |tmp| {
        assemble(
            tmp,
            &Assembly {
                arch,
                stage: &stage,
                init,
                k3s: &k3s,
                payload: &payload,
                overlay: &overlay,
                state_db: inputs.state_db.as_deref(),
            },
        )
    })?;
    for line in recorded_lacks(&root)? {
        eprintln!("xtask: warning: {line}");
    }
    Ok(Built { root, key })
}

/// What the gateway lacks, as the root's manifest records it.
fn recorded_lacks(root: &Path) -> Result<Vec<String>> {
    let path = root.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    Ok(v["payload"]["lacks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str().map(str::to_string))
        .collect())
}

struct Assembly<'a> {
    arch: Arch,
    stage: &'a Path,
    init: &'a Path,
    k3s: &'a Input,
    payload: &'a Payload,
    overlay: &'a [(String, PathBuf)],
    state_db: Option<&'a Path>,
}

fn assemble(root: &Path, a: &Assembly) -> Result<()> {
    eprintln!(
        "xtask: assembling gateway root filesystem for {}",
        a.arch.name()
    );
    rootfs::copy_tree(&a.stage.join("root"), root)?;
    for dir in [
        "usr/local/bin",
        IMAGES_DIR,
        "var/lib/rancher/k3s/server/manifests",
        "etc/rancher/k3s",
        "opt/openshell/manifests",
        "opt/openshell/charts",
    ] {
        let p = root.join(dir);
        std::fs::create_dir_all(&p).map_err(|e| Error::io("create", &p, e))?;
    }
    rootfs::copy(&a.k3s.path, &root.join("usr/local/bin/k3s"), 0o755)?;
    let kubectl = root.join("usr/local/bin/kubectl");
    std::os::unix::fs::symlink("k3s", &kubectl).map_err(|e| Error::io("symlink", &kubectl, e))?;
    for i in &a.payload.images {
        copy_with_progress(&i.input.path, &root.join(IMAGES_DIR).join(&i.input.name))?;
    }
    rootfs::install_overlay(root, a.overlay)?;
    a.payload.place(root)?;
    rootfs::copy(a.init, &root.join("sbin/openshell-init"), 0o755)?;
    // The configuration must be one init accepts, and its hostname is the root's.
    let cfg_path = root.join("etc/openshell/init.yaml");
    let cfg_text =
        std::fs::read_to_string(&cfg_path).map_err(|e| Error::io("read", &cfg_path, e))?;
    let cfg = openshell_shared::config::BootConfig::from_yaml(&cfg_text, &cfg_path)
        .map_err(|e| Error::msg(e.to_string()))?;
    if cfg.k3s.is_none() {
        return Err(Error::msg(format!(
            "{}: the gateway profile's configuration has no `k3s` section",
            cfg_path.display()
        )));
    }
    let hostname = root.join("etc/hostname");
    std::fs::write(&hostname, format!("{}\n", cfg.hostname))
        .map_err(|e| Error::io("write", &hostname, e))?;
    if a.arch != Arch::host() {
        // The root's own init runs here: a foreign one through binfmt_misc, which a cached
        // debootstrap stage did not need to set up on this boot of the machine.
        ensure_binfmt(a.arch)?;
    }
    predeploy_manifests(root, a.init)?;
    let lacks = lacks(root, a.payload)?;
    let state_db_sha256 = match a.state_db {
        Some(db) => Some(install_state_db(root, db)?),
        None => None,
    };
    if root.join(KINE_DB).exists() {
        let done = prune_preinitialised(root, a.init, &cfg)?;
        eprintln!("xtask: pre-initialised database: {done}");
    }
    let packages = std::fs::read_to_string(a.stage.join("packages.tsv"))
        .map_err(|e| Error::io("read", &a.stage.join("packages.tsv"), e))?;
    let debootstrap_version = std::fs::read_to_string(a.stage.join("debootstrap-version"))
        .map_err(|e| Error::io("read", &a.stage.join("debootstrap-version"), e))?;
    let mut overlay = BTreeMap::new();
    for (rel, path) in a.overlay {
        overlay.insert(rel.clone(), cache::sha256_file(path)?);
    }
    let doc = Manifest {
        arch: a.arch,
        debootstrap_version: debootstrap_version.trim(),
        packages: parse_packages(&packages),
        k3s: a.k3s,
        k3s_pin: k3s::k3s_pin(a.arch),
        images: &a.payload.images,
        images_pin: k3s::images_pin(a.arch),
        images_note: a.payload.images_note.as_deref(),
        payload: payload::manifest_json(a.payload, &lacks),
        init_sha256: &cache::sha256_file(a.init)?,
        overlay: &overlay,
        state_db_sha256: state_db_sha256.as_deref(),
        tree_sha256: &tree_hash(root)?,
    }
    .to_json()?;
    let mpath = root.join("manifest.json");
    std::fs::write(&mpath, doc).map_err(|e| Error::io("write", &mpath, e))?;
    rootfs::fix_mtimes(root)
}

/// What the gateway will lack with this payload, from the manifests as pre-deployed.
fn lacks(root: &Path, p: &Payload) -> Result<Vec<String>> {
    let msg = |e: payload::PayloadError| Error::msg(e.to_string());
    let wanted = payload::wanted_images(root).map_err(msg)?;
    let chart_file = payload::chart_file_named(&root.join(payload::HELMCHART)).map_err(msg)?;
    Ok(p.lacks(&wanted, &chart_file))
}

/// Deploys the bundled manifests into k3s's auto-deploy directory with the root's own init and
/// configuration (`openshell-init phase manifests --root`), the function and values the guest
/// uses at boot, so the deployed files are byte for byte what the boot would write.
fn predeploy_manifests(root: &Path, init: &Path) -> Result<()> {
    let run = crate::tools::run_phase(init, root, "manifests")?;
    if !run.status.success() || run.finished.is_none() {
        return Err(Error::msg(format!(
            "pre-deploying the manifests ({} phase manifests --root {}) failed ({}):\n{}{}",
            init.display(),
            root.display(),
            run.status,
            run.stdout,
            run.stderr
        )));
    }
    Ok(())
}

/// `path` with `suffix` appended to its file name (SQLite's `-wal`, `-shm`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Copies the given database (and its WAL, which holds its newest transactions) to k3s's
/// path in the root; returns the SHA-256 of the file as given.
fn install_state_db(root: &Path, db: &Path) -> Result<String> {
    let dest = root.join(KINE_DB);
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    }
    rootfs::copy(db, &dest, 0o600)?;
    let wal = sibling(db, "-wal");
    if wal.is_file() {
        rootfs::copy(&wal, &sibling(&dest, "-wal"), 0o600)?;
    }
    cache::sha256_file(db)
}

/// Prunes a pre-initialised root's kine database with the root's own init (`openshell-init
/// phase kine --root <tree> --config <file>`) under the root's configuration with pods added:
/// the build's k3s ran pods whose sandboxes the shipped root does not have, so the first boot
/// must not find them (the old system's build-time pruning). The configuration file lives
/// outside the tree. Returns what the phase reported.
pub fn prune_preinitialised(
    root: &Path,
    init: &Path,
    cfg: &openshell_shared::config::BootConfig,
) -> Result<String> {
    let mut build = cfg.clone();
    build.kine = cfg.kine.pruning_pods();
    let dir = tempfile::tempdir().map_err(|e| Error::io("create", &std::env::temp_dir(), e))?;
    let file = dir.path().join("init.yaml");
    // JSON is YAML: the configuration's own serialisation, read back by the guest's parser.
    let text = serde_json::to_string_pretty(&build).map_err(|e| Error::msg(e.to_string()))?;
    std::fs::write(&file, text).map_err(|e| Error::io("write", &file, e))?;
    let run = crate::tools::run_phase_with(init, root, "kine", Some(&file))?;
    let outcome = run
        .finished
        .as_ref()
        .map(|f| f["msg"]["outcome"]["kind"].clone());
    if !run.status.success() || outcome != Some(serde_json::json!("ok")) {
        return Err(Error::msg(format!(
            "pruning the pre-initialised database ({} phase kine --root {}) failed ({}):\n{}{}",
            init.display(),
            root.display(),
            run.status,
            run.stdout,
            run.stderr
        )));
    }
    let said = run
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["msg"]["text"].as_str().map(str::to_string))
        .collect::<Vec<_>>()
        .join("; ");
    Ok(said)
}

fn copy_with_progress(from: &Path, to: &Path) -> Result<()> {
    let len = std::fs::metadata(from)
        .map_err(|e| Error::io("stat", from, e))?
        .len();
    let bar = progress::bytes(
        Some(len),
        &format!(
            "copy {}",
            from.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ),
    );
    let mut src = std::fs::File::open(from).map_err(|e| Error::io("open", from, e))?;
    let mut dst = std::fs::File::create(to).map_err(|e| Error::io("create", to, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf).map_err(|e| Error::io("read", from, e))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])
            .map_err(|e| Error::io("write", to, e))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    rootfs::set_mode(to, 0o644)
}

/// Whether debootstrap can reach the mirror (the xtask test skips the build when not).
pub fn mirror_reachable() -> bool {
    Command::new("curl")
        .args(["-fsI", "--connect-timeout", "10", "-o", "/dev/null"])
        .arg(format!("{MIRROR}/dists/{SUITE}/Release"))
        .status()
        .is_ok_and(|s| s.success())
}

/// The debootstrap stage for `arch`: `<entry>/root`, `<entry>/packages.tsv` (package, version,
/// architecture), `<entry>/debootstrap-version`.
pub fn debootstrap(arch: Arch) -> Result<PathBuf> {
    let mut key = Key::new(DEBOOTSTRAP_RECIPE);
    key.str(SUITE).str(VARIANT).str(arch.debian()).str(MIRROR);
    for p in PACKAGES {
        key.str(p);
    }
    for c in CLEANUP {
        key.str(&format!("{c:?}"));
    }
    let dest = cache::root().join("debootstrap").join(format!(
        "{SUITE}-{}-{}",
        arch.debian(),
        key.finish()
    ));
    cache::entry(&dest, |tmp| {
        let tool =
            run_output(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "debootstrap"]))
                .map_err(|_| {
                    Error::msg(
                "debootstrap is not installed: apt-get install debootstrap (as .ci/run does)",
            )
                })?;
        if arch != Arch::host() {
            ensure_binfmt(arch)?;
        }
        let root = tmp.join("root");
        let result = run_debootstrap(arch, &root);
        // debootstrap mounts proc and sys (and binds /dev nodes in some containers) in the
        // target and unmounts them on exit; a killed one may not have. Nothing may stay mounted
        // before the tree is removed or kept.
        unmount_below(&root)?;
        result?;
        cleanup(&root)?;
        write_package_list(&root, &tmp.join("packages.tsv"))?;
        let v = tmp.join("debootstrap-version");
        std::fs::write(&v, tool.trim()).map_err(|e| Error::io("write", &v, e))?;
        rootfs::fix_mtimes(&root)
    })
}

/// Writes the packages installed in `root` to `tsv` (package, version, architecture; sorted).
pub fn write_package_list(root: &Path, tsv: &Path) -> Result<()> {
    let list = run_output(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                root.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f", "${Package}\t${Version}\t${Architecture}\n"]),
    )?;
    let mut lines: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
    lines.sort();
    std::fs::write(tsv, lines.join("\n") + "\n").map_err(|e| Error::io("write", tsv, e))
}

fn run_debootstrap(arch: Arch, root: &Path) -> Result<()> {
    let mut cmd = Command::new("debootstrap");
    cmd.arg(format!("--variant={VARIANT}"))
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(format!("--arch={}", arch.debian()))
        .arg(SUITE)
        .arg(root)
        .arg(MIRROR)
        // debconf (Perl) writes its databases in hash order: fix it.
        .env("PERL_HASH_SEED", "0")
        .env("PERL_PERTURB_KEYS", "0")
        .env("SOURCE_DATE_EPOCH", "0")
        .env("LC_ALL", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut steps = progress::Steps::new(&format!("debootstrap {SUITE} {}", arch.debian()));
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::msg(format!("cannot run debootstrap: {e}")))?;
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let mut tail: Vec<String> = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
            let detail = line.trim_start_matches("I: ").to_string();
            steps.update(&stage_of(&detail), &detail);
            tail.push(line);
            if tail.len() > 30 {
                tail.remove(0);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| Error::msg(format!("debootstrap: {e}")))?;
    let elapsed = steps.finish();
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        let log = root.join("debootstrap/debootstrap.log");
        let log_tail = std::fs::read_to_string(&log)
            .map(|t| {
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            })
            .unwrap_or_default();
        return Err(Error::msg(format!(
            "debootstrap {SUITE} for {} from {MIRROR} failed ({status}):\n{}\n{}\n{log_tail}",
            arch.debian(),
            tail.join("\n"),
            err.trim()
        )));
    }
    eprintln!(
        "xtask: debootstrap {SUITE} {} done in {:.0} s",
        arch.debian(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// Detaches every mount at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| Error::io("read", Path::new("/proc/self/mounts"), e))?;
    let mut points = mounts_below(&mounts, dir);
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        #[cfg(target_os = "linux")]
        let unmounted = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        // Roots are built on Linux only; this lets xtask build on macOS for `sign`.
        #[cfg(not(target_os = "linux"))]
        let unmounted = nix::mount::unmount(&p, nix::mount::MntFlags::MNT_FORCE);
        unmounted.map_err(|e| {
            Error::msg(format!(
                "unmount {} (left by debootstrap): {e}",
                p.display()
            ))
        })?;
    }
    Ok(())
}

/// Mount points in a `/proc/self/mounts` text at or below `dir` (octal escapes decoded).
fn mounts_below(mounts: &str, dir: &Path) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| PathBuf::from(m.replace("\\040", " ").replace("\\011", "\t")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// debootstrap's current stage from one of its `I:` lines ("Retrieving libc6 2.36" ->
/// "Retrieving"; "Installing core packages..." stays).
fn stage_of(detail: &str) -> String {
    let first = detail.split_whitespace().next().unwrap_or("");
    match first {
        // One line each off a terminal, not one per package.
        "Retrieving" | "Validating" => "Retrieving packages".into(),
        "Extracting" => "Extracting packages".into(),
        "Unpacking" | "Configuring" => "Unpacking and configuring packages".into(),
        _ => detail.trim_end_matches("...").to_string(),
    }
}

/// Makes the kernel run `arch`'s binaries through qemu-user (debootstrap's second stage runs the
/// target's maintainer scripts in a chroot): mounts binfmt_misc when it is not, switches on an
/// entry that is registered but disabled, enables Debian's qemu-user-static entry with
/// update-binfmts, or registers qemu-<arch>-static directly with the F flag (the interpreter is
/// opened at registration, so it works inside the chroot).
pub fn ensure_binfmt(arch: Arch) -> Result<()> {
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    let entry = dir.join(format!("qemu-{}", arch.name()));
    let enabled =
        || std::fs::read_to_string(&entry).is_ok_and(|t| t.lines().next() == Some("enabled"));
    if enabled() {
        return Ok(());
    }
    if !dir.join("register").exists() {
        let st = Command::new("mount")
            .args(["-t", "binfmt_misc", "binfmt_misc"])
            .arg(dir)
            .status();
        if !st.is_ok_and(|s| s.success()) {
            return Err(Error::msg(format!(
                "debootstrap for {} runs {} binaries, which needs binfmt_misc: mounting it on {} failed (needs root and a kernel with binfmt_misc)",
                arch.debian(),
                arch.name(),
                dir.display()
            )));
        }
    }
    // Registered but switched off: switch it on.
    if entry.exists() {
        let _ = std::fs::write(&entry, "1");
        if enabled() {
            return Ok(());
        }
    }
    let _ = Command::new("update-binfmts")
        .args(["--enable", &format!("qemu-{}", arch.name())])
        .stderr(Stdio::null())
        .status();
    if enabled() {
        return Ok(());
    }
    let interp = format!("/usr/bin/qemu-{}-static", arch.name());
    if !Path::new(&interp).exists() {
        return Err(Error::msg(format!(
            "{interp} is missing: apt-get install qemu-user-static (as .ci/run does)"
        )));
    }
    let (magic, mask) = match arch {
        Arch::Aarch64 => (
            r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
            r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
        ),
        Arch::X86_64 => (
            r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00",
            r"\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
        ),
    };
    let line = format!(":qemu-{}:M::{magic}:{mask}:{interp}:F", arch.name());
    let reg = dir.join("register");
    std::fs::write(&reg, line).map_err(|e| Error::io("write", &reg, e))?;
    if enabled() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "registered qemu-{} with binfmt_misc but {} is not enabled",
            arch.name(),
            entry.display()
        )))
    }
}

/// One thing removed or rewritten after debootstrap because it differs between two runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// A file, removed if present.
    File(&'static str),
    /// Every file below a directory (recursively); the directories stay.
    FilesBelow(&'static str),
    /// Files directly in a directory whose names end with the suffix.
    Suffix(&'static str, &'static str),
    /// A shadow-format file whose date fields (last change) are emptied.
    ShadowDates(&'static str),
}

/// The deterministic cleanup list.
pub const CLEANUP: &[Cleanup] = &[
    Cleanup::FilesBelow("var/log"),
    Cleanup::FilesBelow("var/cache/apt"),
    Cleanup::FilesBelow("var/lib/apt/lists"),
    Cleanup::FilesBelow("tmp"),
    Cleanup::File("var/cache/ldconfig/aux-cache"),
    Cleanup::File("etc/machine-id"),
    Cleanup::File("var/lib/dbus/machine-id"),
    // The build host's, copied in by debootstrap; init writes its own at boot.
    Cleanup::File("etc/resolv.conf"),
    Cleanup::File("etc/hostname"),
    Cleanup::Suffix("var/cache/debconf", "-old"),
    Cleanup::Suffix("var/lib/dpkg", "-old"),
    Cleanup::Suffix("etc", "-"),
    Cleanup::ShadowDates("etc/shadow"),
];

/// Applies [`CLEANUP`] to `root`; links are removed as links, never followed.
pub fn cleanup(root: &Path) -> Result<()> {
    let remove = |p: &Path| -> Result<()> {
        match std::fs::remove_file(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", p, e)),
        }
    };
    for c in CLEANUP {
        match *c {
            Cleanup::File(rel) => remove(&root.join(rel))?,
            Cleanup::FilesBelow(rel) => {
                let dir = root.join(rel);
                if dir.is_dir() && !dir.is_symlink() {
                    for p in rootfs::walk(&dir)? {
                        let meta =
                            std::fs::symlink_metadata(&p).map_err(|e| Error::io("stat", &p, e))?;
                        if !meta.is_dir() {
                            remove(&p)?;
                        }
                    }
                }
            }
            Cleanup::Suffix(rel, suffix) => {
                let dir = root.join(rel);
                let Ok(list) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in list.flatten() {
                    let is_file = e.file_type().is_ok_and(|t| !t.is_dir());
                    if is_file && e.file_name().to_string_lossy().ends_with(suffix) {
                        remove(&e.path())?;
                    }
                }
            }
            Cleanup::ShadowDates(rel) => {
                let p = root.join(rel);
                if let Ok(text) = std::fs::read_to_string(&p) {
                    let mode = std::fs::metadata(&p)
                        .map_err(|e| Error::io("stat", &p, e))?
                        .permissions()
                        .mode();
                    std::fs::write(&p, normalize_shadow(&text))
                        .map_err(|e| Error::io("write", &p, e))?;
                    rootfs::set_mode(&p, mode & 0o7777)?;
                }
            }
        }
    }
    Ok(())
}

/// Empties the "last password change" field (days since 1970, the day of the build) of every
/// shadow line; an empty field means password ageing is off, which is what a VM with no
/// passwords wants.
pub fn normalize_shadow(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 3 {
            fields[2] = "";
        }
        out.push_str(&fields.join(":"));
        out.push('\n');
    }
    out
}

/// `packages.tsv` lines as package -> "version architecture".
pub fn parse_packages(tsv: &str) -> BTreeMap<String, String> {
    tsv.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (name, version, arch) = (f.next()?, f.next()?, f.next().unwrap_or(""));
            (!name.is_empty()).then(|| {
                (
                    name.to_string(),
                    format!("{version} {arch}").trim().to_string(),
                )
            })
        })
        .collect()
}

/// SHA-256 over every entry of the tree except `manifest.json`: path, type, mode, owner, and
/// content (files), target (links) or device number, in sorted order.
pub fn tree_hash(root: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for (rel, what) in tree_entries(root)? {
        h.update(format!("{rel}\0{what}\n").as_bytes());
    }
    Ok(cache::hex(&h.finalize()))
}

/// Each entry of the tree (but `manifest.json`) with its mode, owner and content digest.
pub fn tree_entries(root: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in rootfs::walk(root)? {
        let rel = p
            .strip_prefix(root)
            .map_err(|_| Error::msg("path outside root"))?
            .to_string_lossy()
            .into_owned();
        if rel == "manifest.json" {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).map_err(|e| Error::io("stat", &p, e))?;
        let ft = m.file_type();
        let what = if ft.is_file() {
            format!("f {}", cache::sha256_file(&p)?)
        } else if ft.is_symlink() {
            let t = std::fs::read_link(&p).map_err(|e| Error::io("readlink", &p, e))?;
            format!("l {}", t.display())
        } else if ft.is_dir() {
            "d".to_string()
        } else if ft.is_char_device() || ft.is_block_device() {
            format!("c {}", m.rdev())
        } else {
            "o".to_string()
        };
        out.insert(
            rel,
            format!("{:o} {}:{} {what}", m.mode(), m.uid(), m.gid()),
        );
    }
    Ok(out)
}

/// What `manifest.json` records.
pub struct Manifest<'a> {
    pub arch: Arch,
    pub debootstrap_version: &'a str,
    pub packages: BTreeMap<String, String>,
    pub k3s: &'a Input,
    pub k3s_pin: k3s::Pin,
    pub images: &'a [payload::Image],
    pub images_pin: k3s::Pin,
    pub images_note: Option<&'a str>,
    /// [`payload::manifest_json`]: chart, supervisor, what the gateway lacks.
    pub payload: serde_json::Value,
    pub init_sha256: &'a str,
    pub overlay: &'a BTreeMap<String, String>,
    /// The `--state-db` the root was pre-initialised with, as given (before pruning).
    pub state_db_sha256: Option<&'a str>,
    pub tree_sha256: &'a str,
}

impl Manifest<'_> {
    pub fn to_json(&self) -> Result<String> {
        let mut unpinned = Vec::new();
        if !self.k3s.pinned {
            unpinned.push("usr/local/bin/k3s".to_string());
        }
        let images: Vec<serde_json::Value> = self
            .images
            .iter()
            .map(|i| {
                if !i.input.pinned {
                    unpinned.push(format!("{IMAGES_DIR}/{}", i.input.name));
                }
                payload::image_json(i)
            })
            .collect();
        let doc = serde_json::json!({
            "profile": "gateway",
            "arch": self.arch.name(),
            "recipe": RECIPE,
            "debian": {
                "suite": SUITE,
                "variant": VARIANT,
                "mirror": MIRROR,
                "debootstrap": self.debootstrap_version,
                "requested": PACKAGES,
                "packages": self.packages,
            },
            "k3s": {
                "version": k3s::VERSION,
                "asset": self.k3s_pin.asset,
                "url": self.k3s_pin.url(),
                "pin": self.k3s_pin.sha256,
                "sha256": self.k3s.sha256,
                "pinned": self.k3s.pinned,
                "origin": self.k3s.origin,
                "path": "usr/local/bin/k3s",
            },
            "images": {
                "asset": self.images_pin.asset,
                "url": self.images_pin.url(),
                "pin": self.images_pin.sha256,
                "files": images,
                "note": self.images_note,
            },
            "openshell-init": {
                "version": env!("CARGO_PKG_VERSION"),
                "sha256": self.init_sha256,
                "path": "sbin/openshell-init",
            },
            "payload": self.payload,
            "overlay": self.overlay,
            "state_db": self.state_db_sha256.map(|sha| serde_json::json!({
                "path": KINE_DB,
                "given_sha256": sha,
                "pruned": "boot policy and /registry/pods/",
            })),
            "unpinned": unpinned,
            "tree_sha256": self.tree_sha256,
            sizing::MANIFEST_KEY: VmSizing::GATEWAY.to_json(),
        });
        serde_json::to_string_pretty(&doc)
            .map(|s| s + "\n")
            .map_err(|e| Error::msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, sha: &str, pinned: bool) -> Input {
        Input {
            path: PathBuf::from(format!("/somewhere/{name}")),
            name: name.into(),
            sha256: sha.into(),
            pinned,
            origin: "local",
        }
    }

    #[test]
    fn manifest_records_versions_checksums_and_unpinned_inputs() {
        let k3s = input("fake-k3s.sh", "aa11", false);
        let images = [payload::Image {
            input: input("a.tar.zst", "bb22", false),
            size: 7,
            archive: crate::image_archive::Archive {
                compression: crate::image_archive::Compression::Zstd,
                format: crate::image_archive::Format::DockerArchive,
                refs: vec!["openshell/gateway:dev".into()],
            },
        }];
        let overlay = BTreeMap::from([("etc/openshell/init.yaml".to_string(), "cc33".to_string())]);
        let m = Manifest {
            arch: Arch::X86_64,
            debootstrap_version: "1.0.128+nmu2+deb12u2",
            packages: parse_packages("zstd\t1.5.4+dfsg2-5\tamd64\nbash\t5.2.15-2+b7\tamd64\n"),
            k3s: &k3s,
            k3s_pin: k3s::k3s_pin(Arch::X86_64),
            images: &images,
            images_pin: k3s::images_pin(Arch::X86_64),
            images_note: None,
            payload: serde_json::json!({"lacks": ["no chart"]}),
            init_sha256: "dd44",
            overlay: &overlay,
            state_db_sha256: None,
            tree_sha256: "ee55",
        };
        let text = m.to_json().expect("json");
        assert_eq!(text, m.to_json().expect("json"), "deterministic");
        let v: serde_json::Value = serde_json::from_str(&text).expect("parses");
        assert_eq!(v["profile"], "gateway");
        assert_eq!(v["debian"]["packages"]["zstd"], "1.5.4+dfsg2-5 amd64");
        assert_eq!(v["debian"]["packages"]["bash"], "5.2.15-2+b7 amd64");
        assert_eq!(v["k3s"]["sha256"], "aa11");
        assert_eq!(v["k3s"]["version"], "v1.35.2+k3s1");
        assert_eq!(v["k3s"]["pinned"], false);
        assert_eq!(
            v["k3s"]["pin"],
            "3ae8e35a62ac83e8e197c117858a564134057a7b8703cf73e67ce60d19f4a22b"
        );
        assert_eq!(v["images"]["files"][0]["sha256"], "bb22");
        assert_eq!(v["images"]["files"][0]["size"], 7);
        assert_eq!(
            v["images"]["files"][0]["path"],
            "var/lib/rancher/k3s/agent/images/a.tar.zst"
        );
        assert_eq!(v["images"]["files"][0]["refs"][0], "openshell/gateway:dev");
        assert_eq!(v["payload"]["lacks"][0], "no chart");
        assert_eq!(v["images"]["pin"], serde_json::Value::Null);
        assert_eq!(v["openshell-init"]["sha256"], "dd44");
        assert_eq!(v["overlay"]["etc/openshell/init.yaml"], "cc33");
        assert_eq!(v["tree_sha256"], "ee55");
        assert_eq!(
            VmSizing::from_json(&v["vm"]),
            Ok(VmSizing::GATEWAY),
            "the sizing the host boots it with"
        );
        assert_eq!(
            v["unpinned"],
            serde_json::json!([
                "usr/local/bin/k3s",
                "var/lib/rancher/k3s/agent/images/a.tar.zst"
            ])
        );
        // Sorted package names: bash before zstd in the text.
        assert!(text.find("\"bash\"") < text.find("\"zstd\""));
        // A pinned k3s and no images: nothing unpinned, the note kept.
        let pinned = input("k3s", "3ae8", true);
        let m2 = Manifest {
            k3s: &pinned,
            images: &[],
            images_note: Some("no pin"),
            ..m
        };
        let v2: serde_json::Value =
            serde_json::from_str(&m2.to_json().expect("json")).expect("parses");
        assert_eq!(v2["unpinned"], serde_json::json!([]));
        assert_eq!(v2["images"]["note"], "no pin");
    }

    #[test]
    fn cleanup_removes_what_differs_between_runs_and_keeps_the_rest() {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path();
        let files = [
            "var/log/dpkg.log",
            "var/log/apt/history.log",
            "var/cache/apt/pkgcache.bin",
            "var/cache/apt/srcpkgcache.bin",
            "var/cache/apt/archives/zstd_1.5.4_amd64.deb",
            "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease",
            "var/cache/ldconfig/aux-cache",
            "etc/machine-id",
            "etc/resolv.conf",
            "etc/hostname",
            "etc/passwd-",
            "etc/shadow-",
            "var/cache/debconf/config.dat-old",
            "var/lib/dpkg/status-old",
            "tmp/x",
            // Kept:
            "etc/passwd",
            "var/lib/dpkg/status",
            "var/cache/debconf/config.dat",
            "etc/ld.so.cache",
            "etc/apt/sources.list",
        ];
        for f in files {
            let p = r.join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, f).expect("write");
        }
        std::fs::write(
            r.join("etc/shadow"),
            "root:*:20781:0:99999:7:::\nnobody:*:20781:0:99999:7:::\n",
        )
        .expect("shadow");
        std::os::unix::fs::symlink("/etc/passwd", r.join("var/log/link")).expect("link");
        cleanup(r).expect("cleanup");
        for gone in &files[..15] {
            assert!(!r.join(gone).exists(), "{gone} should be gone");
        }
        assert!(!r.join("var/log/link").is_symlink());
        for kept in &files[15..] {
            assert!(r.join(kept).is_file(), "{kept} should stay");
        }
        for dir in [
            "var/log/apt",
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "tmp",
        ] {
            assert!(r.join(dir).is_dir(), "{dir} stays a directory");
        }
        assert_eq!(
            std::fs::read_to_string(r.join("etc/shadow")).expect("shadow"),
            "root:*::0:99999:7:::\nnobody:*::0:99999:7:::\n"
        );
        // Idempotent: a second run changes nothing and does not fail.
        cleanup(r).expect("again");
    }

    #[test]
    fn mounts_left_below_the_target_are_found() {
        let text = "proc /proc proc rw 0 0\n\
                    proc /c/.x.tmp-1/root/proc proc rw 0 0\n\
                    sysfs /c/.x.tmp-1/root/sys sysfs rw 0 0\n\
                    /dev/vda /c/.x.tmp-1/root/dev/a\\040b ext4 rw 0 0\n\
                    tmpfs /c/.x.tmp-1/rootfs tmpfs rw 0 0\n";
        let found = mounts_below(text, Path::new("/c/.x.tmp-1/root"));
        assert_eq!(
            found,
            [
                "/c/.x.tmp-1/root/proc",
                "/c/.x.tmp-1/root/sys",
                "/c/.x.tmp-1/root/dev/a b"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn debootstrap_stages_are_named() {
        assert_eq!(stage_of("Retrieving libc6 2.36-9"), "Retrieving packages");
        assert_eq!(stage_of("Validating libc6 2.36-9"), "Retrieving packages");
        assert_eq!(
            stage_of("Installing core packages..."),
            "Installing core packages"
        );
        assert_eq!(
            stage_of("Base system installed successfully."),
            "Base system installed successfully."
        );
    }

    /// A pre-initialised root: a database real kine wrote (and was killed over), given as
    /// `--state-db`, is pruned by the root's own init (the guest build) with pods added to the
    /// gateway configuration's policy; real kine then serves every other key as it was, no pod
    /// and nothing stale, at the same revision.
    #[test]
    fn a_preinitialised_database_loses_its_pods_and_stale_keys_only() {
        use crate::fixtures::kine_peer::{self, gateway_keys, object, Kine, NODE_LEASE};
        let Some(bin) = kine_peer::from_env() else {
            return;
        };
        if !nix::unistd::geteuid().is_root() {
            let why = "needs root: the phase runs in private namespaces";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipped: {why}");
            return;
        }
        let init = crate::tools::init(Arch::host()).expect("the guest's init");
        let path = crate::paths::workspace().join("rootfs/gateway/etc/openshell/init.yaml");
        let text = std::fs::read_to_string(&path).expect("gateway init.yaml");
        let cfg = openshell_shared::config::BootConfig::from_yaml(&text, &path).expect("valid");
        // The k3s that ran before the build: real kine, killed with its WAL unmerged.
        let scratch = tempfile::tempdir().expect("tmp");
        let kine = Kine::start(&bin, &scratch.path().join("server"), &[]).expect("kine");
        for (i, key) in gateway_keys().iter().enumerate() {
            kine.put(key, &object(key, i)).expect("put");
        }
        for i in 0..5 {
            kine.put(NODE_LEASE, &object(NODE_LEASE, 100 + i))
                .expect("renew");
        }
        let before = kine.range("", None).expect("range");
        kine.kill().expect("kill");
        let root = tempfile::tempdir().expect("tmp");
        let given = scratch.path().join("server/db/state.db");
        install_state_db(root.path(), &given).expect("install");
        let said = prune_preinitialised(root.path(), &init, &cfg).expect("prune");
        assert!(said.contains("/registry/pods/ 5 rows/5 keys"), "{said}");
        let db_dir = root
            .path()
            .join(KINE_DB)
            .parent()
            .map(Path::to_path_buf)
            .expect("dir");
        let mut left: Vec<String> = std::fs::read_dir(&db_dir)
            .expect("db dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["state.db"], "the tree holds the database alone");
        let policy = cfg.kine.pruning_pods();
        let expected: Vec<_> = before
            .kvs
            .iter()
            .filter(|kv| {
                !policy
                    .prune_prefixes
                    .iter()
                    .any(|p| kv.key.starts_with(p.as_str()))
            })
            .cloned()
            .collect();
        assert!(expected
            .iter()
            .any(|kv| kv.key.starts_with("/registry/secrets/")));
        let server = db_dir.parent().expect("server dir");
        let kine = Kine::start(&bin, server, &[]).expect("kine on the pruned database");
        assert_eq!(kine.complaints(), Vec::<String>::new());
        let after = kine.range("", None).expect("range");
        assert_eq!(after.kvs, expected);
        assert_eq!(after.revision, before.revision, "the revision moved");
        kine.stop().expect("stop");
    }

    #[test]
    fn gateway_config_is_valid_and_runs_k3s() {
        let path = crate::paths::workspace().join("rootfs/gateway/etc/openshell/init.yaml");
        let text = std::fs::read_to_string(&path).expect("gateway init.yaml");
        let cfg = openshell_shared::config::BootConfig::from_yaml(&text, &path).expect("valid");
        let k3s = cfg.k3s.expect("a k3s section");
        assert_eq!(k3s.binary, "/usr/local/bin/k3s");
        assert_eq!(k3s.kube_proxy_mode, "nftables");
    }

    #[test]
    fn tree_hash_sees_content_modes_and_links_but_not_the_manifest() {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path();
        std::fs::write(r.join("a"), "1").expect("write");
        std::os::unix::fs::symlink("a", r.join("l")).expect("link");
        let h1 = tree_hash(r).expect("hash");
        std::fs::write(r.join("manifest.json"), "{}").expect("write");
        assert_eq!(tree_hash(r).expect("hash"), h1);
        std::fs::write(r.join("a"), "2").expect("write");
        let h2 = tree_hash(r).expect("hash");
        assert_ne!(h2, h1);
        rootfs::set_mode(&r.join("a"), 0o600).expect("chmod");
        assert_ne!(tree_hash(r).expect("hash"), h2);
    }
}
