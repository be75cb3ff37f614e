//! `openshell-host up --backend libkrun` as a whole, short of running a guest (KVM cannot run full
//! guests on these machines): a library that does not load stops the start with its path named,
//! and a VMM child whose `krun_start_enter` fails ends the run with the status and log named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

mod support;

fn up(dir: &Path, libkrun: &Path, kernel: &Path) -> Output {
    support::close_to_others(dir);
    let rootfs = dir.join("root");
    std::fs::create_dir_all(&rootfs).expect("rootfs");
    let child = Command::new(env!("CARGO_BIN_EXE_openshell-host"))
        .args([
            "up",
            "--backend",
            "libkrun",
            "--net",
            "none",
            "--timeout",
            "20",
        ])
        .arg("--libkrun")
        .arg(libkrun)
        .arg("--kernel")
        .arg(kernel)
        .arg("--rootfs")
        .arg(&rootfs)
        .arg("--run-dir")
        .arg(dir.join("run"))
        // Private instance state: the tests run in parallel under the same instance name.
        .env("XDG_STATE_HOME", dir.join("state"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start openshell-host");
    support::output_within(child, Duration::from_secs(60), "openshell-host up")
}

fn fake_kernel(dir: &Path) -> PathBuf {
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"\x7fELF not a kernel").expect("kernel");
    kernel
}

#[test]
fn a_library_that_does_not_load_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = up(
        tmp.path(),
        Path::new("/nonexistent/libkrun.so"),
        &fake_kernel(tmp.path()),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot load libkrun from /nonexistent/libkrun.so (--libkrun)"),
        "{err}"
    );
}

#[test]
fn a_failed_vmm_start_ends_the_run_with_its_log() {
    const VAR: &str = "OPENSHELL_TEST_LIBKRUN";
    let Some(lib) = std::env::var_os(VAR) else {
        let why = format!("{VAR} is not set: libkrun tests run through `cargo xtask test`");
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let out = up(tmp.path(), Path::new(&lib), &fake_kernel(tmp.path()));
    let err = String::from_utf8_lossy(&out.stderr);
    // 2: the VM ended without reporting an exit.
    assert_eq!(out.status.code(), Some(2), "{err}");
    let log = tmp.path().join("run/libkrun.log");
    assert!(
        err.contains(&format!("libkrun status Some(125), log {}", log.display())),
        "{err}"
    );
    let text = std::fs::read_to_string(&log).expect("libkrun.log");
    assert!(
        text.contains("openshell-host: krun_start_enter returned -22"),
        "{text}"
    );
}
