//! The per-instance runtime directory: sockets of the helper daemons and of the boot channel,
//! and the console log. Whoever owns it receives the guest's credentials and a root shell in the
//! guest, so it is made and checked by [`crate::private_dir`]: ours, mode 0700, no link on the
//! way, else refused. Sockets a crashed run left behind are removed, only those with our names,
//! and only once nothing answers on them: a live socket belongs to a running instance.

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::private_dir::{self, DirError};

/// macOS limits `sun_path` to 104 bytes (Linux 108): stay under the smaller one everywhere.
pub const MAX_SOCKET_PATH: usize = 103;

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("run directory: {0}")]
    Create(#[from] DirError),
    #[error("socket path {path} is {len} bytes, over the {MAX_SOCKET_PATH}-byte limit: choose a shorter --run-dir")]
    TooLong { path: PathBuf, len: usize },
    #[error("console log {path}: {why}")]
    Console { path: PathBuf, why: String },
    #[error("{path} is in use by a running instance (something answers on it)")]
    InUse { path: PathBuf },
    #[error("cannot remove stale socket {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// `$XDG_RUNTIME_DIR/openshell/<name>`; else on macOS the per-user `$TMPDIR/openshell/<name>`
    /// (as podman machine does), else `/tmp/openshell-<uid>/<name>`.
    pub fn default_path(name: &str) -> PathBuf {
        let env = |k| std::env::var_os(k).filter(|v| !v.is_empty());
        default_path_from(
            name,
            env("XDG_RUNTIME_DIR"),
            env("TMPDIR").filter(|_| cfg!(target_os = "macos")),
            nix::unistd::geteuid().as_raw(),
        )
    }

    /// Makes the directory (and the parts of `path` that do not exist) and checks it: see
    /// [`private_dir::ensure`]. What exists above it is the base, which must not be writable by
    /// others (unless sticky, like `/tmp`); the directory itself must be ours and 0700.
    pub fn create(path: &Path) -> Result<Self, RunDirError> {
        let dir = Self {
            path: path.to_path_buf(),
        };
        dir.check_lengths()?;
        let (base, rest) = private_dir::split_existing(path);
        private_dir::ensure(&base, &rest, private_dir::PRIVATE)?;
        Ok(dir)
    }

    fn check_lengths(&self) -> Result<(), RunDirError> {
        for s in self.sockets() {
            let len = s.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(RunDirError::TooLong { path: s, len });
            }
        }
        Ok(())
    }

    /// Every socket this run may make, by name: the only entries [`Self::clear_stale_sockets`]
    /// may remove.
    fn sockets(&self) -> [PathBuf; 7] {
        [
            self.virtiofs_socket(),
            self.vsock_vhost_socket(),
            self.vsock_uds(),
            self.channel_socket(),
            self.gvproxy_socket(),
            self.gvproxy_api_socket(),
            self.exec_socket(),
        ]
    }

    pub fn virtiofs_socket(&self) -> PathBuf {
        self.path.join("virtiofsd.sock")
    }
    pub fn vsock_vhost_socket(&self) -> PathBuf {
        self.path.join("vhost-vsock.sock")
    }
    /// Base path of the vsock device's host side; port P is `<this>_P`.
    pub fn vsock_uds(&self) -> PathBuf {
        self.path.join(VSOCK_UDS)
    }
    pub fn channel_socket(&self) -> PathBuf {
        self.path.join(format!(
            "vsock.sock_{}",
            openshell_shared::BOOT_CHANNEL_PORT
        ))
    }
    /// libkrun's listening socket for the guest's exec service (qemu has none: `exec` goes
    /// through [`RunDir::vsock_uds`] with a `CONNECT` line instead).
    pub fn exec_socket(&self) -> PathBuf {
        self.path.join("exec.sock")
    }
    /// gvproxy's data socket (the VMM connects to it).
    pub fn gvproxy_socket(&self) -> PathBuf {
        self.path.join("gvproxy.sock")
    }
    /// gvproxy's HTTP API (port forwards).
    pub fn gvproxy_api_socket(&self) -> PathBuf {
        self.path.join("gvproxy-api.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// Removes the sockets with our names that nothing listens on (also the guest-port sockets
    /// `vsock.sock_<port>` the vsock device makes); fails on a live one. Anything else in the
    /// directory, socket or not, is left alone.
    pub fn clear_stale_sockets(&self) -> Result<usize, RunDirError> {
        let mut removed = 0;
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Ok(0);
        };
        for entry in entries.flatten() {
            let is_socket = entry.file_type().map(|t| t.is_socket()).unwrap_or(false);
            if !is_socket || !self.is_ours(&entry.file_name()) {
                continue;
            }
            let path = entry.path();
            if UnixStream::connect(&path).is_ok() {
                return Err(RunDirError::InUse { path });
            }
            std::fs::remove_file(&path).map_err(|source| RunDirError::Remove {
                path: path.clone(),
                source,
            })?;
            removed += 1;
        }
        Ok(removed)
    }

    /// One of [`Self::sockets`], or `vsock.sock_<port>`.
    fn is_ours(&self, name: &std::ffi::OsStr) -> bool {
        let names: Vec<OsString> = self
            .sockets()
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect();
        if names.iter().any(|n| n == name) {
            return true;
        }
        let vsock = format!("{}_", VSOCK_UDS);
        name.to_str()
            .and_then(|n| n.strip_prefix(&vsock))
            .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
    }

    /// Removes the sockets this run created (on the way out).
    pub fn remove_sockets(&self) {
        for s in self.sockets() {
            let _ = std::fs::remove_file(s);
        }
    }
}

const VSOCK_UDS: &str = "vsock.sock";

/// Makes the console log the VMM will open (qemu's `-serial file:` truncates through links) a
/// regular file of ours before it does: never through a link, and in a directory where nobody
/// else can replace it afterwards (not writable by others, or sticky with the file ours). The
/// run directory's own console log passes trivially; this is for `--console-log`.
pub fn prepare_console_log(path: &Path) -> Result<(), RunDirError> {
    use std::os::unix::fs::MetadataExt;
    let err = |why: String| RunDirError::Console {
        path: path.to_path_buf(),
        why,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    private_dir::check_base(parent).map_err(|e| err(e.to_string()))?;
    let file = private_dir::open_no_follow(
        path,
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false),
    )
    .map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.is_file() || meta.uid() != private_dir::our_uid() {
        return Err(err(format!(
            "not a regular file of ours (uid {}): remove it",
            meta.uid()
        )));
    }
    Ok(())
}

/// [`RunDir::default_path`] from its inputs. On macOS `tmpdir` (per user, where podman machine
/// keeps its sockets) is taken when the longest socket path still fits.
fn default_path_from(
    name: &str,
    xdg_runtime: Option<OsString>,
    tmpdir: Option<OsString>,
    uid: u32,
) -> PathBuf {
    if let Some(dir) = xdg_runtime {
        return PathBuf::from(dir).join("openshell").join(name);
    }
    if let Some(dir) = tmpdir {
        let path = PathBuf::from(dir).join("openshell").join(name);
        let fits = RunDir { path: path.clone() }.check_lengths().is_ok();
        if fits {
            return path;
        }
    }
    PathBuf::from(format!("/tmp/openshell-{uid}")).join(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn dead_sockets_go_live_ones_stay() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = RunDir::create(&tmp.path().join("i")).expect("create");
        // A socket whose listener is gone: stale.
        drop(UnixListener::bind(dir.virtiofs_socket()).expect("bind"));
        assert!(dir.virtiofs_socket().exists());
        assert_eq!(dir.clear_stale_sockets().expect("clear"), 1);
        assert!(!dir.virtiofs_socket().exists());
        // A listening one: another instance is running.
        let _live = UnixListener::bind(dir.channel_socket()).expect("bind");
        match dir.clear_stale_sockets() {
            Err(RunDirError::InUse { path }) => assert_eq!(path, dir.channel_socket()),
            other => panic!("{other:?}"),
        }
        assert!(dir.channel_socket().exists());
    }

    /// Only our own socket names go: another program's dead socket in the directory stays.
    #[test]
    fn only_our_socket_names_are_cleared() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = RunDir::create(&tmp.path().join("i")).expect("create");
        let foreign = dir.path.join("someone-elses.sock");
        let port = dir.path.join("vsock.sock_10777");
        let odd = dir.path.join("vsock.sock_x");
        for s in [&foreign, &port, &odd] {
            drop(UnixListener::bind(s).expect("bind"));
        }
        assert_eq!(dir.clear_stale_sockets().expect("clear"), 1);
        assert!(!port.exists(), "a guest port's socket is ours");
        assert!(
            foreign.exists() && odd.exists(),
            "other names are left alone"
        );
    }

    fn private_tmp() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tmp");
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        t
    }

    /// Another local user made the run directory, or its parent, first (as root here: chown to
    /// 65534): refused, naming the path and the owner, and nothing is made or removed in it.
    #[test]
    fn a_run_directory_another_user_made_first_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let tmp = private_tmp();
        let parent = tmp.path().join("openshell-0");
        let theirs = parent.join("default");
        std::fs::create_dir_all(&theirs).expect("mkdir");
        for d in [&parent, &theirs] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        }
        let planted = theirs.join("vsock.sock_10700");
        drop(UnixListener::bind(&planted).expect("bind"));
        // Their directory, in our parent.
        nix::unistd::chown(&theirs, Some(65534.into()), None).expect("chown");
        let msg = RunDir::create(&theirs).unwrap_err().to_string();
        assert!(
            msg.contains(&theirs.display().to_string()) && msg.contains("owned by uid 65534"),
            "{msg}"
        );
        // Their parent: refused before anything below it is looked at.
        nix::unistd::chown(&parent, Some(65534.into()), None).expect("chown");
        let msg = RunDir::create(&theirs).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("refusing {}:", parent.display()))
                && msg.contains("owned by uid 65534"),
            "{msg}"
        );
        assert!(planted.exists(), "their socket is not ours to remove");
        assert_eq!(std::fs::read_dir(&theirs).expect("ls").count(), 1);
    }

    /// A link in the run directory's place (to a directory the attacker reads) is refused and
    /// nothing is made through it; so is a directory we own whose mode lets others in.
    #[test]
    fn a_linked_or_open_run_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = private_tmp();
        let target = tmp.path().join("target");
        std::fs::create_dir(&target).expect("mkdir");
        let link = tmp.path().join("run");
        std::os::unix::fs::symlink(&target, &link).expect("link");
        let msg = RunDir::create(&link).unwrap_err().to_string();
        assert!(
            msg.contains(&link.display().to_string()) && msg.contains("symbolic link"),
            "{msg}"
        );
        assert_eq!(std::fs::read_dir(&target).expect("ls").count(), 0);

        let open = tmp.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let msg = RunDir::create(&open).unwrap_err().to_string();
        assert!(
            msg.contains(&open.display().to_string()) && msg.contains("0777"),
            "{msg}"
        );
        assert_eq!(
            std::fs::metadata(&open).expect("meta").permissions().mode() & 0o777,
            0o777,
            "not repaired behind the user's back"
        );
    }

    /// `--console-log` at a link another user planted (to a file of ours): refused, and the
    /// target keeps its content; in a directory others may write to, refused too.
    #[test]
    fn a_console_log_at_a_link_or_in_an_open_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = private_tmp();
        let precious = tmp.path().join("shadow");
        std::fs::write(&precious, b"mine").expect("write");
        let link = tmp.path().join("console.log");
        std::os::unix::fs::symlink(&precious, &link).expect("link");
        let msg = prepare_console_log(&link).unwrap_err().to_string();
        assert!(
            msg.contains(&link.display().to_string()) && msg.contains("symbolic link"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&precious).expect("read"), b"mine");
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let msg = prepare_console_log(&open.join("console.log"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("lets other users write"), "{msg}");
        assert!(!open.join("console.log").exists());
        let fine = tmp.path().join("c.log");
        prepare_console_log(&fine).expect("ours");
        prepare_console_log(&fine).expect("ours again");
    }

    #[test]
    fn the_default_path_prefers_the_per_user_directories() {
        let name = "default";
        assert_eq!(
            default_path_from(name, Some("/run/user/7".into()), Some("/t".into()), 7),
            PathBuf::from("/run/user/7/openshell/default")
        );
        let mac_tmp = "/var/folders/zz/zyxvpxvq6csfxvn_n0000000000000/T/";
        assert_eq!(
            default_path_from(name, None, Some(mac_tmp.into()), 7),
            PathBuf::from(mac_tmp).join("openshell/default")
        );
        // A $TMPDIR too deep for socket paths: the /tmp fallback (checked the same way).
        let deep = format!("/{}", "d".repeat(90));
        assert_eq!(
            default_path_from(name, None, Some(deep.into()), 7),
            PathBuf::from("/tmp/openshell-7/default")
        );
        assert_eq!(
            default_path_from(name, None, None, 7),
            PathBuf::from("/tmp/openshell-7/default")
        );
    }

    #[test]
    fn overlong_socket_paths_are_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let deep = tmp.path().join("x".repeat(90));
        match RunDir::create(&deep) {
            Err(RunDirError::TooLong { len, .. }) => assert!(len > MAX_SOCKET_PATH),
            other => panic!("{other:?}"),
        }
    }
}
