//! `up --detach`: runs `up` again as a background process in its own session, with its output in
//! `<state>/host.log`, and waits until it is ready or has failed.
//!
//! Readiness comes from the state file the background `up` rewrites on every ready stage (and
//! on a fatal boot error): the foreground polls it, checking the pid in it is its child's, and
//! returns 0 once `--ready-stage` is listed. If the child exits first, the boot failed: the
//! foreground prints the end of `host.log` and returns the child's exit code.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::state::StateDir;
use crate::up::{code, UpArgs};

/// Flags the foreground consumes: the background gets neither (reset already happened).
const FOREGROUND_ONLY: [&str; 5] = ["--detach", "-d", "--reset", "--yes", "-y"];

/// Set in the background process's environment: it then neither detaches nor resets again,
/// whatever spelling of the flags slipped through (`-dy`).
pub const CHILD_ENV: &str = "OPENSHELL_HOST_DETACHED";

/// True in the background process of `up --detach`.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// The background's arguments: ours without the foreground-only flags. Everything after
/// `--exec` belongs to the guest command and is passed untouched.
fn background_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut in_exec = false;
    for a in args {
        if !in_exec && FOREGROUND_ONLY.iter().any(|f| a == *f) {
            continue;
        }
        if a == "--exec" {
            in_exec = true;
        }
        out.push(a);
    }
    out
}

pub fn run(args: &UpArgs) -> i32 {
    match detach(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("openshell-host: {e}");
            code::SETUP
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum DetachError {
    #[error(transparent)]
    State(#[from] super::state::StateError),
    #[error(transparent)]
    Reset(#[from] super::reset::ResetError),
    #[error("cannot open {path}: {source}")]
    Log {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the background openshell-host: {0}")]
    Spawn(std::io::Error),
}

fn detach(args: &UpArgs) -> Result<i32, DetachError> {
    let sdir = StateDir::for_name(&args.name)?;
    {
        // Hold the lock while checking and resetting; the child takes it again.
        let _lock = sdir.lock()?;
        if let Some(note) = sdir.clear_stale() {
            println!("{note}");
        }
        if args.reset {
            if !args.rootfs.is_dir() {
                eprintln!(
                    "openshell-host: root filesystem {} is not a directory",
                    args.rootfs.display()
                );
                return Ok(code::SETUP);
            }
            println!("{}", super::reset::run(&args.rootfs, args.yes)?);
        }
    }
    let log_path = sdir.host_log_path();
    let open_log = || {
        std::fs::File::create(&log_path).map_err(|source| DetachError::Log {
            path: log_path.clone(),
            source,
        })
    };
    let (out, err) = (open_log()?, open_log()?);
    let exe = std::env::current_exe().map_err(DetachError::Spawn)?;
    let mut cmd = Command::new(exe);
    cmd.args(background_args(std::env::args_os().skip(1)))
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe. A new session: no terminal signals, and the
    // background `up` does not die with the shell that started it.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let spawned_ms = super::state::unix_ms();
    let mut child = cmd.spawn().map_err(DetachError::Spawn)?;
    let pid = child.id();
    println!(
        "openshell-host: instance {:?} starting in the background (pid {pid}); log: {}",
        args.name,
        log_path.display()
    );
    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout);
    let mut reported_failure = false;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let code = status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(code::SETUP);
            // A short workload can reach the stage and end between two polls.
            if reached_then_ended(&sdir, spawned_ms, &args.ready_stage) {
                println!(
                    "{} (instance {:?}), then the instance ended with exit {code}",
                    reached(&args.ready_stage),
                    args.name
                );
                return Ok(code);
            }
            eprintln!(
                "openshell-host: instance {:?} stopped before {}; end of {}:",
                args.name,
                args.ready_stage,
                log_path.display()
            );
            print_tail(&log_path, 20);
            return Ok(if code == 0 { code::NO_EXIT } else { code });
        }
        if let Ok(Some(state)) = sdir.read_state() {
            if state.host_pid == pid {
                if state.ready_stages.contains(&args.ready_stage) {
                    println!(
                        "{} (instance {:?}, openshell-host pid {pid}, {} pid {}); stop it with `openshell-host down --name {}`",
                        reached(&args.ready_stage),
                        args.name,
                        state.backend,
                        state.vmm_pid.map(|p| p.to_string()).unwrap_or_default(),
                        args.name
                    );
                    return Ok(0);
                }
                if let (Some(f), false) = (&state.failed, reported_failure) {
                    eprintln!("openshell-host: {f}");
                    reported_failure = true;
                }
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "openshell-host: no {} within {} s; instance {:?} keeps running (pid {pid}): see `openshell-host logs --name {}`",
                args.ready_stage, args.ready_timeout, args.name, args.name
            );
            return Ok(code::TIMEOUT);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the last boot, started by our child (not before `spawned_ms`), reported `stage`.
fn reached_then_ended(sdir: &StateDir, spawned_ms: u64, stage: &str) -> bool {
    let Some(boot) = super::state::read_json(&sdir.last_boot_path()) else {
        return false;
    };
    let ours = boot["host_start_unix_ms"]
        .as_u64()
        .is_some_and(|t| t >= spawned_ms);
    ours && boot["events"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| marks_stage(e, stage))
}

/// Whether timeline event `e` is reaching `stage`: the host's own `ready` mark for "ready", a
/// guest `ready` event naming it otherwise.
fn marks_stage(e: &serde_json::Value, stage: &str) -> bool {
    let ready = e["event"]["type"] == "ready";
    if stage == "ready" {
        ready && e["source"] == "host"
    } else {
        ready && e["source"] == "guest" && e["event"]["stage"] == stage
    }
}

fn print_tail(path: &std::path::Path, lines: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let mut err = std::io::stderr().lock();
    for l in &all[all.len().saturating_sub(lines)..] {
        let _ = writeln!(err, "  {l}");
    }
}

/// How reaching `stage` reads: the host's own `ready` mark, or a guest stage by name.
fn reached(stage: &str) -> String {
    if stage == "ready" {
        "ready".into()
    } else {
        format!("ready: {stage}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workload that ends at once can take the instance down between two polls: what was
    /// reached is read from the last boot's timeline, the host's own mark for "ready".
    #[test]
    fn reaching_a_stage_is_read_from_the_timeline() {
        let host_ready =
            serde_json::json!({"source": "host", "event": {"type": "ready", "detail": null}});
        let guest_stage = serde_json::json!({"source": "guest", "event": {"type": "ready", "stage": "workload-started"}});
        assert!(marks_stage(&host_ready, "ready"));
        assert!(!marks_stage(&guest_stage, "ready"));
        assert!(marks_stage(&guest_stage, "workload-started"));
        assert!(!marks_stage(&host_ready, "workload-started"));
        assert!(!marks_stage(&guest_stage, "gateway-ready"));
    }

    #[test]
    fn background_drops_foreground_flags_but_not_the_guest_command() {
        let argv = [
            "up", "--detach", "--name", "x", "--reset", "--yes", "--exec", "sh", "-c", "--yes",
        ]
        .map(OsString::from);
        let got = background_args(argv.into_iter());
        let want = ["up", "--name", "x", "--exec", "sh", "-c", "--yes"].map(OsString::from);
        assert_eq!(got, want);
    }
}
