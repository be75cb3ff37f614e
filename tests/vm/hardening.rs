//! The host against a hostile guest and a hostile local user, end to end with the real
//! `openshell-host`: a guest root making device nodes and setuid files through virtio-fs (a real
//! boot), another user's pre-made run directory, a link planted where `host.log` goes (no VM:
//! `up` must refuse before starting one). Each gets a clear error or nothing, and nothing the
//! user owns changes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use openshell_tests::{both_arches, host_bin, vm_slot, Boot, BOOT_DEADLINE};

/// The guest, as root, makes a character and a block device node and a setuid file on its
/// virtio-fs root, and writes how each went to `/hardening`.
const HOSTILE_ROOT: &str = "mknod /cdev c 1 3; echo c=$? > /hardening; \
     mknod /bdev b 8 0; echo b=$? >> /hardening; \
     touch /suid && chmod 4755 /suid; echo s=$? >> /hardening";

/// virtiofsd without CAP_MKNOD: the guest's mknod fails and no device node reaches the host.
/// The setuid bit does land (its owner may set it without any capability), in a tree that only
/// root can reach: `up` as root refuses any other.
fn guest_device_nodes_never_reach_the_host(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let done = boot
        .exec(&["/bin/sh", "-c", HOSTILE_ROOT])
        .start()
        .wait(BOOT_DEADLINE);
    assert!(done.status.success(), "{}", done.output());
    let results = std::fs::read_to_string(done.boot.root_path("hardening")).expect("results");
    let code = |key: &str| {
        results
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in {results:?}"))
            .to_string()
    };
    assert_ne!(code("c"), "0", "a character device was made: {results}");
    assert_ne!(code("b"), "0", "a block device was made: {results}");
    for node in ["cdev", "bdev"] {
        assert!(
            std::fs::symlink_metadata(done.boot.root_path(node)).is_err(),
            "{node} reached the host tree"
        );
    }
    let suid = std::fs::metadata(done.boot.root_path("suid")).expect("suid");
    if suid.mode() & 0o4000 != 0 && is_root() {
        let root = done.boot.root_path("");
        assert!(
            closed_to_others(&root),
            "setuid files landed in {}, which others can reach",
            root.display()
        );
    }
}
both_arches!(guest_device_nodes_never_reach_the_host);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Some directory on the path is closed to other users.
fn closed_to_others(path: &Path) -> bool {
    let real = path.canonicalize().expect("real path");
    real.ancestors()
        .any(|d| std::fs::metadata(d).is_ok_and(|m| m.mode() & 0o001 == 0 && m.mode() & 0o010 == 0))
}

/// A private scratch directory with a stand-in kernel and root: enough for `up` to get as far
/// as its run directory, never far enough to start a VM.
fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let kernel = t.path().join("bzImage");
    std::fs::write(&kernel, b"not a kernel").expect("kernel");
    let root = t.path().join("root");
    std::fs::create_dir(&root).expect("root");
    (t, kernel, root)
}

fn up(dir: &Path, kernel: &Path, root: &Path, extra: &[&str]) -> Output {
    Command::new(host_bin())
        .args(["up", "--net", "none", "--timeout", "5"])
        .arg("--kernel")
        .arg(kernel)
        .arg("--rootfs")
        .arg(root)
        .args(extra)
        .env("XDG_STATE_HOME", dir.join("state"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("HOME", dir.join("home"))
        .stdin(Stdio::null())
        .output()
        .expect("run openshell-host up")
}

/// Another local user made the run directory first (here: root chowns it to 65534) and put
/// their socket in it: `up` refuses naming the directory and its owner, and leaves it alone.
#[test]
fn a_run_directory_another_user_made_first_is_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to make a directory another user's");
        return;
    }
    let (t, kernel, root) = scratch();
    let theirs = t.path().join("run");
    std::fs::create_dir(&theirs).expect("run");
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let planted = theirs.join("vsock.sock_10700");
    drop(std::os::unix::net::UnixListener::bind(&planted).expect("bind"));
    std::os::unix::fs::lchown(&theirs, Some(65534), None).expect("chown");
    let out = up(
        t.path(),
        &kernel,
        &root,
        &["--run-dir", &theirs.to_string_lossy()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&theirs.display().to_string()) && err.contains("owned by uid 65534"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&theirs)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, ["vsock.sock_10700"], "their directory is untouched");
}

/// A link planted where a detached `up` writes its output (at a file of the user's): refused,
/// and the file keeps its content.
#[test]
fn a_linked_host_log_is_refused() {
    let (t, kernel, root) = scratch();
    let state = t.path().join("state/openshell/default");
    std::fs::create_dir_all(&state).expect("state");
    let precious = t.path().join("precious");
    std::fs::write(&precious, b"mine").expect("write");
    let log = state.join("host.log");
    std::os::unix::fs::symlink(&precious, &log).expect("link");
    let out = up(
        t.path(),
        &kernel,
        &root,
        &[
            "--detach",
            "--run-dir",
            &t.path().join("run").to_string_lossy(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&log.display().to_string()) && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(std::fs::read(&precious).expect("read"), b"mine");
}
