//! `openshell-host exec` against a real guest: the exec service on vsock port 10777, reached
//! through vhost-device-vsock's CONNECT handshake under qemu.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use openshell_tests::{both_arches, host_bin, vm_slot, Boot, BOOT_DEADLINE};

/// Generous: under TCG a fork+exec in the guest takes a while.
const EXEC_DEADLINE: Duration = Duration::from_secs(90);

/// Runs `openshell-host exec --run-dir <run_dir> <args>` with `input` on stdin.
fn exec(run_dir: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(host_bin())
        .arg("exec")
        .arg("--run-dir")
        .arg(run_dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start openshell-host exec");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("write stdin");
    drop(stdin);
    let deadline = Instant::now() + EXEC_DEADLINE;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "exec {args:?} still running after {EXEC_DEADLINE:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn exec_runs_commands_in_the_guest(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let run_dir = boot.run_dir.path().join("run");
    let script = "echo up > /exec-ready; exec sleep 1000";
    let mut running = boot.exec(&["/bin/sh", "-c", script]).start();
    running.wait_for_file("exec-ready", BOOT_DEADLINE);

    let out = exec(&run_dir, &["--", "uname", "-m"], b"");
    assert_eq!(text(&out.stdout).trim(), arch, "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));

    let out = exec(&run_dir, &["--", "sh", "-c", "echo oops >&2; exit 7"], b"");
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "oops\n");

    let out = exec(&run_dir, &["--", "cat"], b"through the guest\n");
    assert_eq!(text(&out.stdout), "through the guest\n");
    assert_eq!(out.status.code(), Some(0));

    let out = exec(&run_dir, &["-t", "--", "tty"], b"");
    assert!(
        text(&out.stdout).starts_with("/dev/pts/"),
        "{:?} {}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let out = exec(
        &run_dir,
        &[
            "--env",
            "KUBECONFIG=/x",
            "--",
            "sh",
            "-c",
            "echo $KUBECONFIG",
        ],
        b"",
    );
    assert_eq!(text(&out.stdout), "/x\n");
    let out = exec(&run_dir, &["--", "sh", "-c", "echo $KUBECONFIG"], b"");
    assert_eq!(text(&out.stdout), "/etc/rancher/k3s/k3s.yaml\n");

    let out = exec(&run_dir, &["--env", "BAD-NAME=1", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("BAD-NAME"),
        "{}",
        text(&out.stderr)
    );

    let out = exec(&run_dir, &["--", "/no/such/program"], b"");
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("/no/such/program"));

    running.signal(libc::SIGTERM);
    let done = running.wait(BOOT_DEADLINE);
    let (status, _, synced) = done.exit_message();
    assert_eq!(status, 128 + libc::SIGTERM, "{}", done.output());
    assert!(synced, "{}", done.output());
    assert_eq!(
        done.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        done.output()
    );
}
both_arches!(exec_runs_commands_in_the_guest);
