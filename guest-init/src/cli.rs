//! The command line for use outside the VM: print the plan, run one phase against a root
//! directory, or supervise a command the way PID 1 supervises the workload.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use openshell_shared::config::Workload;

use crate::context::Ctx;
use crate::engine;
use crate::phases;
use crate::power;
use crate::reporter::{Reporter, Sink};
use crate::supervisor::{self, Scope};

#[derive(Parser)]
#[command(
    name = "openshell-init",
    version,
    about = "PID 1 of the OpenShell gateway VM"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Print the boot phases in order with what each runs after.
    Plan,
    /// Run one phase against a root directory and print its events as JSON lines. As root it
    /// runs in private mount, UTS and network namespaces, so the host is left as it was.
    Phase {
        name: String,
        #[arg(long)]
        root: PathBuf,
        /// Configuration file (host path) instead of <root>/etc/openshell/init.yaml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Kernel command line to read instead of <root>/proc/cmdline.
        #[arg(long)]
        cmdline: Option<String>,
        /// Run in the caller's namespaces, changing the real system (e.g. network-cleanup
        /// under `nsenter --net=...` against a namespace's real links and mounts).
        #[arg(long)]
        in_place: bool,
        /// Stay this long after the phase, so what it leaves running in the background (the
        /// DHCP lease keeper) can be watched.
        #[arg(long, default_value_t = 0)]
        linger_ms: u64,
    },
    /// Run CMD as PID 1 runs the workload: own session, reaping orphans (as a subreaper),
    /// forwarding signals, SIGKILL after the grace period. Prints events as JSON lines.
    Supervise {
        #[arg(long, default_value_t = 10_000)]
        grace_ms: u64,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Run the `k3s-prep` phase against a root directory, then supervise <root><k3s.binary>
    /// the way PID 1 does, reporting the readiness stages. Prints events as JSON lines. Runs in
    /// the caller's namespaces except the hostname (private UTS namespace when root, so k3s
    /// registers the configured node name); without a `k3s` section, its defaults apply.
    K3s {
        #[arg(long)]
        root: PathBuf,
        /// Configuration file (host path) instead of <root>/etc/openshell/init.yaml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The node IP the network phase would have found (default: the configured fallback).
        #[arg(long)]
        node_ip: Option<Ipv4Addr>,
        /// Grace period after SIGTERM (default: the configured shutdown.grace_ms).
        #[arg(long)]
        grace_ms: Option<u64>,
    },
    /// Serve the exec protocol (what PID 1 serves on vsock port 10777) on a unix socket, so
    /// `openshell-host exec` and the tests can drive it on a host.
    ExecServe {
        #[arg(long, value_name = "PATH")]
        unix: PathBuf,
    },
    /// Debugging aid, in the guest only: connect to vsock CID (the host by default) on PORT,
    /// write the bytes given in hex, print what comes back (as text) until the peer closes. For
    /// testing the host's handling of a guest that breaks the boot channel protocol, and the
    /// exec service's refusal of guest-local peers.
    #[command(hide = true)]
    VsockSend {
        #[arg(long, default_value_t = crate::reporter::HOST_CID)]
        cid: u32,
        #[arg(long, default_value_t = openshell_shared::BOOT_CHANNEL_PORT)]
        port: u32,
        #[arg(long)]
        hex: String,
    },
    /// Debugging aid, in the guest only, for tests of the refusal of `network.blocked_tcp`:
    /// `--masquerade IFACE` masquerades traffic leaving IFACE as k3s's CNI does for pods, so a
    /// test's pod namespace is answered from outside; `--remove-refusal` deletes the `openshell`
    /// table, so a test can show that what it refused is otherwise answered; `--flush-refusal`
    /// deletes its rules and keeps the table, as `nft flush table` does.
    #[command(hide = true)]
    NftTest {
        #[arg(long, value_name = "IFACE")]
        masquerade: Option<String>,
        #[arg(long)]
        flush_refusal: bool,
        #[arg(long)]
        remove_refusal: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no phase named {0}; `openshell-init plan` lists them")]
    UnknownPhase(String),
    #[error("cannot isolate the phase in private namespaces: {0} (run as root)")]
    Unshare(nix::errno::Errno),
    #[error("configuration: {0}")]
    Config(String),
    #[error("root directory {path}: {source}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn main(init_entry_us: u64) -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Plan => {
            print!("{}", plan_text());
            0
        }
        Command::Phase {
            name,
            root,
            config,
            cmdline,
            in_place,
            linger_ms,
        } => match run_phase(&name, root, config, cmdline, in_place, init_entry_us) {
            Ok(ok) => {
                std::thread::sleep(Duration::from_millis(linger_ms));
                i32::from(!ok)
            }
            Err(e) => {
                eprintln!("openshell-init: {e}");
                2
            }
        },
        Command::Supervise { grace_ms, command } => supervise(grace_ms, command, init_entry_us),
        Command::K3s {
            root,
            config,
            node_ip,
            grace_ms,
        } => run_k3s(root, config, node_ip, grace_ms, init_entry_us),
        Command::ExecServe { unix } => exec_serve(&unix),
        Command::VsockSend { cid, port, hex } => vsock_send(cid, port, &hex),
        Command::NftTest {
            masquerade,
            flush_refusal,
            remove_refusal,
        } => nft_test(masquerade.as_deref(), flush_refusal, remove_refusal),
    }
}

fn nft_test(masquerade: Option<&str>, flush_refusal: bool, remove_refusal: bool) -> i32 {
    let mut failed = false;
    if let Some(out) = masquerade {
        if let Err(e) = crate::nftables::masquerade(out) {
            eprintln!("openshell-init: masquerade out {out}: {e}");
            failed = true;
        }
    }
    if flush_refusal {
        if let Err(e) = crate::nftables::flush_refusal() {
            eprintln!("openshell-init: flush the refusal: {e}");
            failed = true;
        }
    }
    if remove_refusal {
        if let Err(e) = crate::nftables::remove_refusal() {
            eprintln!("openshell-init: remove the refusal: {e}");
            failed = true;
        }
    }
    i32::from(failed)
}

fn vsock_send(cid: u32, port: u32, hex: &str) -> i32 {
    use std::io::{Read, Write};
    let Some(bytes) = decode_hex(hex) else {
        eprintln!("openshell-init: --hex: not an even number of hex digits");
        return 2;
    };
    let mut stream = match crate::reporter::connect_vsock(cid, port) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("openshell-init: vsock connect to {cid}:{port}: {e}");
            return 1;
        }
    };
    if let Err(e) = stream.write_all(&bytes) {
        eprintln!("openshell-init: vsock write: {e}");
        return 1;
    }
    // Stay connected until the peer reacts (closes): closing first could race its reading.
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    print!("{}", String::from_utf8_lossy(&answer));
    match read {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("openshell-init: vsock read: {e}");
            1
        }
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let digits = hex.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| {
            let hi = char::from(pair[0]).to_digit(16)?;
            let lo = char::from(pair[1]).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

fn exec_serve(path: &std::path::Path) -> i32 {
    match std::os::unix::net::UnixListener::bind(path) {
        Ok(listener) => {
            crate::exec_service::serve(listener, crate::exec_service::Reaping::Own, |line| {
                eprintln!("openshell-init: {line}")
            });
            0
        }
        Err(e) => {
            eprintln!("openshell-init: cannot listen on {}: {e}", path.display());
            2
        }
    }
}

/// The plan as printed by `plan`.
pub fn plan_text() -> String {
    let mut out = String::new();
    for (i, wave) in engine::waves(phases::PLAN)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        for p in wave {
            let after = if p.after.is_empty() {
                "-".to_string()
            } else {
                p.after.join(",")
            };
            out.push_str(&format!(
                "{:>2}  {:<10} after {:<16} {}{}\n",
                i + 1,
                p.name,
                after,
                p.purpose,
                if p.fatal { " [fatal]" } else { "" }
            ));
        }
    }
    out
}

fn run_phase(
    name: &str,
    root: PathBuf,
    config: Option<PathBuf>,
    cmdline: Option<String>,
    in_place: bool,
    init_entry_us: u64,
) -> Result<bool, CliError> {
    let phase = phases::find(name).ok_or_else(|| CliError::UnknownPhase(name.to_string()))?;
    let root = std::fs::canonicalize(&root).map_err(|source| CliError::Root {
        path: root.clone(),
        source,
    })?;
    if !in_place {
        isolate()?;
    }
    let reporter = Reporter::new(Sink::JsonLines, init_entry_us);
    reporter.disable_channel();
    let mut ctx = Ctx::new(&root, reporter, false);
    ctx.config_file = config;
    ctx.cmdline = cmdline;
    // Phases after `config` need the configuration: load it quietly first. One that does not
    // load is an error, never the defaults (a phase run with another policy than asked for).
    if phase.after.contains(&"config") {
        let (cfg, _) = phases::config::load(
            &ctx,
            &openshell_shared::Cmdline::parse(ctx.cmdline.as_deref().unwrap_or("")),
        )
        .map_err(|e| CliError::Config(e.to_string()))?;
        let _ = ctx.config.set(cfg);
    }
    Ok(engine::run_one(&ctx, phase).is_none())
}

/// Private mount, UTS and network namespaces, so mounts, hostname and links stay in them.
fn isolate() -> Result<(), CliError> {
    use nix::sched::{unshare, CloneFlags};
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWNET)
        .map_err(CliError::Unshare)?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(CliError::Unshare)
}

fn supervise(grace_ms: u64, command: Vec<String>, init_entry_us: u64) -> i32 {
    let reporter = Reporter::new(Sink::JsonLines, init_entry_us);
    reporter.disable_channel();
    if let Err(e) = supervisor::block_signals() {
        eprintln!("openshell-init: cannot block signals: {e}");
        return 125;
    }
    // Orphans of the workload come to us, as they come to PID 1 in the VM.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let workload = Workload {
        argv: command,
        env: std::env::vars().collect(),
        cwd: std::env::current_dir()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "/".into()),
    };
    let status = supervisor::run(
        &workload,
        Duration::from_millis(grace_ms),
        Scope::WorkloadGroup,
        &Arc::clone(&reporter),
    );
    power::finish(&reporter, status, false)
}

/// `k3s --root DIR`: the phase, then k3s under the supervisor. Returns k3s's status, 1 when
/// the phase failed, 2 on a bad root or configuration.
fn run_k3s(
    root: PathBuf,
    config: Option<PathBuf>,
    node_ip: Option<Ipv4Addr>,
    grace_ms: Option<u64>,
    init_entry_us: u64,
) -> i32 {
    // Before any thread exists (the phase may start the CNI link watcher), so all inherit it.
    if let Err(e) = supervisor::block_signals() {
        eprintln!("openshell-init: cannot block signals: {e}");
        return 125;
    }
    let root = match std::fs::canonicalize(&root) {
        Ok(r) => r,
        Err(source) => {
            eprintln!("openshell-init: {}", CliError::Root { path: root, source });
            return 2;
        }
    };
    let reporter = Reporter::new(Sink::JsonLines, init_entry_us);
    reporter.disable_channel();
    let mut ctx = Ctx::new(&root, Arc::clone(&reporter), false);
    ctx.config_file = config;
    let mut cfg = match phases::config::load(&ctx, &openshell_shared::Cmdline::default()) {
        Ok((cfg, _)) => cfg,
        Err(e) => {
            eprintln!("openshell-init: {e}");
            return 2;
        }
    };
    let k3s = cfg.k3s.get_or_insert_with(Default::default).clone();
    let hostname = cfg.hostname.clone();
    let grace = Duration::from_millis(grace_ms.unwrap_or(cfg.shutdown.grace_ms));
    let _ = ctx.config.set(cfg);
    if let Some(ip) = node_ip {
        let _ = ctx.node_ip.set(ip);
    }
    if nix::unistd::geteuid().is_root() {
        let named = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS)
            .and_then(|()| nix::unistd::sethostname(&hostname));
        if let Err(e) = named {
            reporter.log(
                openshell_shared::Level::Warn,
                format!("cannot set the hostname {hostname} in a private UTS namespace: {e}"),
            );
        }
    }
    // Orphans of k3s come to us, as they come to PID 1 in the VM.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    if engine::run_one(&ctx, &phases::k3s_prep::PHASE).is_some() {
        return 1;
    }
    let status = crate::k3s::supervise(&ctx, &k3s, grace, Scope::WorkloadGroup);
    power::finish(&reporter, status, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_lists_every_phase_after_its_dependencies() {
        let text = plan_text();
        let pos = |n: &str| {
            text.find(&format!("  {n} "))
                .unwrap_or_else(|| panic!("{n} in\n{text}"))
        };
        assert!(pos("mounts") < pos("config"));
        assert!(pos("config") < pos("hostname"));
        assert!(pos("config") < pos("loopback"));
        assert!(pos("config") < pos("channel"));
        assert!(text.contains("[fatal]"));
    }

    #[test]
    fn hex_decodes_and_rejects_bad_digits() {
        assert_eq!(decode_hex("ffFF00"), Some(vec![0xff, 0xff, 0]));
        assert_eq!(decode_hex(""), Some(vec![]));
        assert_eq!(decode_hex("f"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
