//! The per-instance runtime directory: sockets of the helper daemons and of the boot channel,
//! and the console log. Sockets a crashed run left behind are removed, but only once nothing
//! answers on them: a live socket belongs to a running instance.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// macOS limits `sun_path` to 104 bytes (Linux 108): stay under the smaller one everywhere.
pub const MAX_SOCKET_PATH: usize = 103;

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot create run directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket path {path} is {len} bytes, over the {MAX_SOCKET_PATH}-byte limit: choose a shorter --run-dir")]
    TooLong { path: PathBuf, len: usize },
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
    /// `$XDG_RUNTIME_DIR/openshell/<name>`, else `/tmp/openshell-<uid>/<name>`.
    pub fn default_path(name: &str) -> PathBuf {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("openshell").join(name),
            _ => PathBuf::from(format!("/tmp/openshell-{}", nix::unistd::getuid())).join(name),
        }
    }

    pub fn create(path: &Path) -> Result<Self, RunDirError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|source| RunDirError::Create {
                path: path.to_path_buf(),
                source,
            })?;
        let dir = Self {
            path: path.to_path_buf(),
        };
        for s in [
            dir.virtiofs_socket(),
            dir.vsock_vhost_socket(),
            dir.vsock_uds(),
            dir.channel_socket(),
            dir.gvproxy_socket(),
            dir.gvproxy_api_socket(),
            dir.exec_socket(),
        ] {
            let len = s.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(RunDirError::TooLong { path: s, len });
            }
        }
        Ok(dir)
    }

    pub fn virtiofs_socket(&self) -> PathBuf {
        self.path.join("virtiofsd.sock")
    }
    pub fn vsock_vhost_socket(&self) -> PathBuf {
        self.path.join("vhost-vsock.sock")
    }
    /// Base path of the vsock device's host side; port P is `<this>_P`.
    pub fn vsock_uds(&self) -> PathBuf {
        self.path.join("vsock.sock")
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

    /// Removes every socket in the directory that nothing listens on; fails on a live one.
    pub fn clear_stale_sockets(&self) -> Result<usize, RunDirError> {
        let mut removed = 0;
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Ok(0);
        };
        for entry in entries.flatten() {
            let is_socket = entry.file_type().map(|t| t.is_socket()).unwrap_or(false);
            if !is_socket {
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

    /// Removes the sockets this run created (on the way out).
    pub fn remove_sockets(&self) {
        for s in [
            self.virtiofs_socket(),
            self.vsock_vhost_socket(),
            self.vsock_uds(),
            self.channel_socket(),
            self.gvproxy_socket(),
            self.gvproxy_api_socket(),
            self.exec_socket(),
        ] {
            let _ = std::fs::remove_file(s);
        }
    }
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
