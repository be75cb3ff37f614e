//! The workload's life: spawning it as init's child (k3s is no subreaper, so exec'ing it as PID 1
//! would leak zombies), reaping every orphan, forwarding signals, and stopping it with a deadline.
//!
//! Signals are blocked in every thread from init's first instruction and read through a signalfd
//! here, which is also how PID 1 receives them at all (unblocked default-action signals to PID 1
//! are dropped by the kernel). The host's `shutdown` message arrives through a pipe.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use openshell_shared::config::Workload;
use openshell_shared::{GuestMessage, HostMessage, Level};

use crate::reporter::{HostHandler, Reporter};

/// Signals init handles itself; blocked everywhere so only the signalfd sees them.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGPWR,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

/// Must run before any thread starts, so that every thread inherits the mask.
pub fn block_signals() -> nix::Result<()> {
    handled_signals().thread_block()
}

/// For a child between fork and exec: nothing blocked and nothing ignored. Init blocks its
/// signals in every thread, and a disposition of "ignore" survives exec: `supervise` started
/// under `nohup` (or in the background of a script, which ignores SIGINT and SIGQUIT) would hand
/// its workload signals that not even the workload's own `trap` can catch (a POSIX shell leaves
/// a signal ignored on entry ignored). Only async-signal-safe calls (sigaction, sigprocmask).
pub fn reset_signals_in_child() -> nix::Result<()> {
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler, so no code of ours runs on a signal.
        unsafe { sigaction(sig, &default) }?;
    }
    SigSet::empty().thread_set_mask()
}

/// Write end of the pipe the host's shutdown request travels through.
static SHUTDOWN_TX: OnceLock<OwnedFd> = OnceLock::new();

/// The boot channel's handler for host messages.
pub fn host_handler() -> HostHandler {
    Box::new(|msg| match msg {
        HostMessage::Shutdown { grace_ms } => {
            if let Some(tx) = SHUTDOWN_TX.get() {
                let _ = nix::unistd::write(tx, &grace_ms.to_ne_bytes());
            }
        }
    })
}

/// Children other threads started and want the status of (the exec service's commands). The
/// reaper below collects every child with `waitpid(-1)`, so their `Child::wait` would never see
/// it; instead the reaper hands the status of a claimed pid to its claimant. The lock is held
/// across the claimant's spawn and across each reap, so a child cannot be reaped before it is
/// claimed, and std's spawn (which waits for a child whose exec failed) never races the reaper.
static CLAIMS: Mutex<Option<HashMap<i32, Sender<i32>>>> = Mutex::new(None);

fn claims() -> MutexGuard<'static, Option<HashMap<i32, Sender<i32>>>> {
    CLAIMS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Spawns `cmd` while the reaper is held off, and returns the child with a receiver for its
/// status (shell convention), delivered by PID 1's reaper.
pub fn spawn_claimed(cmd: &mut Command) -> std::io::Result<(std::process::Child, Receiver<i32>)> {
    let mut claims = claims();
    let child = cmd.spawn()?;
    let (tx, rx) = mpsc::channel();
    claims
        .get_or_insert_with(HashMap::new)
        .insert(child.id() as i32, tx);
    Ok((child, rx))
}

/// Which processes shutdown may signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// PID 1 of the VM: every process (`kill(-1)`).
    Everything,
    /// Anywhere else (`openshell-init supervise`): only the workload's process group.
    WorkloadGroup,
}

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("cannot start workload {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("workload has an empty command")]
    NoProgram,
    #[error("signal handling setup failed: {0}")]
    Signals(Errno),
}

/// The shell convention for a child's end: its exit code, or 128 + the killing signal.
pub fn status_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

pub struct Supervisor {
    pub scope: Scope,
    pub grace: Duration,
    signals: SignalFd,
    shutdown_rx: OwnedFd,
}

impl Supervisor {
    pub fn new(scope: Scope, grace: Duration) -> Result<Self, SuperviseError> {
        let signals = SignalFd::with_flags(
            &handled_signals(),
            SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
        )
        .map_err(SuperviseError::Signals)?;
        let (rx, tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(SuperviseError::Signals)?;
        // Only one supervisor per process; a second one (tests) keeps the first pipe.
        let _ = SHUTDOWN_TX.set(tx);
        Ok(Self {
            scope,
            grace,
            signals,
            shutdown_rx: rx,
        })
    }

    /// Starts the workload in its own session, with exactly the configured environment.
    pub fn spawn(&self, workload: &Workload) -> Result<Pid, SuperviseError> {
        let (program, args) = workload
            .argv
            .split_first()
            .ok_or(SuperviseError::NoProgram)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(&workload.env)
            .current_dir(&workload.cwd);
        // SAFETY: between fork and exec only async-signal-safe calls (setsid, sigaction,
        // sigprocmask).
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                reset_signals_in_child().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| SuperviseError::Spawn {
            program: program.clone(),
            source,
        })?;
        Ok(Pid::from_raw(child.id() as i32))
    }

    /// Runs until the workload is gone and everything else is stopped; returns its status.
    pub fn wait(&mut self, workload: Pid, reporter: &Reporter) -> i32 {
        let mut status: Option<i32> = None;
        let mut deadline: Option<Instant> = None;
        let mut killed = false;
        loop {
            self.reap(|pid, code| {
                if pid == workload {
                    status = Some(code);
                }
            });
            if let Some(code) = status {
                reporter.log(Level::Info, format!("workload exited with status {code}"));
                self.stop_the_rest(reporter);
                return code;
            }
            let timeout = match deadline {
                Some(d) if Instant::now() >= d => {
                    if !killed {
                        reporter.log(
                            Level::Warn,
                            format!(
                                "workload still running {} ms after SIGTERM: killing it",
                                self.grace.as_millis()
                            ),
                        );
                        self.kill_all(workload, Signal::SIGKILL);
                        killed = true;
                    }
                    PollTimeout::from(100u16)
                }
                Some(d) => millis(d.saturating_duration_since(Instant::now())),
                None => PollTimeout::NONE,
            };
            match self.next_event(timeout) {
                Event::Signal(sig) => match sig {
                    Signal::SIGCHLD => {}
                    Signal::SIGTERM | Signal::SIGINT | Signal::SIGPWR => {
                        let forward = if sig == Signal::SIGPWR {
                            Signal::SIGTERM
                        } else {
                            sig
                        };
                        if deadline.is_none() {
                            reporter.log(
                                Level::Info,
                                format!(
                                    "{sig}: stopping the workload (grace {} ms)",
                                    self.grace.as_millis()
                                ),
                            );
                            deadline = Some(Instant::now() + self.grace);
                        }
                        let _ = kill(Pid::from_raw(-workload.as_raw()), forward);
                    }
                    other => {
                        let _ = kill(Pid::from_raw(-workload.as_raw()), other);
                    }
                },
                Event::HostShutdown(grace_ms) => {
                    if deadline.is_none() {
                        // Clamped: the host's number must not overflow the deadline below.
                        self.grace = openshell_shared::config::grace(grace_ms);
                        reporter.log(
                            Level::Info,
                            format!("host asked to shut down: stopping the workload (grace {grace_ms} ms)"),
                        );
                        deadline = Some(Instant::now() + self.grace);
                        let _ = kill(Pid::from_raw(-workload.as_raw()), Signal::SIGTERM);
                    }
                }
                Event::Timeout => {}
            }
        }
    }

    /// After the workload: ask everything left to stop, then kill what does not.
    fn stop_the_rest(&mut self, reporter: &Reporter) {
        if self.scope == Scope::WorkloadGroup {
            return;
        }
        let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
        let deadline = Instant::now() + self.grace.min(Duration::from_secs(2));
        let mut left = true;
        while Instant::now() < deadline {
            left = self.reap(|_, _| {});
            if !left {
                break;
            }
            let _ = self.next_event(millis(deadline.saturating_duration_since(Instant::now())));
        }
        if left {
            reporter.log(
                Level::Warn,
                "processes left after the workload: killing them",
            );
            let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
            let until = Instant::now() + Duration::from_secs(2);
            while self.reap(|_, _| {}) && Instant::now() < until {
                let _ = self.next_event(PollTimeout::from(50u16));
            }
        }
    }

    fn kill_all(&self, workload: Pid, sig: Signal) {
        match self.scope {
            Scope::Everything => {
                let _ = kill(Pid::from_raw(-1), sig);
            }
            Scope::WorkloadGroup => {
                let _ = kill(Pid::from_raw(-workload.as_raw()), sig);
            }
        }
    }

    /// Reaps every child that has ended, calling `ended` for each. Returns whether children are
    /// still running.
    fn reap(&self, mut ended: impl FnMut(Pid, i32)) -> bool {
        let mut claims = claims();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return true,
                Ok(status) => {
                    if let (Some(pid), Some(code)) = (status.pid(), status_code(status)) {
                        match claims.as_mut().and_then(|c| c.remove(&pid.as_raw())) {
                            Some(claimant) => {
                                let _ = claimant.send(code);
                            }
                            None => ended(pid, code),
                        }
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => return false, // ECHILD: nobody left
            }
        }
    }

    fn next_event(&mut self, timeout: PollTimeout) -> Event {
        let mut fds = [
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.shutdown_rx.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(_) => return Event::Timeout,
            Ok(_) => {}
        }
        if let Ok(Some(info)) = self.signals.read_signal() {
            if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                return Event::Signal(sig);
            }
        }
        let mut buf = [0u8; 8];
        if let Ok(8) = nix::unistd::read(self.shutdown_rx.as_raw_fd(), &mut buf) {
            return Event::HostShutdown(u64::from_ne_bytes(buf));
        }
        Event::Timeout
    }
}

enum Event {
    Signal(Signal),
    HostShutdown(u64),
    Timeout,
}

fn millis(d: Duration) -> PollTimeout {
    PollTimeout::try_from(d.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
}

/// Spawns the workload, reports it, and supervises it to the end. Returns its status.
pub fn run(workload: &Workload, grace: Duration, scope: Scope, reporter: &Reporter) -> i32 {
    run_watched(workload, grace, scope, reporter, || {})
}

/// [`run`], calling `started` once the workload is spawned and reported (k3s's readiness
/// probes start there).
pub fn run_watched(
    workload: &Workload,
    grace: Duration,
    scope: Scope,
    reporter: &Reporter,
    started: impl FnOnce(),
) -> i32 {
    let mut sup = match Supervisor::new(scope, grace) {
        Ok(s) => s,
        Err(e) => {
            reporter.emit(GuestMessage::Fatal {
                phase: "workload".into(),
                error: e.to_string(),
            });
            return 125;
        }
    };
    let pid = match sup.spawn(workload) {
        Ok(pid) => pid,
        Err(e) => {
            reporter.emit(GuestMessage::Fatal {
                phase: "workload".into(),
                error: e.to_string(),
            });
            // The shell's codes: 127 not found, 126 found but not runnable.
            return match &e {
                SuperviseError::Spawn { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    127
                }
                _ => 126,
            };
        }
    };
    reporter.log(
        Level::Info,
        format!("workload started as pid {pid}: {}", workload.argv.join(" ")),
    );
    reporter.emit(GuestMessage::Ready {
        stage: openshell_shared::protocol::stage::WORKLOAD_STARTED.into(),
    });
    started();
    sup.wait(pid, reporter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        let pid = Pid::from_raw(10);
        assert_eq!(status_code(WaitStatus::Exited(pid, 7)), Some(7));
        assert_eq!(
            status_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            status_code(WaitStatus::Signaled(pid, Signal::SIGTERM, true)),
            Some(143)
        );
        assert_eq!(status_code(WaitStatus::StillAlive), None);
    }

    /// The host's `shutdown` with the largest grace a u64 holds: clamped to the configuration's
    /// limit, the workload is stopped and its status returned. (Linux's `Instant` happens to
    /// hold 584 million years; where it does not, the unclamped sum panics, and for PID 1 that is
    /// a kernel panic.) In a forked child: the supervisor reaps every child of its process and
    /// owns the process-wide shutdown pipe.
    #[test]
    fn a_huge_grace_from_the_host_is_clamped() {
        use nix::unistd::ForkResult;
        // SAFETY: the child runs the supervisor single-threaded and ends in _exit.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            ForkResult::Child => {
                let code = std::panic::catch_unwind(|| {
                    block_signals().expect("block");
                    let mut sup = Supervisor::new(Scope::WorkloadGroup, Duration::from_secs(1))
                        .expect("supervisor");
                    let workload = Workload {
                        argv: vec!["/bin/sleep".into(), "30".into()],
                        env: Default::default(),
                        cwd: "/".into(),
                    };
                    let pid = sup.spawn(&workload).expect("spawn");
                    host_handler()(HostMessage::Shutdown { grace_ms: u64::MAX });
                    let reporter = Reporter::new(crate::reporter::Sink::JsonLines, 0);
                    (sup.wait(pid, &reporter), sup.grace)
                });
                let max = Duration::from_millis(openshell_shared::config::MAX_GRACE_MS);
                let status = match code {
                    Ok((143, grace)) if grace <= max => 0,
                    Ok(_) => 1,
                    Err(_) => 2,
                };
                // SAFETY: ends the forked child without the test harness's exit path.
                unsafe { libc::_exit(status) };
            }
            ForkResult::Parent { child } => {
                let deadline = Instant::now() + Duration::from_secs(30);
                let status = loop {
                    match waitpid(child, Some(WaitPidFlag::WNOHANG)).expect("waitpid") {
                        WaitStatus::StillAlive if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        WaitStatus::StillAlive => {
                            let _ = kill(child, Signal::SIGKILL);
                            panic!("the supervisor did not stop the workload in 30 s");
                        }
                        other => break other,
                    }
                };
                assert_eq!(
                    status,
                    WaitStatus::Exited(child, 0),
                    "1: not SIGTERM's status or the grace not clamped, 2: panicked"
                );
            }
        }
    }
}
