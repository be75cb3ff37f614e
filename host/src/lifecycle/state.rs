//! Per-instance state on disk: the state directory (`$XDG_STATE_HOME/openshell/<name>`, else
//! `~/.local/state/openshell/<name>`), the instance lock, the state file, and the detection of
//! what a crashed run left behind.
//!
//! The exclusive `flock` on `<state>/lock` is the single source of truth for "running": the kernel
//! drops it when the `up` process dies however it dies, so a free lock means no live `up`, and any
//! state file found then is stale. The state file only describes a run, it never decides.

use std::fs::File;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::failure::Failure;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "invalid instance name {0:?}: use only letters, digits, '_' and '-' (1 to 64 characters)"
    )]
    BadName(String),
    #[error("no state directory: neither XDG_STATE_HOME nor HOME is set")]
    NoHome,
    #[error("cannot create state directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open lock file {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("instance {name:?} is already running (openshell-host up pid {pid}); stop it with `openshell-host down --name {name}`")]
    Busy { name: String, pid: String },
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("state directory: {0}")]
    Unsafe(#[from] crate::private_dir::DirError),
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `status` and `logs` fail only on the state directory, and end with 1 then.
impl Failure for StateError {
    fn exit_code(&self) -> i32 {
        1
    }
}

/// Instance names become directory and socket path components: keep them to a safe alphabet.
pub fn validate_name(name: &str) -> Result<(), StateError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StateError::BadName(name.to_string()))
    }
}

/// `$XDG_STATE_HOME/openshell`, else `$HOME/.local/state/openshell`.
pub fn state_root() -> Result<PathBuf, StateError> {
    match std::env::var_os("XDG_STATE_HOME") {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir).join("openshell")),
        _ => match std::env::var_os("HOME") {
            Some(home) if !home.is_empty() => {
                Ok(PathBuf::from(home).join(".local/state/openshell"))
            }
            _ => Err(StateError::NoHome),
        },
    }
}

/// What a running instance looks like, written by its `up` process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceState {
    pub name: String,
    /// The `openshell-host up` process: it holds the lock.
    pub host_pid: u32,
    pub vmm_pid: Option<u32>,
    pub backend: String,
    pub arch: String,
    pub started_at_unix_ms: u64,
    pub ports: Vec<String>,
    pub run_dir: PathBuf,
    pub console_log: PathBuf,
    /// `--report`, when given.
    pub report: Option<PathBuf>,
    /// Ready stages the guest reported so far, in order (`up --detach` waits on these).
    #[serde(default)]
    pub ready_stages: Vec<String>,
    /// Set when the boot failed; the process ends soon after.
    #[serde(default)]
    pub failed: Option<String>,
}

/// The state directory of one instance.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub name: String,
    pub path: PathBuf,
}

/// Holding this keeps the instance lock; dropping it (or the process dying) releases it.
#[derive(Debug)]
pub struct InstanceLock {
    _lock: Flock<File>,
}

impl StateDir {
    /// The default location for `name`; validates the name, creates nothing.
    pub fn for_name(name: &str) -> Result<Self, StateError> {
        validate_name(name)?;
        Ok(Self::at(name, state_root()?.join(name)))
    }

    pub fn at(name: &str, path: PathBuf) -> Self {
        Self {
            name: name.to_string(),
            path,
        }
    }

    /// Makes the directory (0700). As root every directory on its path must be root's and not
    /// writable by others, and none of ours a link (`private_dir`): a root host must not write
    /// its lock and state through a directory a user controls (`sudo` keeping `$HOME`).
    pub fn create(&self) -> Result<(), StateError> {
        use std::os::unix::fs::DirBuilderExt;
        if nix::unistd::geteuid().is_root() {
            let (base, rest) = crate::private_dir::split_existing(&self.path);
            crate::private_dir::ensure(&base, &rest, crate::private_dir::NO_SHARED_WRITE)?;
            return Ok(());
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
            .map_err(|source| StateError::Create {
                path: self.path.clone(),
                source,
            })
    }

    pub fn lock_path(&self) -> PathBuf {
        self.path.join("lock")
    }
    pub fn state_path(&self) -> PathBuf {
        self.path.join("state.json")
    }
    /// The boot timeline of the latest boot, rewritten as it goes.
    pub fn last_boot_path(&self) -> PathBuf {
        self.path.join("last-boot.json")
    }
    /// stdout and stderr of a detached `up`.
    pub fn host_log_path(&self) -> PathBuf {
        self.path.join("host.log")
    }

    /// Never through a link: another user's link in its place would have us lock (and write our
    /// pid into) their file.
    fn open_lock(&self) -> Result<File, StateError> {
        crate::private_dir::open_no_follow(
            &self.lock_path(),
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
        )
        .map_err(|source| StateError::Lock {
            path: self.lock_path(),
            source,
        })
    }

    /// Tries the lock without waiting: `Some` when we got it, `None` when someone holds it.
    fn try_flock(&self) -> Result<Option<Flock<File>>, StateError> {
        match Flock::lock(self.open_lock()?, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(StateError::Lock {
                path: self.lock_path(),
                source: errno.into(),
            }),
        }
    }

    /// The pid of the lock's holder: the lock file names it (the holder writes it right after
    /// locking); the state file is the fallback for that instant.
    fn holder_pid(&self) -> String {
        let text = std::fs::read_to_string(self.lock_path()).unwrap_or_default();
        match (text.trim(), self.read_state()) {
            (t, _) if !t.is_empty() => t.to_string(),
            (_, Ok(Some(s))) => s.host_pid.to_string(),
            _ => "unknown".into(),
        }
    }

    /// Takes the instance lock without waiting and records our pid in it (information only:
    /// the lock itself is what counts). Fails with [`StateError::Busy`] naming the holder's pid.
    pub fn lock(&self) -> Result<InstanceLock, StateError> {
        self.create()?;
        match self.try_flock()? {
            Some(mut lock) => {
                let _ = lock.set_len(0);
                let _ = lock.rewind();
                let _ = writeln!(lock, "{}", std::process::id());
                Ok(InstanceLock { _lock: lock })
            }
            None => Err(StateError::Busy {
                name: self.name.clone(),
                pid: self.holder_pid(),
            }),
        }
    }

    /// Whether a live `up` holds the lock. Probes by taking and releasing it, without writing
    /// to it; no lock file means never started.
    pub fn is_running(&self) -> Result<bool, StateError> {
        if !self.lock_path().exists() {
            return Ok(false);
        }
        Ok(self.try_flock()?.is_none())
    }

    pub fn read_state(&self) -> Result<Option<InstanceState>, StateError> {
        let path = self.state_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }

    /// Atomic: `status` never reads half a state file.
    pub fn write_state(&self, state: &InstanceState) -> Result<(), StateError> {
        let path = self.state_path();
        let mut bytes = serde_json::to_vec_pretty(state).map_err(|e| StateError::Write {
            path: path.clone(),
            source: e.into(),
        })?;
        bytes.push(b'\n');
        openshell_shared::fsutil::write_atomic(&path, &bytes)
            .map_err(|source| StateError::Write { path, source })
    }

    pub fn remove_state(&self) {
        let _ = std::fs::remove_file(self.state_path());
    }

    /// Clears the state file a run that died without cleaning up left behind. Call with the lock
    /// held (or just seen free): then no live `up` owns the file. Returns a note for the user.
    pub fn clear_stale(&self) -> Option<String> {
        let stale = match self.read_state() {
            Ok(None) => return None,
            Ok(Some(s)) => s,
            Err(e) => {
                self.remove_state();
                return Some(format!("removed an unreadable state file ({e})"));
            }
        };
        self.remove_state();
        let mut note = format!(
            "cleared stale state of instance {:?} from a run that did not clean up (openshell-host up pid {} {})",
            self.name,
            stale.host_pid,
            if pid_alive(stale.host_pid) { "reused by another process" } else { "gone" }
        );
        if let Some(vmm) = stale.vmm_pid.filter(|p| pid_alive(*p)) {
            note.push_str(&format!(
                "; a process with the old VMM pid {vmm} exists: check it is not a leftover VM"
            ));
        }
        Some(note)
    }
}

/// Whether `pid` names a live process (zombies count as gone: they hold no resources but a slot).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    let exists = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    };
    exists && !is_zombie(pid)
}

#[cfg(target_os = "linux")]
fn is_zombie(pid: u32) -> bool {
    // Field 3 of /proc/<pid>/stat, after the parenthesised command name (which may hold spaces).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[cfg(not(target_os = "linux"))]
fn is_zombie(_pid: u32) -> bool {
    false
}

/// Milliseconds since the Unix epoch, 0 if the clock is before it.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads `path` as JSON, `None` if it is missing or unreadable (status output is best effort).
pub fn read_json(path: &Path) -> Option<serde_json::Value> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pid: u32) -> InstanceState {
        InstanceState {
            name: "t".into(),
            host_pid: pid,
            vmm_pid: Some(pid),
            backend: "qemu".into(),
            arch: "x86_64".into(),
            started_at_unix_ms: 1,
            ports: vec!["127.0.0.1:30051 -> guest:30051".into()],
            run_dir: "/run/x".into(),
            console_log: "/run/x/console.log".into(),
            report: None,
            ready_stages: vec!["workload-started".into()],
            failed: None,
        }
    }

    #[test]
    fn names_are_restricted() {
        for good in ["default", "a", "gw-1_B"] {
            validate_name(good).expect(good);
        }
        for bad in ["", "a/b", "..", "a b", "é", &"x".repeat(65)] {
            match validate_name(bad) {
                Err(StateError::BadName(n)) => assert_eq!(n, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let msg = StateError::BadName("a/b".into()).to_string();
        assert!(msg.contains("\"a/b\""), "{msg}");
    }

    #[test]
    fn state_file_round_trips_atomically() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = StateDir::at("t", tmp.path().join("t"));
        dir.create().expect("create");
        assert_eq!(dir.read_state().expect("read"), None);
        let s = sample(42);
        dir.write_state(&s).expect("write");
        assert_eq!(dir.read_state().expect("read"), Some(s));
        let names: Vec<_> = std::fs::read_dir(&dir.path)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        dir.remove_state();
        assert_eq!(dir.read_state().expect("read"), None);
    }

    #[test]
    fn second_lock_is_refused_naming_the_pid() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = StateDir::at("t", tmp.path().join("t"));
        assert!(!dir.is_running().expect("probe"));
        let held = dir.lock().expect("first lock");
        // A second open file description contends even within one process.
        match dir.lock() {
            Err(StateError::Busy { name, pid }) => {
                assert_eq!(name, "t");
                assert_eq!(pid, std::process::id().to_string());
            }
            other => panic!("{other:?}"),
        }
        assert!(dir.is_running().expect("probe"));
        drop(held);
        assert!(!dir.is_running().expect("probe"));
        dir.lock().expect("free again");
    }

    /// A link planted where the lock goes (at a file of the user's) is refused: nothing is
    /// locked or written through it.
    #[test]
    fn a_linked_lock_file_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = StateDir::at("t", tmp.path().join("t"));
        dir.create().expect("create");
        let precious = tmp.path().join("precious");
        std::fs::write(&precious, b"mine").expect("write");
        std::os::unix::fs::symlink(&precious, dir.lock_path()).expect("link");
        let msg = dir.lock().unwrap_err().to_string();
        assert!(
            msg.contains(&dir.lock_path().display().to_string()) && msg.contains("symbolic link"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&precious).expect("read"), b"mine");
    }

    /// As root, a state directory under a home another user owns (`sudo` keeping `$HOME`) is
    /// refused naming that directory, and nothing is made in it.
    #[test]
    fn as_root_a_state_directory_in_another_users_home_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let Some(home) = crate::private_dir::home_of_another_user(tmp.path()) else {
            return;
        };
        let dir = StateDir::at("t", home.join(".local/state/openshell/t"));
        let msg = dir.lock().unwrap_err().to_string();
        assert!(
            msg.contains(&home.display().to_string()) && msg.contains("owned by uid 65534"),
            "{msg}"
        );
        assert_eq!(std::fs::read_dir(&home).expect("ls").count(), 0);
        // Root's own directory, 0700: fine, and each part made is root's.
        let ours = StateDir::at("t", tmp.path().join("root/.local/state/openshell/t"));
        let _lock = ours.lock().expect("root's own");
        let mode = std::fs::metadata(&ours.path)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn state_of_a_dead_pid_is_cleared() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = StateDir::at("t", tmp.path().join("t"));
        dir.create().expect("create");
        // A pid that existed and is gone: a reaped child.
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let dead = child.id();
        child.wait().expect("wait");
        assert!(!pid_alive(dead));
        assert!(pid_alive(std::process::id()));
        dir.write_state(&sample(dead)).expect("write");
        let _lock = dir.lock().expect("lock is free: the writer is gone");
        let note = dir.clear_stale().expect("a note");
        assert!(
            note.contains(&dead.to_string()) && note.contains("gone"),
            "{note}"
        );
        assert!(!dir.state_path().exists());
        assert_eq!(dir.clear_stale(), None);
    }

    #[test]
    fn zombies_count_as_gone() {
        let child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        std::thread::sleep(std::time::Duration::from_millis(300));
        if cfg!(target_os = "linux") {
            assert!(!pid_alive(pid), "unreaped child is a zombie");
        }
        drop(child);
    }
}
