//! The boot phases, one module each, and the plan that orders them. A phase is a named step with
//! the phases it must run after; the engine runs independent phases concurrently.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use openshell_shared::BootConfig;

use crate::reporter::Reporter;

pub mod capabilities;
pub mod channel;
pub mod config;
pub mod exec_service;
pub mod hostname;
pub mod k3s_prep;
pub mod kine;
pub mod loopback;
pub mod manifests;
pub mod mounts;
pub mod network;
pub mod network_cleanup;
pub mod pki;
pub mod runtime_cleanup;

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
        }
    }

    /// `path` (absolute, as the guest sees it) under this context's root.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
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

/// How a phase that did not fail ended, with an optional one-line account of what it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Ok(Option<String>),
    Skipped(String),
}

pub type PhaseError = Box<dyn std::error::Error + Send + Sync>;
pub type PhaseResult = Result<Done, PhaseError>;

pub struct Phase {
    pub name: &'static str,
    pub after: &'static [&'static str],
    /// A failure stops the boot (nothing after it can work) instead of being reported and
    /// carried past.
    pub fatal: bool,
    /// Spends its time waiting on the world outside the guest's CPU (a DHCP server): on one CPU
    /// it runs on a thread of its own while the rest of its wave runs inline.
    pub waits: bool,
    pub purpose: &'static str,
    pub run: fn(&Ctx) -> PhaseResult,
}

impl std::fmt::Debug for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Phase")
            .field("name", &self.name)
            .field("after", &self.after)
            .field("fatal", &self.fatal)
            .finish()
    }
}

/// The boot plan, in a valid order; the engine derives concurrency from `after`. On one CPU,
/// phases that are ready at the same time run in this order (a waiting phase such as `network`
/// starts on its own thread as soon as it is ready): `channel` last, because once connected the
/// boot channel sends its backlog from a thread that would compete with the phases after it.
pub const PLAN: &[&Phase] = &[
    &mounts::PHASE,
    &config::PHASE,
    &exec_service::PHASE,
    &manifests::PHASE,
    &pki::PHASE,
    &runtime_cleanup::PHASE,
    &network_cleanup::PHASE,
    &kine::PHASE,
    &capabilities::PHASE,
    &hostname::PHASE,
    &loopback::PHASE,
    &network::PHASE,
    &k3s_prep::PHASE,
    &channel::PHASE,
];

pub fn find(name: &str) -> Option<&'static Phase> {
    PLAN.iter().copied().find(|p| p.name == name)
}
