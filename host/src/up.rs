//! `openshell-host up`: starts the helper daemons and the VMM, follows the guest's boot over the
//! boot channel, and ends with the workload's exit status.
//!
//! Everything the main loop reacts to (guest messages, host signals, VMM exit) arrives as an
//! [`Event`] on one queue, so there is a single place that decides what happens next.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use openshell_shared::{GuestMessage, HostMessage};
use serde_json::json;

use crate::backend::libkrun::{self, LibkrunError};
use crate::backend::qemu::{Accel, Qemu};
use crate::backend::spec::{kernel_cmdline, VmSpec};
use crate::backend::{BackendChoice, Chosen};
use crate::channel::{self, Channel, ChannelEvent};
use crate::children::{ChildError, Helper};
use crate::lifecycle::reset::{self, ResetError};
use crate::lifecycle::state::{
    self as instance, InstanceLock, InstanceState, StateDir, StateError,
};
use crate::net::gvproxy::{self, ExposeError, Framing};
use crate::net::passt::{self, PasstDirError};
use crate::net::{Forward, ForwardError, NetBackend};
use crate::progress::Progress;
use crate::readiness::{Readiness, Step};
use crate::report::Timeline;
use crate::rundir::{RunDir, RunDirError};
use openshell_shared::Arch;

/// Exit codes of `up` besides the workload's own status.
pub mod code {
    /// Could not start (bad arguments, missing program, busy instance).
    pub const SETUP: i32 = 1;
    /// The VM ended without reporting an exit.
    pub const NO_EXIT: i32 = 2;
    /// The guest reported a fatal boot error.
    pub const GUEST_FATAL: i32 = 3;
    /// The guest broke the boot channel protocol.
    pub const PROTOCOL: i32 = 4;
    /// No hello from the guest in time.
    pub const TIMEOUT: i32 = 5;
}

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Guest architecture.
    #[arg(long, default_value_t = Arch::host())]
    pub arch: Arch,
    /// Guest kernel: bzImage (x86_64) or Image (aarch64).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Host directory shared as the guest's root filesystem.
    #[arg(long)]
    pub rootfs: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Instance name (letters, digits, '_', '-'): one state and one run directory per instance.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Run in the background (output to `<state>/host.log`); return once the guest reports
    /// `--ready-stage`, non-zero if the boot fails first.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Ready stage `--detach` waits for: by default `ready`, the host's own mark once the last
    /// stage the guest announced (and, for the gateway, the host's probe of its port) arrived.
    #[arg(long, default_value = "ready", value_name = "STAGE")]
    pub ready_stage: String,
    /// Seconds each readiness stage the guest announced may take after the one before; one that
    /// does not come in time is named and the VM stopped.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub stage_timeout: u64,
    /// Seconds `--detach` waits for the ready stage before giving up (the VM keeps running).
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub ready_timeout: u64,
    /// Remove the guest's runtime state (pods, CNI state, k3s database) from the rootfs first.
    #[arg(long)]
    pub reset: bool,
    /// Do not ask before `--reset` (needed when not on a terminal).
    #[arg(short = 'y', long)]
    pub yes: bool,
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// vhost-device-vsock binary.
    #[arg(long, default_value = "vhost-device-vsock")]
    pub vsock_helper: PathBuf,
    /// virtio-fs daemon (Debian's by default).
    #[arg(long, default_value = "/usr/lib/qemu/virtiofsd")]
    pub virtiofsd: PathBuf,
    /// VMM: qemu, libkrun, or auto (libkrun when it loads, runs the guest's arch and /dev/kvm
    /// opens read-write; else qemu, saying why). On machines where KVM fails on full guests even
    /// so, pick `--backend qemu`.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// libkrun library to load; else `OPENSHELL_LIBKRUN`, else `libkrun.so.1` (macOS:
    /// `libkrun.1.dylib`) through the dynamic loader.
    #[arg(long, value_name = "PATH")]
    pub libkrun: Option<PathBuf>,
    /// Emulator binary; `qemu-system-<arch>` by default.
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// KVM fails on full guests on some machines, so software emulation is the default.
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    pub accel: Accel,
    /// Appended to the kernel command line (e.g. `openshell.hostname=gw`).
    #[arg(long)]
    pub cmdline_extra: Option<String>,
    /// Write the boot timeline as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Seconds to wait for the guest's hello.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Time the workload gets to stop when the host is asked to shut down.
    #[arg(long, default_value_t = 10_000)]
    pub grace_ms: u64,
    /// Guest console log; `<run-dir>/console.log` by default.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// User-mode network for the guest (passt on Linux, gvproxy on macOS by default).
    #[arg(long, value_enum, default_value_t = NetBackend::platform_default())]
    pub net: NetBackend,
    /// Forward TCP 127.0.0.1:HOST on this machine to GUEST in the VM (repeatable; a bare PORT
    /// means the same port on both sides). Default: the gateway's 30051.
    #[arg(short = 'p', long = "port", value_name = "HOST:GUEST")]
    pub ports: Vec<Forward>,
    /// passt binary.
    #[arg(long, default_value = "passt")]
    pub passt: PathBuf,
    /// gvproxy binary.
    #[arg(long, default_value = "gvproxy")]
    pub gvproxy: PathBuf,
    /// Print every event as a JSON line instead of human-readable lines.
    #[arg(long)]
    pub json: bool,
    /// Command to run in the guest as the workload, with its arguments (instead of k3s on a
    /// gateway root).
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "CMD")]
    pub exec: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(transparent)]
    Child(#[from] ChildError),
    #[error(transparent)]
    Channel(#[from] channel::ChannelError),
    #[error("kernel {0} does not exist")]
    NoKernel(PathBuf),
    #[error("root filesystem {0} is not a directory")]
    NoRootfs(PathBuf),
    #[error(transparent)]
    Passt(#[from] PasstDirError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Expose(#[from] ExposeError),
    #[error("cannot set up signal handling: {0}")]
    Signals(nix::errno::Errno),
    #[error(transparent)]
    Libkrun(#[from] LibkrunError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Reset(#[from] ResetError),
}

enum Event {
    Channel(ChannelEvent),
    Signal(Signal),
    VmmExited(Option<i32>),
    /// Port forwards made through the network backend's API after the VMM started.
    Forwarded(Result<Vec<(Forward, u32)>, ExposeError>),
    /// The host's probe of the forwarded gateway port: answered or not in time.
    GatewayProbed(bool),
}

fn wrap_channel(e: ChannelEvent) -> Event {
    Event::Channel(e)
}

/// Blocks the signals `up` handles and turns them into events. Must run before any thread or
/// child starts, so every thread inherits the mask and only this one receives them.
fn watch_signals(tx: Sender<Event>) -> Result<(), UpError> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().map_err(UpError::Signals)?;
    std::thread::spawn(move || loop {
        match set.wait() {
            Ok(sig) => {
                if tx.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    });
    Ok(())
}

pub fn run(args: UpArgs) -> i32 {
    if args.detach && !crate::lifecycle::detach::is_child() {
        // Before any signal mask or thread: the background process starts from a clean slate.
        return crate::lifecycle::detach::run(&args);
    }
    let start = Instant::now();
    let mut progress = Progress::new(args.json);
    let mut timeline = Timeline::new();
    let mut session = Session::default();
    // Before signals are blocked: Ctrl+C must still end a `--reset` (y/N) prompt.
    if let Err(e) = claim(&args, &progress, &mut session) {
        eprintln!("openshell-host: {e}");
        return code::SETUP;
    }
    let (tx, rx) = mpsc::channel();
    if let Err(e) = watch_signals(tx.clone()) {
        eprintln!("openshell-host: {e}");
        return code::SETUP;
    }
    // Replace the previous boot's timeline at once: `status` must not show it as this one's.
    session.publish(&timeline, &progress);
    let code = match boot(
        &args,
        start,
        tx,
        &rx,
        &mut progress,
        &mut timeline,
        &mut session,
    ) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("openshell-host: {e}");
            timeline.summary.error = Some(e.to_string());
            code::SETUP
        }
    };
    session.stop_all();
    timeline.host(start.elapsed().as_micros() as u64, "host-exit", json!(code));
    timeline.summary.host_exit_code = code;
    if let Some(path) = &args.report {
        if let Err(e) = timeline.write(path) {
            eprintln!("openshell-host: {e}");
        }
    }
    if let Some(state) = &session.state {
        if let Err(e) = timeline.write(&state.last_boot_path()) {
            eprintln!("openshell-host: {e}");
        }
        state.remove_state();
    }
    // The lock goes last: until here another `up` of this instance must wait.
    drop(session.lock.take());
    code
}

/// Processes this run started, stopped in reverse order on every way out.
#[derive(Default)]
struct Session {
    helpers: Vec<Helper>,
    run_dir: Option<RunDir>,
    /// Held for the whole run: a second `up` of the instance fails while it is.
    lock: Option<InstanceLock>,
    state: Option<StateDir>,
    /// The state file as last written, updated as ready stages arrive.
    record: Option<InstanceState>,
}

impl Session {
    /// Rewrites the state file and the last-boot timeline; a failure is reported, not fatal.
    fn publish(&self, timeline: &Timeline, progress: &Progress) {
        let Some(state) = &self.state else { return };
        if let Some(record) = &self.record {
            if let Err(e) = state.write_state(record) {
                progress.error(&e.to_string());
            }
        }
        if let Err(e) = timeline.write(&state.last_boot_path()) {
            progress.error(&e.to_string());
        }
    }
}

impl Session {
    fn stop_all(&mut self) {
        while let Some(mut h) = self.helpers.pop() {
            h.stop();
        }
        if let Some(dir) = &self.run_dir {
            dir.remove_sockets();
        }
    }
}

/// Takes the instance: its lock (held until the process ends), stale state cleared, and the
/// rootfs reset when asked.
fn claim(args: &UpArgs, progress: &Progress, session: &mut Session) -> Result<(), UpError> {
    let sdir = StateDir::for_name(&args.name)?;
    session.lock = Some(sdir.lock()?);
    if let Some(note) = sdir.clear_stale() {
        progress.note(&note);
    }
    if args.reset && !crate::lifecycle::detach::is_child() {
        progress.note(&reset::run(&args.rootfs, args.yes)?);
    }
    session.state = Some(sdir);
    Ok(())
}

fn boot(
    args: &UpArgs,
    start: Instant,
    tx: Sender<Event>,
    rx: &Receiver<Event>,
    progress: &mut Progress,
    timeline: &mut Timeline,
    session: &mut Session,
) -> Result<i32, UpError> {
    let now = || start.elapsed().as_micros() as u64;
    if !args.kernel.is_file() {
        return Err(UpError::NoKernel(args.kernel.clone()));
    }
    if !args.rootfs.is_dir() {
        return Err(UpError::NoRootfs(args.rootfs.clone()));
    }
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
    session.run_dir = Some(dir.clone());
    let (backend, note) = crate::backend::choose(args.backend, args.arch, args.libkrun.as_deref())?;
    if let Some(note) = note {
        progress.note(&note);
    }

    // Listen first: the guest connects as soon as its config phase is done.
    let channel = Channel::listen(&dir.channel_socket())?;
    let writer: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
    channel.serve(start, tx.clone(), wrap_channel, Arc::clone(&writer));

    let forwards = crate::net::forwards(args.net, &args.ports)?;
    // The host port users reach the gateway on, for the stored metadata.
    let gateway_forward = forwards
        .iter()
        .find(|f| f.guest == crate::net::GATEWAY_PORT)
        .map(|f| f.host);
    // The host port kubectl reaches k3s's API server on, for the written kubeconfig.
    let api_forward = forwards
        .iter()
        .find(|f| f.guest == crate::kubeconfig::API_PORT)
        .map(|f| f.host);
    // The network helper starts first and the vhost-user helpers start while it comes up: each
    // takes milliseconds to create its socket, and waiting for them one after the other adds up.
    let net = match args.net {
        NetBackend::None => None,
        NetBackend::Passt => {
            let (_, sock) = passt::socket_dir(&dir.path)?;
            let mut cmd = Command::new(&args.passt);
            cmd.args(passt::args(&sock, &forwards));
            let passt = Helper::spawn("passt", cmd, &dir.path.join("passt.log"))?;
            Some((passt, sock, Duration::from_secs(10)))
        }
        NetBackend::Gvproxy => {
            let (sock, api) = (dir.gvproxy_socket(), dir.gvproxy_api_socket());
            let mut cmd = Command::new(&args.gvproxy);
            cmd.args(gvproxy::args(gvproxy_framing(&backend), &sock, &api));
            let gv = Helper::spawn("gvproxy", cmd, &dir.path.join("gvproxy.log"))?;
            Some((gv, sock, Duration::from_secs(5)))
        }
    };
    let vhost = if matches!(backend, Chosen::Qemu) {
        start_vhost_helpers(args, &dir, session)
    } else {
        Ok(())
    };
    let net_socket = match net {
        None => None,
        Some((mut helper, sock, within)) => {
            let ready = helper.wait_for_socket(&sock, within);
            session.helpers.push(helper);
            ready?;
            Some(sock)
        }
    };
    vhost?;
    if !forwards.is_empty() {
        let list: Vec<String> = forwards.iter().map(|f| f.to_string()).collect();
        progress.note(&format!("forwarding {} ({})", list.join(", "), args.net));
    }
    timeline.host(now(), "helpers-ready", json!(null));

    let console_log = args
        .console_log
        .clone()
        .unwrap_or_else(|| dir.console_log());
    timeline.console_log = Some(console_log.clone());
    let mut extra: Vec<String> = Vec::new();
    if matches!(backend, Chosen::Qemu) && args.accel == Accel::Tcg && args.arch == Arch::X86_64 {
        let cache = crate::lifecycle::state::state_root().ok();
        if let Some(tsc) = crate::backend::tsc::cmdline_options(cache.as_deref()) {
            extra.push(tsc);
        }
    }
    extra.extend(args.cmdline_extra.clone());
    let spec = VmSpec {
        arch: args.arch,
        kernel: args.kernel.clone(),
        cmdline: kernel_cmdline(args.arch, &args.exec, Some(&extra.join(" "))),
        memory_mib: args.memory,
        cpus: args.cpus,
        virtiofs_socket: dir.virtiofs_socket(),
        vsock_socket: dir.vsock_vhost_socket(),
        console_log: console_log.clone(),
        net_socket,
    };
    let vmm = start_vmm(&backend, args, &spec, &dir, &mut session.helpers)?;
    let vmm_pid = vmm.pid;
    let vmm_started = now();
    let record = InstanceState {
        name: args.name.clone(),
        host_pid: std::process::id(),
        vmm_pid: Some(vmm_pid),
        backend: vmm.name.to_string(),
        arch: args.arch.name().to_string(),
        started_at_unix_ms: instance::unix_ms(),
        ports: forwards.iter().map(|f| f.to_string()).collect(),
        run_dir: dir.path.clone(),
        console_log: console_log.clone(),
        report: args.report.clone(),
        ready_stages: Vec::new(),
        failed: None,
    };
    if let Some(Err(e)) = session.state.as_ref().map(|s| s.write_state(&record)) {
        // Without a state file `down` could not find the VM: do not leave one running.
        kill_vmm(vmm_pid);
        return Err(e.into());
    }
    session.record = Some(record);
    timeline.summary.vmm_started_us = Some(vmm_started);
    timeline.host(
        vmm_started,
        "vmm-started",
        json!({ "pid": vmm_pid, "cmdline": spec.cmdline }),
    );
    progress.note(&format!(
        "{} VM starting ({} pid {vmm_pid}, {:.1} ms after start); console: {}",
        args.arch.name(),
        vmm.name,
        vmm_started as f64 / 1000.0,
        console_log.display()
    ));
    // Reap the VMM on its own thread so its exit is an event like any other.
    let vmm_waiter = {
        let tx = tx.clone();
        let pid = nix::unistd::Pid::from_raw(vmm_pid as i32);
        std::thread::spawn(move || {
            let status = loop {
                match nix::sys::wait::waitpid(pid, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Ok(s) => break s,
                    Err(_) => break nix::sys::wait::WaitStatus::StillAlive,
                }
            };
            let code = match status {
                nix::sys::wait::WaitStatus::Exited(_, c) => Some(c),
                nix::sys::wait::WaitStatus::Signaled(_, s, _) => Some(128 + s as i32),
                _ => None,
            };
            let _ = tx.send(Event::VmmExited(code));
        })
    };
    if args.net == NetBackend::Gvproxy && !forwards.is_empty() {
        // gvproxy's API answers 500 until its network stack is up: retry off the event loop.
        let tx = tx.clone();
        let api = dir.gvproxy_api_socket();
        std::thread::spawn(move || {
            let result = forwards
                .iter()
                .map(|f| {
                    gvproxy::expose(&api, *f, gvproxy::GUEST_IP, Duration::from_secs(10))
                        .map(|n| (*f, n))
                })
                .collect();
            let _ = tx.send(Event::Forwarded(result));
        });
    }
    // Kept for the gateway probe, which starts only once the guest says the gateway is up.
    let probe_sender = tx.clone();
    drop(tx);

    let mut state = LoopState {
        hello_deadline: Some(Instant::now() + Duration::from_secs(args.timeout)),
        readiness: Some(Readiness::new(Duration::from_secs(args.stage_timeout))),
        ..LoopState::default()
    };
    let probe_tx = probe_sender;
    let outcome = loop {
        let timeout = state
            .deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        let event = match rx.recv_timeout(timeout) {
            Ok(e) => e,
            Err(RecvTimeoutError::Disconnected) => break code::NO_EXIT,
            Err(RecvTimeoutError::Timeout) => {
                if state.hello_deadline.is_some_and(|d| Instant::now() >= d) {
                    state.hello_deadline = None;
                    state.error = Some(code::TIMEOUT);
                    progress.error(&format!(
                        "no hello from the guest within {} s: stopping the VM (console: {})",
                        args.timeout,
                        console_log.display()
                    ));
                    kill_vmm(vmm_pid);
                }
                if state.kill_deadline.is_some_and(|d| Instant::now() >= d) {
                    state.kill_deadline = None;
                    progress.error("guest did not power off in time: killing the VM");
                    kill_vmm(vmm_pid);
                }
                let late = state.readiness.as_mut().and_then(|r| {
                    let late = r.deadline().is_some_and(|d| Instant::now() >= d);
                    late.then(|| {
                        r.stop();
                        (r.awaited().unwrap_or("?").to_string(), r.timeout())
                    })
                });
                if let Some((stage, within)) = late {
                    state.error = Some(code::TIMEOUT);
                    progress.error(&format!(
                        "readiness stage `{stage}` did not arrive within {} s: stopping the VM (console: {})",
                        within.as_secs(),
                        console_log.display()
                    ));
                    kill_vmm(vmm_pid);
                }
                continue;
            }
        };
        match event {
            Event::Channel(ChannelEvent::Connected) => {
                timeline.host(now(), "channel-connected", json!(null));
            }
            Event::Channel(ChannelEvent::Message { host_us, envelope }) => {
                timeline.guest(host_us, envelope.seq, envelope.t_us, &envelope.msg);
                progress.guest(&envelope.msg, host_us, vmm_started);
                match &envelope.msg {
                    GuestMessage::Hello { ready_stages, .. } => {
                        state.hello_deadline = None;
                        if let Some(r) = state.readiness.as_mut() {
                            r.hello(ready_stages, Instant::now());
                        }
                    }
                    GuestMessage::Ready { stage } => {
                        if let Some(r) = session.record.as_mut() {
                            r.ready_stages.push(stage.clone());
                        }
                        let step = state
                            .readiness
                            .as_mut()
                            .map(|r| r.stage(stage, Instant::now()));
                        match (step, gateway_forward) {
                            (Some(Step::Ready), _) | (Some(Step::Probe), None) => {
                                state.readiness = None;
                                declare_ready(now(), timeline, session, progress);
                            }
                            (Some(Step::Probe), Some(port)) => {
                                let within = Duration::from_secs(args.stage_timeout);
                                let tx = probe_tx.clone();
                                std::thread::spawn(move || {
                                    let ok = crate::readiness::wait_for_gateway(port, within);
                                    let _ = tx.send(Event::GatewayProbed(ok));
                                });
                            }
                            _ => {}
                        }
                        session.publish(timeline, progress);
                    }
                    GuestMessage::Fatal { phase, error } => {
                        state.fatal = true;
                        if let Some(r) = session.record.as_mut() {
                            r.failed = Some(format!("guest boot failed in phase {phase}: {error}"));
                        }
                        session.publish(timeline, progress);
                    }
                    GuestMessage::Credentials {
                        ca_crt,
                        client_crt,
                        client_key,
                    } => store_credentials(
                        &args.name,
                        (ca_crt, client_crt, client_key),
                        gateway_forward,
                        progress,
                    ),
                    GuestMessage::Kubeconfig { yaml } => {
                        store_kubeconfig(&args.name, yaml, api_forward, progress)
                    }
                    GuestMessage::Exit { status, .. } => {
                        state.exit = Some(*status);
                        // Tell the guest we have everything: it waits for this close.
                        if let Some(w) = writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
                            let _ = w.shutdown(std::net::Shutdown::Both);
                        }
                        state
                            .kill_deadline
                            .get_or_insert(Instant::now() + Duration::from_secs(10));
                    }
                    _ => {}
                }
            }
            Event::Channel(ChannelEvent::Protocol(e)) => {
                timeline.host(now(), "protocol-error", json!(e.to_string()));
                if state.exit.is_none() {
                    progress.error(&format!("boot channel: {e}; stopping the VM"));
                    state.error = Some(code::PROTOCOL);
                    kill_vmm(vmm_pid);
                }
            }
            Event::Channel(ChannelEvent::Closed) => {
                timeline.host(now(), "channel-closed", json!(null));
            }
            Event::Signal(sig) => {
                timeline.host(now(), "signal", json!(sig.as_str()));
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                match (w.as_mut(), state.shutdown_sent) {
                    (Some(stream), false) => {
                        progress.note(&format!(
                            "{sig}: asking the guest to shut down (grace {} ms)",
                            args.grace_ms
                        ));
                        let sent = channel::send(
                            stream,
                            0,
                            start,
                            HostMessage::Shutdown {
                                grace_ms: args.grace_ms,
                            },
                        );
                        state.shutdown_sent = true;
                        if sent.is_err() {
                            kill_vmm(vmm_pid);
                        }
                        state.kill_deadline = Some(
                            Instant::now()
                                + Duration::from_millis(args.grace_ms)
                                + Duration::from_secs(15),
                        );
                    }
                    _ => {
                        progress.note(&format!("{sig}: stopping the VM"));
                        kill_vmm(vmm_pid);
                    }
                }
            }
            Event::GatewayProbed(true) => {
                state.readiness = None;
                declare_ready(now(), timeline, session, progress);
            }
            Event::GatewayProbed(false) => {
                state.error = Some(code::TIMEOUT);
                progress.error(&format!(
                    "the guest reported the gateway up, but 127.0.0.1:{} did not answer within {} s: stopping the VM",
                    gateway_forward.unwrap_or_default(),
                    args.stage_timeout
                ));
                kill_vmm(vmm_pid);
            }
            Event::Forwarded(Ok(done)) => {
                timeline.host(now(), "forwards-exposed", json!(done.len()));
            }
            Event::Forwarded(Err(e)) => {
                timeline.host(now(), "forward-failed", json!(e.to_string()));
                progress.error(&format!("{e}; stopping the VM"));
                state.error = Some(code::SETUP);
                kill_vmm(vmm_pid);
            }
            Event::VmmExited(status) => {
                timeline.host(now(), "vmm-exited", json!(status));
                break match (state.error, state.fatal, state.exit) {
                    (Some(code), _, _) => code,
                    (None, true, _) => code::GUEST_FATAL,
                    (None, false, Some(status)) => status,
                    (None, false, None) => {
                        progress.error(&format!(
                            "the VM ended without reporting an exit ({} status {status:?}, log {}); console: {}",
                            vmm.name,
                            vmm.log.display(),
                            console_log.display()
                        ));
                        code::NO_EXIT
                    }
                };
            }
        }
    };
    let _ = vmm_waiter.join();
    // Already reaped by the waiter: stop() must not signal a pid that may be reused.
    if let Some(index) = vmm.helper {
        drop(session.helpers.remove(index));
    }
    progress.finish(&timeline.summary, outcome);
    Ok(outcome)
}

#[derive(Default)]
struct LoopState {
    hello_deadline: Option<Instant>,
    /// Until the VM is ready; `None` after.
    readiness: Option<Readiness>,
    kill_deadline: Option<Instant>,
    shutdown_sent: bool,
    fatal: bool,
    exit: Option<i32>,
    error: Option<i32>,
}

impl LoopState {
    fn deadline(&self) -> Option<Instant> {
        [
            self.hello_deadline,
            self.kill_deadline,
            self.readiness.as_ref().and_then(Readiness::deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

fn kill_vmm(pid: u32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// virtio-fs and vsock daemons for qemu's vhost-user devices (libkrun has its own).
fn start_vhost_helpers(args: &UpArgs, dir: &RunDir, session: &mut Session) -> Result<(), UpError> {
    let mut virtiofsd = Command::new(&args.virtiofsd);
    virtiofsd
        .arg(format!("--socket-path={}", dir.virtiofs_socket().display()))
        .arg("-o")
        .arg(format!("source={}", args.rootfs.display()))
        .arg("-o")
        .arg("cache=auto");
    let mut fs = Helper::spawn("virtiofsd", virtiofsd, &dir.path.join("virtiofsd.log"))?;
    let mut vsock = Command::new(&args.vsock_helper);
    vsock
        .arg("--guest-cid")
        .arg("3")
        .arg("--socket")
        .arg(dir.vsock_vhost_socket())
        .arg("--uds-path")
        .arg(dir.vsock_uds());
    let vsock = Helper::spawn("vhost-device-vsock", vsock, &dir.path.join("vsock.log"));
    let fs_ready = fs.wait_for_socket(&dir.virtiofs_socket(), Duration::from_secs(10));
    session.helpers.push(fs);
    let mut vsock = vsock?;
    let vsock_ready = vsock.wait_for_socket(&dir.vsock_vhost_socket(), Duration::from_secs(10));
    session.helpers.push(vsock);
    fs_ready?;
    vsock_ready?;
    Ok(())
}

/// The started VMM: its pid for signals and the waiter, and its index in `helpers` when it is a
/// [`Helper`] (qemu); a forked libkrun child is reaped by the waiter alone.
struct StartedVmm {
    name: &'static str,
    pid: u32,
    helper: Option<usize>,
    /// The VMM's own stdout and stderr.
    log: PathBuf,
}

/// Starts the chosen VMM for `spec`. Called on the main thread: the VMM's parent-death signal is
/// tied to the thread that forks it.
fn start_vmm(
    backend: &Chosen,
    args: &UpArgs,
    spec: &VmSpec,
    dir: &RunDir,
    helpers: &mut Vec<Helper>,
) -> Result<StartedVmm, UpError> {
    match backend {
        Chosen::Qemu => {
            let qemu = Qemu {
                program: args.qemu.clone(),
                accel: args.accel,
            };
            let mut cmd = Command::new(qemu.program(args.arch));
            cmd.args(qemu.args(spec));
            let log = dir.path.join("qemu.log");
            let vmm = Helper::spawn("qemu", cmd, &log)?;
            let pid = vmm.child.id();
            helpers.push(vmm);
            Ok(StartedVmm {
                name: "qemu",
                pid,
                helper: Some(helpers.len() - 1),
                log,
            })
        }
        Chosen::Libkrun(krun) => {
            let channel = dir.channel_socket();
            let exec = dir.exec_socket();
            let vm = libkrun::Vm {
                spec,
                rootfs: &args.rootfs,
                channel_socket: &channel,
                exec_socket: &exec,
                net: spec
                    .net_socket
                    .clone()
                    .map(|path| match gvproxy_framing(backend) {
                        Framing::VfkitDatagram if args.net == NetBackend::Gvproxy => {
                            libkrun::Net::VfkitDatagram(path)
                        }
                        _ => libkrun::Net::UnixStream(path),
                    }),
            };
            let log = dir.path.join("libkrun.log");
            let pid = krun.configure(&vm)?.start(&log)?;
            Ok(StartedVmm {
                name: "libkrun",
                pid,
                helper: None,
                log,
            })
        }
    }
}

/// gvproxy's framing: libkrun on macOS speaks vfkit's datagrams (with offloads, much faster);
/// everything else qemu's stream framing.
fn gvproxy_framing(backend: &Chosen) -> Framing {
    if cfg!(target_os = "macos") && matches!(backend, Chosen::Libkrun(_)) {
        Framing::VfkitDatagram
    } else {
        Framing::QemuStream
    }
}

/// Keeps the guest's client bundle where the user's tools find it; a failure is reported, not
/// fatal (the gateway runs without it, only the CLI cannot connect).
/// Writes the cluster's kubeconfig for the user; a refused or unwritable one is an error line,
/// not the end of the boot (the gateway itself works without it).
fn store_kubeconfig(instance: &str, yaml: &str, api_forward: Option<u16>, progress: &Progress) {
    use crate::kubeconfig::{path, store, Written, API_PORT};
    let result =
        path(instance).and_then(|p| store(&p, yaml, instance, api_forward).map(|w| (p, w)));
    match result {
        Ok((p, written)) => {
            if written != Written::Unchanged {
                progress.note(&format!("kubeconfig written to {}", p.display()));
            }
            if api_forward.is_none() {
                progress.note(&format!(
                    "the API port {API_PORT} is not forwarded: {} reaches the cluster only with `-p {API_PORT}:{API_PORT}`",
                    p.display()
                ));
            }
        }
        Err(e) => progress.error(&format!("kubeconfig not written: {e}")),
    }
}

fn store_credentials(
    instance: &str,
    (ca, cert, key): (&str, &str, &str),
    gateway_port: Option<u16>,
    progress: &Progress,
) {
    use crate::credentials::{gateway_dir, store, Stored};
    let result = gateway_dir(instance)
        .and_then(|dir| store(&dir, ca, cert, key, gateway_port).map(|stored| (dir, stored)));
    match result {
        Ok((dir, Stored::New)) => {
            progress.note(&format!("client credentials stored in {}", dir.display()))
        }
        Ok((_, Stored::Unchanged)) => {}
        Ok((dir, Stored::Replaced)) => progress.note(&format!(
            "the gateway's CA changed: client credentials in {} replaced",
            dir.display()
        )),
        Err(e) => progress.error(&format!("client credentials not stored: {e}")),
    }
}

/// The last readiness stage (and the host's own probe, for the gateway) is in: the boot is done.
fn declare_ready(now_us: u64, timeline: &mut Timeline, session: &mut Session, progress: &Progress) {
    timeline.summary.ready_us = Some(now_us);
    timeline.host(now_us, "ready", json!(null));
    if let Some(r) = session.record.as_mut() {
        r.ready_stages.push("ready".into());
    }
    progress.note(&format!(
        "ready ({:.1} ms after openshell-host started)",
        now_us as f64 / 1000.0
    ));
}
