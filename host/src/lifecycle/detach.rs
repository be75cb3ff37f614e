//! `up --detach`: runs `up` again as a background process in its own session, with its output in
//! `<state>/host.log`, and waits until it is ready or has failed.
//!
//! Readiness comes from the state file the background `up` rewrites on every ready stage (and
//! on a fatal boot error): the foreground polls it, checking the pid in it is its child's, and
//! returns 0 once `--ready-stage` is listed. If the child exits first, the boot failed: the
//! foreground prints the end of `host.log` and returns the child's exit code.
//!
//! `main` decides between this and a foreground `up`; this module needs only `up`'s arguments.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::reset::{self, ResetError};
use super::state::{self, StateDir, StateError};
use crate::failure::Failure;
use crate::up::args::{code, UpArgs};

/// Flags the foreground consumes: the background gets neither (reset already happened).
const FOREGROUND_ONLY: [&str; 5] = ["--detach", "-d", "--reset", "--yes", "-y"];

/// Set in the background process's environment: it then neither detaches nor resets again,
/// whatever spelling of the flags slipped through (`-dy`).
pub const CHILD_ENV: &str = "OPENSHELL_HOST_DETACHED";

/// True in the background process of `up --detach`.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// The arguments the background process runs `up` with: the foreground reset the rootfs
/// already, and the background never detaches again.
pub fn in_background(mut args: UpArgs) -> UpArgs {
    args.reset = false;
    args.detach = false;
    args
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

#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Reset(#[from] ResetError),
    #[error("cannot open {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the background openshell-host: {0}")]
    Spawn(std::io::Error),
    #[error("root filesystem {0} is not a directory")]
    NoRootfs(PathBuf),
    #[error(transparent)]
    Bundle(#[from] crate::bundle::HostBundleError),
    /// The background `up` ended before the ready stage: `tail` is the end of its log.
    #[error("instance {name:?} stopped before {stage}; end of {log}:{tail}")]
    StoppedEarly {
        name: String,
        stage: String,
        log: PathBuf,
        tail: Tail,
        /// The background's exit code, or [`code::NO_EXIT`] when it was 0.
        code: i32,
    },
    #[error("no {stage} within {secs} s; instance {name:?} keeps running (pid {pid}): see `openshell-host logs --name {name}`")]
    NotReady {
        stage: String,
        secs: u64,
        name: String,
        pid: u32,
    },
}

impl Failure for DetachError {
    fn exit_code(&self) -> i32 {
        match self {
            DetachError::StoppedEarly { code, .. } => *code,
            DetachError::NotReady { .. } => code::TIMEOUT,
            _ => code::SETUP,
        }
    }
}

/// Starts `up` in the background and waits until it reports `--ready-stage` (0) or fails.
pub fn run(args: &UpArgs) -> Result<i32, DetachError> {
    let sdir = StateDir::for_name(&args.name)?;
    {
        // Hold the lock while checking and resetting; the child takes it again.
        let _lock = sdir.lock()?;
        if let Some(note) = sdir.clear_stale() {
            println!("{note}");
        }
        if args.reset {
            // A bundle's root is unpacked (or found) first: it is the root to reset.
            let mut args = args.clone();
            if let Some(note) = crate::bundle::resolve(&mut args, &sdir)? {
                println!("{note}");
            }
            if !args.rootfs_path().is_dir() {
                return Err(DetachError::NoRootfs(args.rootfs_path().to_path_buf()));
            }
            let _root = reset::lock_root(args.rootfs_path(), true)?;
            println!("{}", reset::run(args.rootfs_path(), &sdir, args.yes)?);
        }
    }
    let log_path = sdir.host_log_path();
    let (child, spawned_ms) = spawn_background(&log_path)?;
    println!(
        "openshell-host: instance {:?} starting in the background (pid {}); log: {}",
        args.name,
        child.id(),
        log_path.display()
    );
    wait_ready(args, &sdir, child, spawned_ms, log_path)
}

/// Starts this program again with our arguments less the foreground-only ones, in a session of
/// its own, its output in `log_path`. Returns the child and when it was spawned (Unix ms).
fn spawn_background(log_path: &Path) -> Result<(Child, u64), DetachError> {
    let open_log = || {
        crate::private_dir::open_no_follow(
            log_path,
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true),
        )
        .map_err(|source| DetachError::Log {
            path: log_path.to_path_buf(),
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
    let spawned_ms = state::unix_ms();
    let child = cmd.spawn().map_err(DetachError::Spawn)?;
    Ok((child, spawned_ms))
}

/// Polls the background `up` (started at `spawned_ms`) and its state file until the ready
/// stage is listed, the child ends, or `--ready-timeout` passes.
fn wait_ready(
    args: &UpArgs,
    sdir: &StateDir,
    mut child: Child,
    spawned_ms: u64,
    log_path: PathBuf,
) -> Result<i32, DetachError> {
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout);
    let mut reported_failure = false;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let code = status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(code::SETUP);
            // A short workload can reach the stage and end between two polls.
            if reached_then_ended(sdir, spawned_ms, &args.ready_stage) {
                println!(
                    "{} (instance {:?}), then the instance ended with exit {code}",
                    reached(&args.ready_stage),
                    args.name
                );
                return Ok(code);
            }
            return Err(DetachError::StoppedEarly {
                name: args.name.clone(),
                stage: args.ready_stage.clone(),
                tail: Tail::of(&log_path, 20),
                log: log_path,
                code: if code == 0 { code::NO_EXIT } else { code },
            });
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
                    eprintln!("openshell-host: {}", crate::safe_text::escape(f));
                    reported_failure = true;
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(DetachError::NotReady {
                stage: args.ready_stage.clone(),
                secs: args.ready_timeout,
                name: args.name.clone(),
                pid,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the last boot, started by our child (not before `spawned_ms`), reported `stage`.
fn reached_then_ended(sdir: &StateDir, spawned_ms: u64, stage: &str) -> bool {
    let Some(boot) = state::read_json(&sdir.last_boot_path()) else {
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

/// The last lines of a log, shown under the error that names it: each on a line of its own,
/// indented by two spaces (nothing for an empty or unreadable log).
#[derive(Debug)]
pub struct Tail(Vec<String>);

impl Tail {
    fn of(path: &Path, lines: usize) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        Self(
            all[all.len().saturating_sub(lines)..]
                .iter()
                .map(|l| l.to_string())
                .collect(),
        )
    }
}

impl std::fmt::Display for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|l| write!(f, "\n  {l}"))
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

    /// What `main` prints for a background `up` that ended early: the log's last lines under the
    /// error, as they were printed before the error was returned instead.
    #[test]
    fn an_early_stop_shows_the_end_of_the_log() {
        let tmp = tempfile::tempdir().expect("tmp");
        let log = tmp.path().join("host.log");
        let text: String = (1..=25).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).expect("log");
        let err = DetachError::StoppedEarly {
            name: "gw".into(),
            stage: "ready".into(),
            tail: Tail::of(&log, 20),
            log: log.clone(),
            code: 7,
        };
        let want: String = (6..=25).map(|i| format!("\n  line {i}")).collect();
        assert_eq!(
            err.to_string(),
            format!(
                "instance \"gw\" stopped before ready; end of {}:{want}",
                log.display()
            )
        );
        assert_eq!(err.exit_code(), 7);
        let empty = Tail::of(&tmp.path().join("none.log"), 20);
        assert_eq!(empty.to_string(), "");
    }

    #[test]
    fn failures_keep_their_exit_codes_and_wording() {
        let late = DetachError::NotReady {
            stage: "gateway-ready".into(),
            secs: 600,
            name: "default".into(),
            pid: 42,
        };
        assert_eq!(late.exit_code(), code::TIMEOUT);
        assert_eq!(
            late.to_string(),
            "no gateway-ready within 600 s; instance \"default\" keeps running (pid 42): \
             see `openshell-host logs --name default`"
        );
        let rootfs = DetachError::NoRootfs("/nope".into());
        assert_eq!(rootfs.exit_code(), code::SETUP);
        assert_eq!(
            rootfs.to_string(),
            "root filesystem /nope is not a directory"
        );
    }

    /// The background process neither resets again nor detaches again.
    #[test]
    fn the_background_runs_in_the_foreground_without_reset() {
        let args =
            crate::up::args::parse(&["--kernel", "/k", "--rootfs", "/r", "-d", "--reset", "-y"])
                .expect("parse");
        let bg = in_background(args);
        assert!(!bg.detach && !bg.reset && bg.yes);
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
