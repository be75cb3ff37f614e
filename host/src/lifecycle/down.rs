//! `openshell-host down`: stops a running instance. SIGTERM to its `up` process, which asks the
//! guest over the boot channel to shut down (workload stopped, filesystems synced); past the
//! deadline SIGKILL to the VMM and to `up`. "Down" is judged by the instance lock, which the
//! kernel releases when `up` exits, not by pids that may already be reused.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::state::{self, StateDir, StateError};
use crate::failure::Failure;

#[derive(Debug, clap::Args)]
pub struct DownArgs {
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Seconds to wait for a clean shutdown before killing the VM.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DownError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("instance {name:?} holds its lock but names no pid in {lock}")]
    NoPid { name: String, lock: PathBuf },
    #[error("instance {0:?} still holds its lock after SIGKILL")]
    StillLocked(String),
}

impl Failure for DownError {
    fn exit_code(&self) -> i32 {
        1
    }
}

fn signal(pid: u32, sig: Signal) -> bool {
    i32::try_from(pid).is_ok_and(|p| p > 0 && kill(Pid::from_raw(p), sig).is_ok())
}

/// Polls the lock until it is free or `deadline` passes; true when free.
fn wait_down(sdir: &StateDir, deadline: Instant) -> Result<bool, StateError> {
    loop {
        if !sdir.is_running()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One line about how the guest ended, from the last boot's timeline.
pub fn guest_exit_line(sdir: &StateDir) -> Option<String> {
    let boot = state::read_json(&sdir.last_boot_path())?;
    let exit = boot["events"].as_array()?.iter().rev().find_map(|e| {
        (e["source"] == "guest" && e["event"]["type"] == "exit").then(|| e["event"].clone())
    });
    Some(match exit {
        Some(x) => format!(
            "guest exited with status {}, filesystems {}",
            x["status"],
            if x["synced"] == true {
                "synced"
            } else {
                "NOT synced"
            }
        ),
        None => "the guest reported no exit (the VM was stopped without a clean shutdown)".into(),
    })
}

/// Stops the instance (0 also when it was not running).
pub fn run(args: &DownArgs) -> Result<i32, DownError> {
    let sdir = StateDir::for_name(&args.name)?;
    if !sdir.is_running()? {
        if let Some(note) = sdir.clear_stale() {
            println!("{note}");
        }
        println!("instance {:?} is not running", args.name);
        return Ok(0);
    }
    let record = sdir.read_state()?;
    // The lock's holder writes its pid into the lock file; the state file comes later.
    let host_pid = std::fs::read_to_string(sdir.lock_path())
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .or(record.as_ref().map(|r| r.host_pid));
    let Some(host_pid) = host_pid else {
        return Err(DownError::NoPid {
            name: args.name.clone(),
            lock: sdir.lock_path(),
        });
    };
    let vmm_pid = record.as_ref().and_then(|r| r.vmm_pid);
    println!(
        "stopping instance {:?}: SIGTERM to openshell-host up (pid {host_pid}), waiting up to {} s for the guest to shut down",
        args.name, args.timeout
    );
    signal(host_pid, Signal::SIGTERM);
    let started = Instant::now();
    if wait_down(&sdir, started + Duration::from_secs(args.timeout))? {
        println!(
            "instance {:?} is down after {:.1} s{}",
            args.name,
            started.elapsed().as_secs_f64(),
            guest_exit_line(&sdir)
                .map(|l| format!(": {l}"))
                .unwrap_or_default()
        );
        return Ok(0);
    }
    println!(
        "instance {:?} did not stop within {} s: killing the VM{} and openshell-host up (pid {host_pid})",
        args.name,
        args.timeout,
        vmm_pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    );
    if let Some(vmm) = vmm_pid {
        signal(vmm, Signal::SIGKILL);
    }
    signal(host_pid, Signal::SIGKILL);
    if wait_down(&sdir, Instant::now() + Duration::from_secs(5))? {
        if let Some(note) = sdir.clear_stale() {
            println!("{note}");
        }
        println!("instance {:?} is down (killed)", args.name);
        Ok(0)
    } else {
        Err(DownError::StillLocked(args.name.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wording `main` prints after `openshell-host: `, and exit 1 for every failure.
    #[test]
    fn failures_name_the_instance_and_exit_1() {
        let no_pid = DownError::NoPid {
            name: "gw".into(),
            lock: "/state/gw/lock".into(),
        };
        assert_eq!(
            no_pid.to_string(),
            "instance \"gw\" holds its lock but names no pid in /state/gw/lock"
        );
        let locked = DownError::StillLocked("gw".into());
        assert_eq!(
            locked.to_string(),
            "instance \"gw\" still holds its lock after SIGKILL"
        );
        let state = DownError::from(StateError::NoHome);
        for e in [no_pid, locked, state] {
            assert_eq!(e.exit_code(), 1, "{e}");
        }
    }
}
