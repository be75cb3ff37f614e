//! `openshell-host up` and `status` with the state disk, short of booting a guest: `up` makes the
//! image ready (or refuses it) before any helper starts, so these runs end at the missing
//! virtio-fs daemon. A bad image ends `up` at once with the file and the fault named and its
//! bytes as they were; `status` shows the image; `--reset` deletes it; a held disk lock (another
//! VM) is refused.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod support;

const MIB: u64 = 1 << 20;

struct Instance {
    tmp: tempfile::TempDir,
}

impl Instance {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        support::close_to_others(tmp.path());
        std::fs::create_dir_all(tmp.path().join("root")).expect("rootfs");
        std::fs::write(tmp.path().join("bzImage"), b"not booted").expect("kernel");
        Self { tmp }
    }

    fn image(&self) -> PathBuf {
        self.tmp.path().join("state/openshell/default/state.img")
    }

    fn host(&self, args: &[&str]) -> Output {
        let child = Command::new(env!("CARGO_BIN_EXE_openshell-host"))
            .args(args)
            // Private instance state and configuration: the tests run in parallel.
            .env("XDG_STATE_HOME", self.tmp.path().join("state"))
            .env("XDG_CONFIG_HOME", self.tmp.path().join("config"))
            .env("HOME", self.tmp.path().join("home"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start openshell-host");
        support::output_within(
            child,
            Duration::from_secs(60),
            &format!("openshell-host {args:?}"),
        )
    }

    /// `up` that gets as far as starting the helpers, which do not exist.
    fn up(&self, extra: &[&str]) -> (i32, String) {
        let dir = self.tmp.path();
        let s = |p: PathBuf| p.display().to_string();
        let (kernel, root, run) = (
            s(dir.join("bzImage")),
            s(dir.join("root")),
            s(dir.join("run")),
        );
        let mut args = vec![
            "up",
            "--kernel",
            &kernel,
            "--rootfs",
            &root,
            "--run-dir",
            &run,
        ];
        args.extend([
            "--net",
            "none",
            "--backend",
            "qemu",
            "--virtiofsd",
            "/nonexistent/virtiofsd",
            "--vsock-helper",
            "/nonexistent/vhost-device-vsock",
        ]);
        args.extend(extra);
        let out = self.host(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// `up` that stops at the state disk: exit 1, the image named, no helper tried.
    fn refused(&self, extra: &[&str], fault: &str) -> String {
        let before = std::fs::read(self.image()).expect("image");
        let (code, text) = self.up(extra);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains(&self.image().display().to_string()), "{text}");
        assert!(text.contains(fault), "{fault:?} in {text}");
        assert!(
            !text.contains("nonexistent"),
            "stopped before the helpers: {text}"
        );
        assert!(
            before == std::fs::read(self.image()).expect("image"),
            "bytes unchanged"
        );
        text
    }

    /// Writes bytes where a guest would, start and end, so any host write shows.
    fn scribble(&self) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.image())
            .expect("open");
        let len = f.metadata().expect("meta").len();
        f.write_all_at(b"cluster state", 0).expect("write");
        f.write_all_at(b"more state", len - 10).expect("write");
    }

    fn set_len(&self, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.image())
            .and_then(|f| f.set_len(len))
            .expect("set_len");
    }
}

#[test]
fn a_new_disk_is_made_and_shown_by_status() {
    let inst = Instance::new();
    let (code, text) = inst.up(&["--state-disk-size", "64M"]);
    assert_eq!(code, 1, "{text}");
    let said = format!(
        "state disk: {} (64 MiB, created; serial openshell-state)",
        inst.image().display()
    );
    assert!(text.contains(&said), "{text}");
    assert!(
        text.contains("/nonexistent/"),
        "went on to the helpers: {text}"
    );

    let out = inst.host(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(3), "not running");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let disk = &v["state_disk"];
    assert_eq!(disk["path"], serde_json::json!(inst.image()));
    assert_eq!(disk["apparent_bytes"], serde_json::json!(64 * MIB));
    assert!(
        disk["allocated_bytes"].as_u64().expect("allocated") < MIB,
        "{v}"
    );
    let text = String::from_utf8_lossy(&inst.host(&["status"]).stdout).into_owned();
    assert!(
        text.contains(&format!(
            "state disk: {} (64 MiB apparent, 0 B allocated)",
            inst.image().display()
        )),
        "{text}"
    );

    // A second run keeps it, the default never shrinks it... and asks for more grows it.
    let (_, text) = inst.up(&[]);
    assert!(text.contains("(32 GiB, grown from 64 MiB;"), "{text}");
}

#[test]
fn bad_images_are_refused_and_left_unchanged() {
    let inst = Instance::new();
    let (_, text) = inst.up(&["--state-disk-size", "128M"]);
    assert!(text.contains("created"), "{text}");
    inst.scribble();

    inst.refused(&["--state-disk-size", "64M"], "would shrink it");

    inst.set_len(100 * MIB);
    inst.scribble();
    inst.refused(&[], "shorter than 134217728 bytes");

    inst.set_len(128 * MIB + 7);
    inst.refused(&[], "not a whole number of 512-byte sectors");

    inst.set_len(128 * MIB);
    let mode = |m| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(inst.image(), std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    mode(0o400);
    inst.refused(&[], "is read-only");
    mode(0o600);

    // Another VM holds the disk: its lock is held by a process of its own (flock itself, which
    // --close keeps from passing it on to sleep).
    let lock = inst.image().with_file_name("state.img.lock");
    let mut holder = Command::new("flock")
        .args(["--nonblock", "--close"])
        .arg(&lock)
        .args(["sleep", "30"])
        .spawn()
        .expect("flock (util-linux)");
    std::thread::sleep(Duration::from_millis(300));
    let text = inst.refused(&[], "is in use by another VM");
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(text.contains("state.img.lock"), "{text}");
    let (_, text) = inst.up(&["--state-disk-size", "128M"]);
    assert!(text.contains("(128 MiB, kept;"), "usable again: {text}");
}

#[test]
fn reset_deletes_the_disk_and_a_fresh_one_is_made() {
    let inst = Instance::new();
    inst.up(&["--state-disk-size", "64M"]);
    inst.scribble();
    let (_, text) = inst.up(&["--reset", "--yes", "--state-disk-size", "64M"]);
    assert!(
        text.contains(&format!("reset: removed {}", inst.image().display())),
        "{text}"
    );
    assert!(text.contains("(64 MiB, created;"), "{text}");
    let bytes = std::fs::read(inst.image()).expect("image");
    assert!(bytes.iter().all(|b| *b == 0), "a fresh disk");

    // Without --yes and without a terminal nothing is removed.
    inst.scribble();
    let before = std::fs::read(inst.image()).expect("image");
    let (code, text) = inst.up(&["--reset"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("without confirmation"), "{text}");
    assert!(before == std::fs::read(inst.image()).expect("image"));

    // --no-state-disk: the disk is left alone and not attached.
    let (_, text) = inst.up(&["--no-state-disk"]);
    assert!(
        text.contains("state disk: none (--no-state-disk)"),
        "{text}"
    );
    assert!(before == std::fs::read(inst.image()).expect("image"));
}

/// An image on a read-only file system (the image file bind-mounted read-only onto itself;
/// needs root and a mount namespace that allows it, else skipped).
#[test]
fn an_image_on_a_read_only_file_system_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to mount a read-only file system");
        return;
    }
    let inst = Instance::new();
    inst.up(&["--state-disk-size", "64M"]);
    inst.scribble();
    let image = inst.image();
    let bound = Command::new("mount")
        .arg("--bind")
        .arg(&image)
        .arg(&image)
        .status()
        .is_ok_and(|s| s.success());
    if !bound {
        eprintln!("skipped: cannot bind-mount {} here", image.display());
        return;
    }
    let _unmount = Unmount(image.clone());
    let ro = Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(&image)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ro, "remount read-only");
    inst.refused(&["--state-disk-size", "64M"], "on a read-only file system");
}

/// Unmounts on every way out of the test, so a failure leaves no mount behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
