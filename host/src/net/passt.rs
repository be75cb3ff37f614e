//! passt (Debian's `passt`): the Linux user-mode network. It serves the guest DHCP, DNS and NAT
//! over one unix stream socket that qemu (`-netdev stream`) or libkrun
//! (`krun_add_net_unixstream`) connects to, and listens on the host for the port forwards.
//!
//! passt refuses to keep root and switches to `nobody`, which must then reach its socket: every
//! directory above it has to let others through. A run directory may sit below a private one
//! (`/tmp/openshell-0` is 0700, and so is any `mktemp -d`), so as root the socket lives in a
//! directory of its own under the system's temporary directory, named by a hash of the run
//! directory, owned by `nobody` and closed to everyone else. Without root, passt runs as the user
//! and its socket stays inside the run directory.
//!
//! Switching to `nobody` also clears passt's parent-death signal, and `--one-off` ends it only
//! once a VM has connected and gone: as root it is tied to the host's life by the helper
//! watcher in `children` instead, which kills it when the host dies before any VM connected.

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
///
/// The host's loopback: passt maps its gateway address to the host's 127.0.0.1 (and ::1), so by
/// default every pod could reach every service on it. With no `host_ports` listed, `--no-map-gw`
/// turns that off here, on the host; with some, the mapping stays and the guest refuses all but
/// those ports at the gateway address. `-4`: the guest is IPv4-only, and passt's router
/// advertisements would otherwise give it an IPv6 route whose gateway maps to the host's ::1,
/// which the guest's IPv4 refusals do not cover.
pub fn args(socket: &Path, forwards: &[Forward], host_ports: &[u16]) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["-f", "-1", "-4"].map(OsString::from).to_vec();
    if host_ports.is_empty() {
        args.push("--no-map-gw".into());
    }
    args.push("-s".into());
    args.push(socket.into());
    for f in forwards {
        args.push("-t".into());
        args.push(format!("{FORWARD_LISTEN}/{}:{}", f.host, f.guest).into());
    }
    args
}

/// The directory for passt's socket (see the module doc) and the socket's path; a socket left
/// there by a killed run is removed once nothing answers on it.
pub fn socket_dir(run: &Path) -> Result<(PathBuf, PathBuf), PasstDirError> {
    let root = nix::unistd::geteuid().is_root();
    let dir = if root {
        shared_base()?.join(format!(
            "{:012x}",
            fnv1a(run.as_os_str().as_encoded_bytes()) >> 16
        ))
    } else {
        run.join("passt")
    };
    let io = |source| PasstDirError {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    if root {
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

/// `<tmp>/openshell-passt`: root's, traversable by others, not listable; refused when it is a
/// link or someone else's, since passt's sockets are made below it.
fn shared_base() -> Result<PathBuf, PasstDirError> {
    use std::os::unix::fs::MetadataExt;
    let base = std::env::temp_dir().join("openshell-passt");
    let err = |source| PasstDirError {
        path: base.clone(),
        source,
    };
    match std::fs::create_dir(&base) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e)),
    }
    let meta = std::fs::symlink_metadata(&base).map_err(err)?;
    if !meta.is_dir() || meta.uid() != 0 {
        return Err(err(std::io::Error::other(
            "not a directory owned by root (a link, or someone else's): remove it",
        )));
    }
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o711)).map_err(err)?;
    Ok(base)
}

/// FNV-1a: a short, stable name for a run directory.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
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
            &[],
        );
        let line: Vec<String> = a.iter().map(|s| s.to_string_lossy().into()).collect();
        assert_eq!(
            line.join(" "),
            "-f -1 -4 --no-map-gw -s /r/passt/passt.sock -t 127.0.0.1/30051:30051 -t 127.0.0.1/8443:443"
        );
    }

    /// No host port listed: the gateway is not the host's loopback. Some listed: it stays mapped
    /// (the guest refuses the other ports there).
    #[test]
    fn the_gateway_maps_to_the_host_only_when_ports_are_listed() {
        let sock = Path::new("/s");
        assert!(args(sock, &[], &[]).contains(&OsString::from("--no-map-gw")));
        let listed = args(sock, &[], &[8080]);
        assert!(!listed.contains(&OsString::from("--no-map-gw")));
        assert!(
            listed.contains(&OsString::from("-4")),
            "IPv4 only either way"
        );
    }

    #[test]
    fn overlong_socket_path_is_refused() {
        if nix::unistd::geteuid().is_root() {
            eprintln!("skipped: as root the socket lives under the temporary directory");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        let deep = t.path().join("x".repeat(90));
        std::fs::create_dir_all(&deep).expect("mkdir");
        let e = socket_dir(&deep).expect_err("too long");
        assert!(e.to_string().contains("byte limit"), "{e}");
    }

    /// As root, passt (dropped to `nobody`) reaches its socket even when the run directory sits
    /// below a private one, and two run directories get two socket directories.
    #[test]
    fn root_puts_the_socket_where_nobody_can_reach_it() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let (dir, sock) = socket_dir(&t.path().join("run")).expect("dir");
        let (other, _) = socket_dir(&t.path().join("run2")).expect("dir");
        assert_ne!(dir, other);
        assert!(!dir.starts_with(t.path()), "{}", dir.display());
        let nobody = nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .expect("nobody");
        assert_eq!(
            std::fs::metadata(&dir).expect("meta").uid(),
            nobody.uid.as_raw()
        );
        for a in dir.ancestors().skip(1) {
            let mode = std::fs::metadata(a).expect("meta").mode();
            assert!(mode & 0o001 != 0, "{} not traversable", a.display());
        }
        assert!(sock.as_os_str().len() <= crate::rundir::MAX_SOCKET_PATH);
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

    /// The real passt, started as `up` starts it, by a host SIGKILLed before any VM connected:
    /// passt must not outlive it (as root it drops to `nobody`, which clears the parent-death
    /// signal, and with no client yet `--one-off` never ends it).
    #[test]
    fn a_killed_host_leaves_no_passt() {
        use crate::children::{assert_dies_with_killed_host, Helper};
        if std::process::Command::new("passt")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: no passt");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        let run = t.path().join("run");
        std::fs::create_dir(&run).expect("run");
        let (_, sock) = socket_dir(&run).expect("dir");
        let log = run.join("passt.log");
        assert_dies_with_killed_host("passt", || {
            let mut cmd = std::process::Command::new("passt");
            cmd.args(args(&sock, &[], &[]));
            let mut h = Helper::spawn("passt", cmd, &log).ok()?;
            h.wait_for_socket(&sock, std::time::Duration::from_secs(10))
                .ok()?;
            let pid = h.child.id() as i32;
            std::mem::forget(h);
            Some(pid)
        });
    }
}
