//! Starting a boot: reports the open-file limit, checks the inputs, sizes the VM, makes the state
//! disk ready, prepares the run directory, picks the backend and qemu's accelerator, listens on
//! the boot channel, starts the helpers and the VMM, records the instance for `down` and
//! `status`, and starts the VMM's reaper. gvproxy's forwards are left to
//! the loop, which makes them once the guest confirms its refusals.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use openshell_shared::sizing::VmSizing;
use openshell_shared::Arch;
use serde_json::json;

use super::args::UpArgs;
use super::error::UpError;
use super::event::{wrap_channel, Event};
use super::helpers;
use super::session::Session;
use super::vmm::{self, StartedVmm};
use crate::backend::accel::AccelChoice;
use crate::backend::qemu::Qemu;
use crate::backend::spec::{kernel_cmdline, state_disk_cmdline, Engine, VmSpec};
use crate::backend::Chosen;
use crate::channel::Channel;
use crate::children::Helper;
use crate::lifecycle::state::{self as instance, InstanceState};
use crate::lifecycle::state_disk::{self, Request};
use crate::net::choice::{self, Network, Search};
use crate::net::{Forward, NetBackend};
use crate::progress::Progress;
use crate::report::Timeline;
use crate::rundir::RunDir;

/// A VM that runs, and what the loop needs to follow it.
pub struct Started {
    pub vmm: StartedVmm,
    /// When the VMM started, in microseconds since `up` started.
    pub vmm_started_us: u64,
    pub console_log: PathBuf,
    /// The host port users reach the gateway on, for the stored metadata and the probe.
    pub gateway_forward: Option<u16>,
    /// The host port kubectl reaches k3s's API server on, for the written kubeconfig.
    pub api_forward: Option<u16>,
    /// The boot channel's write side, set once the guest connects.
    pub writer: Arc<Mutex<Option<UnixStream>>>,
    /// gvproxy's API socket and the forwards to make through it, once the guest confirms its
    /// refusals (`network_guarded`).
    pub gvproxy_forwards: Option<(PathBuf, Vec<Forward>)>,
    waiter: JoinHandle<()>,
}

impl Started {
    /// After the loop saw the VMM exit: waits for its reaper, and forgets a qemu [`Helper`]
    /// without stopping it (already reaped: its pid may be reused).
    pub fn reaped(self, helpers: &mut Vec<Helper>) {
        let _ = self.waiter.join();
        if let Some(index) = self.vmm.helper {
            drop(helpers.remove(index));
        }
    }
}

/// Starts everything a boot needs; every process started joins `session` so it is stopped on
/// every way out. `clock` is when `up` started; threads report to `tx`.
pub fn start(
    args: &UpArgs,
    clock: Instant,
    tx: &SyncSender<Event>,
    progress: &Progress,
    timeline: &mut Timeline,
    session: &mut Session,
) -> Result<Started, UpError> {
    let now = || clock.elapsed().as_micros() as u64;
    report_open_files(progress, timeline, now());
    check_inputs(args)?;
    let sizing = size_vm(args, progress, timeline, now())?;
    let disk = prepare_disk(args, progress, timeline, session, now())?;
    let network = choose_network(args, progress, timeline, now())?;
    progress.note(&crate::net::host_loopback_summary(
        network.backend,
        &args.host_ports,
    ));
    let dir = run_dir(args, progress)?;
    session.run_dir = Some(dir.clone());
    let (backend, accel) = choose_vmm(args, progress, timeline, now())?;

    // Listen first: the guest connects as soon as its config phase is done.
    let channel = Channel::listen(&dir.channel_socket())?;
    let writer: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
    channel.serve(clock, tx.clone(), wrap_channel, Arc::clone(&writer));

    let (forwards, net_socket) = start_helpers(args, &network, &dir, &backend, progress, session)?;
    let host_port = |guest| forwards.iter().find(|f| f.guest == guest).map(|f| f.host);
    let gateway_forward = host_port(crate::net::GATEWAY_PORT);
    let api_forward = host_port(crate::kubeconfig::API_PORT);
    timeline.host(now(), "helpers-ready", json!(null));

    let console_log = args
        .console_log
        .clone()
        .unwrap_or_else(|| dir.console_log());
    crate::rundir::prepare_console_log(&console_log)?;
    timeline.console_log = Some(console_log.clone());
    let mut spec = with_host_time(
        vm_spec(
            args,
            accel.as_ref().map_or(Engine::Kvm, |a| a.engine),
            network.backend,
            &dir,
            net_socket,
            &console_log,
            disk,
        ),
        std::time::SystemTime::now(),
    );
    (spec.cpus, spec.memory_mib) = (sizing.vm.cpus, sizing.vm.memory_mib);
    let vmm = vmm::start(
        &backend,
        network.backend,
        args,
        &spec,
        &dir,
        session.disk_lock.as_ref(),
        &mut session.helpers,
    )?;
    let vmm_started_us = now();
    record_instance(args, &vmm, &forwards, &dir, &console_log, session)?;
    timeline.summary.vmm_started_us = Some(vmm_started_us);
    timeline.host(
        vmm_started_us,
        "vmm-started",
        json!({ "pid": vmm.pid, "cmdline": spec.cmdline }),
    );
    progress.note(&starting_line(
        args.arch,
        &vmm,
        vmm_started_us,
        accel.as_ref(),
        &sizing,
        &console_log,
    ));
    // Reap the VMM on its own thread so its exit is an event like any other.
    let waiter = vmm::watch(vmm.pid, tx.clone());
    // Exposed by the loop once the guest confirms it refuses gvproxy's API, never before.
    let gvproxy_forwards = (network.backend == NetBackend::Gvproxy && !forwards.is_empty())
        .then(|| (dir.gvproxy_api_socket(), forwards));
    Ok(Started {
        vmm,
        vmm_started_us,
        console_log,
        gateway_forward,
        api_forward,
        writer,
        gvproxy_forwards,
        waiter,
    })
}

/// The network's port forwards and the helpers that run beside the VMM (network, virtio-fs,
/// vsock), said in the progress; returns the forwards and the network's socket for the VMM.
fn start_helpers(
    args: &UpArgs,
    network: &Network,
    dir: &RunDir,
    backend: &Chosen,
    progress: &Progress,
    session: &mut Session,
) -> Result<(Vec<Forward>, Option<PathBuf>), UpError> {
    let forwards = crate::net::forwards(network.backend, &args.ports)?;
    let net_socket = helpers::start(args, network, dir, backend, &forwards, &mut session.helpers)?;
    if !forwards.is_empty() {
        let list: Vec<String> = forwards.iter().map(|f| f.to_string()).collect();
        progress.note(&format!(
            "forwarding {} ({})",
            list.join(", "),
            network.backend
        ));
    }
    Ok((forwards, net_socket))
}

/// The line that says the VM starts: arch, VMM and engine, pid, when, sizing and its source, and
/// where the console goes.
fn starting_line(
    arch: Arch,
    vmm: &StartedVmm,
    started_us: u64,
    accel: Option<&AccelChoice>,
    sizing: &crate::sizing::Sizing,
    console_log: &Path,
) -> String {
    let engine = match accel {
        Some(a) if a.fell_back => format!("/{} (KVM fell back)", a.engine.name()),
        Some(a) => format!("/{}", a.engine.name()),
        None => String::new(),
    };
    format!(
        "{} VM starting ({}{engine} pid {}, {:.1} ms after start; {sizing}); console: {}",
        arch.name(),
        vmm.name,
        vmm.pid,
        started_us as f64 / 1000.0,
        console_log.display()
    )
}

/// The network for this boot (see `net::choice`), said on a line of its own and in the timeline.
fn choose_network(
    args: &UpArgs,
    progress: &Progress,
    timeline: &mut Timeline,
    now_us: u64,
) -> Result<Network, UpError> {
    let network = choice::choose(
        args.net,
        args.gvproxy.as_deref(),
        &Search::from_env(),
        cfg!(target_os = "macos"),
    )?;
    progress.note(&network.to_string());
    timeline.host(
        now_us,
        "network",
        json!({ "backend": network.backend.name(), "why": network.why }),
    );
    Ok(network)
}

/// The state disk for this boot, ready and said on a line of its own and in the timeline; `None`
/// with `--no-state-disk` (then the session holds no disk lock).
fn prepare_disk(
    args: &UpArgs,
    progress: &Progress,
    timeline: &mut Timeline,
    session: &Session,
    now_us: u64,
) -> Result<Option<PathBuf>, UpError> {
    let (Some(lock), Some(sdir)) = (&session.disk_lock, &session.state) else {
        progress.note("state disk: none (--no-state-disk): the guest keeps its state in the root");
        timeline.host(now_us, "state-disk", json!(null));
        return Ok(None);
    };
    let disk = state_disk::prepare(sdir, Request::from_flag(args.state_disk_size), lock)?;
    progress.note(&disk.to_string());
    timeline.host(
        now_us,
        "state-disk",
        json!({ "path": disk.path, "size_bytes": disk.size, "action": disk.action.name() }),
    );
    Ok(Some(disk.path))
}

/// The open-file limit `main` raised, said on a line of its own (a warning when low) and in the
/// timeline.
fn report_open_files(progress: &Progress, timeline: &mut Timeline, now_us: u64) {
    match crate::nofile::at_start() {
        Some(Ok(raise)) => {
            let line = raise.describe();
            if raise.warning().is_some() {
                progress.error(&line);
            } else {
                progress.note(&line);
            }
            timeline.host(
                now_us,
                "open-files",
                json!({ "before": raise.before, "soft": raise.now, "hard": raise.hard,
                        "needed": crate::nofile::NEEDED }),
            );
        }
        Some(Err(e)) => progress.error(&format!("open files: cannot read or raise the limit: {e}")),
        None => {}
    }
}

/// The VM's vCPUs and memory (see `sizing`), clamping warnings said, recorded in the timeline.
fn size_vm(
    args: &UpArgs,
    progress: &Progress,
    timeline: &mut Timeline,
    now_us: u64,
) -> Result<crate::sizing::Sizing, UpError> {
    let sizing = crate::sizing::resolve(
        args.cpus,
        args.memory,
        args.rootfs_path(),
        crate::sizing::HostResources::this(),
    )?;
    for warning in &sizing.warnings {
        progress.error(&format!("warning: {warning}"));
    }
    timeline.host(
        now_us,
        "sizing",
        json!({ "cpus": sizing.vm.cpus, "memory_mib": sizing.vm.memory_mib,
                "source": sizing.source, "warnings": sizing.warnings }),
    );
    Ok(sizing)
}

/// The backend (see `backend::choose`) and, for qemu, its accelerator, each said on a line.
fn choose_vmm(
    args: &UpArgs,
    progress: &Progress,
    timeline: &mut Timeline,
    now_us: u64,
) -> Result<(Chosen, Option<AccelChoice>), UpError> {
    let (backend, note) = crate::backend::choose(
        args.backend,
        args.arch,
        args.libkrun.as_deref(),
        &crate::backend::Host::this(),
    )?;
    if let Some(note) = note {
        progress.note(&note);
    }
    let accel = choose_accel(args, &backend, progress, timeline, now_us)?;
    Ok((backend, accel))
}

/// qemu's accelerator (see `backend::accel`), said on a line of its own and in the timeline;
/// `None` for libkrun.
fn choose_accel(
    args: &UpArgs,
    backend: &Chosen,
    progress: &Progress,
    timeline: &mut Timeline,
    now_us: u64,
) -> Result<Option<AccelChoice>, UpError> {
    if !matches!(backend, Chosen::Qemu) {
        return Ok(None);
    }
    let program = Qemu {
        program: args.qemu.clone(),
    }
    .program(args.arch);
    let accel = crate::backend::accel::resolve(args.accel, args.arch, &program)?;
    progress.note(&format!("accelerator {}", accel.why));
    timeline.host(
        now_us,
        "accel",
        json!({ "engine": accel.engine.name(), "why": accel.why, "fell_back": accel.fell_back }),
    );
    Ok(Some(accel))
}

fn check_inputs(args: &UpArgs) -> Result<(), UpError> {
    openshell_shared::config::check_host_ports(&args.host_ports).map_err(UpError::HostPorts)?;
    if !args.kernel_path().is_file() {
        return Err(UpError::NoKernel(args.kernel_path().to_path_buf()));
    }
    if !args.rootfs_path().is_dir() {
        return Err(UpError::NoRootfs(args.rootfs_path().to_path_buf()));
    }
    // As root the guest's setuid files and device nodes are root's on the host: only root may
    // reach them (see `backend::qemu::virtiofsd_args`).
    if nix::unistd::geteuid().is_root() {
        crate::private_dir::check_closed_to_others(args.rootfs_path())
            .map_err(UpError::OpenRootfs)?;
    }
    Ok(())
}

/// The run directory (`--run-dir`, else the instance's), with sockets a killed run left removed.
fn run_dir(args: &UpArgs, progress: &Progress) -> Result<RunDir, UpError> {
    let dir = RunDir::create(
        &args
            .run_dir
            .clone()
            .unwrap_or_else(|| RunDir::default_path(&args.name)),
    )?;
    let stale = dir.clear_stale_sockets()?;
    if stale > 0 {
        progress.note(&format!(
            "removed {stale} stale sockets from a previous run"
        ));
    }
    Ok(dir)
}

/// The VM to start. An x86_64 guest under qemu's TCG gets the TSC options measured on this
/// machine (see `backend::tsc`) before any `--cmdline-extra`; a state disk is announced there too.
fn vm_spec(
    args: &UpArgs,
    engine: Engine,
    net: NetBackend,
    dir: &RunDir,
    net_socket: Option<PathBuf>,
    console_log: &Path,
    state_disk: Option<PathBuf>,
) -> VmSpec {
    let router_is_host_loopback = crate::net::router_is_host_loopback(net, &args.host_ports);
    let mut extra: Vec<String> = Vec::new();
    if state_disk.is_some() {
        extra.push(state_disk_cmdline());
    }
    if engine == Engine::Tcg {
        extra.extend(
            crate::backend::tcg_guest::OPTIONS
                .iter()
                .map(|o| o.to_string()),
        );
        if args.arch == Arch::X86_64 {
            let cache = instance::state_root().ok();
            if let Some(tsc) = crate::backend::tsc::cmdline_options(cache.as_deref()) {
                extra.push(tsc);
            }
            extra.extend(
                crate::backend::tcg_guest::X86_64_OPTIONS
                    .iter()
                    .map(|o| o.to_string()),
            );
        }
    }
    // Always given, even empty: the host's list replaces whatever the root's file says.
    extra.push(format!(
        "openshell.host_ports={} openshell.router_is_host_loopback={}",
        openshell_shared::config::encode_host_ports(&args.host_ports),
        u8::from(router_is_host_loopback)
    ));
    extra.extend(args.cmdline_extra.clone());
    VmSpec {
        arch: args.arch,
        kernel: args.kernel_path().to_path_buf(),
        cmdline: kernel_cmdline(args.arch, &args.exec, Some(&extra.join(" "))),
        memory_mib: VmSizing::BASE.memory_mib,
        cpus: VmSizing::BASE.cpus,
        engine,
        virtiofs_socket: dir.virtiofs_socket(),
        vsock_socket: dir.vsock_vhost_socket(),
        console_log: console_log.to_path_buf(),
        net_socket,
        state_disk,
    }
}

/// Tells the guest the host's clock (`openshell.host_time=`, seconds): a guest without a
/// real-time clock (aarch64 virt and libkrun here) starts in 1970 and would date its
/// certificates there. Last on the command line: nothing of the user's replaces it.
fn with_host_time(mut spec: VmSpec, now: std::time::SystemTime) -> VmSpec {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    spec.cmdline
        .push_str(&format!(" openshell.host_time={secs}"));
    spec
}

/// Writes the state file `down`, `status` and `--detach` read. Without it `down` could not find
/// the VM, so a VM that cannot be recorded is killed rather than left running.
fn record_instance(
    args: &UpArgs,
    vmm: &StartedVmm,
    forwards: &[Forward],
    dir: &RunDir,
    console_log: &Path,
    session: &mut Session,
) -> Result<(), UpError> {
    let record = InstanceState {
        name: args.name.clone(),
        host_pid: std::process::id(),
        vmm_pid: Some(vmm.pid),
        backend: vmm.name.to_string(),
        arch: args.arch.name().to_string(),
        started_at_unix_ms: instance::unix_ms(),
        ports: forwards.iter().map(|f| f.to_string()).collect(),
        run_dir: dir.path.clone(),
        console_log: console_log.to_path_buf(),
        report: args.report.clone(),
        ready_stages: Vec::new(),
        failed: None,
    };
    if let Some(Err(e)) = session.state.as_ref().map(|s| s.write_state(&record)) {
        vmm::kill(vmm.pid);
        return Err(e.into());
    }
    session.record = Some(record);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::up::args::parse;
    use std::ffi::OsStr;

    /// The spec carries the run directory's sockets, the console log and the workload; the TSC
    /// options are for qemu's TCG on x86_64 only, so this aarch64 guest has none.
    /// The host's clock goes last on the command line, in whole seconds.
    #[test]
    fn the_host_time_ends_the_command_line() {
        let args = parse(&["--kernel", "/k", "--rootfs", "/r"]).expect("parse");
        let dir = RunDir {
            path: "/run/x".into(),
        };
        let spec = vm_spec(
            &args,
            Engine::Tcg,
            NetBackend::Passt,
            &dir,
            None,
            Path::new("/c"),
            None,
        );
        let before = spec.cmdline.clone();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_764_633_600_900);
        let spec = with_host_time(spec, at);
        assert_eq!(
            spec.cmdline,
            format!("{before} openshell.host_time=1764633600")
        );
    }

    /// Every guest under TCG gets `backend::tcg_guest::OPTIONS`, an x86_64 one its
    /// `X86_64_OPTIONS` too, all of them: under KVM the defaults are kept.
    #[test]
    fn only_tcg_guests_get_the_tcg_options() {
        let dir = RunDir {
            path: "/run/x".into(),
        };
        // (every-arch options given, x86_64 options given), each all or none.
        let cmdline = |arch: &str, engine: Engine| {
            let args = parse(&["--kernel", "/k", "--rootfs", "/r", "--arch", arch]).expect("parse");
            let spec = vm_spec(
                &args,
                engine,
                NetBackend::Passt,
                &dir,
                None,
                Path::new("/c"),
                None,
            );
            let given: Vec<&str> = spec.cmdline.split(' ').collect();
            let all_or_none = |options: &[&str]| {
                let n = options.iter().filter(|o| given.contains(o)).count();
                assert!(n == 0 || n == options.len(), "all or none: {given:?}");
                n > 0
            };
            (
                all_or_none(crate::backend::tcg_guest::OPTIONS),
                all_or_none(crate::backend::tcg_guest::X86_64_OPTIONS),
            )
        };
        assert_eq!(cmdline("x86_64", Engine::Tcg), (true, true));
        assert_eq!(cmdline("aarch64", Engine::Tcg), (true, false));
        assert_eq!(cmdline("x86_64", Engine::Kvm), (false, false));
        assert_eq!(cmdline("aarch64", Engine::Kvm), (false, false));
    }

    #[test]
    fn the_vm_spec_is_made_from_the_arguments_and_the_run_dir() {
        let args = parse(&[
            "--kernel",
            "/k/Image",
            "--rootfs",
            "/images/root",
            "--arch",
            "aarch64",
            "--memory",
            "768",
            "--cpus",
            "2",
            "--cmdline-extra",
            "openshell.hostname=gw",
            "--exec",
            "/bin/true",
        ])
        .expect("parse");
        let dir = RunDir {
            path: "/run/x".into(),
        };
        let spec = vm_spec(
            &args,
            Engine::Tcg,
            NetBackend::Gvproxy,
            &dir,
            Some("/run/x/passt/passt.sock".into()),
            Path::new("/logs/console.log"),
            None,
        );
        assert_eq!(spec.arch, Arch::Aarch64);
        assert_eq!(spec.kernel, PathBuf::from("/k/Image"));
        assert_eq!(spec.virtiofs_socket, dir.virtiofs_socket());
        assert_eq!(spec.vsock_socket, dir.vsock_vhost_socket());
        assert_eq!(spec.console_log, PathBuf::from("/logs/console.log"));
        assert_eq!(
            spec.net_socket,
            Some(PathBuf::from("/run/x/passt/passt.sock"))
        );
        assert_eq!(
            spec.cmdline,
            kernel_cmdline(
                Arch::Aarch64,
                &["/bin/true".into()],
                Some("init_on_alloc=1 openshell.host_ports= openshell.router_is_host_loopback=0 openshell.hostname=gw")
            )
        );
        assert_eq!(spec.state_disk, None);
        // With a disk the guest is told, before the user's extra options.
        let with = vm_spec(
            &args,
            Engine::Tcg,
            NetBackend::Passt,
            &dir,
            None,
            Path::new("/logs/console.log"),
            Some("/s/state.img".into()),
        );
        assert_eq!(with.state_disk, Some(PathBuf::from("/s/state.img")));
        assert!(
            with.cmdline
                .ends_with(" openshell.state_disk=openshell-state init_on_alloc=1 openshell.host_ports= openshell.router_is_host_loopback=0 openshell.hostname=gw"),
            "{}",
            with.cmdline
        );
        let listed = parse(&[
            "--kernel",
            "/k/Image",
            "--rootfs",
            "/r",
            "--host-port",
            "8080",
            "--host-port",
            "9000",
        ])
        .expect("parse");
        let spec = vm_spec(
            &listed,
            Engine::Tcg,
            NetBackend::Passt,
            &dir,
            None,
            Path::new("/c"),
            None,
        );
        assert!(
            spec.cmdline
                .contains(" openshell.host_ports=8080,9000 openshell.router_is_host_loopback=1"),
            "{}",
            spec.cmdline
        );
    }

    #[test]
    fn a_missing_kernel_or_rootfs_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let kernel = tmp.path().join("bzImage");
        let rootfs = tmp.path().join("root");
        let args = |k: &Path, r: &Path| {
            parse(&[
                OsStr::new("--kernel"),
                k.as_os_str(),
                OsStr::new("--rootfs"),
                r.as_os_str(),
            ])
        };
        let err = check_inputs(&args(&kernel, &rootfs).expect("parse")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("kernel {} does not exist", kernel.display())
        );
        std::fs::write(&kernel, b"k").expect("kernel");
        let err = check_inputs(&args(&kernel, &rootfs).expect("parse")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("root filesystem {} is not a directory", rootfs.display())
        );
        std::fs::create_dir(&rootfs).expect("rootfs");
        check_inputs(&args(&kernel, &rootfs).expect("parse")).expect("both there");
        if nix::unistd::geteuid().is_root() {
            // Every directory up to it open to others: a guest's setuid files would be
            // anyone's way to root.
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            let err = check_inputs(&args(&kernel, &rootfs).expect("parse")).unwrap_err();
            assert!(
                err.to_string().contains("other users can reach it"),
                "{err}"
            );
        }
    }
}
