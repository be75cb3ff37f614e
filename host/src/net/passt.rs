//! passt (Debian's `passt`): the Linux user-mode network. It serves the guest DHCP, DNS and NAT
//! over one unix stream socket that qemu (`-netdev stream`) or libkrun
//! (`krun_add_net_unixstream`) connects to, and listens on the host for the port forwards.
//!
//! passt refuses to keep root and switches to `nobody`, so its socket lives in a directory that
//! user owns, inside the run directory (which must then be traversable).

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{Forward, FORWARD_LISTEN};

#[derive(Debug, thiserror::Error)]
#[error("passt socket directory {path}: {source}")]
pub struct PasstDirError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Arguments for passt serving `socket`: in the foreground, for one VM connection (it exits when
/// the VM goes away), with one `-t` per forward bound to the loopback address only.
pub fn args(socket: &Path, forwards: &[Forward]) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["-f", "-1", "-s"].map(OsString::from).to_vec();
    args.push(socket.into());
    for f in forwards {
        args.push("-t".into());
        args.push(format!("{FORWARD_LISTEN}/{}:{}", f.host, f.guest).into());
    }
    args
}

/// Creates `<run>/passt` for the unprivileged passt user and returns it with the socket path; a
/// socket left there by a killed run is removed once nothing answers on it.
pub fn socket_dir(run: &Path) -> Result<(PathBuf, PathBuf), PasstDirError> {
    let dir = run.join("passt");
    let io = |source| PasstDirError {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o711)).map_err(io)?;
    if nix::unistd::geteuid().is_root() {
        if let Some(user) = nix::unistd::User::from_name("nobody").ok().flatten() {
            nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).map_err(|e| io(e.into()))?;
        }
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    let sock = dir.join("passt.sock");
    let len = sock.as_os_str().len();
    if len > crate::rundir::MAX_SOCKET_PATH {
        return Err(io(std::io::Error::other(format!(
            "socket path {} is {len} bytes, over the {}-byte limit: choose a shorter --run-dir",
            sock.display(),
            crate::rundir::MAX_SOCKET_PATH
        ))));
    }
    // A live socket belongs to another VM: passt will then refuse it, and say so.
    if sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_err() {
        std::fs::remove_file(&sock).map_err(io)?;
    }
    Ok((dir, sock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_bind_loopback_only() {
        let a = args(
            Path::new("/r/passt/passt.sock"),
            &[
                Forward {
                    host: 30051,
                    guest: 30051,
                },
                Forward {
                    host: 8443,
                    guest: 443,
                },
            ],
        );
        let line: Vec<String> = a.iter().map(|s| s.to_string_lossy().into()).collect();
        assert_eq!(
            line.join(" "),
            "-f -1 -s /r/passt/passt.sock -t 127.0.0.1/30051:30051 -t 127.0.0.1/8443:443"
        );
    }

    #[test]
    fn overlong_socket_path_is_refused() {
        let t = tempfile::tempdir().expect("tmp");
        let deep = t.path().join("x".repeat(90));
        std::fs::create_dir_all(&deep).expect("mkdir");
        let e = socket_dir(&deep).expect_err("too long");
        assert!(e.to_string().contains("byte limit"), "{e}");
    }

    #[test]
    fn stale_socket_is_removed_live_one_kept() {
        let t = tempfile::tempdir().expect("tmp");
        let (dir, sock) = socket_dir(t.path()).expect("dir");
        assert!(dir.is_dir());
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
        socket_dir(t.path()).expect("again");
        assert!(!sock.exists(), "stale socket left");
        let _live = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        socket_dir(t.path()).expect("live");
        assert!(sock.exists(), "live socket removed");
    }
}
