//! Helper processes (VMM, virtio-fs daemon, vsock device): started so that they die with the
//! host, even when the host is killed with SIGKILL, and stopped and reaped on every way out.
//!
//! Linux: PR_SET_PDEATHSIG(SIGKILL) in the child. It fires when the *thread* that forked exits,
//! so children are spawned from the main thread only. The kernel clears it when a process
//! changes its credentials, and passt started as root switches to `nobody` at once: as root a
//! watcher process does the job too ([`linux_guard`]). It is forked from the host before the
//! first helper and holds only the read end of a pipe whose write end only the host keeps;
//! each helper, between fork and exec (still root, still under its parent-death signal), writes
//! its own pid there, so no helper runs unregistered however early the host dies. The watcher
//! opens a pidfd for each pid (a pidfd names one process, never a later one with the same pid)
//! and, at end of file on the pipe (the host is gone, however it died), SIGKILLs every helper
//! still running and exits.
//!
//! macOS has no parent-death signal, so a guard process does the job (compile-checked only: no
//! macOS machine here). Before the first helper starts, the host forks a watcher (fork without
//! exec: after the fork it runs only async-signal-safe system calls on stack memory). The watcher
//! closes every inherited descriptor but the read end of a pipe (so it holds no lock, socket or
//! output pipe of the host), ignores the terminal's and `down`'s signals, and waits on a kqueue
//! for `EVFILT_PROC`/`NOTE_EXIT` of the host's pid and for input on the pipe. The host writes each
//! helper's pid to the pipe as it is spawned ([`guard_child`]) and its negation once the helper
//! is reaped ([`release_child`]), so a reused pid is never killed. When the host exits, however it
//! dies, the watcher SIGKILLs every pid still registered and exits. Left open: a host killed in
//! the microseconds between a helper's spawn and the write of its pid leaves that helper running.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long [`Helper::wait_for_socket`] looks every millisecond before it backs off.
pub const SOCKET_FAST_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: &'static str,
        program: String,
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) before creating {socket}; see {log}")]
    DiedEarly {
        name: &'static str,
        status: std::process::ExitStatus,
        socket: String,
        log: String,
    },
    #[error("{name} did not create {socket} within {waited:?}; see {log}")]
    NoSocket {
        name: &'static str,
        socket: String,
        waited: Duration,
        log: String,
    },
}

/// Configures `cmd` so the child dies with this process and starts with signals unblocked.
pub fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as i32;
        // SAFETY: prctl, sigprocmask and getppid are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl: then nobody will signal us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                linux_guard::register_self();
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cmd;
    }
}

/// Keeps `fd` open in the program `cmd` runs (std opens every descriptor close-on-exec): for a
/// lock the child must hold for as long as it lives.
pub fn keep_open(cmd: &mut Command, fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: fcntl is async-signal-safe, and after the fork it changes only the child's table.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A started helper with its name for messages.
pub struct Helper {
    pub name: &'static str,
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Helper {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<Self, ChildError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let spawn_err = |source| ChildError::Spawn {
            name,
            program: program.clone(),
            source,
        };
        let out = crate::private_dir::open_no_follow(
            log,
            std::fs::OpenOptions::new().create(true).append(true),
        )
        .map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_parent(&mut cmd);
        start_guard();
        let child = cmd.spawn().map_err(spawn_err)?;
        guard_child(child.id());
        Ok(Self {
            name,
            child,
            log: log.to_path_buf(),
        })
    }

    /// Waits until the helper has created `socket`, failing early if it exits.
    ///
    /// Looks every millisecond for the first [`SOCKET_FAST_POLL`], then less and less often:
    /// the helpers make their sockets 2 to 10 ms after their start, every boot waits for them
    /// before the VMM starts, and a pause doubling from the start overshot by up to its last
    /// step (7 ms for a socket made at 8 ms).
    pub fn wait_for_socket(&mut self, socket: &Path, timeout: Duration) -> Result<(), ChildError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        while !socket.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ChildError::DiedEarly {
                    name: self.name,
                    status,
                    socket: socket.display().to_string(),
                    log: self.log.display().to_string(),
                });
            }
            if start.elapsed() >= timeout {
                return Err(ChildError::NoSocket {
                    name: self.name,
                    socket: socket.display().to_string(),
                    waited: timeout,
                    log: self.log.display().to_string(),
                });
            }
            std::thread::sleep(pause);
            if start.elapsed() >= SOCKET_FAST_POLL {
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// SIGTERM, a short wait, then SIGKILL; always reaps.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        release_child(self.child.id());
    }
}

/// Starts the exit watcher that kills the helpers when the host dies (macOS always; Linux as
/// root, where a helper may drop the parent-death signal with its privileges). Idempotent; a
/// failure is reported once and helpers then die with a normal exit only.
pub fn start_guard() {
    #[cfg(target_os = "macos")]
    mac_guard::start();
    #[cfg(target_os = "linux")]
    linux_guard::start();
}

/// Registers a helper with the exit watcher (macOS; a no-op elsewhere).
pub fn guard_child(pid: u32) {
    #[cfg(target_os = "macos")]
    mac_guard::send(pid as i32);
    #[cfg(not(target_os = "macos"))]
    let _ = pid;
}

/// Unregisters a reaped helper, so the watcher never kills a process that reuses its pid.
pub fn release_child(pid: u32) {
    #[cfg(target_os = "macos")]
    mac_guard::send(-(pid as i32));
    #[cfg(not(target_os = "macos"))]
    let _ = pid;
}

#[cfg(target_os = "linux")]
mod linux_guard {
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::Mutex;

    /// Most helpers a host runs at once, with room to spare; more are not guarded.
    const MAX_PIDS: usize = 64;

    /// Write end of the pipe to the watcher, -1 without one. Read between fork and exec.
    static FD: AtomicI32 = AtomicI32::new(-1);
    /// The pid that started the watcher: a process forked from the host inherits `FD` but must
    /// not register with the host's watcher, which would not see it die.
    static OWNER: Mutex<u32> = Mutex::new(0);

    pub fn start() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let mut owner = OWNER.lock().unwrap_or_else(|p| p.into_inner());
        let me = std::process::id();
        if *owner == me {
            return;
        }
        let inherited = FD.swap(-1, Ordering::SeqCst);
        if inherited >= 0 {
            // SAFETY: our copy of the parent's write end, owned by nobody else here.
            unsafe { libc::close(inherited) };
        }
        *owner = me;
        match fork_watcher() {
            Ok(fd) => FD.store(fd, Ordering::SeqCst),
            Err(e) => eprintln!(
                "openshell-host: cannot start the helper exit watcher: {e}; a helper that drops root may outlive a killed host"
            ),
        }
    }

    /// In a child between fork and exec: registers its own pid. Async-signal-safe.
    pub fn register_self() {
        let fd = FD.load(Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: getpid and a 4-byte write (atomic, below PIPE_BUF) to a descriptor this
            // process holds.
            unsafe {
                let pid = libc::getpid();
                libc::write(fd, (&pid as *const libc::pid_t).cast(), 4);
            }
        }
    }

    fn fork_watcher() -> std::io::Result<i32> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given; both close on exec,
        // so helpers hold the write end only until their exec.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the child runs only `watch`: async-signal-safe system calls on stack memory,
        // ending in _exit.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => watch(fds[0]),
            _ => {
                // SAFETY: the read end is the watcher's now.
                unsafe { libc::close(fds[0]) };
                Ok(fds[1])
            }
        }
    }

    /// The watcher: never returns, never allocates.
    fn watch(rfd: i32) -> ! {
        // SAFETY: only async-signal-safe system calls on this process's own descriptors and
        // stack, as required in the child of a multi-threaded process.
        unsafe {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::signal(sig, libc::SIG_IGN);
            }
            let max = libc::getdtablesize().clamp(0, 65_536);
            for fd in 0..max {
                if fd != rfd {
                    libc::close(fd);
                }
            }
            let mut pidfds = [-1i32; MAX_PIDS];
            let mut pids = [0 as libc::pid_t; MAX_PIDS];
            while wait_once(rfd, &mut pidfds, &mut pids) {}
            for i in 0..MAX_PIDS {
                if pidfds[i] >= 0 {
                    let null: *const libc::siginfo_t = std::ptr::null();
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfds[i],
                        libc::SIGKILL,
                        null,
                        0,
                    );
                } else if pids[i] > 0 {
                    // No pidfds (before Linux 5.3): by pid.
                    libc::kill(pids[i], libc::SIGKILL);
                }
            }
            libc::_exit(0)
        }
    }

    /// One wait for a registration, a helper's exit or the end of the pipe; false at the end.
    ///
    /// # Safety
    /// Async-signal-safe system calls only; for the watcher process.
    unsafe fn wait_once(
        rfd: i32,
        pidfds: &mut [i32; MAX_PIDS],
        pids: &mut [libc::pid_t; MAX_PIDS],
    ) -> bool {
        let mut polled: [libc::pollfd; MAX_PIDS + 1] = std::mem::zeroed();
        polled[0] = libc::pollfd {
            fd: rfd,
            events: libc::POLLIN,
            revents: 0,
        };
        for i in 0..MAX_PIDS {
            // A negative descriptor is skipped by poll.
            polled[i + 1] = libc::pollfd {
                fd: pidfds[i],
                events: libc::POLLIN,
                revents: 0,
            };
        }
        if libc::poll(polled.as_mut_ptr(), (MAX_PIDS + 1) as libc::nfds_t, -1) < 0 {
            return *libc::__errno_location() == libc::EINTR;
        }
        // A helper ended: its slot is free (its pidfd readable means it exited).
        for i in 0..MAX_PIDS {
            if pidfds[i] >= 0 && polled[i + 1].revents != 0 {
                libc::close(pidfds[i]);
                pidfds[i] = -1;
                pids[i] = 0;
            }
        }
        if polled[0].revents == 0 {
            return true;
        }
        let mut pid: libc::pid_t = 0;
        match libc::read(rfd, (&mut pid as *mut libc::pid_t).cast(), 4) {
            4 => {
                if let Some(i) = (0..MAX_PIDS).find(|&i| pidfds[i] < 0 && pids[i] == 0) {
                    let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
                    if fd >= 0 {
                        pidfds[i] = fd as i32;
                        pids[i] = pid;
                    } else if *libc::__errno_location() == libc::ENOSYS {
                        pids[i] = pid;
                    }
                    // Otherwise (ESRCH) the helper is gone already: nothing to kill later.
                }
                true
            }
            // End of file: every writer, the host last, is gone.
            0 => false,
            _ => *libc::__errno_location() == libc::EINTR,
        }
    }
}

#[cfg(target_os = "macos")]
mod mac_guard {
    use std::io::Write;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::{Mutex, OnceLock};

    /// Most helpers a host runs at once, with room to spare; more are not guarded.
    const MAX_PIDS: usize = 64;

    /// Write end of the pipe to the watcher; `None` when it could not be started.
    static PIPE: OnceLock<Mutex<Option<std::fs::File>>> = OnceLock::new();

    pub fn start() {
        PIPE.get_or_init(|| match fork_watcher() {
            Ok(f) => Mutex::new(Some(f)),
            Err(e) => {
                eprintln!("openshell-host: cannot start the helper exit watcher: {e}; helpers may outlive a killed host");
                Mutex::new(None)
            }
        });
    }

    pub fn send(value: i32) {
        start();
        if let Some(lock) = PIPE.get() {
            let mut w = lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = w.as_mut() {
                // 4 bytes are below PIPE_BUF: the write is atomic.
                let _ = f.write_all(&value.to_ne_bytes());
            }
        }
    }

    fn fork_watcher() -> std::io::Result<std::fs::File> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe writes two descriptors into the array it is given.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Helpers must not inherit the write end, or they would keep it open.
        // SAFETY: fcntl on a descriptor this function owns.
        unsafe { libc::fcntl(fds[1], libc::F_SETFD, libc::FD_CLOEXEC) };
        let host = std::process::id() as libc::pid_t;
        // SAFETY: the child runs only `watch`, which makes async-signal-safe system calls on
        // stack memory and ends in _exit.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => watch(host, fds[0]),
            _ => {
                drop(read);
                Ok(std::fs::File::from(write))
            }
        }
    }

    /// The watcher process: never returns, never allocates.
    fn watch(host: libc::pid_t, rfd: i32) -> ! {
        // SAFETY: only async-signal-safe system calls on this process's own descriptors and
        // stack, as required in the child of a multi-threaded process.
        unsafe {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::signal(sig, libc::SIG_IGN);
            }
            // Capped: with an unlimited descriptor limit the table size can be huge.
            let max = libc::getdtablesize().clamp(0, 65_536);
            for fd in 0..max {
                if fd != rfd {
                    libc::close(fd);
                }
            }
            let kq = libc::kqueue();
            if kq < 0 {
                libc::_exit(1);
            }
            let mut changes: [libc::kevent; 2] = std::mem::zeroed();
            changes[0].ident = host as libc::uintptr_t;
            changes[0].filter = libc::EVFILT_PROC;
            changes[0].flags = libc::EV_ADD;
            changes[0].fflags = libc::NOTE_EXIT;
            changes[1].ident = rfd as libc::uintptr_t;
            changes[1].filter = libc::EVFILT_READ;
            changes[1].flags = libc::EV_ADD;
            let mut pids = [0 as libc::pid_t; MAX_PIDS];
            // ESRCH: the host is gone already; nothing is registered yet either way.
            if libc::kevent(
                kq,
                changes.as_ptr(),
                2,
                std::ptr::null_mut(),
                0,
                std::ptr::null(),
            ) < 0
                || libc::getppid() != host
            {
                libc::_exit(0);
            }
            let mut event: libc::kevent = std::mem::zeroed();
            loop {
                let n = libc::kevent(kq, std::ptr::null(), 0, &mut event, 1, std::ptr::null());
                if n < 0 {
                    if *libc::__error() == libc::EINTR {
                        continue;
                    }
                    break;
                }
                if n == 0 || event.filter == libc::EVFILT_PROC {
                    break;
                }
                let mut buf = [0u8; 4];
                let got = libc::read(rfd, buf.as_mut_ptr().cast(), 4);
                if got != 4 {
                    // End of file: the host closed the pipe, so it is exiting.
                    break;
                }
                let v = i32::from_ne_bytes(buf);
                if v > 0 {
                    if let Some(slot) = pids.iter_mut().find(|p| **p == 0) {
                        *slot = v;
                    }
                } else if let Some(slot) = pids.iter_mut().find(|p| **p == -v) {
                    *slot = 0;
                }
            }
            for &pid in &pids {
                if pid > 0 {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            libc::_exit(0)
        }
    }
}

/// Whether `pid` runs (a zombie counts as dead).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Forks a stand-in host that runs `start` (which starts a child and returns its pid) and then
/// waits; SIGKILLs that host once the child runs, and asserts the child dies within 5 s. A host
/// that never gets its child going (a fork of this multithreaded test process can block on a
/// lock another thread held at the fork; a loaded machine can be slow) is killed and forked
/// again, three times at most.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn assert_dies_with_killed_host(what: &str, start: impl Fn() -> Option<i32>) {
    use std::time::{Duration, Instant};
    for attempt in 1..=3 {
        let tmp = tempfile::tempdir().expect("tmp");
        let pidfile = tmp.path().join("pid");
        // SAFETY: the forked "host" only runs `start`, writes a file and sleeps; the test thread
        // waits on it.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let code = match start() {
                    Some(pid) => {
                        let _ = std::fs::write(&pidfile, pid.to_string());
                        std::thread::sleep(Duration::from_secs(100));
                        0
                    }
                    None => 1,
                };
                // SAFETY: ends the forked host without running the test harness's exit path.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let deadline = Instant::now() + Duration::from_secs(20);
                let pid = loop {
                    if let Some(p) = std::fs::read_to_string(&pidfile)
                        .ok()
                        .and_then(|t| t.trim().parse::<i32>().ok())
                    {
                        break Some(p);
                    }
                    if Instant::now() > deadline {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                let Some(pid) = pid else {
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                    let _ = nix::sys::wait::waitpid(child, None);
                    assert!(attempt < 3, "the {what} never started ({attempt} tries)");
                    continue;
                };
                assert!(alive(pid));
                nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL).expect("kill");
                nix::sys::wait::waitpid(child, None).expect("reap host");
                let deadline = Instant::now() + Duration::from_secs(5);
                while alive(pid) {
                    assert!(Instant::now() < deadline, "{what} {pid} outlived its host");
                    std::thread::sleep(Duration::from_millis(10));
                }
                return;
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A helper started by a process that is then SIGKILLed must die too.
    #[test]
    fn helpers_die_when_the_host_is_killed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let log = tmp.path().join("log");
        assert_dies_with_killed_host("helper", || {
            let mut cmd = Command::new("sleep");
            cmd.arg("100");
            let h = Helper::spawn("sleep", cmd, &log).ok()?;
            let pid = h.child.id() as i32;
            // Kept alive (not dropped, which would stop it) until the "host" is killed.
            std::mem::forget(h);
            Some(pid)
        });
    }

    #[test]
    fn early_exit_is_reported_with_the_log() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom >&2; exit 3"]);
        let log = tmp.path().join("h.log");
        let mut h = Helper::spawn("virtiofsd", cmd, &log).expect("spawn");
        let err = h
            .wait_for_socket(&tmp.path().join("never.sock"), Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(
                err,
                ChildError::DiedEarly {
                    name: "virtiofsd",
                    ..
                }
            ),
            "{err}"
        );
        assert!(std::fs::read_to_string(&log).expect("log").contains("boom"));
    }
}
