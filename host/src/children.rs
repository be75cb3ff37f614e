//! Helper processes (VMM, virtio-fs daemon, vsock device): started so that they die with the
//! host, even when the host is killed with SIGKILL, and stopped and reaped on every way out.
//!
//! Linux: PR_SET_PDEATHSIG(SIGKILL) in the child. It fires when the *thread* that forked exits,
//! so children are spawned from the main thread only. macOS has no equivalent; there the children
//! are stopped on normal exit only (a kqueue exit watcher is the planned replacement).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(spawn_err)?;
        Ok(Self {
            name,
            child,
            log: log.to_path_buf(),
        })
    }

    /// Waits until the helper has created `socket`, failing early if it exits.
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
            pause = (pause * 2).min(Duration::from_millis(20));
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
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn alive(pid: i32) -> bool {
        // Zombies count as dead: read the state.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }

    /// A helper started by a process that is then SIGKILLed must die too.
    #[test]
    fn helpers_die_when_the_host_is_killed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let pidfile = tmp.path().join("pid");
        // The "host": a forked process that starts `sleep` through Helper::spawn, writes the
        // sleep's pid, and waits to be killed.
        // SAFETY: the child only runs the spawn and then sleeps; the test thread waits on it.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let mut cmd = Command::new("sleep");
                cmd.arg("100");
                let code = match Helper::spawn("sleep", cmd, &tmp.path().join("log")) {
                    Ok(h) => {
                        let _ = std::fs::write(&pidfile, h.child.id().to_string());
                        std::thread::sleep(Duration::from_secs(100));
                        0
                    }
                    Err(_) => 1,
                };
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let deadline = Instant::now() + Duration::from_secs(10);
                let sleep_pid = loop {
                    if let Ok(t) = std::fs::read_to_string(&pidfile) {
                        if let Ok(p) = t.trim().parse::<i32>() {
                            break p;
                        }
                    }
                    assert!(Instant::now() < deadline, "helper never started");
                    std::thread::sleep(Duration::from_millis(10));
                };
                assert!(alive(sleep_pid));
                nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL).expect("kill");
                nix::sys::wait::waitpid(child, None).expect("reap host");
                let deadline = Instant::now() + Duration::from_secs(5);
                while alive(sleep_pid) {
                    assert!(
                        Instant::now() < deadline,
                        "helper {sleep_pid} outlived its host"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
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
