//! Instance lifecycle against real VMs: `up --detach` returns once the guest is ready, `status`,
//! `logs` and a refused second `up` see the running instance, `down` stops it with a synced guest
//! exit and leaves no process behind, and a SIGKILLed `up` leaves nothing running and only stale
//! state that the next `up` clears.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use openshell_tests::{both_arches, host_bin, vm_slot, Boot, BOOT_DEADLINE};

/// A `openshell-host <sub>` command for this boot's instance with its private state home.
fn host(boot: &Boot, name: &str, sub: &str) -> Command {
    let mut cmd = Command::new(host_bin());
    cmd.arg(sub)
        .arg("--name")
        .arg(name)
        .env("XDG_STATE_HOME", boot.state_home())
        .stdin(Stdio::null());
    cmd
}

/// `up` for this boot with `flags`: a workload that runs until stopped, no network.
fn up(boot: &Boot, name: &str, flags: &[&str]) -> Command {
    up_exec(boot, name, flags, &["/bin/sleep", "3600"])
}

fn up_exec(boot: &Boot, name: &str, flags: &[&str], exec: &[&str]) -> Command {
    let mut cmd = host(boot, name, "up");
    cmd.args(flags);
    boot.vm_args(&mut cmd, &run_dir(boot));
    cmd.args(["--net", "none", "--exec"]).args(exec);
    cmd
}

fn run_dir(boot: &Boot) -> PathBuf {
    boot.run_dir.path().join("run")
}

fn state_dir(boot: &Boot, name: &str) -> PathBuf {
    boot.state_home().join("openshell").join(name)
}

/// Runs `cmd` to the end; past `timeout` kills it and fails.
fn run(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start openshell-host");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn state_json(boot: &Boot, name: &str) -> serde_json::Value {
    let path = state_dir(boot, name).join("state.json");
    let t = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&t).expect("state.json")
}

/// Processes whose command line mentions `needle` (the instance's run dir): VMM and helpers.
fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

/// Live (non-zombie) process with this pid.
fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `status` of the running instance, as text and as JSON, names the up process `host_pid`.
fn assert_running_status(boot: &Boot, name: &str, host_pid: u64) {
    let status = run(host(boot, name, "status"), Duration::from_secs(10));
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        out.contains("running") && out.contains(&format!("pid {host_pid}")),
        "{out}"
    );
    assert!(out.contains("mounts"), "last boot phases shown: {out}");
    let mut json_cmd = host(boot, name, "status");
    json_cmd.arg("--json");
    let js = run(json_cmd, Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_slice(&js.stdout).expect("status --json");
    assert_eq!(v["running"], true);
    assert_eq!(v["pid"], host_pid);
}

/// A second `up` of the running instance is refused at once, naming its pid, and leaves it be.
fn assert_second_up_refused(boot: &Boot, name: &str, host_pid: u64) {
    let second = run(up(boot, name, &[]), Duration::from_secs(20));
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("already running") && err.contains(&host_pid.to_string()),
        "{err}"
    );
    assert!(
        alive(host_pid),
        "the refused up must not disturb the running one"
    );
}

/// `logs` shows the boot report's lines and the console.
fn assert_logs(boot: &Boot, name: &str) {
    let logs = run(host(boot, name, "logs"), Duration::from_secs(10));
    assert!(logs.status.success(), "{}", text(&logs));
    let out = String::from_utf8_lossy(&logs.stdout);
    for want in [
        "openshell-init 0.1.0 on",
        "phase mounts: ok in",
        "ready: workload-started",
        "== console",
    ] {
        assert!(out.contains(want), "logs lack {want:?}:\n{out}");
    }
}

fn detached_up_status_logs_down(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let name = format!("lc-{arch}");

    let started = run(up(&boot, &name, &["--detach"]), BOOT_DEADLINE);
    assert!(started.status.success(), "{}", text(&started));
    assert!(
        String::from_utf8_lossy(&started.stdout).contains("ready (instance"),
        "{}",
        text(&started)
    );
    let st = state_json(&boot, &name);
    let host_pid = st["host_pid"].as_u64().expect("host_pid");
    let vmm_pid = st["vmm_pid"].as_u64().expect("vmm_pid");
    assert!(alive(host_pid) && alive(vmm_pid), "{st}");
    assert_eq!(st["arch"], arch);
    assert_eq!(st["backend"], "qemu");

    assert_running_status(&boot, &name, host_pid);
    assert_second_up_refused(&boot, &name, host_pid);
    assert_logs(&boot, &name);

    // `logs -f` follows until the instance stops, then ends by itself.
    let mut follow = host(&boot, &name, "logs");
    follow
        .arg("-f")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut follower = follow.spawn().expect("logs -f");
    let mut follow_out = follower.stdout.take().expect("stdout");
    let follow_text = std::thread::spawn(move || {
        let mut t = String::new();
        let _ = follow_out.read_to_string(&mut t);
        t
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        matches!(follower.try_wait(), Ok(None)),
        "logs -f runs while the instance does"
    );

    let down = run(host(&boot, &name, "down"), Duration::from_secs(60));
    assert!(down.status.success(), "{}", text(&down));
    let out = String::from_utf8_lossy(&down.stdout);
    assert!(
        out.contains("is down") && out.contains("filesystems synced"),
        "{out}"
    );
    wait_until("up and VMM gone", Duration::from_secs(10), || {
        !alive(host_pid) && !alive(vmm_pid)
    });
    wait_until("logs -f ended", Duration::from_secs(10), || {
        matches!(follower.try_wait(), Ok(Some(_)))
    });
    let followed = follow_text.join().unwrap_or_default();
    assert!(
        followed.contains("== console") && followed.contains("stopped"),
        "{followed}"
    );
    let left = processes_mentioning(&run_dir(&boot));
    assert!(left.is_empty(), "processes of the instance left: {left:?}");
    assert!(!state_dir(&boot, &name).join("state.json").exists());

    let status = run(host(&boot, &name, "status"), Duration::from_secs(10));
    assert_eq!(status.status.code(), Some(3), "{}", text(&status));
    assert!(String::from_utf8_lossy(&status.stdout).contains("not running"));

    // Down of a stopped instance is fine and says so.
    let again = run(host(&boot, &name, "down"), Duration::from_secs(10));
    assert!(again.status.success(), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("not running"));
}
both_arches!(detached_up_status_logs_down);

/// Starts the instance detached and SIGKILLs its `up`: the VMM and helpers go with it, the
/// instance's state file stays (nothing could remove it), and `status` says it is not running.
/// Returns the killed `up`'s pid.
fn sigkill_detached_up(boot: &Boot, name: &str) -> u64 {
    let started = run(up(boot, name, &["--detach"]), BOOT_DEADLINE);
    assert!(started.status.success(), "{}", text(&started));
    let st = state_json(boot, name);
    let host_pid = st["host_pid"].as_u64().expect("host_pid");
    let vmm_pid = st["vmm_pid"].as_u64().expect("vmm_pid");
    // SAFETY: kill(2) with a pid we just read; no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(host_pid as i32, libc::SIGKILL) }, 0);
    wait_until(
        "killed up and its VMM gone",
        Duration::from_secs(10),
        || !alive(host_pid) && !alive(vmm_pid),
    );
    wait_until("no helper left", Duration::from_secs(10), || {
        processes_mentioning(&run_dir(boot)).is_empty()
    });
    assert!(
        state_dir(boot, name).join("state.json").exists(),
        "a SIGKILLed up cannot clean up"
    );
    let status = run(host(boot, name, "status"), Duration::from_secs(10));
    assert_eq!(status.status.code(), Some(3), "{}", text(&status));
    host_pid
}

fn sigkilled_up_leaves_nothing_and_next_up_clears_stale_state(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let name = format!("lk-{arch}");

    // Runtime state for `--reset`, with a link out of the rootfs whose target must survive.
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("precious"), b"keep").expect("precious");
    let seeded = [
        "var/lib/kubelet/pods/p1/volumes/v",
        "var/lib/cni/networks/cbr0/10.42.0.2",
        "var/lib/rancher/k3s/server/db/state.db",
        "var/lib/rancher/k3s/server/db/state.db-wal",
    ];
    let seed = || {
        for rel in seeded {
            let p = boot.root_path(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, b"x").expect("seed");
        }
        let link = boot.root_path("var/lib/kubelet/pods/p1/escape");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(outside.path(), link).expect("escape link");
    };
    seed();
    if std::fs::symlink_metadata(boot.root_path("var/run")).is_err() {
        std::os::unix::fs::symlink("../run", boot.root_path("var/run")).expect("var/run");
    }
    // Not on a terminal: --reset without --yes refuses and removes nothing.
    let refused = run(
        up(&boot, &name, &["--detach", "--reset"]),
        Duration::from_secs(20),
    );
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--yes"),
        "{}",
        text(&refused)
    );
    assert!(seeded.iter().all(|rel| boot.root_path(rel).exists()));
    // The guest's kine phase rightly refuses a database that is not one: boot without them.
    for rel in &seeded[2..] {
        std::fs::remove_file(boot.root_path(rel)).expect("unseed");
    }

    let host_pid = sigkill_detached_up(&boot, &name);

    seed();
    let restarted = run(
        up(&boot, &name, &["--detach", "--reset", "--yes"]),
        BOOT_DEADLINE,
    );
    assert!(restarted.status.success(), "{}", text(&restarted));
    let out = String::from_utf8_lossy(&restarted.stdout);
    assert!(
        out.contains("cleared stale state") && out.contains(&host_pid.to_string()),
        "{out}"
    );
    assert!(out.contains("reset: removed"), "{out}");
    for rel in seeded {
        assert!(!boot.root_path(rel).exists(), "{rel} survived the reset");
    }
    assert!(!boot.root_path("var/lib/kubelet/pods").exists());
    assert!(
        outside.path().join("precious").exists(),
        "link target survives"
    );
    let run_link = std::fs::symlink_metadata(boot.root_path("var/run")).expect("var/run kept");
    assert!(run_link.file_type().is_symlink());
    // No time for a clean shutdown: down kills the VM and up, and clears what up left.
    let mut hard = host(&boot, &name, "down");
    hard.args(["--timeout", "0"]);
    let down = run(hard, Duration::from_secs(30));
    assert!(down.status.success(), "{}", text(&down));
    let out = String::from_utf8_lossy(&down.stdout);
    assert!(
        out.contains("killing the VM") && out.contains("is down"),
        "{out}"
    );
    wait_until(
        "no process of the instance left",
        Duration::from_secs(10),
        || processes_mentioning(&run_dir(&boot)).is_empty(),
    );
    assert!(!state_dir(&boot, &name).join("state.json").exists());
}
both_arches!(sigkilled_up_leaves_nothing_and_next_up_clears_stale_state);

fn detached_boot_that_fails_returns_its_error(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let name = format!("lf-{arch}");
    let failed = run(
        up_exec(&boot, &name, &["--detach"], &["/no/such/program"]),
        BOOT_DEADLINE,
    );
    assert!(!failed.status.success(), "{}", text(&failed));
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("stopped before ready"),
        "{}",
        text(&failed)
    );
    let status = run(host(&boot, &name, "status"), Duration::from_secs(10));
    assert_eq!(status.status.code(), Some(3), "{}", text(&status));
    assert!(processes_mentioning(&run_dir(&boot)).is_empty());

    // A workload that ends at once: ready was reached, so the workload's status is returned.
    let quick = run(
        up_exec(&boot, &name, &["--detach"], &["/bin/true"]),
        BOOT_DEADLINE,
    );
    assert!(quick.status.success(), "{}", text(&quick));
    assert!(
        String::from_utf8_lossy(&quick.stdout).contains("ready (instance"),
        "{}",
        text(&quick)
    );
}
both_arches!(detached_boot_that_fails_returns_its_error);
