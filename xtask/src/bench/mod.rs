//! `cargo xtask bench`: the subcommand's arguments and which benchmark each runs. Every
//! benchmark is a module of its own; what several share (statistics, the host's boot report)
//! lives in sibling modules, never here.

mod boot;
mod chart;
// Network namespaces: Linux only (xtask builds on macOS for `sign`).
#[cfg(target_os = "linux")]
mod dhcp;
mod disk;
mod host;
mod kernel_log;
mod kine;
mod profile;
mod state;
mod stats;
mod timeline;

use std::path::PathBuf;

use openshell_shared::Arch;

use crate::error::Result;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// kine pruning on a 200k-row database against the old sqlite3 DELETEs.
    Kine {
        #[arg(long, default_value_t = 200_000)]
        rows: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The state phases (kine, runtime-cleanup, manifests, capabilities) on a crashed gateway's
    /// root, outside a VM.
    State {
        /// kine rows: k3s compacts every 5 minutes and keeps about 1000 old revisions, so a small
        /// single-node cluster's database holds a few thousand rows.
        #[arg(long, default_value_t = 3_000)]
        rows: u64,
        #[arg(long, default_value_t = 30)]
        tasks: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// The host's own cost: `up` start to VMM start.
    Host {
        #[arg(long, default_value_t = Arch::host())]
        arch: Arch,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// What the guest executes while init boots (x86_64 under TCG), by function: init's own
    /// and the kernel's on init's behalf.
    Profile {
        /// How many functions each list shows.
        #[arg(long, default_value_t = 40)]
        top: usize,
    },
    /// Our DHCP client against busybox udhcpc, both against dnsmasq in network namespaces.
    Dhcp {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Boot timing, phase by phase, against the shell way, on both arches unless one is named.
    Boot {
        #[arg(long)]
        arch: Option<Arch>,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Write the results here as JSON.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Draw the median boot of each arch, and the shell way's, as a stacked bar chart.
        #[arg(long)]
        png: Option<PathBuf>,
        /// A `--out` file of the same bench on the commit before a change: host start to ready
        /// is checked against it (issue 18's ratios, `boot::READY_RATIO_TARGETS`).
        #[arg(long)]
        baseline: Option<PathBuf>,
    },
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        What::Boot {
            arch,
            runs,
            out,
            png,
            baseline,
        } => boot::run(arch, runs, out, png, baseline),
        What::Kine { rows, runs } => kine::run(rows, runs.max(1)),
        #[cfg(target_os = "linux")]
        What::Dhcp { runs } => dhcp::run(runs.max(1)),
        #[cfg(not(target_os = "linux"))]
        What::Dhcp { .. } => Err(crate::error::Error::msg(
            "bench dhcp runs in Linux network namespaces",
        )),
        What::Profile { top } => profile::run(top.max(1)),
        What::Host { arch, runs } => host::run(arch, runs.max(1)),
        What::State { rows, tasks, runs } => state::run(rows, tasks, runs.max(1)),
    }
}
