//! The boot context: what every phase, and the k3s workload after them, may look at (the root
//! that guest paths are joined to, the reporter, the configuration once read, the node IP once
//! configured). Phases share it by reference; the engine only passes it on.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use openshell_init::guest_path::under;
use openshell_shared::BootConfig;

use crate::reporter::Reporter;

/// Everything a phase may look at. Paths inside the guest are always joined to `root`, which is
/// `/` in the VM and a scratch directory when a phase runs alone on a host.
pub struct Ctx {
    pub root: PathBuf,
    pub reporter: Arc<Reporter>,
    /// True when running as the VM's PID 1 (phases may then touch the real system).
    pub pid1: bool,
    /// Configuration file to read instead of the one the command line or default names.
    pub config_file: Option<PathBuf>,
    /// Kernel command line to use instead of `<root>/proc/cmdline`.
    pub cmdline: Option<String>,
    /// Set by the `config` phase; read by the phases after it.
    pub config: OnceLock<BootConfig>,
    /// Set by the `network` phase to the address it configured; k3s's `--node-ip`.
    pub node_ip: OnceLock<Ipv4Addr>,
    /// Set by the `state-disk` phase once the disk is mounted and bound, so later phases can
    /// name the disk their files are on.
    pub state_disk: OnceLock<StateDiskInUse>,
}

/// The state disk as the `state-disk` phase left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDiskInUse {
    /// The device node as the guest sees it (`/dev/vdb`).
    pub device: String,
    /// How the host named it: a virtio-blk serial, or the same path.
    pub named: String,
    /// Guest paths now bound onto the disk.
    pub bound: Vec<&'static str>,
}

impl StateDiskInUse {
    /// Whether `guest_path` lies on the disk (under one of the bound paths).
    pub fn holds(&self, guest_path: &str) -> bool {
        self.bound.iter().any(|b| {
            guest_path == *b
                || guest_path
                    .strip_prefix(b)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

impl Ctx {
    pub fn new(root: &Path, reporter: Arc<Reporter>, pid1: bool) -> Self {
        Self {
            root: root.to_path_buf(),
            reporter,
            pid1,
            config_file: None,
            cmdline: None,
            config: OnceLock::new(),
            node_ip: OnceLock::new(),
            state_disk: OnceLock::new(),
        }
    }

    /// `path` (absolute, as the guest sees it) under this context's root.
    pub fn path(&self, path: &str) -> PathBuf {
        under(&self.root, path)
    }

    /// The configuration, or the defaults when the `config` phase has not run (a phase run
    /// alone on a host).
    pub fn config(&self) -> &BootConfig {
        self.config.get_or_init(BootConfig::default)
    }
}

#[cfg(test)]
impl Ctx {
    /// A context for a phase's tests: `root`, events on the console with no boot channel, not
    /// PID 1.
    pub fn for_test(root: &Path) -> Self {
        let reporter = Reporter::new(crate::reporter::Sink::Console, 0);
        reporter.disable_channel();
        Self::new(root, reporter, false)
    }
}
