//! The init binary's host-side commands, run for real: `plan`, `phase NAME --root DIR` (in
//! private namespaces) and `supervise` (the PID 1 supervision loop, as a subreaper).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_openshell-init");

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn finished(events: &[Value]) -> &Value {
    events
        .iter()
        .find(|e| e["msg"]["type"] == "phase_finished")
        .unwrap_or_else(|| panic!("no phase_finished in {events:?}"))
}

/// Namespaces need root; say so instead of failing where they cannot be made.
fn can_unshare() -> bool {
    let ok = nix::unistd::geteuid().is_root();
    if !ok {
        eprintln!("skipped: needs root for private namespaces");
    }
    ok
}

#[test]
fn plan_is_printed_in_order() {
    let out = Command::new(BIN).arg("plan").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(names[..2], ["mounts", "config"]);
    assert_eq!(names.len(), 15, "{text}");
    // The state disk is bound before anything that works on what it holds.
    let pos = |n: &str| {
        names
            .iter()
            .position(|x| *x == n)
            .unwrap_or_else(|| panic!("{n}: {text}"))
    };
    for after in [
        "manifests",
        "pki",
        "runtime-cleanup",
        "kine",
        "capabilities",
    ] {
        assert!(pos("state-disk") < pos(after), "{after}: {text}");
    }
    for name in [
        "runtime-cleanup",
        "manifests",
        "pki",
        "k3s-prep",
        "exec-service",
    ] {
        assert!(names.contains(&name), "{text}");
    }
}

/// The `manifests` and `pki` phases on a root with the gateway rootfs's bundled manifests: the
/// second boot changes nothing and says so.
#[test]
fn gateway_phases_deploy_once_then_report_unchanged() {
    if !can_unshare() {
        return;
    }
    let root = tempfile::tempdir().expect("tmp");
    let bundle = root.path().join("opt/openshell/manifests");
    std::fs::create_dir_all(&bundle).expect("mkdir");
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../rootfs/gateway/opt/openshell/manifests"
    );
    for entry in std::fs::read_dir(fixtures).expect("fixtures") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), bundle.join(entry.file_name())).expect("copy");
    }
    let log_of = |phase: &str| -> String {
        let out = Command::new(BIN)
            .args(["phase", phase, "--root"])
            .arg(root.path())
            .output()
            .expect("run");
        // The client bundle is printed with its key redacted: stdout may be a shared log.
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        let events = json_lines(&out.stdout);
        if phase == "pki" {
            let sent = events.iter().find(|e| e["msg"]["type"] == "credentials");
            let sent = sent.unwrap_or_else(|| panic!("no credentials in {events:?}"));
            assert_eq!(sent["msg"]["client_key"], "<redacted>");
            assert!(sent["msg"]["client_crt"]
                .as_str()
                .is_some_and(|c| c.contains("BEGIN CERTIFICATE")));
        }
        assert_eq!(
            finished(&events)["msg"]["outcome"]["kind"],
            "ok",
            "{events:?}"
        );
        events
            .iter()
            .find(|e| e["msg"]["type"] == "log")
            .and_then(|e| e["msg"]["text"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(log_of("manifests").contains("2 written"));
    assert!(log_of("pki").contains("issued ca"));
    let manifests = root.path().join("var/lib/rancher/k3s/server/manifests");
    for f in [
        "openshell-helmchart.yaml",
        "agent-sandbox.yaml",
        "openshell-tls-secrets.yaml",
    ] {
        assert!(manifests.join(f).is_file(), "{f}");
    }
    assert_eq!(
        log_of("manifests"),
        "manifests: 2 manifests unchanged, 0 written, 0 removed; 0 charts unchanged, 0 written"
    );
    assert_eq!(
        log_of("pki"),
        "pki: kept ca, server, client, ssh secret; secret manifest unchanged"
    );
}

#[test]
fn mounts_phase_runs_against_a_root_and_leaves_the_host_alone() {
    if !can_unshare() {
        return;
    }
    let root = tempfile::tempdir().expect("tmp");
    let out = Command::new(BIN)
        .args(["phase", "mounts", "--root"])
        .arg(root.path())
        .output()
        .expect("run");
    let events = json_lines(&out.stdout);
    assert!(
        out.status.success(),
        "{events:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(events[0]["msg"]["type"], "phase_started");
    assert_eq!(events[0]["seq"], 0);
    assert_eq!(finished(&events)["msg"]["outcome"]["kind"], "ok");
    let log = events
        .iter()
        .find(|e| e["msg"]["type"] == "log")
        .expect("detail log");
    assert!(
        log["msg"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("8 mounted"),
        "{log}"
    );
    // The mounts lived in the phase's own namespace: nothing is mounted here.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let root_str = root.path().to_string_lossy().into_owned();
    assert!(
        !mountinfo.contains(&root_str),
        "leaked mounts under {root_str}"
    );
    // Mount points were created in the root.
    // (Mount points inside sysfs and devtmpfs went away with those mounts.)
    for dir in ["proc", "sys", "dev", "run", "tmp"] {
        assert!(root.path().join(dir).is_dir(), "{dir}");
    }
}

#[test]
fn config_phase_names_the_bad_field() {
    if !can_unshare() {
        return;
    }
    let root = tempfile::tempdir().expect("tmp");
    let cfg = root.path().join("bad.yaml");
    std::fs::write(&cfg, "workload:\n  argv: [relative/sh]\n").expect("write");
    let out = Command::new(BIN)
        .args(["phase", "config", "--cmdline", "quiet", "--root"])
        .arg(root.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let events = json_lines(&out.stdout);
    let outcome = &finished(&events)["msg"]["outcome"];
    assert_eq!(outcome["kind"], "failed");
    let detail = outcome["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("workload.argv") && detail.contains("bad.yaml"),
        "{detail}"
    );
}

#[test]
fn loopback_and_hostname_phases_run_in_private_namespaces() {
    if !can_unshare() {
        return;
    }
    let host_name = nix::unistd::gethostname().expect("hostname");
    let root = tempfile::tempdir().expect("tmp");
    for phase in ["loopback", "hostname"] {
        let out = Command::new(BIN)
            .args([
                "phase",
                phase,
                "--cmdline",
                "openshell.hostname=phase-test",
                "--root",
            ])
            .arg(root.path())
            .output()
            .expect("run");
        let events = json_lines(&out.stdout);
        assert!(out.status.success(), "{phase}: {events:?}");
        assert_eq!(finished(&events)["msg"]["outcome"]["kind"], "ok", "{phase}");
    }
    assert_eq!(nix::unistd::gethostname().expect("hostname"), host_name);
}

#[test]
fn unknown_phase_is_a_usage_error() {
    let out = Command::new(BIN)
        .args(["phase", "nope", "--root", "/tmp"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no phase named nope"));
}

fn exit_event(events: &[Value]) -> &Value {
    events
        .iter()
        .find(|e| e["msg"]["type"] == "exit")
        .unwrap_or_else(|| panic!("no exit event in {events:?}"))
}

#[test]
fn supervise_passes_the_exit_status_through() {
    let out = Command::new(BIN)
        .args(["supervise", "--", "/bin/sh", "-c", "exit 7"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(7));
    let events = json_lines(&out.stdout);
    assert_eq!(exit_event(&events)["msg"]["status"], 7);
    assert!(events.iter().any(|e| e["msg"]["type"] == "ready"));
}

/// The workload starts with no signal blocked (init blocks its handled signals for a signalfd)
/// and leads a process group of its own, which is what shutdown signals outside PID 1.
#[test]
fn supervise_starts_the_workload_unblocked_in_its_own_group() {
    let script = r#"
        read -r line < /proc/self/stat
        rest=${line##*) }
        set -- $rest
        pgid=$3
        blocked=$(awk '/^SigBlk/ {print $2}' /proc/self/status)
        [ "$pgid" = "$$" ] || { echo "pgid $pgid, pid $$"; exit 3; }
        [ "$blocked" = 0000000000000000 ] || { echo "blocked $blocked"; exit 4; }
        exit 0
    "#;
    let out = supervise_sh(script);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `openshell-init supervise -- /bin/sh -c SCRIPT`, to its end.
fn supervise_sh(script: &str) -> std::process::Output {
    Command::new(BIN)
        .args(["supervise", "--", "/bin/sh", "-c", script])
        .output()
        .expect("run")
}

#[test]
fn supervise_reaps_orphans() {
    // Orphans re-parent to the supervisor (a subreaper, like PID 1); after they end, none of
    // the supervisor's children may be a zombie. The count is the exit status.
    let script = r#"
        for i in 1 2 3; do ( /bin/sh -c 'exit 3' & ) ; ( sleep 0.05 & ) ; done
        sleep 0.5
        n=0
        for f in /proc/[0-9]*/stat; do
            read -r line < "$f" 2>/dev/null || continue
            rest=${line##*) }
            set -- $rest
            [ "$1" = Z ] && [ "$2" = "$PPID" ] && n=$((n+1))
        done
        exit $n
    "#;
    let out = supervise_sh(script);
    assert_eq!(
        out.status.code(),
        Some(0),
        "zombies left: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// [`signal`] with SIGTERM: (status, time after the signal).
fn terminate(grace_ms: u64, script: &str) -> (Option<i32>, Duration) {
    signal(grace_ms, script, nix::sys::signal::Signal::SIGTERM, None)
}

/// Runs `script` under `supervise` (with `ignored` set to SIG_IGN in the supervisor, as `nohup`
/// would), waits until the script prints `armed` (after its traps are set), sends `sig` to the
/// supervisor and returns its exit code and how long it took to exit. A supervisor still running
/// 20 s later is killed with its workload's session and fails the test, rather than hang it.
fn signal(
    grace_ms: u64,
    script: &str,
    sig: nix::sys::signal::Signal,
    ignored: Option<nix::sys::signal::Signal>,
) -> (Option<i32>, Duration) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    cmd.args([
        "supervise",
        "--grace-ms",
        &grace_ms.to_string(),
        "--",
        "/bin/sh",
        "-c",
        script,
    ])
    .stdout(Stdio::piped());
    if let Some(ignored) = ignored {
        // SAFETY: between fork and exec only sigaction, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::signal::signal(ignored, nix::sys::signal::SigHandler::SigIgn)
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut workload = None;
    loop {
        let line = lines.next().expect("armed before EOF").expect("read");
        if let Some(pid) = line
            .split("workload started as pid ")
            .nth(1)
            .and_then(|rest| rest.split(':').next())
        {
            workload = pid.parse::<i32>().ok();
        }
        if line == "armed" {
            break;
        }
    }
    let sent = Instant::now();
    let supervisor = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(supervisor, sig).expect("kill");
    while sent.elapsed() < Duration::from_secs(20) {
        if let Some(status) = child.try_wait().expect("wait") {
            return (status.code(), sent.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(pid) = workload {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-pid), nix::sys::signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("supervise still running 20 s after {sig}");
}

#[test]
fn sigterm_is_forwarded_to_the_workload() {
    let (code, took) = terminate(5_000, "echo armed; exec sleep 100");
    assert_eq!(code, Some(128 + 15));
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn a_workload_ignoring_sigterm_is_killed_after_the_grace_period() {
    let (code, took) = terminate(
        400,
        "trap '' TERM; echo armed; while :; do sleep 0.05; done",
    );
    assert_eq!(code, Some(128 + 9));
    assert!(took >= Duration::from_millis(400), "killed early: {took:?}");
}

#[test]
fn sighup_is_forwarded_without_stopping_anything() {
    let (code, _) = signal(
        5_000,
        "trap 'exit 42' HUP; echo armed; while :; do sleep 0.05; done",
        nix::sys::signal::Signal::SIGHUP,
        None,
    );
    assert_eq!(code, Some(42));
}

/// A supervisor started under `nohup` ignores SIGHUP; its workload must not inherit that, or
/// the workload's own trap would be refused and the forwarded SIGHUP lost.
#[test]
fn a_signal_ignored_by_whoever_started_supervise_still_reaches_the_workload() {
    let (code, _) = signal(
        5_000,
        "trap 'exit 42' HUP; echo armed; while :; do sleep 0.05; done",
        nix::sys::signal::Signal::SIGHUP,
        Some(nix::sys::signal::Signal::SIGHUP),
    );
    assert_eq!(code, Some(42));
}
