//! Harness for VM tests: finds the artifacts `cargo xtask` built (kernel, root filesystem, vsock
//! helper), gives each test its own writable copy of the root filesystem, runs the real
//! `openshell-host up`, and parses the boot timeline it writes.
//!
//! VM tests need artifacts that take minutes to build, so they run through `cargo xtask test`,
//! which builds them and points `OPENSHELL_TEST_ARTIFACTS_<ARCH>` at a JSON file listing them.
//! Run any other way they print why they skip, except under CI (`CI` set), where a missing
//! artifact is a failure: CI must never pass by skipping.

pub mod crashed_root;
pub mod oci_image;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use openshell_shared::GuestMessage;
use serde::Deserialize;

pub const ARCHES: [&str; 2] = ["x86_64", "aarch64"];

/// Generous: aarch64 under TCG on a loaded 2-core machine is slow. This is a hang guard, not a
/// performance assertion.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(180);

/// Instantiates a test body for every architecture.
#[macro_export]
macro_rules! both_arches {
    ($body:ident) => {
        mod $body {
            #[test]
            fn x86_64() {
                super::$body("x86_64");
            }
            #[test]
            fn aarch64() {
                super::$body("aarch64");
            }
        }
    };
}

/// Paths of the prebuilt artifacts for one architecture, as `cargo xtask artifacts --json` prints.
#[derive(Debug, Clone, Deserialize)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub vsock_helper: PathBuf,
}

/// The path `var` names, or `None` (with `why`, the way to set it, on stderr) when it is not set;
/// under CI its absence is a failure: there every VM test must run.
fn path_from_env(var: &str, why: &str) -> Option<PathBuf> {
    let Some(path) = std::env::var_os(var) else {
        let why = format!("{var} is not set: {why}");
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
        return None;
    };
    Some(PathBuf::from(path))
}

/// Loads the artifact list for `arch`, or `None` (with a message) when VM tests cannot run here.
pub fn artifacts(arch: &str) -> Option<Artifacts> {
    let var = format!("OPENSHELL_TEST_ARTIFACTS_{}", arch.to_uppercase());
    let path = path_from_env(&var, "VM tests run through `cargo xtask test`")?;
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{var}={}: {e}", Path::new(&path).display()));
    let found: Artifacts = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not an artifact list: {e}", Path::new(&path).display()));
    Some(found)
}

/// The base bundle for `arch` (`cargo xtask bundle`), named by `OPENSHELL_TEST_BUNDLE_<ARCH>`,
/// or `None` (with a message) when the bundle tests cannot run here.
pub fn bundle(arch: &str) -> Option<PathBuf> {
    let var = format!("OPENSHELL_TEST_BUNDLE_{}", arch.to_uppercase());
    path_from_env(&var, "the bundle tests run through `cargo xtask test`")
}

/// The `containerd-test` root for `arch` (Debian's containerd and runc: `cargo xtask rootfs
/// --profile containerd-test`), named by `OPENSHELL_TEST_CONTAINERD_ROOTFS_<ARCH>`, or `None`
/// with a message; under CI its absence is a failure.
pub fn containerd_rootfs(arch: &str) -> Option<PathBuf> {
    let var = format!("OPENSHELL_TEST_CONTAINERD_ROOTFS_{}", arch.to_uppercase());
    let how = format!("`cargo xtask rootfs --profile containerd-test --arch {arch}` builds it");
    let path = path_from_env(&var, &how)?;
    assert!(
        path.join("usr/bin/containerd").is_file(),
        "{var}={}: no usr/bin/containerd there",
        path.display()
    );
    Some(path)
}

/// The real gvproxy the gvproxy tests boot with: `OPENSHELL_TEST_GVPROXY` (`cargo xtask test`
/// sets it to the pinned build), or `None` with a message; under CI its absence is a failure.
pub fn gvproxy() -> Option<PathBuf> {
    const VAR: &str = "OPENSHELL_TEST_GVPROXY";
    let path = path_from_env(VAR, "gvproxy tests run through `cargo xtask test`")?;
    assert!(path.is_file(), "{VAR}={}: no such file", path.display());
    Some(path)
}

/// A TCP port nothing listens on right now on 127.0.0.1 (the kernel picks it; racy only against
/// other binders).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The local addresses listening on TCP `port` on this host, IPv4 and IPv6, as /proc/net/tcp
/// and tcp6 write them (`0100007F:PORT` is 127.0.0.1, `00000000:PORT` every IPv4 interface, 32
/// zeros every IPv6 one).
pub fn listeners_on(port: u16) -> Vec<String> {
    let suffix = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|path| {
            let table = std::fs::read_to_string(path).unwrap_or_default();
            table
                .lines()
                .skip(1)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // st 0A is LISTEN.
            (cols.get(3) == Some(&"0A") && cols.get(1)?.ends_with(&suffix))
                .then(|| cols[1].to_string())
        })
        .collect()
}

/// One HTTP/1.0 GET of `/index.html` on 127.0.0.1:`port` (a forward into the guest); the whole
/// answer, or `None` while nothing answers yet.
pub fn http_get(port: u16) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(
        &(std::net::Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    (!answer.is_empty()).then_some(answer)
}

/// Starts `boot` with a busybox web server on guest port 8080 (its page names the guest's arch)
/// behind `-p HOST:8080`, and waits until 127.0.0.1:`host_port` answers; returns the running boot
/// and the answer. Whatever network `boot` was given carries the forward.
pub fn serve_web(boot: Boot, host_port: u16) -> (Running, String) {
    let script = "mkdir -p /tmp/www && echo \"served by $(uname -m)\" > /tmp/www/index.html \
                  && exec busybox httpd -f -p 8080 -h /tmp/www";
    let mut running = boot
        .arg("-p")
        .arg(&format!("{host_port}:8080"))
        .exec(&["/bin/sh", "-c", script])
        .start();
    let deadline = Instant::now() + BOOT_DEADLINE;
    loop {
        assert!(
            running.is_running(),
            "host exited before the service answered"
        );
        if let Some(answer) = http_get(host_port) {
            return (running, answer);
        }
        assert!(
            Instant::now() < deadline,
            "no answer on 127.0.0.1:{host_port}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `openshell-host` binary under test: `OPENSHELL_HOST_BIN`, else the one cargo built next to
/// this test binary (`target/<profile>/deps/<test>` → `target/<profile>/openshell-host`).
pub fn host_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OPENSHELL_HOST_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("openshell-host");
    assert!(
        bin.exists(),
        "{} missing: build it with `cargo build -p openshell-host` or set OPENSHELL_HOST_BIN",
        bin.display()
    );
    bin
}

/// Every process of the host's (qemu, virtiofsd, vhost-device-vsock) whose command line mentions
/// the run directory.
pub fn processes_using(dir: &std::path::Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        if cmdline.contains(&needle) && !zombie {
            found.push((pid, cmdline));
        }
    }
    found
}

/// The seed of a crash test's kill moments: `OPENSHELL_CRASH_SEED`, else the clock (odd, never
/// zero, for a xorshift generator). The tests print it so a failing sequence can be replayed.
pub fn crash_seed() -> u64 {
    std::env::var("OPENSHELL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        })
}

/// The qemu of a boot whose run directory is `run`, once it exists (before `deadline`).
pub fn vmm_pid(run: &Path, deadline: Instant) -> Option<i32> {
    while Instant::now() < deadline {
        if let Some((pid, _)) = processes_using(run)
            .into_iter()
            .find(|(_, cmd)| cmd.starts_with("qemu-system"))
        {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Waits until the guest console log `console` contains `needle` (e.g. `phase kine: started`);
/// false at `deadline`.
pub fn wait_for_console(console: &Path, needle: &str, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if std::fs::read(console)
            .map(|b| String::from_utf8_lossy(&b).contains(needle))
            .unwrap_or(false)
        {
            return true;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    false
}

/// `e2fsck -fn` of a state disk image on the host (the VM ended): its status and its words; 0
/// is a filesystem with nothing to fix.
pub fn fsck_image(image: &Path) -> (i32, String) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("e2fsck (the host's e2fsprogs): {e}"));
    let words =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), words)
}

/// Full VM boots under TCG each want a whole core; running them one at a time keeps their timing
/// (and the deadlines inside the guest) sane on small machines.
pub fn vm_slot() -> MutexGuard<'static, ()> {
    static SLOT: Mutex<()> = Mutex::new(());
    SLOT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One VM boot to be started.
pub struct Boot {
    pub arch: String,
    pub artifacts: Artifacts,
    /// The test's private copy of the root filesystem.
    pub root: tempfile::TempDir,
    pub run_dir: tempfile::TempDir,
    pub exec: Vec<String>,
    pub extra_args: Vec<String>,
    /// `--net` for the boot: `none` unless a test is about the network, so boots stay fast and
    /// never compete for the default forwarded port.
    pub net: String,
    /// `--state-disk-size` for the boot; unset, `--no-state-disk`: the base root cannot format
    /// a state disk, so only the tests about the disk get one.
    pub state_disk: Option<String>,
    /// `--accel` for the boot: [`test_accel`] unless a test is about the accelerator.
    pub accel: String,
    /// `--bundle` instead of `--kernel`/`--rootfs` (`root` then stays empty).
    pub bundle: Option<PathBuf>,
}

/// qemu's accelerator for the VM tests: `OPENSHELL_TEST_ACCEL` (`auto`, `kvm`, `tcg`), else
/// `tcg`, so a run measures the same thing on every machine and never depends on whether KVM
/// runs guests here (on these CI hosts it does not).
pub fn test_accel() -> String {
    std::env::var("OPENSHELL_TEST_ACCEL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "tcg".into())
}

impl Boot {
    /// Prepares a boot with a fresh copy of the root filesystem, or `None` when VM tests skip.
    pub fn new(arch: &str) -> Option<Self> {
        let artifacts = artifacts(arch)?;
        let rootfs = artifacts.rootfs.clone();
        Some(Self::on_copy_of(arch, artifacts, &rootfs))
    }

    /// A boot of `bundle` (the host unpacks it into the instance's state directory), or `None`
    /// when VM tests skip.
    pub fn from_bundle(arch: &str, bundle: &Path) -> Option<Self> {
        let artifacts = artifacts(arch)?;
        let empty = tempfile::tempdir().expect("temp dir");
        let mut boot = Self::on_copy_of(arch, artifacts, empty.path());
        boot.bundle = Some(bundle.to_path_buf());
        Some(boot)
    }

    /// The same with a fresh copy of another root (another profile's) instead of the base root;
    /// `artifacts.rootfs` stays the base root's.
    pub fn with_rootfs(arch: &str, rootfs: &Path) -> Option<Self> {
        Some(Self::on_copy_of(arch, artifacts(arch)?, rootfs))
    }

    fn on_copy_of(arch: &str, artifacts: Artifacts, rootfs: &Path) -> Self {
        // Inside a directory closed to other users: as root, `up` refuses a root they can reach.
        let root = tempfile::Builder::new()
            .prefix("openshell-root-")
            .tempdir_in(private_roots())
            .expect("temp dir");
        // cp -a keeps device nodes, symlinks and modes, which the guest needs.
        let status = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", rootfs.display()))
            .arg(root.path())
            .status()
            .expect("run cp");
        assert!(status.success(), "copying {} failed", rootfs.display());
        // Short path: unix socket paths must stay under 104 bytes.
        let run_dir = tempfile::Builder::new()
            .prefix("osh-")
            .tempdir_in("/tmp")
            .expect("run dir");
        Self {
            arch: arch.to_string(),
            artifacts,
            root,
            run_dir,
            exec: Vec::new(),
            extra_args: Vec::new(),
            net: "none".into(),
            state_disk: None,
            accel: test_accel(),
            bundle: None,
        }
    }

    pub fn exec<S: AsRef<str>>(mut self, argv: &[S]) -> Self {
        self.exec = argv.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    pub fn net(mut self, backend: &str) -> Self {
        self.net = backend.to_string();
        self
    }

    /// Boots with a state disk of `size` (`--state-disk-size`).
    pub fn state_disk(mut self, size: &str) -> Self {
        self.state_disk = Some(size.to_string());
        self
    }

    /// Boots with `--accel ACCEL` instead of [`test_accel`]'s.
    pub fn accel(mut self, accel: &str) -> Self {
        self.accel = accel.to_string();
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }

    pub fn root_path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel.trim_start_matches('/'))
    }

    /// `XDG_CONFIG_HOME` of the boot's host.
    pub fn config_dir(&self) -> PathBuf {
        self.run_dir.path().join("config")
    }

    /// `HOME` of the boot's host.
    pub fn home_dir(&self) -> PathBuf {
        self.run_dir.path().join("home")
    }

    /// `XDG_STATE_HOME` of this boot: the instance's state directory lives under it.
    pub fn state_home(&self) -> PathBuf {
        self.run_dir.path().join("state")
    }

    /// The state directory of instance `name` (lock, state file, state disk).
    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.state_home().join("openshell").join(name)
    }

    pub fn report_path(&self) -> PathBuf {
        self.run_dir.path().join("report.json")
    }

    /// The `up` options that say which VM this is: arch, kernel, root, vsock helper, run
    /// directory, state disk, accelerator.
    pub fn vm_args(&self, cmd: &mut Command, run_dir: &Path) {
        match &self.state_disk {
            Some(size) => cmd.arg("--state-disk-size").arg(size),
            None => cmd.arg("--no-state-disk"),
        };
        cmd.arg("--arch").arg(&self.arch);
        match &self.bundle {
            Some(bundle) => cmd.arg("--bundle").arg(bundle),
            None => cmd
                .arg("--kernel")
                .arg(&self.artifacts.kernel)
                .arg("--rootfs")
                .arg(self.root.path()),
        };
        cmd.arg("--vsock-helper")
            .arg(&self.artifacts.vsock_helper)
            .arg("--run-dir")
            .arg(run_dir)
            .arg("--accel")
            .arg(&self.accel);
    }

    /// Starts `openshell-host up` for this boot.
    pub fn start(self) -> Running {
        let mut cmd = Command::new(host_bin());
        cmd.arg("up");
        self.vm_args(&mut cmd, &self.run_dir.path().join("run"));
        cmd.arg("--report")
            .arg(self.report_path())
            .arg("--net")
            .arg(&self.net)
            .args(&self.extra_args)
            // The host stores the guest's client credentials under the configuration directory:
            // the test's own, never the user's.
            .env("XDG_CONFIG_HOME", self.config_dir())
            // ~/.kube/openshell-<name>.yaml goes to the test's own home, never the user's.
            .env("HOME", self.home_dir());
        // Private instance state (lock, state file): boots never contend for an instance name.
        cmd.env("XDG_STATE_HOME", self.state_home());
        if !self.exec.is_empty() {
            cmd.arg("--exec").args(&self.exec);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start openshell-host");
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        Running {
            boot: self,
            child,
            stdout,
            stderr,
            started: Instant::now(),
        }
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut p) = pipe {
            let mut bytes = Vec::new();
            let _ = p.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

/// `<tmp>/openshell-test-roots`, 0700: where boots copy their root filesystems.
fn private_roots() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join("openshell-test-roots");
    let _ = std::fs::create_dir(&dir);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// A boot in progress.
pub struct Running {
    pub boot: Boot,
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
    pub started: Instant,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Stops the instance the way a user does: `openshell-host down` (this boot's instance has
    /// the default name, under its own state home). Returns what `down` printed and its status.
    pub fn down(&self, timeout_secs: u32) -> std::process::Output {
        Command::new(host_bin())
            .args(["down", "--name", "default", "--timeout"])
            .arg(timeout_secs.to_string())
            .env("XDG_STATE_HOME", self.boot.state_home())
            .stdin(Stdio::null())
            .output()
            .expect("run openshell-host down")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// True while `openshell-host` has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until `rel` exists in the guest's root (the guest writes through virtio-fs).
    pub fn wait_for_file(&mut self, rel: &str, timeout: Duration) {
        let path = self.boot.root_path(rel);
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("host exited ({status}) before {} appeared", path.display());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not appear within {timeout:?}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the host to exit; past `timeout` kills it and fails the test with its output.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait().expect("wait for openshell-host") {
                Some(status) => break status,
                None if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let out = self.stdout.join().unwrap_or_default();
                    let err = self.stderr.join().unwrap_or_default();
                    panic!("openshell-host still running after {timeout:?}\nstdout:\n{out}\nstderr:\n{err}");
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let elapsed = self.started.elapsed();
        let stdout = self.stdout.join().unwrap_or_default();
        let stderr = self.stderr.join().unwrap_or_default();
        let report = std::fs::read_to_string(self.boot.report_path())
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        Finished {
            boot: self.boot,
            status,
            stdout,
            stderr,
            report,
            elapsed,
        }
    }
}

/// A boot that ended.
pub struct Finished {
    pub boot: Boot,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub report: Option<serde_json::Value>,
    pub elapsed: Duration,
}

impl Finished {
    /// Everything the host printed, for assertion messages.
    pub fn output(&self) -> String {
        format!(
            "exit: {}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// The guest's messages in the order the host received them, from the `--report` timeline.
    pub fn guest_messages(&self) -> Vec<GuestMessage> {
        let report = self
            .report
            .as_ref()
            .unwrap_or_else(|| panic!("no report written\n{}", self.output()));
        let events = report["events"]
            .as_array()
            .unwrap_or_else(|| panic!("report has no events array: {report}"));
        events
            .iter()
            .filter(|e| e["source"] == "guest")
            .map(|e| {
                serde_json::from_value(e["event"].clone())
                    .unwrap_or_else(|err| panic!("bad guest event {e}: {err}"))
            })
            .collect()
    }

    pub fn exit_message(&self) -> (i32, u64, bool) {
        self.guest_messages()
            .into_iter()
            .find_map(|m| match m {
                GuestMessage::Exit {
                    status,
                    peak_rss_kib,
                    synced,
                } => Some((status, peak_rss_kib, synced)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no exit message\n{}", self.output()))
    }
}
