//! `openshell-host up` raises its open-file limit to the hard limit before anything else, so the
//! helpers and the VMM it starts inherit it, and warns when the hard limit keeps it below what
//! libkrun's virtio-fs may need. Each run starts under a lowered limit and ends at its stand-in
//! virtio-fs daemon: a script that records the limit it inherited and fails.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

mod support;

/// `up` under `soft:hard` open files; its output and the limit its first helper inherited.
fn up_under(soft: u64, hard: u64) -> (String, String) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    support::close_to_others(dir);
    std::fs::create_dir(dir.join("root")).expect("root");
    std::fs::write(dir.join("bzImage"), b"not booted").expect("kernel");
    let helper = dir.join("virtiofsd");
    let seen = dir.join("inherited");
    std::fs::write(
        &helper,
        format!("#!/bin/sh\nulimit -n > {}\nexit 1\n", seen.display()),
    )
    .expect("helper");
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let p = |rel: &str| dir.join(rel).display().to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_openshell-host"));
    cmd.args(["up", "--kernel", &p("bzImage"), "--rootfs", &p("root")])
        .args(["--run-dir", &p("run"), "--net", "none", "--backend", "qemu"])
        .args([
            "--accel",
            "tcg",
            "--no-state-disk",
            "--virtiofsd",
            &p("virtiofsd"),
        ])
        .env("XDG_STATE_HOME", dir.join("state"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("HOME", dir.join("home"))
        .stdin(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
                .map_err(std::io::Error::from)
        });
    }
    let out = cmd.output().expect("run openshell-host");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "ends at the helper: {text}");
    let inherited = read(&seen);
    (text, inherited)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn a_low_hard_limit_is_raised_to_and_warned_about() {
    let (text, inherited) = up_under(256, 2048);
    assert_eq!(
        inherited, "2048",
        "the helper inherits the raised limit: {text}"
    );
    assert!(
        text.contains(
            "open files: 2048 (raised from 256; hard limit 2048); warning: below the 10240"
        ),
        "{text}"
    );
}

#[test]
fn a_high_hard_limit_is_raised_to_without_a_warning() {
    // As high as this process may go (a hard limit is only ever lowered without privilege).
    let (_, ours) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    let hard = ours.min(65536);
    if hard < 10240 {
        eprintln!("skipped: this process's hard limit {ours} is below 10240");
        return;
    }
    let (text, inherited) = up_under(1024, hard);
    assert_eq!(inherited, hard.to_string(), "{text}");
    assert!(
        text.contains(&format!(
            "open files: {hard} (raised from 1024; hard limit {hard})"
        )),
        "{text}"
    );
    assert!(!text.contains("warning: below"), "{text}");
}
