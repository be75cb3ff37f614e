//! The `capabilities` phase: does the running kernel have what k3s needs? The list is the kernel
//! config fragments under `kernel-config/` (compiled in), the same files the kernel is built
//! from, so the requirement is written once. Each required option with a run-time probe is
//! checked by using the feature (create a bridge and a veth pair over netlink, ask nf_tables for
//! its generation, look for the cgroup controller, the filesystem, the device); options with no
//! observable effect are counted as build-time only.
//!
//! Groups marked `(optional)` in the fragments only warn. Anything else missing fails the boot
//! before k3s starts, with one report listing every missing item.
//!
//! A passed check is recorded in the root filesystem under the kernel's build id and a digest
//! of the requirements; the next boot of the same kernel build trusts it instead of probing
//! again (any other kernel, or another requirement list, is probed).
//!
//! When k3s will run with the overlayfs snapshotter, an overlay is also mounted where
//! containerd's snapshots will live ([`overlay`]), at every boot: that depends on the
//! filesystem there (the state disk or the root), not only on the kernel.

pub(crate) mod overlay;

use std::path::Path;

use netlink_packet_route::link::InfoKind;

use openshell_init::guest_path::under;
use openshell_shared::Level;

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::k3s::paths::{CONTAINERD_OVERLAYFS, CONTAINERD_ROOT};
use crate::netlink;

pub const PHASE: Phase = Phase {
    name: "capabilities",
    after: &["mounts", "state-disk"],
    fatal: true,
    waits: false,
    purpose: "check the kernel has what k3s needs (the kernel-config/ list), by using each feature",
    run,
};

const COMMON: &str = include_str!("../../../kernel-config/common.config");
#[cfg(target_arch = "x86_64")]
const ARCH: &str = include_str!("../../../kernel-config/x86_64.config");
#[cfg(target_arch = "aarch64")]
const ARCH: &str = include_str!("../../../kernel-config/aarch64.config");
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCH: &str = "";

/// A group of the fragments: `# group: NAME [(optional)] - why`, then its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub optional: bool,
    /// Options the group requires (`CONFIG_X=y`), without the `CONFIG_` prefix.
    pub required: Vec<String>,
}

pub fn parse_groups(text: &str) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# group:") {
            let head = rest.split(" - ").next().unwrap_or("").trim();
            let optional = head.ends_with("(optional)");
            let name = head.trim_end_matches("(optional)").trim().to_string();
            groups.push(Group {
                name,
                optional,
                required: Vec::new(),
            });
        } else if let Some(opt) = line
            .strip_prefix("CONFIG_")
            .and_then(|l| l.strip_suffix("=y"))
        {
            if let Some(g) = groups.last_mut() {
                g.required.push(opt.to_string());
            }
        }
    }
    groups
}

/// The guest kernel's groups: common plus this architecture's.
pub fn groups() -> Vec<Group> {
    let mut g = parse_groups(COMMON);
    g.extend(parse_groups(ARCH));
    g
}

/// How an option is observed in a running kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Listed in /proc/filesystems.
    Filesystem(&'static str),
    /// The path exists (under the root).
    Path(&'static str),
    /// Listed in /sys/fs/cgroup/cgroup.controllers.
    Controller(&'static str),
    /// A link of this kind can be created (and is deleted again).
    Link(&'static str),
    /// A veth pair can be created.
    Veth,
    /// nf_tables answers a generation request.
    NfTables,
    /// The bpf(2) system call exists.
    Bpf,
    /// Landlock is enabled (its ABI version can be read).
    Landlock,
}

impl Probe {
    /// A tag and argument naming the probe, for the record's digest.
    fn describe(&self) -> (u8, &'static str) {
        match *self {
            Probe::Filesystem(f) => (1, f),
            Probe::Path(p) => (2, p),
            Probe::Controller(c) => (3, c),
            Probe::Link(k) => (4, k),
            Probe::Veth => (5, ""),
            Probe::NfTables => (6, ""),
            Probe::Bpf => (7, ""),
            Probe::Landlock => (8, ""),
        }
    }
}

/// Run-time probes, by option. Options not listed have no observable effect of their own.
pub const PROBES: &[(&str, Probe)] = &[
    ("PROC_FS", Probe::Filesystem("proc")),
    ("SYSFS", Probe::Filesystem("sysfs")),
    ("TMPFS", Probe::Filesystem("tmpfs")),
    ("DEVTMPFS", Probe::Filesystem("devtmpfs")),
    ("UNIX98_PTYS", Probe::Filesystem("devpts")),
    ("OVERLAY_FS", Probe::Filesystem("overlay")),
    ("EXT4_FS", Probe::Filesystem("ext4")),
    ("FUSE_FS", Probe::Filesystem("fuse")),
    ("VIRTIO_FS", Probe::Filesystem("virtiofs")),
    ("POSIX_MQUEUE", Probe::Filesystem("mqueue")),
    ("CGROUPS", Probe::Filesystem("cgroup2")),
    ("MEMCG", Probe::Controller("memory")),
    ("CGROUP_PIDS", Probe::Controller("pids")),
    ("CPUSETS", Probe::Controller("cpuset")),
    ("CGROUP_SCHED", Probe::Controller("cpu")),
    ("BLK_CGROUP", Probe::Controller("io")),
    ("NET_NS", Probe::Path("/proc/self/ns/net")),
    ("UTS_NS", Probe::Path("/proc/self/ns/uts")),
    ("IPC_NS", Probe::Path("/proc/self/ns/ipc")),
    ("PID_NS", Probe::Path("/proc/self/ns/pid")),
    ("USER_NS", Probe::Path("/proc/self/ns/user")),
    ("IPV6", Probe::Path("/proc/sys/net/ipv6")),
    ("TUN", Probe::Path("/dev/net/tun")),
    ("VIRTIO_VSOCKETS", Probe::Path("/dev/vsock")),
    ("KEYS", Probe::Path("/proc/keys")),
    (
        "SECCOMP_FILTER",
        Probe::Path("/proc/sys/kernel/seccomp/actions_avail"),
    ),
    (
        "NF_CONNTRACK",
        Probe::Path("/proc/sys/net/netfilter/nf_conntrack_max"),
    ),
    (
        "BRIDGE_NETFILTER",
        Probe::Path("/proc/sys/net/bridge/bridge-nf-call-iptables"),
    ),
    ("IP_NF_IPTABLES", Probe::Path("/proc/net/ip_tables_names")),
    ("BRIDGE", Probe::Link("bridge")),
    ("DUMMY", Probe::Link("dummy")),
    ("VETH", Probe::Veth),
    ("NF_TABLES", Probe::NfTables),
    ("BPF_SYSCALL", Probe::Bpf),
    ("SECURITY_LANDLOCK", Probe::Landlock),
];

/// One structured result for the whole check.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub probed: usize,
    pub build_time_only: usize,
    /// (group, option, what was looked for)
    pub missing: Vec<(String, String, String)>,
    pub missing_optional: Vec<(String, String, String)>,
}

impl Report {
    fn list(items: &[(String, String, String)]) -> String {
        items
            .iter()
            .map(|(g, o, how)| format!("CONFIG_{o} ({g}: {how})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("kernel lacks {count} required feature(s): {list}")]
pub struct Missing {
    count: usize,
    list: String,
}

#[derive(Debug, thiserror::Error)]
#[error("containerd's overlayfs snapshotter cannot work in {dir} (on {fs}): {reason}")]
pub struct OverlayUnusable {
    dir: String,
    fs: String,
    reason: String,
}

fn run(ctx: &Ctx) -> PhaseResult {
    let kernel = kernel(ctx)?;
    let uses_overlay = ctx
        .config()
        .k3s
        .as_ref()
        .is_some_and(|k| k.snapshotter == "overlayfs");
    if !uses_overlay {
        return Ok(kernel);
    }
    // Where containerd's overlayfs snapshotter keeps its snapshots.
    let shown = format!("{CONTAINERD_ROOT}/{CONTAINERD_OVERLAYFS}");
    let dir = ctx.path(&shown);
    let watch = openshell_init::clock::Stopwatch::start();
    let result = overlay::check(&dir);
    let fs = overlay::fs_name(&dir);
    if let Err(reason) = result {
        return Err(Box::new(OverlayUnusable {
            dir: shown,
            fs,
            reason,
        }));
    }
    let line = format!(
        "overlay with its upper directory on {fs} ({shown}) works ({:.1} ms)",
        watch.elapsed_us() as f64 / 1000.0
    );
    Ok(match kernel {
        Done::Ok(Some(d)) => Done::Ok(Some(format!("{d}; {line}"))),
        _ => Done::Ok(Some(line)),
    })
}

/// The kernel's part: the recorded result for this build, or the probes.
fn kernel(ctx: &Ctx) -> PhaseResult {
    let key = record_key(&ctx.root);
    let record = ctx.path(RECORD);
    if let Some(seen) = key.as_ref().and_then(|k| read_record(&record, k)) {
        return Ok(Done::Ok(Some(format!(
            "kernel build {} passed this check on an earlier boot ({} features probed, {} more \
             build-time only{}): not probed again",
            seen.build_id_short(),
            seen.probed,
            seen.build_time_only,
            seen.optional_missing
                .as_deref()
                .map(|m| format!("; optional missing: {m}"))
                .unwrap_or_default()
        ))));
    }
    let report = check(&ctx.root, &groups());
    if !report.missing.is_empty() {
        return Err(Box::new(Missing {
            count: report.missing.len(),
            list: Report::list(&report.missing),
        }));
    }
    let mut detail = format!(
        "{} features probed, all present ({} more are build-time only)",
        report.probed, report.build_time_only
    );
    if !report.missing_optional.is_empty() {
        detail.push_str(&format!(
            "; optional missing: {}",
            Report::list(&report.missing_optional)
        ));
    }
    if let Some(key) = key {
        if let Err(e) = write_record(&record, &key, &report) {
            ctx.reporter.log(
                Level::Warn,
                format!(
                    "capabilities: cannot record the result in {} (the next boot probes again): {e}",
                    record.display()
                ),
            );
        }
    }
    Ok(Done::Ok(Some(detail)))
}

/// A passed check, kept for the next boot: the probes find the same answers as long as the
/// kernel build and the requirements are the same (the guest kernel has no modules), and under
/// emulation they are the most expensive phase of a boot.
const RECORD: &str = "/var/lib/openshell/kernel-capabilities";

/// What a record holds good for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordKey {
    /// The running kernel's GNU build id (hex), from `/sys/kernel/notes`: any change to the
    /// kernel's configuration or code changes it.
    pub build_id: String,
    /// A digest of the requirement list and the probes (FNV-1a; not a security boundary: the
    /// record lives in the guest's own root filesystem).
    pub requirements: u64,
}

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub build_id: String,
    pub probed: usize,
    pub build_time_only: usize,
    pub optional_missing: Option<String>,
}

impl Recorded {
    fn build_id_short(&self) -> &str {
        self.build_id.get(..12).unwrap_or(&self.build_id)
    }
}

/// The key for this kernel and the guest's fragments; `None` when the kernel shows no build id
/// (then every boot probes).
pub fn record_key(root: &Path) -> Option<RecordKey> {
    let notes = std::fs::read(root.join("sys/kernel/notes")).ok()?;
    Some(RecordKey {
        build_id: gnu_build_id(&notes)?,
        requirements: requirements_digest(&[COMMON, ARCH]),
    })
}

/// The NT_GNU_BUILD_ID note among the kernel's ELF notes, as hex.
pub fn gnu_build_id(notes: &[u8]) -> Option<String> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(notes.get(at..at + 4)?.try_into().ok()?))
    };
    let align = |n: usize| n.checked_add(3).map(|n| n & !3);
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let (namesz, descsz, kind) = (word(at)? as usize, word(at + 4)? as usize, word(at + 8)?);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(align(namesz)?)?;
        let end = desc_at.checked_add(align(descsz)?)?;
        let desc = notes.get(desc_at..desc_at.checked_add(descsz)?)?;
        if kind == NT_GNU_BUILD_ID && notes.get(name_at..name_at + namesz)? == b"GNU\0" {
            return (!desc.is_empty()).then(|| desc.iter().map(|b| format!("{b:02x}")).collect());
        }
        at = end;
    }
    None
}

/// FNV-1a over everything the check's answer depends on besides the kernel: the fragments'
/// text (groups and options) and how each option is probed. The text, not its parse: a boot
/// that trusts the record never parses the fragments.
pub fn requirements_digest(fragments: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for f in fragments {
        feed(f.as_bytes());
    }
    for (opt, probe) in PROBES {
        feed(opt.as_bytes());
        let (tag, arg) = probe.describe();
        feed(&[tag]);
        feed(arg.as_bytes());
    }
    h
}

/// The record at `path` if it was written for `key`; anything else (none, another kernel,
/// another requirement list, unreadable lines) is no record.
pub fn read_record(path: &Path, key: &RecordKey) -> Option<Recorded> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut fields = std::collections::BTreeMap::new();
    for line in text.lines() {
        let (k, v) = line.split_once(' ')?;
        fields.insert(k, v);
    }
    let requirements = format!("{:016x}", key.requirements);
    if fields.get("build-id") != Some(&key.build_id.as_str())
        || fields.get("requirements") != Some(&requirements.as_str())
    {
        return None;
    }
    Some(Recorded {
        build_id: key.build_id.clone(),
        probed: fields.get("probed")?.parse().ok()?,
        build_time_only: fields.get("build-time-only")?.parse().ok()?,
        optional_missing: fields.get("optional-missing").map(|s| s.to_string()),
    })
}

/// Records a passed `report` for `key`, atomically.
pub fn write_record(path: &Path, key: &RecordKey, report: &Report) -> std::io::Result<()> {
    let mut text = format!(
        "build-id {}\nrequirements {:016x}\nprobed {}\nbuild-time-only {}\n",
        key.build_id, key.requirements, report.probed, report.build_time_only
    );
    if !report.missing_optional.is_empty() {
        text.push_str(&format!(
            "optional-missing {}\n",
            Report::list(&report.missing_optional)
        ));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Unsynced: a record lost to a crash only means the next boot probes again.
    openshell_shared::fsutil::write_atomic_unsynced(path, text.as_bytes())
}

/// Link probes run in a network namespace of their own, on a thread of their own: the links are
/// never deleted, they go with the namespace when the thread ends, and the kernel tears that down
/// on a work queue. Deleting them here would wait an RCU grace period per link (about 70 ms for
/// the bridge and the veth pair together, measured), longer than every other probe together.
/// `None` when no namespace can be made: the probes then run in place and clean up after
/// themselves.
fn link_probes_in_scratch_netns(probes: Vec<Probe>) -> Option<Vec<Result<(), String>>> {
    std::thread::Builder::new()
        .name("caps-netns".into())
        .spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            Some(
                probes
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| create_link_probe(i, p))
                    .collect(),
            )
        })
        .ok()?
        .join()
        .ok()
        .flatten()
}

/// The link probes rtnetlink confirms without creating anything (see
/// [`netlink::link_kind_known`]): creating a bridge and a veth pair in a scratch namespace costs
/// tens of milliseconds of emulated kernel work at boot, asking costs one request each. The
/// answer is trusted only when a made-up type is refused the way an unknown type must be;
/// whatever is not confirmed is created for real.
fn kinds_known(probes: &[Probe]) -> Vec<Probe> {
    let discriminates = matches!(
        netlink::link_kind_known(InfoKind::Other("_osh_nokind".into())),
        Ok(Some(false))
    );
    if !discriminates {
        return Vec::new();
    }
    let mut known: Vec<Probe> = Vec::new();
    for p in probes {
        let kind = match p {
            Probe::Link("bridge") => InfoKind::Bridge,
            Probe::Link(_) => InfoKind::Dummy,
            Probe::Veth => InfoKind::Veth,
            _ => continue,
        };
        if !known.contains(p) && matches!(netlink::link_kind_known(kind), Ok(Some(true))) {
            known.push(*p);
        }
    }
    known
}

fn is_link_probe(p: &Probe) -> bool {
    matches!(p, Probe::Link(_) | Probe::Veth)
}

/// Creates the probe's link (or pair), named by its position so a probe asked for twice does not
/// collide with itself; does not delete it.
fn create_link_probe(i: usize, probe: Probe) -> Result<(), String> {
    let name = format!("_osh{i}");
    match probe {
        Probe::Link(kind) => {
            let info = match kind {
                "bridge" => InfoKind::Bridge,
                _ => InfoKind::Dummy,
            };
            netlink::create_link(&name, info, None)
                .map_err(|e| format!("cannot create a {kind} link: {e}"))
        }
        Probe::Veth => netlink::create_link(&name, InfoKind::Veth, Some(&format!("{name}p")))
            .map_err(|e| format!("cannot create a veth pair: {e}")),
        _ => Err("not a link probe".into()),
    }
}

/// Probes every required option of `groups` under `root`.
pub fn check(root: &Path, groups: &[Group]) -> Report {
    let filesystems = std::fs::read_to_string(root.join("proc/filesystems")).unwrap_or_default();
    let controllers =
        std::fs::read_to_string(root.join("sys/fs/cgroup/cgroup.controllers")).unwrap_or_default();
    let link_probes: Vec<Probe> = groups
        .iter()
        .flat_map(|g| &g.required)
        .filter_map(|opt| PROBES.iter().find(|(o, _)| o == opt).map(|(_, p)| *p))
        .filter(is_link_probe)
        .collect();
    let known = kinds_known(&link_probes);
    let unconfirmed: Vec<Probe> = link_probes
        .iter()
        .copied()
        .filter(|p| !known.contains(p))
        .collect();
    let mut scratch = if unconfirmed.is_empty() {
        Some(Vec::new().into_iter())
    } else {
        link_probes_in_scratch_netns(unconfirmed).map(Vec::into_iter)
    };
    let mut report = Report::default();
    for g in groups {
        for opt in &g.required {
            let Some((_, probe)) = PROBES.iter().find(|(o, _)| o == opt) else {
                report.build_time_only += 1;
                continue;
            };
            report.probed += 1;
            let result = match scratch.as_mut() {
                _ if known.contains(probe) => Ok(()),
                Some(done) if is_link_probe(probe) => done
                    .next()
                    .unwrap_or_else(|| Err("link probe result missing".into())),
                _ => run_probe(root, *probe, &filesystems, &controllers),
            };
            if let Err(how) = result {
                let item = (g.name.clone(), opt.clone(), how);
                if g.optional {
                    report.missing_optional.push(item);
                } else {
                    report.missing.push(item);
                }
            }
        }
    }
    report
}

/// `Err` says what was looked for and what happened.
pub fn run_probe(
    root: &Path,
    probe: Probe,
    filesystems: &str,
    controllers: &str,
) -> Result<(), String> {
    match probe {
        Probe::Filesystem(fs) => filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(fs))
            .then_some(())
            .ok_or_else(|| format!("no {fs} in /proc/filesystems")),
        Probe::Path(p) => under(root, p)
            .exists()
            .then_some(())
            .ok_or_else(|| format!("no {p}")),
        Probe::Controller(c) => controllers
            .split_whitespace()
            .any(|w| w == c)
            .then_some(())
            .ok_or_else(|| format!("no {c} cgroup controller")),
        Probe::Link(kind) => {
            let name = format!("_osh_{kind}");
            let info = match kind {
                "bridge" => InfoKind::Bridge,
                _ => InfoKind::Dummy,
            };
            let _ = netlink::delete_link(&name);
            netlink::create_link(&name, info, None)
                .map_err(|e| format!("cannot create a {kind} link: {e}"))?;
            netlink::delete_link(&name).map_err(|e| format!("cannot delete {name}: {e}"))
        }
        Probe::Veth => {
            let _ = netlink::delete_link("_osh_veth0");
            netlink::create_link("_osh_veth0", InfoKind::Veth, Some("_osh_veth1"))
                .map_err(|e| format!("cannot create a veth pair: {e}"))?;
            // Deleting one end removes both.
            netlink::delete_link("_osh_veth0").map_err(|e| format!("cannot delete _osh_veth0: {e}"))
        }
        Probe::NfTables => nftables_generation(),
        Probe::Bpf => {
            // SAFETY: BPF_PROG_LOAD with a null attribute pointer and size 0 has no side effect;
            // the kernel answers EINVAL/EFAULT/EPERM when bpf(2) exists and ENOSYS when not.
            let rc = unsafe { libc::syscall(libc::SYS_bpf, 5, std::ptr::null::<u8>(), 0) };
            match (rc, nix::errno::Errno::last()) {
                (-1, nix::errno::Errno::ENOSYS) => Err("bpf(2) returns ENOSYS".into()),
                _ => Ok(()),
            }
        }
        Probe::Landlock => {
            // landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) returns the ABI.
            // SAFETY: the version query reads and writes no memory.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_landlock_create_ruleset,
                    std::ptr::null::<u8>(),
                    0,
                    1,
                )
            };
            if rc >= 1 {
                Ok(())
            } else {
                Err(format!(
                    "landlock unavailable ({})",
                    nix::errno::Errno::last()
                ))
            }
        }
    }
}

/// Asks nf_tables for its ruleset generation (NFT_MSG_GETGEN) over NETLINK_NETFILTER: the
/// reply is NFT_MSG_NEWGEN only when nf_tables is in the kernel.
fn nftables_generation() -> Result<(), String> {
    use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_NEWGEN: u16 = 15;
    const NFT_MSG_GETGEN: u16 = 16;
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&20u32.to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]); // nfgenmsg: family, version, res_id
    let io = |e: std::io::Error| format!("NETLINK_NETFILTER: {e}");
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(io)?;
    sock.bind_auto().map_err(io)?;
    sock.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    sock.send(&req, 0).map_err(io)?;
    let mut buf = vec![0u8; 4096];
    let n = sock.recv(&mut &mut buf[..], 0).map_err(io)?;
    if n < 16 {
        return Err("short reply from NETLINK_NETFILTER".into());
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
        return Ok(());
    }
    if kind == libc::NLMSG_ERROR as u16 && n >= 20 {
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return Err(format!(
            "nf_tables did not answer ({})",
            nix::errno::Errno::from_raw(-code)
        ));
    }
    Err(format!("unexpected netlink message type {kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ELF notes as the kernel lists them: a `Linux` note, then the GNU build id.
    fn notes(id: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        for (name, kind, desc) in [(&b"Linux\0"[..], 6u32, &[0u8; 4][..]), (b"GNU\0", 3, id)] {
            n.extend_from_slice(&(name.len() as u32).to_ne_bytes());
            n.extend_from_slice(&(desc.len() as u32).to_ne_bytes());
            n.extend_from_slice(&kind.to_ne_bytes());
            for part in [name, desc] {
                n.extend_from_slice(part);
                n.resize((n.len() + 3) & !3, 0);
            }
        }
        n
    }

    #[test]
    fn the_build_id_is_found_among_the_notes() {
        assert_eq!(
            gnu_build_id(&notes(&[0x75, 0x80, 0xae, 0x7a])).as_deref(),
            Some("7580ae7a")
        );
        let whole = notes(&[1, 2, 3, 4, 5]);
        for cut in [0, 7, 20, whole.len() - 4] {
            assert_eq!(gnu_build_id(&whole[..cut]), None, "cut at {cut}");
        }
        let mut lying = whole.clone();
        lying[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(gnu_build_id(&lying), None);
        // This machine's own kernel, where sysfs shows one.
        if let Ok(real) = std::fs::read("/sys/kernel/notes") {
            if let Some(id) = gnu_build_id(&real) {
                assert!(
                    id.len() >= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{id}"
                );
            }
        }
    }

    proptest::proptest! {
        /// Any bytes as the kernel's notes: a build id or none, never a panic; a GNU note put
        /// in front of them is always found.
        #[test]
        fn arbitrary_notes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
                                       id in proptest::collection::vec(proptest::num::u8::ANY, 1..32)) {
            let _ = gnu_build_id(&bytes);
            let mut n = notes(&id);
            n.extend_from_slice(&bytes);
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            proptest::prop_assert_eq!(gnu_build_id(&n), Some(hex));
        }
    }

    #[test]
    fn a_record_holds_only_for_its_kernel_and_requirements() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("var/lib/openshell/kernel-capabilities");
        let key = RecordKey {
            build_id: "7580ae7a2854b57b945bb8fb7a7144203fa402f4".into(),
            requirements: requirements_digest(&[COMMON, ARCH]),
        };
        let report = Report {
            probed: 35,
            build_time_only: 123,
            missing: Vec::new(),
            missing_optional: vec![("ipvs".into(), "IP_VS".into(), "no /proc/net/ip_vs".into())],
        };
        assert_eq!(read_record(&path, &key), None);
        write_record(&path, &key, &report).expect("write");
        let seen = read_record(&path, &key).expect("read back");
        assert_eq!((seen.probed, seen.build_time_only), (35, 123));
        assert_eq!(seen.build_id_short(), "7580ae7a2854");
        assert!(seen
            .optional_missing
            .is_some_and(|m| m.contains("CONFIG_IP_VS (ipvs: no /proc/net/ip_vs)")));
        let other_kernel = RecordKey {
            build_id: "0000".into(),
            ..key.clone()
        };
        assert_eq!(read_record(&path, &other_kernel), None);
        let other_list = RecordKey {
            requirements: requirements_digest(&[COMMON]),
            ..key.clone()
        };
        assert_eq!(read_record(&path, &other_list), None);
        std::fs::write(&path, "build-id\n").expect("garble");
        assert_eq!(read_record(&path, &key), None);
    }

    #[test]
    fn the_digest_changes_with_any_requirement() {
        let d = requirements_digest(&[COMMON, ARCH]);
        assert_eq!(d, requirements_digest(&[COMMON, ARCH]));
        let optional = COMMON.replacen("# group: ipvs (optional)", "# group: ipvs", 1);
        assert_ne!(
            optional, COMMON,
            "the fragments have an optional ipvs group"
        );
        let dropped = COMMON.replacen("CONFIG_VETH=y\n", "", 1);
        assert_ne!(dropped, COMMON, "the fragments require VETH");
        for other in [
            vec![COMMON],
            vec![optional.as_str(), ARCH],
            vec![dropped.as_str(), ARCH],
            // The same text split differently between the fragments is another list.
            vec![&COMMON[..COMMON.len() - 1], ARCH],
        ] {
            assert_ne!(d, requirements_digest(&other));
        }
    }

    /// The phase itself: a record for the running kernel build is trusted without probing; one
    /// for another build is not (here the probes then fail, the root having no /proc).
    #[test]
    fn the_phase_trusts_a_record_of_this_kernel_build_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        std::fs::create_dir_all(root.join("sys/kernel")).expect("mkdir");
        std::fs::write(root.join("sys/kernel/notes"), notes(&[0xab; 20])).expect("notes");
        let key = record_key(root).expect("key");
        assert_eq!(key.build_id, "ab".repeat(20));
        let report = Report {
            probed: 35,
            build_time_only: 123,
            ..Report::default()
        };
        let record = under(root, RECORD);
        write_record(&record, &key, &report).expect("record");
        match run(&Ctx::for_test(root)) {
            Ok(Done::Ok(Some(detail))) => {
                assert!(
                    detail.contains("abababababab passed this check on an earlier boot"),
                    "{detail}"
                );
                assert!(detail.contains("not probed again"), "{detail}");
            }
            other => panic!("expected the record to be trusted, got {other:?}"),
        }
        std::fs::write(root.join("sys/kernel/notes"), notes(&[0xcd; 20])).expect("notes");
        let err =
            run(&Ctx::for_test(root)).expect_err("another kernel build is probed, and fails here");
        assert!(err.to_string().contains("kernel lacks"), "{err}");
        // A failed check leaves the old record as it was and writes none for this build.
        let key2 = record_key(root).expect("key");
        assert_eq!(read_record(&record, &key2), None);
        assert!(read_record(&record, &key).is_some());
    }

    #[test]
    fn groups_come_from_the_kernel_fragments() {
        let g = groups();
        let names: Vec<&str> = g.iter().map(|g| g.name.as_str()).collect();
        for want in [
            "namespaces",
            "cgroups",
            "network",
            "netfilter",
            "nftables",
            "filesystems",
            "virtio",
        ] {
            assert!(names.contains(&want), "group {want} in {names:?}");
        }
        assert!(g
            .iter()
            .find(|g| g.name == "ipvs")
            .is_some_and(|g| g.optional));
        assert!(
            g.iter()
                .all(|g| !g.required.is_empty() || g.name == "build"),
            "{g:?}"
        );
    }

    #[test]
    fn every_probe_is_for_an_option_the_fragments_require() {
        let required: Vec<String> = groups().into_iter().flat_map(|g| g.required).collect();
        for (opt, _) in PROBES {
            assert!(
                required.iter().any(|r| r == opt),
                "probe for CONFIG_{opt}, which no fragment asks for"
            );
        }
    }

    #[test]
    fn parsing_marks_optional_groups() {
        let g = parse_groups(
            "# group: a - x\nCONFIG_A=y\nCONFIG_B=n\n# group: b (optional) - y\nCONFIG_C=y\n",
        );
        assert_eq!(
            g,
            vec![
                Group {
                    name: "a".into(),
                    optional: false,
                    required: vec!["A".into()]
                },
                Group {
                    name: "b".into(),
                    optional: true,
                    required: vec!["C".into()]
                },
            ]
        );
    }

    #[test]
    fn missing_items_are_listed_with_group_and_reason() {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(root.path().join("proc")).expect("mkdir");
        std::fs::write(
            root.path().join("proc/filesystems"),
            "nodev\tproc\n\text4\n",
        )
        .expect("write");
        let groups = parse_groups(
            "# group: fs - x\nCONFIG_PROC_FS=y\nCONFIG_OVERLAY_FS=y\nCONFIG_NOT_PROBED=y\n# group: opt (optional) - y\nCONFIG_EXT4_FS=y\nCONFIG_FUSE_FS=y\n",
        );
        let r = check(root.path(), &groups);
        assert_eq!(r.probed, 4);
        assert_eq!(r.build_time_only, 1);
        assert_eq!(
            r.missing,
            vec![(
                "fs".to_string(),
                "OVERLAY_FS".to_string(),
                "no overlay in /proc/filesystems".to_string()
            )]
        );
        assert_eq!(r.missing_optional.len(), 1);
        assert!(Report::list(&r.missing).contains("CONFIG_OVERLAY_FS (fs: no overlay"));
    }

    /// `check` makes its links in a scratch namespace: the caller's namespace gets none, and a
    /// probe asked for by two groups does not collide with itself.
    #[test]
    fn link_probes_leave_the_callers_namespace_untouched() {
        let result = crate::netlink::in_new_netns(|| {
            let groups = parse_groups(
                "# group: net - x\nCONFIG_BRIDGE=y\nCONFIG_VETH=y\n# group: again - y\nCONFIG_VETH=y\n",
            );
            let report = check(Path::new("/"), &groups);
            let links: Vec<String> = netlink::links()
                .expect("links")
                .into_iter()
                .map(|l| l.name)
                .collect();
            Some((report, links))
        });
        if let Some((report, links)) = result {
            assert_eq!(report.probed, 3);
            assert!(report.missing.is_empty(), "{:?}", report.missing);
            assert_eq!(links, vec!["lo".to_string()], "probe links leaked");
        }
    }

    /// The kind question against the real kernel: a type it has (veth, once a creation has
    /// loaded it on a modular kernel) is confirmed, a made-up one is not, and nothing is created.
    #[test]
    fn link_kinds_are_confirmed_without_creating_links() {
        let result = crate::netlink::in_new_netns(|| {
            let created = run_probe(Path::new("/"), Probe::Veth, "", "");
            let veth = netlink::link_kind_known(InfoKind::Veth);
            let made_up = netlink::link_kind_known(InfoKind::Other("_osh_nokind".into()));
            let links: Vec<String> = netlink::links()
                .expect("links")
                .into_iter()
                .map(|l| l.name)
                .collect();
            let known = kinds_known(&[Probe::Veth, Probe::Veth]);
            Some((created, veth, made_up, links, known))
        });
        if let Some((created, veth, made_up, links, known)) = result {
            assert_eq!(created, Ok(()));
            assert_eq!(veth.expect("veth asked"), Some(true));
            assert_eq!(made_up.expect("made-up kind asked"), Some(false));
            assert_eq!(links, vec!["lo".to_string()], "the question created a link");
            assert_eq!(known, vec![Probe::Veth]);
        }
    }

    /// The netlink probes against the real kernel, in a private network namespace.
    #[test]
    fn link_and_nftables_probes_work_on_this_kernel() {
        let result = crate::netlink::in_new_netns(|| {
            let root = Path::new("/");
            Some([
                run_probe(root, Probe::Link("dummy"), "", ""),
                run_probe(root, Probe::Veth, "", ""),
                run_probe(root, Probe::Link("bridge"), "", ""),
                run_probe(root, Probe::Veth, "", ""), // again: the first left nothing behind
                run_probe(root, Probe::NfTables, "", ""),
            ])
        });
        if let Some(results) = result {
            let [dummy, links @ .., nftables] = results;
            for r in links {
                assert_eq!(r, Ok(()));
            }
            match nftables {
                Ok(()) => {}
                // qemu-user (the aarch64 test runner) does not pass NETLINK_NETFILTER through.
                Err(e) if e.contains("Protocol not supported") => {
                    eprintln!(
                        "skipped nf_tables: this kernel or emulator has no NETLINK_NETFILTER ({e})"
                    )
                }
                Err(e) => panic!("nf_tables probe: {e}"),
            }
            // This machine's own kernel may lack the dummy driver: the kernel then refuses the
            // unknown link kind, and the probe must say exactly that.
            if let Err(e) = dummy {
                assert!(e.contains("dummy") && e.contains("EOPNOTSUPP"), "{e}");
            }
        }
    }
}
