//! The loop of a running boot: receives every [`Event`] from the one queue, hands each to its
//! handler, and ends when the VMM has exited, with the exit code [`outcome::end`] decides.
//! Handlers update [`LoopState`] and act on the VM only through [`Effects`], so they can be
//! driven without one.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use openshell_shared::protocol::{Envelope, ProtocolError};
use openshell_shared::{GuestMessage, HostMessage};
use serde_json::json;

use super::args::{code, UpArgs};
use super::client_config::{activate, store_credentials, store_kubeconfig};
use super::event::Event;
use super::outcome::{self, End, Verdict};
use super::session::Session;
use super::vmm::{self, StartedVmm};
use crate::channel::{self, ChannelEvent};
use crate::gateway_health::{ClientBundle, ReadyProbe};
use crate::net::gvproxy::{self, ExposeError, NotGuarded};
use crate::net::Forward;
use crate::progress::Progress;
use crate::readiness::{Readiness, Step};
use crate::report::Timeline;

/// What a guest asked to shut down gets beyond the workload's grace to sync and power off before
/// its VMM is killed.
const POWER_OFF_MARGIN: Duration = Duration::from_secs(15);

/// What the handlers do to the world beyond the loop's own state and output.
pub trait Effects {
    /// Stops the VM at once; its exit then arrives as [`Event::VmmExited`].
    fn kill_vmm(&mut self);
    /// Probes the gateway behind the forwarded port off the loop, the way `how` says, with the
    /// guest's client bundle; the answer arrives as [`Event::GatewayProbed`].
    fn probe_gateway(
        &mut self,
        port: u16,
        within: Duration,
        how: ReadyProbe,
        bundle: Option<ClientBundle>,
    );
    /// Makes the gateway the OpenShell CLI's active one.
    fn activate_gateway(&mut self, instance: &str, progress: &Progress);
    /// Makes `forwards` through gvproxy's API at `api` off the loop (it answers 500 until its
    /// network stack is up, so exposing retries); the result arrives as [`Event::Forwarded`].
    fn expose_forwards(&mut self, api: &Path, forwards: &[Forward]);
}

/// The real effects: SIGKILL to the VMM, and the probe on a thread of its own.
pub struct Live {
    pub vmm_pid: u32,
    /// The queue's last sender besides the threads': the probe reports on it.
    pub tx: SyncSender<Event>,
}

impl Effects for Live {
    fn kill_vmm(&mut self) {
        vmm::kill(self.vmm_pid);
    }

    fn probe_gateway(
        &mut self,
        port: u16,
        within: Duration,
        how: ReadyProbe,
        bundle: Option<ClientBundle>,
    ) {
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            let found = crate::gateway_health::probe(how, port, bundle.as_ref(), within);
            let _ = tx.send(Event::GatewayProbed(found));
        });
    }

    fn expose_forwards(&mut self, api: &Path, forwards: &[Forward]) {
        let (tx, api, forwards) = (self.tx.clone(), api.to_path_buf(), forwards.to_vec());
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

    fn activate_gateway(&mut self, instance: &str, progress: &Progress) {
        activate(instance, progress);
    }
}

/// What the loop knows of the run, fixed before the first event.
pub struct Run<'a> {
    pub args: &'a UpArgs,
    /// When `up` started: host timestamps count from here.
    pub clock: Instant,
    pub vmm: &'a StartedVmm,
    pub vmm_started_us: u64,
    pub console_log: &'a Path,
    /// The host port users reach the gateway on, if forwarded.
    pub gateway_forward: Option<u16>,
    /// The host port kubectl reaches k3s's API server on, if forwarded.
    pub api_forward: Option<u16>,
    /// The boot channel's write side, once the guest connected.
    pub writer: &'a Mutex<Option<UnixStream>>,
    /// gvproxy's API socket and the forwards it is to make once the guest confirms its
    /// refusals; `None` on other networks or without forwards.
    pub gvproxy_forwards: Option<&'a (PathBuf, Vec<Forward>)>,
}

/// Where gvproxy's forwards stand: they wait for the guest's `network_guarded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// Not on gvproxy, or nothing to forward.
    NotNeeded,
    Awaited,
    Confirmed,
    /// The guest did not confirm what it must: no forwards, the VM is stopped.
    Refused,
}

/// What the handlers change: the deadlines the loop waits for, and the verdict.
#[derive(Debug)]
pub struct LoopState {
    hello_deadline: Option<Instant>,
    /// Until the VM is ready; `None` after.
    readiness: Option<Readiness>,
    kill_deadline: Option<Instant>,
    /// The guest was asked to shut down (for a signal or a host error).
    shutdown_sent: bool,
    /// A signal came: the next one stops the VM at once.
    signalled: bool,
    guard: Guard,
    verdict: Verdict,
    /// The client bundle the guest sent, once checked: the health probe's.
    bundle: Option<ClientBundle>,
}

impl LoopState {
    fn new(now: Instant, hello_timeout: Duration, stage_timeout: Duration, guard: Guard) -> Self {
        Self {
            hello_deadline: Some(now + hello_timeout),
            readiness: Some(Readiness::new(stage_timeout)),
            kill_deadline: None,
            shutdown_sent: false,
            signalled: false,
            guard,
            verdict: Verdict::default(),
            bundle: None,
        }
    }

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

pub struct EventLoop<'a, E: Effects> {
    run: Run<'a>,
    effects: E,
    state: LoopState,
    progress: &'a Progress,
    timeline: &'a mut Timeline,
    session: &'a mut Session,
}

impl<'a, E: Effects> EventLoop<'a, E> {
    /// The hello deadline starts now.
    pub fn new(
        run: Run<'a>,
        effects: E,
        progress: &'a Progress,
        timeline: &'a mut Timeline,
        session: &'a mut Session,
    ) -> Self {
        let state = LoopState::new(
            Instant::now(),
            Duration::from_secs(run.args.timeout),
            Duration::from_secs(run.args.stage_timeout),
            if run.gvproxy_forwards.is_some() {
                Guard::Awaited
            } else {
                Guard::NotNeeded
            },
        );
        Self {
            run,
            effects,
            state,
            progress,
            timeline,
            session,
        }
    }

    /// Handles events until the VMM has exited; returns `up`'s exit code.
    pub fn run(mut self, rx: &Receiver<Event>) -> i32 {
        loop {
            let timeout = self
                .state
                .deadline()
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            match rx.recv_timeout(timeout) {
                Ok(event) => {
                    if let Some(code) = self.handle(event) {
                        return code;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return code::NO_EXIT,
                Err(RecvTimeoutError::Timeout) => self.on_deadline(Instant::now()),
            }
        }
    }

    fn now_us(&self) -> u64 {
        self.run.clock.elapsed().as_micros() as u64
    }

    /// Hands `event` to its handler; `Some(exit code)` once the VMM has exited.
    fn handle(&mut self, event: Event) -> Option<i32> {
        let now_us = self.now_us();
        match event {
            Event::Channel(ChannelEvent::Connected) => {
                self.timeline.host(now_us, "channel-connected", json!(null))
            }
            Event::Channel(ChannelEvent::Message { host_us, envelope }) => {
                self.on_message(host_us, &envelope)
            }
            Event::Channel(ChannelEvent::Protocol(e)) => self.on_protocol_error(&e),
            Event::Channel(ChannelEvent::Closed) => {
                self.timeline.host(now_us, "channel-closed", json!(null))
            }
            Event::Signal(sig) => self.on_signal(sig),
            Event::GatewayProbed(answered) => self.on_gateway_probed(answered),
            Event::Forwarded(result) => self.on_forwarded(result),
            Event::VmmExited(status) => return Some(self.on_vmm_exited(status)),
        }
        None
    }

    /// A deadline passed: no hello, no power-off after the exit or the shutdown request (each
    /// kills the VM), or a readiness stage late (the guest is asked to shut down: k3s may be
    /// writing its database).
    fn on_deadline(&mut self, now: Instant) {
        if self.state.hello_deadline.is_some_and(|d| now >= d) {
            self.state.hello_deadline = None;
            self.state.verdict.error = Some(code::TIMEOUT);
            self.progress.error(&format!(
                "no hello from the guest within {} s: stopping the VM (console: {})",
                self.run.args.timeout,
                self.run.console_log.display()
            ));
            self.effects.kill_vmm();
        }
        if self.state.kill_deadline.is_some_and(|d| now >= d) {
            self.state.kill_deadline = None;
            self.progress
                .error("guest did not power off in time: killing the VM");
            self.effects.kill_vmm();
        }
        let late = self.state.readiness.as_mut().and_then(|r| {
            let late = r.deadline().is_some_and(|d| now >= d);
            late.then(|| {
                r.stop();
                (r.awaited().unwrap_or("?").to_string(), r.timeout())
            })
        });
        if let Some((stage, within)) = late {
            self.state.verdict.error = Some(code::TIMEOUT);
            self.progress.error(&format!(
                "readiness stage `{stage}` did not arrive within {} s: stopping the VM (console: {})",
                within.as_secs(),
                self.run.console_log.display()
            ));
            self.stop_cleanly(now);
        }
    }

    /// A guest message: recorded and shown, then handled by its kind.
    fn on_message(&mut self, host_us: u64, envelope: &Envelope<GuestMessage>) {
        self.timeline
            .guest(host_us, envelope.seq, envelope.t_us, &envelope.msg);
        self.progress
            .guest(&envelope.msg, host_us, self.run.vmm_started_us);
        let (name, progress) = (&self.run.args.name, self.progress);
        match &envelope.msg {
            GuestMessage::Hello { ready_stages, .. } => self.on_hello(ready_stages),
            GuestMessage::Ready { stage } => self.on_ready(stage),
            GuestMessage::Fatal { phase, error } => self.on_fatal(phase, error),
            GuestMessage::Credentials {
                ca_crt,
                client_crt,
                client_key,
            } => {
                let stored = store_credentials(
                    name,
                    (ca_crt, client_crt, client_key),
                    self.run.gateway_forward,
                    progress,
                );
                self.state.bundle = stored.or(self.state.bundle.take());
            }
            GuestMessage::Kubeconfig { yaml } => {
                store_kubeconfig(name, yaml, self.run.api_forward, progress)
            }
            GuestMessage::NetworkGuarded {
                refused_tcp,
                host_loopback,
                host_ports,
            } => self.on_guarded(gvproxy::check_guarded(
                refused_tcp,
                host_loopback,
                host_ports,
                &self.run.args.host_ports,
            )),
            GuestMessage::Exit { status, .. } => self.on_exit(*status),
            _ => {}
        }
    }

    fn on_hello(&mut self, ready_stages: &[String]) {
        self.state.hello_deadline = None;
        if let Some(r) = self.state.readiness.as_mut() {
            r.hello(ready_stages, Instant::now());
        }
    }

    /// The guest's refusals, as checked against what gvproxy's forwards need: the forwards are
    /// made, or refused and the VM stopped.
    fn on_guarded(&mut self, checked: Result<(), NotGuarded>) {
        if self.state.guard != Guard::Awaited {
            return;
        }
        let Some((api, forwards)) = self.run.gvproxy_forwards else {
            return;
        };
        match checked {
            Ok(()) => {
                self.state.guard = Guard::Confirmed;
                self.timeline
                    .host(self.now_us(), "network-guarded", json!(null));
                self.effects.expose_forwards(api, forwards);
            }
            Err(e) => self.refuse_forwards(&e),
        }
    }

    /// gvproxy's forwards are not made for this guest: said, recorded, and the VM stopped.
    fn refuse_forwards(&mut self, why: &NotGuarded) {
        self.state.guard = Guard::Refused;
        self.timeline
            .host(self.now_us(), "forwards-refused", json!(why.to_string()));
        self.progress.error(&format!("{why}; stopping the VM"));
        self.state.verdict.error = Some(code::SETUP);
        self.stop_cleanly(Instant::now());
    }

    /// A readiness stage: the last one makes the VM ready, or (the gateway's) starts the probe
    /// of its forwarded port first. Only a stage's first report is recorded and published: one
    /// repeated (or unknown, or after ready) changes nothing on disk. On gvproxy, a guest ready
    /// before it confirmed its refusals gets no forwards.
    fn on_ready(&mut self, stage: &str) {
        if self.state.guard == Guard::Awaited {
            self.refuse_forwards(&NotGuarded::Missing);
        }
        if self.state.guard == Guard::Refused {
            return;
        }
        let step = match self.state.readiness.as_mut() {
            Some(r) => r.stage(stage, Instant::now()),
            None => Step::Ignored,
        };
        if step == Step::Ignored {
            return;
        }
        if let Some(r) = self.session.record.as_mut() {
            r.ready_stages.push(stage.to_string());
        }
        match (Some(step), self.run.gateway_forward) {
            (Some(Step::Ready), _) | (Some(Step::Probe), None) => {
                self.state.readiness = None;
                self.declare_ready();
            }
            (Some(Step::Probe), Some(port)) => {
                let within = Duration::from_secs(self.run.args.stage_timeout);
                let (how, bundle) = (self.run.args.ready_probe, self.state.bundle.clone());
                self.effects.probe_gateway(port, within, how, bundle);
            }
            _ => {}
        }
        self.session.publish(self.timeline, self.progress);
    }

    fn on_fatal(&mut self, phase: &str, error: &str) {
        self.state.verdict.fatal = true;
        if let Some(r) = self.session.record.as_mut() {
            r.failed = Some(format!("guest boot failed in phase {phase}: {error}"));
        }
        self.session.publish(self.timeline, self.progress);
    }

    /// The guest is about to power off: it gets 10 s to do so. No later stage can come.
    fn on_exit(&mut self, status: i32) {
        self.state.verdict.exit = Some(status);
        if let Some(r) = self.state.readiness.as_mut() {
            r.stop();
        }
        // Tell the guest we have everything: it waits for this close.
        if let Some(w) = self
            .run
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        self.state
            .kill_deadline
            .get_or_insert(Instant::now() + Duration::from_secs(10));
    }

    /// The guest broke the protocol: the VM is stopped, unless its exit is already in.
    fn on_protocol_error(&mut self, e: &ProtocolError) {
        self.timeline
            .host(self.now_us(), "protocol-error", json!(e.to_string()));
        if self.state.verdict.exit.is_none() {
            self.progress
                .error(&format!("boot channel: {e}; stopping the VM"));
            self.state.verdict.error = Some(code::PROTOCOL);
            self.effects.kill_vmm();
        }
    }

    /// The first signal asks the guest to shut down (unless it already was); another one, or one
    /// before the guest connected, stops the VM.
    fn on_signal(&mut self, sig: Signal) {
        self.timeline
            .host(self.now_us(), "signal", json!(sig.as_str()));
        let first = !std::mem::replace(&mut self.state.signalled, true);
        if !first || !self.channel_open() {
            self.progress.note(&format!("{sig}: stopping the VM"));
            self.effects.kill_vmm();
        } else if self.state.shutdown_sent {
            self.progress.note(&format!(
                "{sig}: the guest is already shutting down; another signal stops the VM at once"
            ));
        } else {
            self.progress.note(&format!(
                "{sig}: asking the guest to shut down (grace {} ms)",
                self.run.args.grace_ms
            ));
            self.request_shutdown(Instant::now());
        }
    }

    fn channel_open(&self) -> bool {
        let w = self.run.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.is_some()
    }

    /// Stops the VM for a host error the guest is not to blame for (a late stage, a gateway that
    /// does not answer, a failed forward) the way a signal does: through the guest's own
    /// shutdown, so that k3s's database is not cut mid-write. Killed at once only when there is
    /// no channel to ask on.
    fn stop_cleanly(&mut self, now: Instant) {
        if self.state.shutdown_sent {
            return;
        }
        if !self.channel_open() {
            self.effects.kill_vmm();
            return;
        }
        self.progress.note(&format!(
            "asking the guest to shut down (grace {} ms)",
            self.run.args.grace_ms
        ));
        self.request_shutdown(now);
    }

    /// Sends `shutdown` (the workload gets SIGTERM, SIGKILL after the grace; init syncs and
    /// powers off) and arms the kill for a guest that has not powered off by the grace plus
    /// [`POWER_OFF_MARGIN`] after `now`. A request that cannot be written kills at once.
    fn request_shutdown(&mut self, now: Instant) {
        let grace_ms = self.run.args.grace_ms;
        let sent = {
            let mut w = self.run.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.as_mut().map(|stream| {
                channel::send(
                    stream,
                    0,
                    self.run.clock,
                    HostMessage::Shutdown { grace_ms },
                )
            })
        };
        self.state.shutdown_sent = true;
        match sent {
            Some(Ok(())) => {
                self.timeline
                    .host(self.now_us(), "shutdown-requested", json!(grace_ms));
                self.state.kill_deadline =
                    Some(now + Duration::from_millis(grace_ms) + POWER_OFF_MARGIN);
            }
            Some(Err(e)) => {
                self.progress.error(&format!(
                    "cannot ask the guest to shut down: {e}; killing the VM"
                ));
                self.effects.kill_vmm();
            }
            None => self.effects.kill_vmm(),
        }
    }

    /// The host's probe of the gateway: healthy makes the VM ready (and, unless the user said
    /// not to, the OpenShell CLI's active gateway); anything else is the last stage not arriving.
    fn on_gateway_probed(&mut self, found: Result<String, String>) {
        match found {
            Ok(what) => {
                self.progress.note(&what);
                self.state.readiness = None;
                if !self.run.args.no_activate {
                    self.effects
                        .activate_gateway(&self.run.args.name, self.progress);
                }
                self.declare_ready();
            }
            Err(why) => {
                self.state.verdict.error = Some(code::TIMEOUT);
                self.progress.error(&format!(
                    "the guest reported the gateway up, but {why}: stopping the VM"
                ));
                self.stop_cleanly(Instant::now());
            }
        }
    }

    fn on_forwarded(&mut self, result: Result<Vec<(Forward, u32)>, ExposeError>) {
        let now_us = self.now_us();
        match result {
            Ok(done) => self
                .timeline
                .host(now_us, "forwards-exposed", json!(done.len())),
            Err(e) => {
                self.timeline
                    .host(now_us, "forward-failed", json!(e.to_string()));
                self.progress.error(&format!("{e}; stopping the VM"));
                self.state.verdict.error = Some(code::SETUP);
                self.stop_cleanly(Instant::now());
            }
        }
    }

    /// The run is over: the exit code from the verdict, and why when the VM said nothing.
    fn on_vmm_exited(&mut self, status: Option<i32>) -> i32 {
        self.timeline
            .host(self.now_us(), "vmm-exited", json!(status));
        let end = outcome::end(&self.state.verdict);
        if end == End::NoExit {
            self.progress.error(&format!(
                "the VM ended without reporting an exit ({} status {status:?}, log {}); console: {}",
                self.run.vmm.name,
                self.run.vmm.log.display(),
                self.run.console_log.display()
            ));
        }
        end.code()
    }

    /// The last readiness stage (and the host's own probe, for the gateway) is in: the boot is
    /// done.
    fn declare_ready(&mut self) {
        let now_us = self.now_us();
        self.timeline.summary.ready_us = Some(now_us);
        self.timeline.host(now_us, "ready", json!(null));
        if let Some(r) = self.session.record.as_mut() {
            r.ready_stages.push("ready".into());
        }
        self.progress.note(&format!(
            "ready ({:.1} ms after openshell-host started)",
            now_us as f64 / 1000.0
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use openshell_shared::protocol::{stage, FrameDecoder};

    use crate::lifecycle::state::InstanceState;
    use crate::up::args::parse;

    /// Effects recorded instead of done.
    #[derive(Default)]
    struct Recorder {
        kills: usize,
        probes: Vec<(u16, Duration, ReadyProbe, bool)>,
        activations: Vec<String>,
        exposed: Vec<(PathBuf, Vec<Forward>)>,
    }

    impl Effects for Recorder {
        fn kill_vmm(&mut self) {
            self.kills += 1;
        }
        fn probe_gateway(
            &mut self,
            port: u16,
            within: Duration,
            how: ReadyProbe,
            bundle: Option<ClientBundle>,
        ) {
            self.probes.push((port, within, how, bundle.is_some()));
        }
        fn activate_gateway(&mut self, instance: &str, _: &Progress) {
            self.activations.push(instance.to_string());
        }
        fn expose_forwards(&mut self, api: &Path, forwards: &[Forward]) {
            self.exposed.push((api.to_path_buf(), forwards.to_vec()));
        }
    }

    /// Everything a loop borrows, for one test.
    struct Fixture {
        args: UpArgs,
        vmm: StartedVmm,
        console: PathBuf,
        writer: Mutex<Option<UnixStream>>,
        progress: Progress,
        timeline: Timeline,
        session: Session,
        gvproxy: Option<(PathBuf, Vec<Forward>)>,
    }

    impl Fixture {
        fn new() -> Self {
            let args = parse(&["--kernel", "/k", "--rootfs", "/r", "--name", "t"]).expect("parse");
            let session = Session {
                record: Some(InstanceState {
                    name: "t".into(),
                    host_pid: 1,
                    vmm_pid: Some(2),
                    backend: "qemu".into(),
                    arch: "x86_64".into(),
                    started_at_unix_ms: 0,
                    ports: Vec::new(),
                    run_dir: "/run/t".into(),
                    console_log: "/run/t/console.log".into(),
                    report: None,
                    ready_stages: Vec::new(),
                    failed: None,
                }),
                ..Session::default()
            };
            Self {
                args,
                vmm: StartedVmm {
                    name: "qemu",
                    pid: 0,
                    helper: None,
                    log: "/run/t/qemu.log".into(),
                },
                console: "/run/t/console.log".into(),
                writer: Mutex::new(None),
                progress: Progress::new(true),
                timeline: Timeline::new(),
                session,
                gvproxy: None,
            }
        }

        fn event_loop(&mut self, gateway_forward: Option<u16>) -> EventLoop<'_, Recorder> {
            let run = Run {
                args: &self.args,
                clock: Instant::now(),
                vmm: &self.vmm,
                vmm_started_us: 0,
                console_log: &self.console,
                gateway_forward,
                api_forward: None,
                writer: &self.writer,
                gvproxy_forwards: self.gvproxy.as_ref(),
            };
            EventLoop::new(
                run,
                Recorder::default(),
                &self.progress,
                &mut self.timeline,
                &mut self.session,
            )
        }
    }

    fn guest(seq: u64, msg: GuestMessage) -> Event {
        Event::Channel(ChannelEvent::Message {
            host_us: seq,
            envelope: Envelope { seq, t_us: 0, msg },
        })
    }

    fn hello(stages: &[&str]) -> Event {
        guest(
            0,
            GuestMessage::Hello {
                protocol: 1,
                init_version: "test".into(),
                arch: "x86_64".into(),
                kernel_release: "6.1".into(),
                boot_id: "b".into(),
                init_entry_us: 0,
                ready_stages: stages.iter().map(|s| s.to_string()).collect(),
            },
        )
    }

    fn ready(seq: u64, stage: &str) -> Event {
        guest(
            seq,
            GuestMessage::Ready {
                stage: stage.into(),
            },
        )
    }

    fn exit(seq: u64, status: i32) -> Event {
        guest(
            seq,
            GuestMessage::Exit {
                status,
                peak_rss_kib: 1,
                synced: true,
            },
        )
    }

    /// Connects the boot channel's write side: the returned end is the guest's.
    fn connect(f: &Fixture) -> UnixStream {
        let (ours, guest_end) = UnixStream::pair().expect("pair");
        *f.writer.lock().expect("lock") = Some(ours);
        guest_end
    }

    /// The one host message the guest end has received.
    fn received(guest_end: &mut UnixStream) -> HostMessage {
        let mut decoder = FrameDecoder::default();
        let mut buf = [0u8; 256];
        let n = std::io::Read::read(guest_end, &mut buf).expect("read");
        decoder.push(&buf[..n]);
        decoder
            .next_frame::<HostMessage>()
            .expect("a frame")
            .expect("complete")
            .msg
    }

    /// Feeds `events`, none of which may end the loop, then the VMM's exit; returns the code.
    fn feed(lp: &mut EventLoop<'_, Recorder>, events: Vec<Event>) -> i32 {
        for e in events {
            assert_eq!(lp.handle(e), None, "only the VMM's exit ends the loop");
        }
        lp.handle(Event::VmmExited(Some(0)))
            .expect("the VMM's exit ends the loop")
    }

    #[test]
    fn the_workload_status_is_passed_through_and_power_off_awaited() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        for e in [hello(&[]), exit(1, 7)] {
            assert_eq!(lp.handle(e), None);
        }
        assert!(lp.state.hello_deadline.is_none());
        assert!(lp.state.kill_deadline.is_some(), "10 s to power off");
        assert_eq!(feed(&mut lp, vec![]), 7);
        assert_eq!(lp.effects.kills, 0);
    }

    #[test]
    fn a_guest_that_does_not_power_off_is_killed() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        lp.handle(hello(&[]));
        lp.handle(exit(1, 0));
        lp.on_deadline(Instant::now());
        assert_eq!(lp.effects.kills, 0, "not before the deadline");
        lp.on_deadline(Instant::now() + Duration::from_secs(11));
        assert_eq!(lp.effects.kills, 1);
        assert!(lp.state.kill_deadline.is_none());
        assert_eq!(feed(&mut lp, vec![]), 0, "the status reported still counts");
    }

    #[test]
    fn a_fatal_boot_error_is_recorded_and_ends_with_its_code() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        let fatal = GuestMessage::Fatal {
            phase: "mounts".into(),
            error: "no /proc".into(),
        };
        assert_eq!(
            feed(&mut lp, vec![hello(&[]), guest(1, fatal)]),
            code::GUEST_FATAL
        );
        let record = lp.session.record.as_ref().expect("record");
        assert_eq!(
            record.failed.as_deref(),
            Some("guest boot failed in phase mounts: no /proc")
        );
    }

    #[test]
    fn a_protocol_error_stops_the_vm_unless_the_exit_is_in() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        let broken =
            || Event::Channel(ChannelEvent::Protocol(ProtocolError::Empty { seq_hint: 1 }));
        assert_eq!(feed(&mut lp, vec![hello(&[]), broken()]), code::PROTOCOL);
        assert_eq!(lp.effects.kills, 1);

        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        assert_eq!(feed(&mut lp, vec![hello(&[]), exit(1, 7), broken()]), 7);
        assert_eq!(lp.effects.kills, 0);
    }

    #[test]
    fn no_hello_in_time_stops_the_vm() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        lp.on_deadline(Instant::now());
        assert_eq!(lp.effects.kills, 0, "not before the deadline");
        lp.on_deadline(Instant::now() + Duration::from_secs(61));
        assert_eq!(lp.effects.kills, 1);
        assert!(lp.state.hello_deadline.is_none(), "reported once");
        assert_eq!(feed(&mut lp, vec![]), code::TIMEOUT);
    }

    #[test]
    fn a_vm_that_ends_without_a_word_has_no_exit() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        let events = vec![
            Event::Channel(ChannelEvent::Connected),
            hello(&[]),
            Event::Channel(ChannelEvent::Closed),
        ];
        assert_eq!(feed(&mut lp, events), code::NO_EXIT);
        let kinds: Vec<&serde_json::Value> = lp
            .timeline
            .events
            .iter()
            .map(|e| &e.event["type"])
            .collect();
        assert_eq!(
            kinds,
            ["channel-connected", "hello", "channel-closed", "vmm-exited"]
        );
    }

    #[test]
    fn a_signal_before_the_guest_connected_stops_the_vm() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        assert_eq!(
            feed(&mut lp, vec![Event::Signal(Signal::SIGTERM)]),
            code::NO_EXIT
        );
        assert_eq!(lp.effects.kills, 1);
    }

    /// The first signal asks the guest to shut down within the grace time; the guest's exit then
    /// decides the code. A second signal does not wait.
    #[test]
    fn a_signal_asks_the_guest_to_shut_down_once() {
        let mut f = Fixture::new();
        let mut guest_end = connect(&f);
        let mut lp = f.event_loop(None);
        lp.handle(hello(&[]));
        let before = Instant::now();
        lp.handle(Event::Signal(Signal::SIGTERM));
        assert_eq!(lp.effects.kills, 0);
        assert!(lp.state.shutdown_sent);
        let deadline = lp.state.kill_deadline.expect("a deadline to power off");
        assert!(deadline >= before + Duration::from_millis(10_000) + POWER_OFF_MARGIN);
        assert_eq!(
            received(&mut guest_end),
            HostMessage::Shutdown { grace_ms: 10_000 }
        );
        lp.handle(Event::Signal(Signal::SIGINT));
        assert_eq!(lp.effects.kills, 1);
        assert_eq!(feed(&mut lp, vec![exit(1, 143)]), 143);
    }

    #[test]
    fn the_last_announced_stage_makes_the_vm_ready() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        let stages = [stage::WORKLOAD_STARTED, stage::K3S_STARTED];
        lp.handle(hello(&stages));
        lp.handle(ready(1, stage::WORKLOAD_STARTED));
        assert!(lp.state.readiness.is_some(), "one more stage to come");
        assert!(lp.timeline.summary.ready_us.is_none());
        lp.handle(ready(2, stage::K3S_STARTED));
        assert!(lp.state.readiness.is_none());
        assert!(lp.timeline.summary.ready_us.is_some());
        let record = lp.session.record.as_ref().expect("record");
        assert_eq!(
            record.ready_stages,
            [stage::WORKLOAD_STARTED, stage::K3S_STARTED, "ready"]
        );
        assert_eq!(feed(&mut lp, vec![exit(3, 0)]), 0);
        assert_eq!(lp.effects.probes, []);
    }

    /// A guest repeating `ready` (and sending stages it never announced) gets each announced
    /// stage recorded once; nothing after ready is recorded or published again.
    #[test]
    fn repeated_ready_frames_are_recorded_once() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        lp.handle(hello(&[stage::WORKLOAD_STARTED, stage::K3S_STARTED]));
        let mut seq = 1;
        for name in [stage::WORKLOAD_STARTED, "bogus", stage::NODE_READY] {
            for _ in 0..500 {
                lp.handle(ready(seq, name));
                seq += 1;
            }
        }
        lp.handle(ready(seq, stage::K3S_STARTED));
        for _ in 0..500 {
            seq += 1;
            lp.handle(ready(seq, stage::K3S_STARTED));
        }
        let record = lp.session.record.as_ref().expect("record");
        assert_eq!(
            record.ready_stages,
            [stage::WORKLOAD_STARTED, stage::K3S_STARTED, "ready"]
        );
    }

    /// Readiness is no part of the exit code: a workload that ends before it passes its status.
    #[test]
    fn a_workload_that_ends_before_ready_passes_its_status() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        let code = feed(&mut lp, vec![hello(&[stage::K3S_STARTED]), exit(1, 9)]);
        assert_eq!(code, 9);
        assert!(lp.timeline.summary.ready_us.is_none());
    }

    /// A late stage is named and the guest asked to shut down: no kill while it may still be
    /// stopping k3s and syncing, a kill once the grace and the margin are spent.
    #[test]
    fn a_late_stage_asks_the_guest_to_shut_down_and_kills_only_after_the_grace() {
        let mut f = Fixture::new();
        let mut guest_end = connect(&f);
        let mut lp = f.event_loop(None);
        lp.handle(hello(&[stage::WORKLOAD_STARTED, stage::K3S_STARTED]));
        let late = Instant::now() + Duration::from_secs(301);
        lp.on_deadline(late);
        assert_eq!(lp.effects.kills, 0, "asked, not killed");
        assert_eq!(
            received(&mut guest_end),
            HostMessage::Shutdown { grace_ms: 10_000 }
        );
        let r = lp.state.readiness.as_ref().expect("still not ready");
        assert_eq!(r.awaited(), Some(stage::WORKLOAD_STARTED));
        assert_eq!(r.deadline(), None, "reported once");
        let last = lp.timeline.events.last().expect("timeline");
        assert_eq!(last.event["type"], "shutdown-requested");
        let kill_at = late + Duration::from_millis(10_000) + POWER_OFF_MARGIN;
        assert_eq!(lp.state.deadline(), Some(kill_at));
        lp.on_deadline(kill_at - Duration::from_millis(1));
        assert_eq!(lp.effects.kills, 0, "not before the grace and the margin");
        lp.on_deadline(kill_at);
        assert_eq!(lp.effects.kills, 1, "a guest that hangs is killed");
        assert_eq!(feed(&mut lp, vec![]), code::TIMEOUT);
    }

    /// A guest that shuts down in time is never killed; the run still ends with the timeout's code.
    #[test]
    fn a_late_stage_with_a_guest_that_powers_off_in_time_is_not_killed() {
        let mut f = Fixture::new();
        let mut guest_end = connect(&f);
        let mut lp = f.event_loop(None);
        lp.handle(hello(&[stage::K3S_STARTED]));
        let late = Instant::now() + Duration::from_secs(301);
        lp.on_deadline(late);
        assert!(matches!(
            received(&mut guest_end),
            HostMessage::Shutdown { .. }
        ));
        lp.handle(exit(1, 143));
        lp.on_deadline(late + Duration::from_secs(1));
        assert_eq!(feed(&mut lp, vec![]), code::TIMEOUT);
        assert_eq!(lp.effects.kills, 0);
        // The guest's exit closed the channel: it waits for that close before powering off.
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut guest_end, &mut rest).expect("closed");
        assert!(rest.is_empty());
    }

    /// Once the guest is shutting down for a late stage, the user's first signal does not cut it
    /// short; a second one does.
    #[test]
    fn a_signal_during_that_shutdown_waits_and_a_second_kills() {
        let mut f = Fixture::new();
        let mut guest_end = connect(&f);
        let mut lp = f.event_loop(None);
        lp.handle(hello(&[stage::K3S_STARTED]));
        lp.on_deadline(Instant::now() + Duration::from_secs(301));
        received(&mut guest_end);
        lp.handle(Event::Signal(Signal::SIGINT));
        assert_eq!(lp.effects.kills, 0);
        lp.handle(Event::Signal(Signal::SIGINT));
        assert_eq!(lp.effects.kills, 1);
    }

    /// Before the guest connected there is no one to ask: the VM is stopped at once.
    #[test]
    fn a_late_stage_without_a_channel_stops_the_vm() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        lp.handle(hello(&[stage::WORKLOAD_STARTED, stage::K3S_STARTED]));
        lp.on_deadline(Instant::now() + Duration::from_secs(301));
        assert_eq!(lp.effects.kills, 1);
        assert_eq!(feed(&mut lp, vec![]), code::TIMEOUT);
    }

    /// The gateway's stage starts the host's probe of the forwarded port; the VM is ready only
    /// when it answers.
    #[test]
    fn the_gateway_is_ready_when_its_forwarded_port_answers() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(Some(30051));
        lp.handle(hello(&[stage::GATEWAY_READY]));
        lp.handle(ready(1, stage::GATEWAY_READY));
        assert_eq!(
            lp.effects.probes,
            [(30051, Duration::from_secs(300), ReadyProbe::Grpc, false)]
        );
        assert!(lp.timeline.summary.ready_us.is_none());
        assert!(
            lp.effects.activations.is_empty(),
            "not before it is healthy"
        );
        lp.handle(Event::GatewayProbed(Ok("healthy".into())));
        assert!(lp.state.readiness.is_none());
        assert!(lp.timeline.summary.ready_us.is_some());
        assert_eq!(lp.effects.activations, ["t"]);
        assert_eq!(feed(&mut lp, vec![exit(2, 0)]), 0);
        assert_eq!(lp.effects.kills, 0);
    }

    /// A forwarded gateway port that does not answer is the last stage not arriving: the guest
    /// is asked to shut down.
    #[test]
    fn a_gateway_port_that_does_not_answer_stops_the_vm_cleanly() {
        let mut f = Fixture::new();
        let mut guest_end = connect(&f);
        let mut lp = f.event_loop(Some(30051));
        lp.handle(hello(&[stage::GATEWAY_READY]));
        lp.handle(ready(1, stage::GATEWAY_READY));
        lp.handle(Event::GatewayProbed(Err("not healthy".into())));
        assert!(lp.effects.activations.is_empty());
        assert_eq!(
            received(&mut guest_end),
            HostMessage::Shutdown { grace_ms: 10_000 }
        );
        assert!(lp.state.kill_deadline.is_some());
        assert_eq!(feed(&mut lp, vec![exit(2, 0)]), code::TIMEOUT);
        assert_eq!(lp.effects.kills, 0);
    }

    /// Without a forwarded gateway port there is nothing to probe: its stage is enough.
    #[test]
    fn an_unforwarded_gateway_is_ready_at_its_stage() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        lp.handle(hello(&[stage::GATEWAY_READY]));
        lp.handle(ready(1, stage::GATEWAY_READY));
        assert_eq!(lp.effects.probes, []);
        assert!(lp.timeline.summary.ready_us.is_some());
    }

    #[test]
    fn forwards_that_fail_stop_the_vm() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        let forward = Forward {
            host: 8080,
            guest: 80,
        };
        lp.handle(Event::Forwarded(Ok(vec![(forward, 1)])));
        assert_eq!(lp.effects.kills, 0);
        let refused = ExposeError::Refused {
            forward,
            status: 500,
            body: "no".into(),
        };
        let code = feed(&mut lp, vec![hello(&[]), Event::Forwarded(Err(refused))]);
        assert_eq!(code, code::SETUP);
        assert_eq!(lp.effects.kills, 1);
    }

    fn guarded(seq: u64, refused: &[&str], loopback: &[&str], ports: &[u16]) -> Event {
        guest(
            seq,
            GuestMessage::NetworkGuarded {
                refused_tcp: refused.iter().map(|a| a.parse().expect("addr")).collect(),
                host_loopback: loopback.iter().map(|a| a.parse().expect("ip")).collect(),
                host_ports: ports.to_vec(),
            },
        )
    }

    fn on_gvproxy(f: &mut Fixture) -> (PathBuf, Vec<Forward>) {
        let forwards = (
            PathBuf::from("/run/t/gvproxy-api.sock"),
            vec![Forward {
                host: 30051,
                guest: 30051,
            }],
        );
        f.gvproxy = Some(forwards.clone());
        forwards
    }

    /// gvproxy's forwards wait for the guest's confirmation that it refuses the API and guards
    /// the host's loopback; only then are they made.
    #[test]
    fn gvproxy_forwards_wait_for_the_guests_refusals() {
        let mut f = Fixture::new();
        let forwards = on_gvproxy(&mut f);
        let mut lp = f.event_loop(None);
        lp.handle(hello(&[stage::WORKLOAD_STARTED]));
        assert!(lp.effects.exposed.is_empty(), "not before the confirmation");
        lp.handle(guarded(1, &["192.168.127.1:80"], &["192.168.127.254"], &[]));
        assert_eq!(lp.effects.exposed, [forwards]);
        lp.handle(guarded(2, &["192.168.127.1:80"], &["192.168.127.254"], &[]));
        assert_eq!(lp.effects.exposed.len(), 1, "once");
        lp.handle(ready(3, stage::WORKLOAD_STARTED));
        assert!(lp.timeline.summary.ready_us.is_some());
        assert_eq!(feed(&mut lp, vec![exit(4, 0)]), 0);
    }

    /// A guest that does not refuse the API, or says it is ready without confirming anything,
    /// gets no forwards and is asked to shut down.
    #[test]
    fn a_guest_that_does_not_confirm_gets_no_forwards_and_is_stopped() {
        for (events, why) in [
            (
                vec![guarded(1, &[], &["192.168.127.254"], &[])],
                "refuses gvproxy's control API",
            ),
            (
                vec![guarded(
                    1,
                    &["192.168.127.1:80"],
                    &["192.168.127.254"],
                    &[22],
                )],
                "host ports [22]",
            ),
            (
                vec![ready(1, stage::WORKLOAD_STARTED)],
                "without confirming",
            ),
        ] {
            let mut f = Fixture::new();
            on_gvproxy(&mut f);
            let mut guest_end = connect(&f);
            let mut lp = f.event_loop(None);
            lp.handle(hello(&[stage::WORKLOAD_STARTED]));
            for e in events {
                lp.handle(e);
            }
            assert!(lp.effects.exposed.is_empty(), "{why}");
            assert!(lp.timeline.summary.ready_us.is_none(), "{why}");
            assert_eq!(
                received(&mut guest_end),
                HostMessage::Shutdown { grace_ms: 10_000 }
            );
            let refused = lp
                .timeline
                .events
                .iter()
                .find(|e| e.event["type"] == "forwards-refused")
                .expect("recorded");
            assert!(
                refused.event["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(why)),
                "{why}: {}",
                refused.event
            );
            assert_eq!(feed(&mut lp, vec![exit(2, 0)]), code::SETUP, "{why}");
        }
    }

    /// Without gvproxy forwards the confirmation changes nothing.
    #[test]
    fn without_gvproxy_forwards_the_confirmation_is_only_recorded() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        lp.handle(hello(&[stage::WORKLOAD_STARTED]));
        lp.handle(guarded(1, &[], &[], &[]));
        lp.handle(ready(2, stage::WORKLOAD_STARTED));
        assert!(lp.effects.exposed.is_empty());
        assert!(lp.timeline.summary.ready_us.is_some());
    }

    /// The last host error counts, and beats the guest's report.
    #[test]
    fn a_host_error_beats_the_workload_status() {
        let mut f = Fixture::new();
        let mut lp = f.event_loop(None);
        lp.on_deadline(Instant::now() + Duration::from_secs(61));
        let broken = Event::Channel(ChannelEvent::Protocol(ProtocolError::Empty { seq_hint: 0 }));
        assert_eq!(feed(&mut lp, vec![broken]), code::PROTOCOL);
    }
}
