//! The boot configuration: what openshell-init reads from the guest's YAML file, with overrides
//! from the kernel command line (which is how the host passes per-boot choices such as the
//! workload without rewriting the root filesystem).
//!
//! Every error names where the bad value came from (file path or kernel command line) and the
//! field, so a user who mistyped a key sees exactly which one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::BOOT_CHANNEL_PORT;

/// Where init looks for its configuration unless `openshell.config=` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/openshell/init.yaml";

/// Prefix of the kernel command-line keys init reads. Dotted keys are not passed to init's
/// environment or argv by the kernel, so init reads them from `/proc/cmdline`.
pub const CMDLINE_PREFIX: &str = "openshell.";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootConfig {
    /// Also the Kubernetes node name once k3s runs, so it must be a valid DNS label.
    pub hostname: String,
    pub workload: Workload,
    pub shutdown: Shutdown,
    pub channel: Channel,
    pub kine: Kine,
    pub network: Network,
    pub manifests: Manifests,
    pub pki: Pki,
    pub state_disk: StateDisk,
    /// Present: PID 1 runs k3s (command line built from this) instead of `workload.argv`,
    /// after the `k3s-prep` phase. Absent (the base profile): neither happens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k3s: Option<K3s>,
    /// The host's clock at VM start, seconds since the epoch (`openshell.host_time=`, from the
    /// command line only): a guest without a real-time clock starts in 1970, and certificates
    /// the PKI phase issues then would be dated 1970.
    #[serde(skip)]
    pub host_time_s: Option<u64>,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            hostname: "openshell-vm".into(),
            workload: Workload::default(),
            shutdown: Shutdown::default(),
            channel: Channel::default(),
            kine: Kine::default(),
            network: Network::default(),
            manifests: Manifests::default(),
            pki: Pki::default(),
            state_disk: StateDisk::default(),
            k3s: None,
            host_time_s: None,
        }
    }
}

/// The guest's network: DHCP on one interface, with a static plan when no lease comes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Network {
    pub interface: String,
    /// One deadline for the whole DHCP exchange, retries included.
    pub dhcp_timeout_ms: u64,
    /// Offer Rapid Commit (two messages instead of four) to servers that support it.
    pub rapid_commit: bool,
    /// Used when no lease arrives in time (gvproxy's fixed addressing by default): k3s needs a
    /// default route, so "no lease" must still leave one.
    pub fallback: StaticPlan,
    /// Used when the lease names no nameserver k3s accepts.
    pub fallback_dns: Vec<std::net::Ipv4Addr>,
    /// With no network device at all: a dummy interface so k3s still finds a node IP and route.
    pub no_device: StaticPlan,
    /// TCP destinations that pods and guest processes are refused (a reset): by default
    /// gvproxy's control API, which can open ports on the user's host.
    pub blocked_tcp: Vec<std::net::SocketAddrV4>,
    /// The user's host loopback ports (127.0.0.1 on the host) the guest may reach: none by
    /// default. The host passes its `--host-port` list as `openshell.host_ports=`, which
    /// replaces this one.
    pub host_ports: Vec<u16>,
    /// Addresses at which the user-mode network reaches the host's loopback: gvproxy
    /// translates 192.168.127.254 to 127.0.0.1. TCP and UDP to them is refused except to
    /// `host_ports`.
    pub host_loopback: Vec<std::net::Ipv4Addr>,
    /// Whether the default router is the host's loopback too, and refused the same way (DNS
    /// and DHCP to it excepted): passt maps its gateway address to the host's loopback unless
    /// started with `--no-map-gw`. The host says which (`openshell.router_is_host_loopback=`);
    /// without it, the safe assumption.
    pub router_is_host_loopback: bool,
}

/// Most host ports the guest may be given: an allow-list, not a way around the refusal.
pub const MAX_HOST_PORTS: usize = 32;

/// Parses a comma-separated host port list (`openshell.host_ports=`, `up --host-port`); empty
/// means none. Ports are 1-65535, each at most once, at most [`MAX_HOST_PORTS`].
pub fn parse_host_ports(text: &str) -> Result<Vec<u16>, String> {
    let ports = text
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse::<u16>().map_err(|e| format!("`{p}`: {e}")))
        .collect::<Result<Vec<u16>, String>>()?;
    check_host_ports(&ports)?;
    Ok(ports)
}

/// The rules a host port list obeys, whichever way it came.
pub fn check_host_ports(ports: &[u16]) -> Result<(), String> {
    if ports.len() > MAX_HOST_PORTS {
        return Err(format!(
            "{} ports: at most {MAX_HOST_PORTS} (an allow-list, not a range)",
            ports.len()
        ));
    }
    for (i, p) in ports.iter().enumerate() {
        if *p == 0 {
            return Err("port 0 is not a port".into());
        }
        if ports[..i].contains(p) {
            return Err(format!("port {p} is listed twice"));
        }
    }
    Ok(())
}

/// Joins a host port list for `openshell.host_ports=` (empty: none).
pub fn encode_host_ports(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl Default for Network {
    fn default() -> Self {
        let gvproxy = std::net::Ipv4Addr::new(192, 168, 127, 1);
        Self {
            interface: "eth0".into(),
            dhcp_timeout_ms: 3000,
            rapid_commit: true,
            fallback: StaticPlan {
                address: std::net::Ipv4Addr::new(192, 168, 127, 2),
                prefix: 24,
                gateway: Some(gvproxy),
                dns: vec![gvproxy],
            },
            fallback_dns: vec![gvproxy],
            no_device: StaticPlan {
                address: std::net::Ipv4Addr::new(10, 0, 2, 15),
                prefix: 24,
                gateway: None,
                dns: Vec::new(),
            },
            blocked_tcp: vec![std::net::SocketAddrV4::new(gvproxy, 80)],
            host_ports: Vec::new(),
            host_loopback: vec![std::net::Ipv4Addr::new(192, 168, 127, 254)],
            router_is_host_loopback: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPlan {
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    /// None: the default route points at the device itself.
    #[serde(default)]
    pub gateway: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<std::net::Ipv4Addr>,
}

/// Offline maintenance of k3s's kine (SQLite) database before k3s starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Kine {
    /// Key prefixes whose objects are dropped (every revision) at boot. The default drops what a
    /// restart makes stale and nothing a user owns: events, leases (else the new control plane
    /// waits for its dead predecessor's leader leases to expire), masterleases, endpoint slices
    /// and the bootstrap lock that makes k3s hang after a kill. Pods are kept: a rebooted node
    /// keeps its pods and the kubelet recreates their sandboxes, while deleting them behind the
    /// API server loses bare pods and skips graceful deletion and finalizers. Add
    /// [`Kine::PODS`] to drop them too (what a pre-initialised root's build does).
    pub prune_prefixes: Vec<String>,
    /// VACUUM when free pages exceed this percentage of the file.
    pub vacuum_free_percent: u32,
    /// Below this much free space next to the database, neither the maintenance nor k3s starts.
    pub min_free_mib: u64,
}

impl Kine {
    /// Where the API server keeps Pod objects.
    pub const PODS: &'static str = "/registry/pods/";

    /// This policy with Pod objects pruned as well: for a database captured at build time,
    /// whose pods' sandboxes were never shipped (the old system's build-time pruning).
    pub fn pruning_pods(&self) -> Kine {
        let mut kine = self.clone();
        if !kine.prune_prefixes.iter().any(|p| p == Self::PODS) {
            kine.prune_prefixes.insert(0, Self::PODS.to_string());
        }
        kine
    }
}

impl Default for Kine {
    fn default() -> Self {
        Self {
            prune_prefixes: [
                "/registry/events/",
                "/registry/leases/",
                "/registry/endpointslices/",
                "/registry/masterleases/",
                "/bootstrap/",
            ]
            .map(String::from)
            .to_vec(),
            vacuum_free_percent: 25,
            min_free_mib: 64,
        }
    }
}

/// The k3s manifests init deploys at boot (`manifests` phase).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Manifests {
    /// Values written into the gateway's HelmChart.
    pub gateway: HelmValues,
}

/// The gateway chart's values that the bundled HelmChart leaves as `__PLACEHOLDER__`s. One typed
/// set, read by the rootfs build (which pre-deploys the chart) and by the guest at every boot:
/// if the two ever differed, the Helm controller would upgrade the release and recycle the
/// pre-baked gateway pod shortly after boot. The defaults are the values the VM has always used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HelmValues {
    /// The gateway image's pull policy. `IfNotPresent`: the image is pre-loaded and the VM may
    /// be offline.
    pub image_pull_policy: PullPolicy,
    /// Pull policy the gateway gives the sandbox pods it creates.
    pub sandbox_image_pull_policy: PullPolicy,
    /// The gateway's own database (inside its pod).
    pub db_url: String,
    /// Host and port sandboxes are told to reach the gateway's SSH endpoint at; empty and 0
    /// leave the choice to the gateway.
    pub ssh_gateway_host: String,
    pub ssh_gateway_port: u16,
    pub disable_gateway_auth: bool,
    pub disable_tls: bool,
    /// Address of the host as the guest sees it; empty lets the gateway find out.
    pub host_gateway_ip: String,
    /// Gateway image repository and tag; `None` keeps what the bundled chart says.
    pub image_repository: Option<String>,
    pub image_tag: Option<String>,
}

impl Default for HelmValues {
    fn default() -> Self {
        Self {
            image_pull_policy: PullPolicy::IfNotPresent,
            sandbox_image_pull_policy: PullPolicy::IfNotPresent,
            db_url: "sqlite:/tmp/openshell.db".into(),
            ssh_gateway_host: String::new(),
            ssh_gateway_port: 0,
            disable_gateway_auth: false,
            disable_tls: false,
            host_gateway_ip: String::new(),
            image_repository: None,
            image_tag: None,
        }
    }
}

/// Kubernetes image pull policy, spelled as Kubernetes spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The gateway's PKI (`pki` phase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pki {
    /// A certificate that expires within this many days is issued again at boot, so a VM that
    /// is rarely started never comes up with an expired certificate.
    pub renew_before_days: u32,
}

impl Default for Pki {
    fn default() -> Self {
        Self {
            renew_before_days: 30,
        }
    }
}

/// The serial the host gives the state disk's virtio-blk device, and the value of
/// `openshell.state_disk=` it passes when it attaches one.
pub const STATE_DISK_SERIAL: &str = "openshell-state";

/// The state disk (`state-disk` phase): the block device that holds k3s's, containerd's and the
/// PKI's state. Unset, there is none and that state stays in the root filesystem.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateDisk {
    /// The disk by its virtio-blk serial ([`STATE_DISK_SERIAL`]), or, for debugging, by an
    /// absolute `/dev/...` path. Set by the host with `openshell.state_disk=`.
    pub device: Option<String>,
}

impl StateDisk {
    /// The longest serial virtio-blk carries (VIRTIO_BLK_ID_BYTES).
    pub const MAX_SERIAL: usize = 20;

    /// Checks a value for [`StateDisk::device`]: a `/dev/` path without `..`, or a serial of
    /// 1 to 20 characters from `[A-Za-z0-9._-]`.
    pub fn check_device(value: &str) -> Result<(), String> {
        if value.starts_with('/') {
            let dev = value.strip_prefix("/dev/").unwrap_or("");
            if dev.is_empty()
                || dev
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..")
                || value.contains('\0')
            {
                return Err(format!("`{value}` is not a path under /dev/"));
            }
            return Ok(());
        }
        let ok = !value.is_empty()
            && value.len() <= Self::MAX_SERIAL
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(format!(
                "`{value}` is neither a /dev/ path nor a virtio-blk serial (1 to {} characters from A-Z a-z 0-9 . _ -)",
                Self::MAX_SERIAL
            ))
        }
    }
}

/// How init starts k3s and decides it is ready. The defaults are the command line the VM has
/// always used (k3s server with the built-in CNI, flannel and network policy off).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct K3s {
    /// The k3s binary, as the guest sees it.
    pub binary: String,
    /// Packaged components k3s must not deploy (`--disable=`).
    pub disable: Vec<String>,
    /// Names the API server certificate is valid for (`--tls-san=`); the node IP is added.
    pub tls_sans: Vec<String>,
    /// containerd snapshotter. overlayfs needs the kernel's overlay filesystem.
    pub snapshotter: String,
    /// kube-proxy mode: nftables, because k3s's bundled iptables cannot negotiate xt_MARK
    /// revision 2 with the guest kernel.
    pub kube_proxy_mode: String,
    pub kubelet: Kubelet,
    /// The gateway's NodePort; `gateway-ready` is a TCP connect to it on the node IP (kube-proxy's
    /// nftables mode does not serve NodePorts on 127.0.0.1).
    pub gateway_port: u16,
    pub readiness: Readiness,
    /// Appended to the command line as given.
    pub extra_args: Vec<String>,
}

impl Default for K3s {
    fn default() -> Self {
        Self {
            binary: "/usr/local/bin/k3s".into(),
            disable: ["traefik", "servicelb", "metrics-server"]
                .map(String::from)
                .to_vec(),
            tls_sans: ["localhost", "127.0.0.1", "10.0.2.15", "192.168.127.2"]
                .map(String::from)
                .to_vec(),
            snapshotter: "overlayfs".into(),
            kube_proxy_mode: "nftables".into(),
            kubelet: Kubelet::default(),
            gateway_port: 30051,
            readiness: Readiness::default(),
            extra_args: Vec::new(),
        }
    }
}

/// Kubelet settings for a VM whose disk usage the kubelet cannot judge: virtio-fs reports the
/// host's disk, so any eviction or image GC threshold would fire on a host that is merely full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Kubelet {
    pub eviction_hard: String,
    pub eviction_minimum_reclaim: String,
    pub image_gc_high_threshold: u8,
    pub image_gc_low_threshold: u8,
    /// CRI request timeout; the kubelet's 2m default failed CreateContainer on slow disks.
    pub runtime_request_timeout: String,
}

impl Default for Kubelet {
    fn default() -> Self {
        Self {
            eviction_hard: "imagefs.available<0%,nodefs.available<0%".into(),
            eviction_minimum_reclaim: "imagefs.available=1%,nodefs.available=1%".into(),
            image_gc_high_threshold: 100,
            image_gc_low_threshold: 99,
            runtime_request_timeout: "10m".into(),
        }
    }
}

/// How long each readiness stage may take, counted from the stage before it (`k3s-started`
/// is the spawn itself). A stage that does not arrive in time is reported as an error and the
/// later stages are not awaited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Readiness {
    pub apiserver_ready_ms: u64,
    pub node_ready_ms: u64,
    /// Long: on a fresh database the gateway's chart is installed and its pod started first.
    pub gateway_ready_ms: u64,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            apiserver_ready_ms: 120_000,
            node_ready_ms: 120_000,
            gateway_ready_ms: 300_000,
        }
    }
}

/// The program init starts and supervises once boot phases are done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: String,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            argv: vec!["/bin/sh".into()],
            env: BTreeMap::from([(
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            )]),
            cwd: "/".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shutdown {
    /// Time the workload gets between SIGTERM and SIGKILL.
    pub grace_ms: u64,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self { grace_ms: 10_000 }
    }
}

/// The longest grace a workload gets: one hour. A configuration asking for more is refused;
/// a grace from elsewhere (the host's `shutdown` message) is clamped to it with [`grace`].
pub const MAX_GRACE_MS: u64 = 3_600_000;

/// `grace_ms` as a duration, at most [`MAX_GRACE_MS`]: any `u64` the host sends can be added
/// to an `Instant` without overflowing (which panics, and PID 1 must not).
pub fn grace(grace_ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(grace_ms.min(MAX_GRACE_MS))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Channel {
    /// vsock port on the host (CID 2) the boot channel connects to.
    pub port: u32,
    /// Total time spent trying to reach the host before giving up and logging to the console only.
    pub connect_timeout_ms: u64,
}

impl Default for Channel {
    fn default() -> Self {
        Self {
            port: BOOT_CHANNEL_PORT,
            connect_timeout_ms: 300,
        }
    }
}

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Cmdline,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Cmdline => f.write_str("kernel command line"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{origin}: cannot read: {reason}")]
    Read { origin: Source, reason: String },
    #[error("{origin}: {reason}")]
    Parse { origin: Source, reason: String },
    #[error("{origin}: field `{field}`: {reason}")]
    Invalid {
        origin: Source,
        field: String,
        reason: String,
    },
}

impl ConfigError {
    fn invalid(source: &Source, field: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            origin: source.clone(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// `Ok` when `ok` holds, else `field` of `source` is invalid for `reason`.
fn ensure(
    ok: bool,
    source: &Source,
    field: &str,
    reason: impl Into<String>,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(source, field, reason))
    }
}

impl BootConfig {
    /// The readiness stages a boot with this configuration reports, in order: the workload's
    /// start, and with k3s as the workload, k3s's own stages up to the gateway's port.
    pub fn ready_stages(&self) -> Vec<String> {
        use crate::protocol::stage;
        let mut stages = vec![stage::WORKLOAD_STARTED];
        if self.k3s.is_some() {
            stages.extend([
                stage::K3S_STARTED,
                stage::APISERVER_READY,
                stage::NODE_READY,
                stage::GATEWAY_READY,
            ]);
        }
        stages.into_iter().map(String::from).collect()
    }

    /// Parses YAML text; `path` is only used to name the file in errors.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let source = Source::File(path.to_path_buf());
        // An empty file means "all defaults", which serde_yaml would call a type error.
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let config: BootConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: source.clone(),
            reason: e.to_string(),
        })?;
        config.validate(&source)?;
        Ok(config)
    }

    /// Reads the file at `path`; a missing file means defaults, since a root filesystem without a
    /// configuration must still boot.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_yaml(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ConfigError::Read {
                origin: Source::File(path.to_path_buf()),
                reason: e.to_string(),
            }),
        }
    }

    /// Applies `openshell.*` keys from a kernel command line, then validates the result.
    pub fn apply_cmdline(&mut self, cmdline: &Cmdline) -> Result<(), ConfigError> {
        let src = Source::Cmdline;
        for (key, value) in &cmdline.pairs {
            let Some(field) = key.strip_prefix(CMDLINE_PREFIX) else {
                continue;
            };
            let full = key.as_str();
            match field {
                // Consumed by the caller to pick the file, before overrides apply.
                "config" => {}
                "hostname" => self.hostname = value.clone(),
                // A command asked for at boot replaces whatever the root would run, k3s too.
                "exec" => {
                    self.workload.argv = decode_argv(value)
                        .map_err(|reason| ConfigError::invalid(&src, full, reason))?;
                    self.k3s = None;
                }
                "cwd" => self.workload.cwd = value.clone(),
                "state_disk" => {
                    StateDisk::check_device(value)
                        .map_err(|reason| ConfigError::invalid(&src, full, reason))?;
                    self.state_disk.device = Some(value.clone());
                }
                "grace_ms" => self.shutdown.grace_ms = parse_num(&src, full, value)?,
                "dhcp_timeout_ms" => self.network.dhcp_timeout_ms = parse_num(&src, full, value)?,
                "interface" => self.network.interface = value.clone(),
                "host_ports" => {
                    self.network.host_ports = parse_host_ports(value)
                        .map_err(|reason| ConfigError::invalid(&src, full, reason))?
                }
                "router_is_host_loopback" => {
                    self.network.router_is_host_loopback = match value.as_str() {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => {
                            return Err(ConfigError::invalid(
                                &src,
                                full,
                                format!("`{value}`: 1, 0, true or false"),
                            ))
                        }
                    }
                }
                "host_time" => self.host_time_s = Some(parse_num(&src, full, value)?),
                "channel_port" => self.channel.port = parse_num(&src, full, value)?,
                "connect_timeout_ms" => {
                    self.channel.connect_timeout_ms = parse_num(&src, full, value)?
                }
                _ => {
                    if let Some(name) = field.strip_prefix("env.") {
                        self.workload.env.insert(
                            name.to_string(),
                            percent_decode(value)
                                .map_err(|reason| ConfigError::invalid(&src, full, reason))?,
                        );
                    } else {
                        return Err(ConfigError::invalid(&src, full, "unknown key"));
                    }
                }
            }
        }
        self.validate(&src)
    }

    /// Checks values serde cannot: ranges, formats, consistency.
    pub fn validate(&self, source: &Source) -> Result<(), ConfigError> {
        validate_hostname(&self.hostname)
            .map_err(|r| ConfigError::invalid(source, "hostname", r))?;
        self.validate_workload(source)?;
        ensure(
            self.shutdown.grace_ms <= MAX_GRACE_MS,
            source,
            "shutdown.grace_ms",
            format!("must be at most {MAX_GRACE_MS} (one hour)"),
        )?;
        // Ports below 1024 are reserved by vsock conventions; 0 and u32::MAX mean "any".
        ensure(
            self.channel.port >= 1024 && self.channel.port != u32::MAX,
            source,
            "channel.port",
            "must be between 1024 and 4294967294",
        )?;
        for (i, prefix) in self.kine.prune_prefixes.iter().enumerate() {
            // A prefix of "/" or one that does not name a key space would prune the whole cluster.
            ensure(
                prefix.starts_with('/') && prefix.len() >= 2 && prefix.ends_with('/'),
                source,
                &format!("kine.prune_prefixes[{i}]"),
                format!("`{prefix}` must look like /registry/<kind>/ (leading and trailing slash)"),
            )?;
        }
        self.validate_network(source)?;
        ensure(
            self.kine.vacuum_free_percent <= 100,
            source,
            "kine.vacuum_free_percent",
            "must be at most 100",
        )?;
        ensure(
            self.channel.connect_timeout_ms <= 60_000,
            source,
            "channel.connect_timeout_ms",
            "must be at most 60000",
        )?;
        self.validate_manifests(source)?;
        if let Some(device) = &self.state_disk.device {
            StateDisk::check_device(device)
                .map_err(|r| ConfigError::invalid(source, "state_disk.device", r))?;
        }
        if let Some(k3s) = &self.k3s {
            k3s.validate(source)?;
        }
        // Certificates are issued for ten years: a margin that long would reissue every boot.
        ensure(
            self.pki.renew_before_days < 3650,
            source,
            "pki.renew_before_days",
            "must be less than 3650 (the certificates' lifetime)",
        )
    }

    /// The workload's program, arguments, environment and directory.
    fn validate_workload(&self, source: &Source) -> Result<(), ConfigError> {
        let w = &self.workload;
        let program = w.argv.first().map(String::as_str).unwrap_or_default();
        ensure(
            !w.argv.is_empty(),
            source,
            "workload.argv",
            "must name a program",
        )?;
        ensure(
            program.starts_with('/'),
            source,
            "workload.argv",
            format!("program `{program}` must be an absolute path"),
        )?;
        ensure(
            !w.argv.iter().any(|a| a.contains('\0')),
            source,
            "workload.argv",
            "contains a NUL byte",
        )?;
        for (name, value) in &w.env {
            let field = format!("workload.env.{name}");
            ensure(
                valid_env_name(name),
                source,
                &field,
                "not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)",
            )?;
            ensure(!value.contains('\0'), source, &field, "contains a NUL byte")?;
        }
        ensure(
            w.cwd.starts_with('/'),
            source,
            "workload.cwd",
            "must be an absolute path",
        )
    }

    /// The guest's interface, static plans, host ports and DHCP timeout.
    fn validate_network(&self, source: &Source) -> Result<(), ConfigError> {
        let n = &self.network;
        for (field, plan) in [
            ("network.fallback.prefix", &n.fallback),
            ("network.no_device.prefix", &n.no_device),
        ] {
            ensure(
                (1..=32).contains(&plan.prefix),
                source,
                field,
                "must be 1 to 32",
            )?;
        }
        let ifname = &n.interface;
        ensure(
            !(ifname.is_empty()
                || ifname.len() > 15
                || ifname.contains('/')
                || ifname.contains(' ')),
            source,
            "network.interface",
            format!("`{ifname}` is not an interface name"),
        )?;
        check_host_ports(&n.host_ports)
            .map_err(|reason| ConfigError::invalid(source, "network.host_ports", reason))?;
        ensure(
            (1..=120_000).contains(&n.dhcp_timeout_ms),
            source,
            "network.dhcp_timeout_ms",
            "must be 1 to 120000",
        )
    }

    fn validate_manifests(&self, source: &Source) -> Result<(), ConfigError> {
        let gw = &self.manifests.gateway;
        ensure(
            !gw.db_url.trim().is_empty(),
            source,
            "manifests.gateway.db_url",
            "must not be empty",
        )?;
        let ip = &gw.host_gateway_ip;
        ensure(
            ip.is_empty() || ip.parse::<std::net::IpAddr>().is_ok(),
            source,
            "manifests.gateway.host_gateway_ip",
            format!("`{ip}` is not an IP address (leave it empty to let the gateway decide)"),
        )?;
        let host = &gw.ssh_gateway_host;
        ensure(
            !host.chars().any(|c| c.is_whitespace() || c.is_control()),
            source,
            "manifests.gateway.ssh_gateway_host",
            format!("`{host}` is not a host name"),
        )?;
        for (field, value) in [
            ("manifests.gateway.image_repository", &gw.image_repository),
            ("manifests.gateway.image_tag", &gw.image_tag),
        ] {
            if let Some(v) = value {
                ensure(
                    is_token(v),
                    source,
                    field,
                    format!("`{v}` must be non-empty without spaces (omit it to keep the chart's)"),
                )?;
            }
        }
        Ok(())
    }
}

impl K3s {
    fn validate(&self, source: &Source) -> Result<(), ConfigError> {
        ensure(
            self.binary.starts_with('/') && !self.binary.contains('\0'),
            source,
            "k3s.binary",
            format!("`{}` must be an absolute path", self.binary),
        )?;
        // Comma-joined into one flag each: an item with a comma or space would split or break it.
        for (name, list) in [("disable", &self.disable), ("tls_sans", &self.tls_sans)] {
            for (i, item) in list.iter().enumerate() {
                ensure(
                    is_token(item) && !item.contains(','),
                    source,
                    &format!("k3s.{name}[{i}]"),
                    format!("`{item}` must be non-empty, without commas or spaces"),
                )?;
            }
        }
        ensure(
            is_token(&self.snapshotter),
            source,
            "k3s.snapshotter",
            format!("`{}` is not a snapshotter name", self.snapshotter),
        )?;
        ensure(
            ["iptables", "ipvs", "nftables"].contains(&self.kube_proxy_mode.as_str()),
            source,
            "k3s.kube_proxy_mode",
            format!(
                "`{}` must be iptables, ipvs or nftables",
                self.kube_proxy_mode
            ),
        )?;
        let k = &self.kubelet;
        for (field, value) in [
            ("k3s.kubelet.eviction_hard", &k.eviction_hard),
            (
                "k3s.kubelet.eviction_minimum_reclaim",
                &k.eviction_minimum_reclaim,
            ),
            (
                "k3s.kubelet.runtime_request_timeout",
                &k.runtime_request_timeout,
            ),
        ] {
            ensure(
                is_token(value),
                source,
                field,
                format!("`{value}` must be non-empty without spaces"),
            )?;
        }
        // The kubelet refuses to start unless low < high <= 100.
        ensure(
            k.image_gc_high_threshold <= 100,
            source,
            "k3s.kubelet.image_gc_high_threshold",
            "must be at most 100",
        )?;
        ensure(
            k.image_gc_low_threshold < k.image_gc_high_threshold,
            source,
            "k3s.kubelet.image_gc_low_threshold",
            "must be below image_gc_high_threshold",
        )?;
        ensure(
            self.gateway_port != 0,
            source,
            "k3s.gateway_port",
            "must not be 0",
        )?;
        let r = &self.readiness;
        for (field, ms) in [
            ("k3s.readiness.apiserver_ready_ms", r.apiserver_ready_ms),
            ("k3s.readiness.node_ready_ms", r.node_ready_ms),
            ("k3s.readiness.gateway_ready_ms", r.gateway_ready_ms),
        ] {
            ensure(
                (1..=3_600_000).contains(&ms),
                source,
                field,
                "must be 1 to 3600000",
            )?;
        }
        for (i, arg) in self.extra_args.iter().enumerate() {
            ensure(
                !arg.is_empty() && !arg.contains('\0'),
                source,
                &format!("k3s.extra_args[{i}]"),
                "must be non-empty without NUL bytes",
            )?;
        }
        Ok(())
    }
}

/// Non-empty, no whitespace or control characters: safe to put in one command-line argument.
fn is_token(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn parse_num<T: std::str::FromStr>(src: &Source, field: &str, value: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e: T::Err| ConfigError::invalid(src, field, format!("`{value}`: {e}")))
}

fn validate_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("`{name}` must be 1 to 63 characters"));
    }
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "`{name}` is not a DNS label (lowercase letters, digits, inner hyphens)"
        ));
    }
    Ok(())
}

/// Environment names the guest accepts, as the old exec agent did.
pub fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The kernel command line split into `key=value` pairs (bare words get an empty value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    pub pairs: Vec<(String, String)>,
}

impl Cmdline {
    /// Splits on whitespace, honouring double quotes the way the kernel does.
    pub fn parse(text: &str) -> Self {
        let mut pairs = Vec::new();
        let mut word = String::new();
        let mut in_quotes = false;
        let mut flush = |word: &mut String| {
            if !word.is_empty() {
                let (k, v) = word.split_once('=').unwrap_or((word.as_str(), ""));
                pairs.push((k.to_string(), v.to_string()));
                word.clear();
            }
        };
        for c in text.chars() {
            match c {
                '"' => in_quotes = !in_quotes,
                c if c.is_whitespace() && !in_quotes => flush(&mut word),
                c => word.push(c),
            }
        }
        flush(&mut word);
        Self { pairs }
    }

    /// Last value given for `key` (the kernel's own rule: later wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Encodes an argv for `openshell.exec=`: elements joined by `,`, each percent-encoded so that
/// spaces, commas, quotes and control characters survive the kernel command line.
pub fn encode_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| percent_encode(a))
        .collect::<Vec<_>>()
        .join(",")
}

/// Inverse of [`encode_argv`].
pub fn decode_argv(text: &str) -> Result<Vec<String>, String> {
    if text.is_empty() {
        return Err("empty command".into());
    }
    text.split(',').map(percent_decode).collect()
}

/// Percent-encodes everything outside a conservative safe set.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.:@+=".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i} of `{s}`"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file() -> PathBuf {
        PathBuf::from("/etc/openshell/init.yaml")
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(
            BootConfig::from_yaml("", &file()),
            Ok(BootConfig::default())
        );
    }

    #[test]
    fn full_file_parses() {
        let c = BootConfig::from_yaml(
            "hostname: gw\nworkload:\n  argv: [/bin/k3s, server]\n  env: {A: b}\n  cwd: /root\nshutdown:\n  grace_ms: 5\nchannel:\n  port: 2000\n",
            &file(),
        )
        .expect("valid");
        assert_eq!(c.hostname, "gw");
        assert_eq!(c.workload.argv, ["/bin/k3s", "server"]);
        assert_eq!(c.workload.env["A"], "b");
        assert_eq!(c.shutdown.grace_ms, 5);
        assert_eq!(c.channel.port, 2000);
    }

    #[test]
    fn type_errors_name_file_and_field() {
        let err = BootConfig::from_yaml("shutdown:\n  grace_ms: soon\n", &file()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/etc/openshell/init.yaml"), "{text}");
        assert!(text.contains("shutdown.grace_ms"), "{text}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = BootConfig::from_yaml("workload:\n  args: [/bin/sh]\n", &file()).unwrap_err();
        assert!(err.to_string().contains("args"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        for (yaml, field) in [
            ("hostname: Not_Valid\n", "hostname"),
            ("workload:\n  argv: []\n", "workload.argv"),
            ("workload:\n  argv: [sh]\n", "workload.argv"),
            ("workload:\n  env: {1X: y}\n", "workload.env.1X"),
            ("workload:\n  cwd: rel\n", "workload.cwd"),
            ("shutdown:\n  grace_ms: 99999999\n", "shutdown.grace_ms"),
            ("channel:\n  port: 5\n", "channel.port"),
            ("kine:\n  prune_prefixes: [/]\n", "kine.prune_prefixes[0]"),
            (
                "kine:\n  prune_prefixes: [/registry/pods/, registry]\n",
                "kine.prune_prefixes[1]",
            ),
            (
                "kine:\n  vacuum_free_percent: 101\n",
                "kine.vacuum_free_percent",
            ),
            (
                "manifests:\n  gateway:\n    host_gateway_ip: gateway\n",
                "manifests.gateway.host_gateway_ip",
            ),
            (
                "manifests:\n  gateway:\n    db_url: ''\n",
                "manifests.gateway.db_url",
            ),
            (
                "manifests:\n  gateway:\n    image_tag: 'a b'\n",
                "manifests.gateway.image_tag",
            ),
            ("pki:\n  renew_before_days: 4000\n", "pki.renew_before_days"),
            ("k3s:\n  binary: k3s\n", "k3s.binary"),
            ("k3s:\n  disable: [traefik, 'a,b']\n", "k3s.disable[1]"),
            ("k3s:\n  tls_sans: ['']\n", "k3s.tls_sans[0]"),
            ("k3s:\n  snapshotter: 'over lay'\n", "k3s.snapshotter"),
            (
                "k3s:\n  kube_proxy_mode: userspace\n",
                "k3s.kube_proxy_mode",
            ),
            (
                "k3s:\n  kubelet:\n    image_gc_low_threshold: 100\n",
                "k3s.kubelet.image_gc_low_threshold",
            ),
            (
                "k3s:\n  kubelet:\n    image_gc_high_threshold: 101\n",
                "k3s.kubelet.image_gc_high_threshold",
            ),
            (
                "k3s:\n  kubelet:\n    runtime_request_timeout: ''\n",
                "k3s.kubelet.runtime_request_timeout",
            ),
            ("k3s:\n  gateway_port: 0\n", "k3s.gateway_port"),
            (
                "k3s:\n  readiness:\n    node_ready_ms: 0\n",
                "k3s.readiness.node_ready_ms",
            ),
            ("k3s:\n  extra_args: ['']\n", "k3s.extra_args[0]"),
            ("network:\n  host_ports: [0]\n", "network.host_ports"),
            ("network:\n  host_ports: [80, 80]\n", "network.host_ports"),
        ] {
            match BootConfig::from_yaml(yaml, &file()) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{yaml}"),
                other => panic!("{yaml}: expected invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn kine_keeps_pods_by_default_and_prunes_them_on_request() {
        let boot = Kine::default();
        assert!(!boot.prune_prefixes.iter().any(|p| p == Kine::PODS));
        for stale in ["/registry/leases/", "/registry/events/", "/bootstrap/"] {
            assert!(boot.prune_prefixes.iter().any(|p| p == stale), "{stale}");
        }
        let build = boot.pruning_pods();
        assert_eq!(build.prune_prefixes[0], Kine::PODS);
        assert_eq!(build.prune_prefixes[1..], boot.prune_prefixes[..]);
        assert_eq!(build.pruning_pods(), build, "added once");
        let c = BootConfig::from_yaml("kine:\n  prune_prefixes: [/registry/pods/]\n", &file())
            .expect("valid");
        assert_eq!(c.kine.prune_prefixes, [Kine::PODS]);
    }

    #[test]
    fn manifest_values_default_to_what_the_vm_always_used() {
        let gw = BootConfig::from_yaml("manifests: {}\n", &file())
            .expect("valid")
            .manifests
            .gateway;
        assert_eq!(gw.image_pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(gw.sandbox_image_pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(gw.db_url, "sqlite:/tmp/openshell.db");
        assert_eq!((gw.ssh_gateway_host.as_str(), gw.ssh_gateway_port), ("", 0));
        assert!(!gw.disable_gateway_auth && !gw.disable_tls);
        assert_eq!(gw.host_gateway_ip, "");
        assert_eq!((gw.image_repository, gw.image_tag), (None, None));
        let c = BootConfig::from_yaml(
            "manifests:\n  gateway:\n    image_pull_policy: Always\n    image_tag: dev\n    ssh_gateway_port: 2222\npki:\n  renew_before_days: 7\n",
            &file(),
        )
        .expect("valid");
        assert_eq!(c.manifests.gateway.image_pull_policy, PullPolicy::Always);
        assert_eq!(c.manifests.gateway.image_tag.as_deref(), Some("dev"));
        assert_eq!(c.manifests.gateway.ssh_gateway_port, 2222);
        assert_eq!(c.pki.renew_before_days, 7);
        let err = BootConfig::from_yaml(
            "manifests:\n  gateway:\n    image_pull_policy: Sometimes\n",
            &file(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("image_pull_policy"), "{err}");
    }

    #[test]
    fn k3s_section_is_optional_and_defaults_to_the_vms_command_line() {
        assert_eq!(BootConfig::default().k3s, None);
        let base = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../rootfs/base/etc/openshell/init.yaml"
        ))
        .expect("base profile");
        assert_eq!(
            BootConfig::from_yaml(&base, &file()).expect("valid").k3s,
            None
        );
        let k = BootConfig::from_yaml("k3s: {}\n", &file())
            .expect("valid")
            .k3s
            .expect("present");
        assert_eq!(k, K3s::default());
        assert_eq!(k.binary, "/usr/local/bin/k3s");
        assert_eq!(k.gateway_port, 30051);
        let k = BootConfig::from_yaml(
            "k3s:\n  gateway_port: 8080\n  readiness:\n    apiserver_ready_ms: 5\n",
            &file(),
        )
        .expect("valid")
        .k3s
        .expect("present");
        assert_eq!(k.gateway_port, 8080);
        assert_eq!(k.readiness.apiserver_ready_ms, 5);
        assert_eq!(k.readiness.node_ready_ms, 120_000);
        let err = BootConfig::from_yaml("k3s:\n  bogus: 1\n", &file()).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn cmdline_overrides_file() {
        let mut c = BootConfig::default();
        let cl = Cmdline::parse(
            "console=ttyS0 quiet openshell.hostname=node1 openshell.exec=/bin/sh,-c,exit%207 openshell.env.FOO=a%20b openshell.grace_ms=250",
        );
        c.apply_cmdline(&cl).expect("valid");
        assert_eq!(c.hostname, "node1");
        assert_eq!(c.workload.argv, ["/bin/sh", "-c", "exit 7"]);
        assert_eq!(c.workload.env["FOO"], "a b");
        assert_eq!(c.shutdown.grace_ms, 250);
    }

    /// `up --exec` on a gateway root runs the command, not k3s.
    #[test]
    fn a_boot_command_replaces_k3s() {
        let mut c = BootConfig::from_yaml("k3s: {}\n", &file()).expect("valid");
        assert!(c.k3s.is_some());
        c.apply_cmdline(&Cmdline::parse("openshell.hostname=gw"))
            .expect("valid");
        assert!(c.k3s.is_some(), "other keys leave k3s alone");
        c.apply_cmdline(&Cmdline::parse("openshell.exec=/bin/true"))
            .expect("valid");
        assert!(c.k3s.is_none());
        assert_eq!(c.workload.argv, ["/bin/true"]);
    }

    #[test]
    fn cmdline_errors_name_the_key() {
        for (line, key) in [
            ("openshell.grace_ms=x", "openshell.grace_ms"),
            ("openshell.bogus=1", "openshell.bogus"),
            ("openshell.exec=%zz", "openshell.exec"),
            ("openshell.hostname=UPPER", "hostname"),
        ] {
            let mut c = BootConfig::default();
            match c.apply_cmdline(&Cmdline::parse(line)) {
                Err(ConfigError::Invalid { field, origin, .. }) => {
                    assert_eq!(field, key, "{line}");
                    assert_eq!(origin, Source::Cmdline);
                }
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    /// The host's key names the disk by serial; a `/dev/` path is for debugging; anything else
    /// is refused with the key named, from the command line and from the file alike.
    #[test]
    fn state_disk_is_a_serial_or_a_dev_path() {
        let mut c = BootConfig::default();
        assert_eq!(c.state_disk.device, None);
        c.apply_cmdline(&Cmdline::parse(&format!(
            "openshell.state_disk={STATE_DISK_SERIAL}"
        )))
        .expect("serial");
        assert_eq!(c.state_disk.device.as_deref(), Some(STATE_DISK_SERIAL));
        c.apply_cmdline(&Cmdline::parse("openshell.state_disk=/dev/loop3"))
            .expect("path");
        assert_eq!(c.state_disk.device.as_deref(), Some("/dev/loop3"));
        for bad in [
            "",
            "/etc/passwd",
            "/dev/",
            "/dev/../etc/shadow",
            "/dev//vda",
            "has space",
            "a-serial-longer-than-20",
            "semi;colon",
        ] {
            let mut c = BootConfig::default();
            match c.apply_cmdline(&Cmdline::parse(&format!("openshell.state_disk=\"{bad}\""))) {
                Err(ConfigError::Invalid { field, .. }) => {
                    assert_eq!(field, "openshell.state_disk", "{bad:?}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let err = BootConfig::from_yaml("state_disk:\n  device: /tmp/x\n", &file()).unwrap_err();
        assert!(err.to_string().contains("state_disk.device"), "{err}");
        let ok = BootConfig::from_yaml("state_disk:\n  device: /dev/vdb\n", &file()).expect("ok");
        assert_eq!(ok.state_disk.device.as_deref(), Some("/dev/vdb"));
    }

    /// No host loopback port by default; the host's list replaces the file's, and a bad one is
    /// named.
    /// The host's clock comes from the command line only; a file cannot set it.
    #[test]
    fn host_time_is_a_command_line_number() {
        let mut c = BootConfig::default();
        assert_eq!(c.host_time_s, None);
        c.apply_cmdline(&Cmdline::parse("openshell.host_time=1764633600"))
            .expect("valid");
        assert_eq!(c.host_time_s, Some(1_764_633_600));
        let err = BootConfig::default()
            .apply_cmdline(&Cmdline::parse("openshell.host_time=soon"))
            .unwrap_err();
        assert!(err.to_string().contains("openshell.host_time"), "{err}");
        assert!(BootConfig::from_yaml("host_time_s: 5\n", &file()).is_err());
    }

    #[test]
    fn host_ports_default_to_none_and_the_command_line_decides() {
        let n = Network::default();
        assert!(n.host_ports.is_empty());
        assert_eq!(
            n.host_loopback,
            ["192.168.127.254".parse::<std::net::Ipv4Addr>().expect("ip")]
        );
        let mut c =
            BootConfig::from_yaml("network:\n  host_ports: [22]\n", &file()).expect("valid");
        assert_eq!(c.network.host_ports, [22]);
        c.apply_cmdline(&Cmdline::parse("openshell.host_ports=8080,9000"))
            .expect("valid");
        assert_eq!(c.network.host_ports, [8080, 9000]);
        c.apply_cmdline(&Cmdline::parse("openshell.host_ports="))
            .expect("valid");
        assert!(c.network.host_ports.is_empty(), "empty means none");
        assert!(
            c.network.router_is_host_loopback,
            "assumed unless the host says"
        );
        c.apply_cmdline(&Cmdline::parse("openshell.router_is_host_loopback=0"))
            .expect("valid");
        assert!(!c.network.router_is_host_loopback);
        assert!(c
            .apply_cmdline(&Cmdline::parse("openshell.router_is_host_loopback=maybe"))
            .expect_err("maybe")
            .to_string()
            .contains("openshell.router_is_host_loopback"));
        assert_eq!(encode_host_ports(&[8080, 9000]), "8080,9000");
        assert_eq!(
            parse_host_ports(&encode_host_ports(&[1, 65535])),
            Ok(vec![1, 65535])
        );
        for (line, why) in [
            ("openshell.host_ports=80,x", "`x`"),
            ("openshell.host_ports=80,80", "listed twice"),
            ("openshell.host_ports=0", "port 0"),
            ("openshell.host_ports=70000", "`70000`"),
        ] {
            let err = BootConfig::default()
                .apply_cmdline(&Cmdline::parse(line))
                .expect_err(line);
            let text = err.to_string();
            assert!(
                text.contains("openshell.host_ports") && text.contains(why),
                "{text}"
            );
        }
        let many = (1..=33)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert!(parse_host_ports(&many)
            .expect_err("33")
            .contains("at most 32"));
    }

    #[test]
    fn cmdline_quotes_and_last_wins() {
        let cl = Cmdline::parse("a=1 b=\"x y\" a=2 flag");
        assert_eq!(cl.get("a"), Some("2"));
        assert_eq!(cl.get("b"), Some("x y"));
        assert_eq!(cl.get("flag"), Some(""));
        assert_eq!(cl.get("missing"), None);
    }

    proptest! {
        /// Over the whole `u64` range, from the command line and from the file: a grace is
        /// refused naming the field, or it is one PID 1 can add to its clock (with the host's
        /// margin on top) without overflowing.
        #[test]
        fn any_grace_is_refused_or_safe_to_add(
            ms in prop_oneof![any::<u64>(), 0..=MAX_GRACE_MS + 1, Just(u64::MAX)]
        ) {
            let mut c = BootConfig::default();
            let line = format!("openshell.grace_ms={ms}");
            match c.apply_cmdline(&Cmdline::parse(&line)) {
                Ok(()) => {
                    prop_assert!(ms <= MAX_GRACE_MS);
                    let grace = std::time::Duration::from_millis(c.shutdown.grace_ms);
                    prop_assert!(std::time::Instant::now().checked_add(grace * 2).is_some());
                }
                Err(ConfigError::Invalid { field, .. }) => {
                    prop_assert!(ms > MAX_GRACE_MS);
                    prop_assert_eq!(field, "shutdown.grace_ms");
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
            let yaml = format!("shutdown:\n  grace_ms: {ms}\n");
            prop_assert_eq!(BootConfig::from_yaml(&yaml, &file()).is_ok(), ms <= MAX_GRACE_MS);
            // What the host sends is clamped, never refused.
            prop_assert_eq!(grace(ms).as_millis() as u64, ms.min(MAX_GRACE_MS));
            prop_assert!(std::time::Instant::now().checked_add(grace(ms) * 2).is_some());
        }

        #[test]
        fn argv_survives_the_command_line(prog in "/[a-z/]{0,8}", args in proptest::collection::vec(".*", 0..6)) {
            let argv: Vec<String> = std::iter::once(prog).chain(args).collect();
            let encoded = encode_argv(&argv);
            prop_assert!(!encoded.contains(' ') && !encoded.contains('"'));
            let line = format!("quiet openshell.exec={encoded} x=y");
            let parsed = Cmdline::parse(&line);
            prop_assert_eq!(decode_argv(parsed.get("openshell.exec").unwrap_or_default()), Ok(argv));
        }
    }
}
