//! The `k3s-prep` phase: what must be true of the node before k3s starts, when the
//! configuration runs k3s. It owns the pod network's CNI configuration (`10-bridge.conflist`
//! and the removal of the ptp and flannel ones older images left), the CNI plugin links in
//! `/opt/cni/bin`, and IPv4 forwarding.
//!
//! With flannel off, containerd looks for CNI configuration and plugins in the default paths;
//! k3s ships the plugins in its self-extracted data directory, `data/<hash>/bin`, as links to
//! one multicall binary. On a cold boot that directory does not exist until k3s has run for a
//! moment, so the links are then made by a thread that waits for it with inotify (k3s extracts
//! into `<hash>-tmp` and renames it, hence IN_MOVED_TO) instead of polling.
//!
//! Everything is idempotent: files are written only when their bytes change and links only when
//! they point elsewhere, and a run that changed nothing says so.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use openshell_init::guest_path::under;
use openshell_shared::fsutil::write_atomic;
use openshell_shared::Level;
use serde_json::json;

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::k3s::paths::{
    k3s_data_bin, CNI_BIN_DIR, CNI_CONFLIST, CNI_CONF_DIR, FLANNEL_CONFLIST, K3S_DATA_DIR,
    PTP_CONFLIST,
};
use crate::reporter::Reporter;

pub const PHASE: Phase = Phase {
    name: "k3s-prep",
    after: &[
        "config",
        "network",
        "manifests",
        "pki",
        "kine",
        "runtime-cleanup",
        "network-cleanup",
        "capabilities",
    ],
    // Only IPv4 forwarding fails the phase (pods could reach nothing without it); every other
    // problem is reported and carried past.
    fatal: true,
    waits: false,
    purpose: "CNI config and plugin links, IPv4 forwarding, for k3s",
    run,
};

/// Configurations that would compete with ours: the ptp one of older images, and flannel's,
/// which a pre-bake with flannel on left in k3s's agent directory.
pub const STALE_CONFLISTS: &[&str] = &[PTP_CONFLIST, FLANNEL_CONFLIST];
/// The plugins our conflist (and kube-proxy's bandwidth shaping) use.
pub const PLUGINS: &[&str] = &["bridge", "host-local", "loopback", "bandwidth", "portmap"];
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error("{path}: cannot enable IPv4 forwarding: {source}")]
    IpForward {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> PrepError {
    let path = path.to_path_buf();
    move |source| PrepError::Io { path, what, source }
}

/// The bridge chain every pod joins: `cni0` as the pods' gateway with masquerading (the VM has
/// one address, so pod traffic leaves as the node's), then host ports, then loopback.
pub fn conflist() -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "bridge",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "isDefaultGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": "10.42.0.0/24" }]]
                }
            },
            {
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "snat": true
            },
            { "type": "loopback" }
        ]
    })
}

/// The conflist file's bytes.
pub fn conflist_bytes() -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(&conflist()).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// What one run did, for the phase's one-line account.
#[derive(Debug, Default)]
struct Report {
    changes: Vec<String>,
    problems: Vec<String>,
}

impl Report {
    fn describe(&self) -> String {
        let mut out = if self.changes.is_empty() {
            "nothing changed".to_string()
        } else {
            self.changes.join("; ")
        };
        if !self.problems.is_empty() {
            out.push_str(&format!(
                "; {} problem(s): {}",
                self.problems.len(),
                self.problems.join("; ")
            ));
        }
        out
    }
}

fn run(ctx: &Ctx) -> PhaseResult {
    if ctx.config().k3s.is_none() {
        return Ok(Done::Skipped(
            "the configuration has no k3s section".to_string(),
        ));
    }
    let mut report = Report::default();
    if ctx.pid1 {
        enable_forwarding(ctx, &mut report)?;
    }
    for dir in [CNI_CONF_DIR, CNI_BIN_DIR] {
        let path = ctx.path(dir);
        if let Err(e) = std::fs::create_dir_all(&path).map_err(io(&path, "cannot create")) {
            report.problems.push(e.to_string());
        }
    }
    match write_conflist(ctx) {
        Ok(true) => report.changes.push(format!("wrote {CNI_CONFLIST}")),
        Ok(false) => {}
        Err(e) => report.problems.push(e.to_string()),
    }
    for stale in STALE_CONFLISTS {
        let path = ctx.path(stale);
        match std::fs::remove_file(&path) {
            Ok(()) => report.changes.push(format!("removed {stale}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report
                .problems
                .push(io(&path, "cannot remove")(e).to_string()),
        }
    }
    match find_data_bin(&ctx.root) {
        Some(hash) => {
            let linked = link_plugins(&ctx.root, &hash);
            report.changes.extend(linked.changes);
            report.problems.extend(linked.problems);
        }
        None => match spawn_watcher(&ctx.root, Arc::clone(&ctx.reporter)) {
            Ok(()) => report.changes.push(format!(
                "no k3s data directory yet: plugin links wait for {K3S_DATA_DIR}/<hash>"
            )),
            Err(e) => report.problems.push(format!(
                "cannot watch for the k3s data directory, CNI plugins will not be linked: {e}"
            )),
        },
    }
    for p in &report.problems {
        ctx.reporter.log(Level::Error, format!("k3s-prep: {p}"));
    }
    Ok(Done::Ok(Some(report.describe())))
}

/// Pods route through the node: without forwarding nothing leaves a pod. The bridge netfilter
/// hook is a nicety (kube-proxy's rules for bridged traffic) and only exists with br_netfilter.
fn enable_forwarding(ctx: &Ctx, report: &mut Report) -> Result<(), PrepError> {
    let path = ctx.path(IP_FORWARD);
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    if before.trim() != "1" {
        std::fs::write(&path, "1\n").map_err(|source| PrepError::IpForward {
            path: path.clone(),
            source,
        })?;
        report.changes.push("enabled IPv4 forwarding".into());
    }
    let nf = ctx.path(BRIDGE_NF_CALL_IPTABLES);
    if nf.exists() && std::fs::read_to_string(&nf).unwrap_or_default().trim() != "1" {
        match std::fs::write(&nf, "1\n") {
            Ok(()) => report
                .changes
                .push("enabled bridge-nf-call-iptables".into()),
            Err(e) => ctx
                .reporter
                .log(Level::Warn, format!("{}: cannot enable: {e}", nf.display())),
        }
    }
    Ok(())
}

/// Writes the conflist when its bytes differ; returns whether it wrote.
fn write_conflist(ctx: &Ctx) -> Result<bool, PrepError> {
    let path = ctx.path(CNI_CONFLIST);
    let bytes = conflist_bytes();
    if std::fs::read(&path).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    write_atomic(&path, &bytes).map_err(io(&path, "cannot write"))?;
    Ok(true)
}

/// The name of k3s's extracted data directory (`<hash>` under [`K3S_DATA_DIR`]) with a `bin`
/// directory. An extraction in progress (`-tmp`) and links (`current`, `previous`) are not it;
/// of several (an upgrade), the newest.
pub fn find_data_bin(root: &Path) -> Option<String> {
    let data = under(root, K3S_DATA_DIR);
    let mut best: Option<(std::time::SystemTime, String)> = None;
    for entry in std::fs::read_dir(data).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_data_name(OsStr::new(&name)) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !meta.is_dir() || !entry.path().join("bin").is_dir() {
            continue;
        }
        let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(t, _)| mtime > *t) {
            best = Some((mtime, name));
        }
    }
    best.map(|(_, name)| name)
}

fn is_data_name(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    !name.starts_with('.') && !name.ends_with("-tmp")
}

#[derive(Debug, Default)]
struct Linked {
    changes: Vec<String>,
    problems: Vec<String>,
}

/// Makes the k3s binaries in `data/<hash>/bin` and `bin/aux` executable (a copy through a
/// filesystem that drops mode bits leaves them not), and links [`PLUGINS`] into
/// [`CNI_BIN_DIR`]. A stale link is replaced atomically (a new link renamed over it).
fn link_plugins(root: &Path, hash: &str) -> Linked {
    let mut out = Linked::default();
    let bin_guest = k3s_data_bin(hash);
    let bin = under(root, &bin_guest);
    let mut made_executable = 0;
    for dir in [bin.clone(), bin.join("aux")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // Links are left alone: chmod would follow them.
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let mode = meta.permissions().mode();
            if meta.is_file() && mode & 0o111 != 0o111 {
                match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o111))
                {
                    Ok(()) => made_executable += 1,
                    Err(e) => out
                        .problems
                        .push(io(&path, "cannot make executable")(e).to_string()),
                }
            }
        }
    }
    if made_executable > 0 {
        out.changes
            .push(format!("made {made_executable} k3s binaries executable"));
    }
    let cni_bin = under(root, CNI_BIN_DIR);
    if let Err(e) = std::fs::create_dir_all(&cni_bin) {
        out.problems
            .push(io(&cni_bin, "cannot create")(e).to_string());
        return out;
    }
    let (mut linked, mut missing) = (Vec::new(), Vec::new());
    for plugin in PLUGINS {
        // k3s ships the plugins as links to its multicall binary: existing as a link is enough.
        if std::fs::symlink_metadata(bin.join(plugin)).is_err() {
            missing.push(*plugin);
            continue;
        }
        let target = PathBuf::from(format!("{bin_guest}/{plugin}"));
        let link = cni_bin.join(plugin);
        if std::fs::read_link(&link).is_ok_and(|t| t == target) {
            continue;
        }
        match replace_link(&target, &link) {
            Ok(()) => linked.push(*plugin),
            Err(e) => out.problems.push(io(&link, "cannot link")(e).to_string()),
        }
    }
    if !linked.is_empty() {
        out.changes
            .push(format!("linked {} from {bin_guest}", linked.join(",")));
    }
    if !missing.is_empty() {
        out.problems
            .push(format!("{bin_guest} has no {}", missing.join(",")));
    }
    out
}

/// Points `link` at `target`, replacing whatever is there in one rename.
fn replace_link(target: &Path, link: &Path) -> std::io::Result<()> {
    let mut name = link.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = link.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Starts the thread that links the plugins once k3s has extracted its data directory. The
/// watch is set before a second look, so a directory that appears in between is not missed.
fn spawn_watcher(root: &Path, reporter: Arc<Reporter>) -> Result<(), PrepError> {
    let data = under(root, K3S_DATA_DIR);
    std::fs::create_dir_all(&data).map_err(io(&data, "cannot create"))?;
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)
        .map_err(|e| io(&data, "cannot start inotify")(e.into()))?;
    inotify
        .add_watch(
            &data,
            AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ONLYDIR,
        )
        .map_err(|e| io(&data, "cannot watch")(e.into()))?;
    let root = root.to_path_buf();
    std::thread::Builder::new()
        .name("cni-links".into())
        .spawn(move || watch(&root, &inotify, &reporter))
        .map_err(io(&data, "cannot start the watcher thread"))?;
    Ok(())
}

fn watch(root: &Path, inotify: &Inotify, reporter: &Reporter) {
    let since = Instant::now();
    loop {
        if let Some(hash) = find_data_bin(root) {
            let linked = link_plugins(root, &hash);
            let elapsed = since.elapsed().as_millis();
            for p in &linked.problems {
                reporter.log(Level::Error, format!("cni-links: {p}"));
            }
            let what = if linked.changes.is_empty() {
                "links already in place".to_string()
            } else {
                linked.changes.join("; ")
            };
            reporter.log(
                Level::Info,
                format!("cni-links: {what} ({elapsed} ms after k3s-prep)"),
            );
            return;
        }
        // Blocks until something is created or renamed into the data directory.
        match inotify.read_events() {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                reporter.log(
                    Level::Error,
                    format!(
                        "cni-links: watching {K3S_DATA_DIR} failed: {e}; CNI plugins not linked"
                    ),
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_is_the_bridge_chain() {
        let v: serde_json::Value = serde_json::from_slice(&conflist_bytes()).expect("json");
        assert_eq!(v["cniVersion"], "1.0.0");
        let plugins = v["plugins"].as_array().expect("plugins");
        let types: Vec<&str> = plugins.iter().filter_map(|p| p["type"].as_str()).collect();
        assert_eq!(types, ["bridge", "portmap", "loopback"]);
        let b = &plugins[0];
        assert_eq!(b["bridge"], "cni0");
        for flag in ["isGateway", "isDefaultGateway", "ipMasq", "hairpinMode"] {
            assert_eq!(b[flag], true, "{flag}");
        }
        assert_eq!(b["ipam"]["type"], "host-local");
        assert_eq!(b["ipam"]["ranges"][0][0]["subnet"], "10.42.0.0/24");
        assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
        assert_eq!(plugins[1]["snat"], true);
    }

    fn ctx(root: &Path, k3s: bool) -> Ctx {
        let ctx = Ctx::for_test(root);
        let mut cfg = openshell_shared::BootConfig::default();
        if k3s {
            cfg.k3s = Some(Default::default());
        }
        let _ = ctx.config.set(cfg);
        ctx
    }

    #[test]
    fn skipped_without_a_k3s_section() {
        let t = tempfile::tempdir().expect("tmp");
        assert!(matches!(run(&ctx(t.path(), false)), Ok(Done::Skipped(_))));
        assert_eq!(std::fs::read_dir(t.path()).expect("ls").count(), 0);
    }

    #[test]
    fn second_run_changes_nothing_and_says_so() {
        let t = tempfile::tempdir().expect("tmp");
        let bin = t.path().join("var/lib/rancher/k3s/data/h1/bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        for p in PLUGINS {
            std::os::unix::fs::symlink("cni", bin.join(p)).expect("plugin link");
        }
        let ctx = ctx(t.path(), true);
        match run(&ctx) {
            Ok(Done::Ok(Some(text))) => {
                assert!(
                    text.contains("wrote /etc/cni/net.d/10-bridge.conflist"),
                    "{text}"
                );
                assert!(text.contains("linked bridge,host-local"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            std::fs::read(t.path().join("etc/cni/net.d/10-bridge.conflist")).expect("conflist"),
            conflist_bytes()
        );
        assert!(t.path().join("opt/cni/bin").is_dir());
        match run(&ctx) {
            Ok(Done::Ok(Some(text))) => assert_eq!(text, "nothing changed"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_dir_skips_extractions_and_links() {
        let t = tempfile::tempdir().expect("tmp");
        let data = under(t.path(), K3S_DATA_DIR);
        assert_eq!(find_data_bin(t.path()), None);
        std::fs::create_dir_all(data.join("abc-tmp/bin")).expect("mkdir");
        std::fs::create_dir_all(data.join("nobin")).expect("mkdir");
        assert_eq!(find_data_bin(t.path()), None);
        std::fs::create_dir_all(data.join("abc/bin")).expect("mkdir");
        std::os::unix::fs::symlink(data.join("abc"), data.join("current")).expect("link");
        assert_eq!(find_data_bin(t.path()).as_deref(), Some("abc"));
    }

    #[test]
    fn plugins_are_linked_once_and_stale_links_replaced() {
        let t = tempfile::tempdir().expect("tmp");
        let bin = t.path().join("var/lib/rancher/k3s/data/h1/bin");
        std::fs::create_dir_all(bin.join("aux")).expect("mkdir");
        std::fs::write(bin.join("cni"), "").expect("cni");
        std::fs::write(bin.join("aux/nft"), "").expect("nft");
        for p in PLUGINS {
            std::os::unix::fs::symlink("cni", bin.join(p)).expect("plugin link");
        }
        let cni_bin = t.path().join("opt/cni/bin");
        std::fs::create_dir_all(&cni_bin).expect("mkdir");
        std::os::unix::fs::symlink("/elsewhere/bridge", cni_bin.join("bridge")).expect("stale");
        let first = link_plugins(t.path(), "h1");
        assert!(first.problems.is_empty(), "{:?}", first.problems);
        assert_eq!(first.changes.len(), 2, "{:?}", first.changes);
        for p in PLUGINS {
            assert_eq!(
                std::fs::read_link(cni_bin.join(p)).expect("link"),
                PathBuf::from(format!("/var/lib/rancher/k3s/data/h1/bin/{p}"))
            );
        }
        let mode = std::fs::metadata(bin.join("aux/nft"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
        let second = link_plugins(t.path(), "h1");
        assert!(
            second.changes.is_empty() && second.problems.is_empty(),
            "{second:?}"
        );
        assert_eq!(
            std::fs::read_dir(&cni_bin).expect("ls").count(),
            PLUGINS.len()
        );
    }
}
