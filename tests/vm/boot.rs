//! Walking-skeleton VM tests: real kernels booted under qemu TCG on both architectures, with
//! openshell-init as PID 1 reporting to openshell-host over vsock.

use std::time::Duration;

use openshell_shared::{GuestMessage, Outcome, PROTOCOL_VERSION};
use openshell_tests::{both_arches, processes_using, vm_slot, Boot, BOOT_DEADLINE};

fn phases_in(msgs: &[GuestMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            GuestMessage::PhaseFinished { phase, .. } => Some(phase.clone()),
            _ => None,
        })
        .collect()
}

fn channel_delivers_every_message_in_order(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let done = boot.exec(&["/bin/true"]).start().wait(BOOT_DEADLINE);
    assert!(done.status.success(), "{}", done.output());
    let msgs = done.guest_messages();

    match msgs.first() {
        Some(GuestMessage::Hello {
            protocol,
            arch: guest_arch,
            kernel_release,
            init_entry_us,
            ..
        }) => {
            assert_eq!(*protocol, PROTOCOL_VERSION);
            assert_eq!(guest_arch, arch);
            assert!(kernel_release.starts_with("6.1"), "{kernel_release}");
            assert!(*init_entry_us > 0);
        }
        other => panic!("first message must be hello, got {other:?}"),
    }

    // Every phase the guest started, it finished, successfully, before the workload started.
    let started: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            GuestMessage::PhaseStarted { phase } => Some(phase.clone()),
            _ => None,
        })
        .collect();
    let mut finished = phases_in(&msgs);
    for core in ["mounts", "config", "hostname", "loopback"] {
        assert!(
            finished.iter().any(|p| p == core),
            "phase {core} missing: {finished:?}"
        );
    }
    let mut sorted_started = started.clone();
    sorted_started.sort();
    finished.sort();
    assert_eq!(sorted_started, finished, "every started phase finishes");
    for m in &msgs {
        if let GuestMessage::PhaseFinished { phase, outcome, .. } = m {
            assert!(
                !matches!(outcome, Outcome::Failed(_)),
                "phase {phase} failed: {outcome:?}"
            );
        }
    }

    let pos = |pred: &dyn Fn(&GuestMessage) -> bool| msgs.iter().position(pred);
    let ready = pos(&|m| matches!(m, GuestMessage::Ready { stage } if stage == "workload-started"))
        .unwrap_or_else(|| panic!("no ready message: {msgs:?}"));
    let last_phase = msgs
        .iter()
        .rposition(|m| matches!(m, GuestMessage::PhaseFinished { .. }))
        .expect("phases reported");
    let exit = pos(&|m| matches!(m, GuestMessage::Exit { .. })).expect("exit reported");
    assert!(last_phase < ready && ready < exit, "order: {msgs:?}");
    assert_eq!(exit, msgs.len() - 1, "exit is the last message: {msgs:?}");

    let (status, peak_rss_kib, synced) = done.exit_message();
    assert_eq!(status, 0);
    assert!(synced, "guest did not report a synced filesystem");
    assert!(
        peak_rss_kib > 0 && peak_rss_kib <= 8 * 1024,
        "init peak RSS {peak_rss_kib} KiB"
    );
}
both_arches!(channel_delivers_every_message_in_order);

fn host_exits_with_the_workload_status(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let done = boot
        .exec(&["/bin/sh", "-c", "exit 7"])
        .start()
        .wait(BOOT_DEADLINE);
    assert_eq!(done.status.code(), Some(7), "{}", done.output());
    assert_eq!(done.exit_message().0, 7);
}
both_arches!(host_exits_with_the_workload_status);

/// Orphans re-parented to PID 1 must be reaped by init: the workload makes some, waits for them
/// to die, then counts zombies in the whole guest and exits with that count.
fn orphaned_grandchildren_are_reaped(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let script = r#"
        for i in 1 2 3 4 5; do ( /bin/sh -c 'exit 3' & ) ; ( sleep 0.2 & ) ; done
        sleep 1
        n=0
        for f in /proc/[0-9]*/stat; do
            case "$(cat "$f" 2>/dev/null)" in *") Z "*) n=$((n+1));; esac
        done
        exit $n
    "#;
    let done = boot
        .exec(&["/bin/sh", "-c", script])
        .start()
        .wait(BOOT_DEADLINE);
    assert_eq!(
        done.status.code(),
        Some(0),
        "zombies left behind (exit = count)\n{}",
        done.output()
    );
}
both_arches!(orphaned_grandchildren_are_reaped);

/// SIGTERM to the host: the guest stops the workload, syncs, reports exit, and the VM goes away.
fn sigterm_to_host_shuts_the_guest_down_cleanly(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    // The workload writes a file without syncing it, then signals it is up and waits.
    let script = "echo kept > /data-written; echo up > /workload-up; exec sleep 1000";
    let mut running = boot.exec(&["/bin/sh", "-c", script]).start();
    running.wait_for_file("workload-up", BOOT_DEADLINE);
    running.signal(libc::SIGTERM);
    let done = running.wait(BOOT_DEADLINE);
    let (status, _, synced) = done.exit_message();
    assert_eq!(
        status,
        128 + libc::SIGTERM,
        "sleep dies of the forwarded SIGTERM"
    );
    assert!(synced, "guest did not sync\n{}", done.output());
    let data = std::fs::read_to_string(done.boot.root_path("data-written")).expect("data file");
    assert_eq!(data, "kept\n");
    assert_eq!(
        done.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        done.output()
    );
}
both_arches!(sigterm_to_host_shuts_the_guest_down_cleanly);

/// A workload that ignores SIGTERM is killed once the grace period is over.
fn stubborn_workload_is_killed_after_the_deadline(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let script = "trap '' TERM; echo up > /workload-up; while :; do sleep 1; done";
    let mut running = boot
        .arg("--grace-ms")
        .arg("1500")
        .exec(&["/bin/sh", "-c", script])
        .start();
    running.wait_for_file("workload-up", BOOT_DEADLINE);
    let asked = std::time::Instant::now();
    running.signal(libc::SIGTERM);
    let done = running.wait(BOOT_DEADLINE);
    let (status, _, synced) = done.exit_message();
    assert_eq!(status, 128 + libc::SIGKILL, "{}", done.output());
    assert!(synced);
    assert!(
        asked.elapsed() >= Duration::from_millis(1500),
        "killed before the grace period ended ({:?})",
        asked.elapsed()
    );
}
both_arches!(stubborn_workload_is_killed_after_the_deadline);

/// A broken configuration is a fatal boot error that names the field, and the VM powers off.
fn malformed_config_is_reported_and_powers_off(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    std::fs::write(
        boot.root_path("etc/openshell/init.yaml"),
        "hostname: openshell-vm\nshutdown:\n  grace_ms: later\n",
    )
    .expect("write config");
    let done = boot.exec(&["/bin/true"]).start().wait(BOOT_DEADLINE);
    assert!(!done.status.success(), "{}", done.output());
    let fatal = done
        .guest_messages()
        .into_iter()
        .find_map(|m| match m {
            GuestMessage::Fatal { phase, error } => Some((phase, error)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no fatal message\n{}", done.output()));
    assert_eq!(fatal.0, "config");
    assert!(fatal.1.contains("shutdown.grace_ms"), "{}", fatal.1);
    assert!(fatal.1.contains("/etc/openshell/init.yaml"), "{}", fatal.1);
    assert!(
        done.stdout.contains("shutdown.grace_ms") || done.stderr.contains("shutdown.grace_ms"),
        "host shows the field\n{}",
        done.output()
    );
}
both_arches!(malformed_config_is_reported_and_powers_off);

/// SIGKILL to the host takes its helpers down with it, and the next start on the same run
/// directory clears the stale sockets and boots.
fn killed_host_leaves_nothing_running(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let Some(mut second) = Boot::new(arch) else {
        return;
    };
    let _slot = vm_slot();
    let mut running = boot
        .exec(&["/bin/sh", "-c", "echo up > /workload-up; exec sleep 1000"])
        .start();
    running.wait_for_file("workload-up", BOOT_DEADLINE);
    let run_dir = running.boot.run_dir.path().join("run");
    assert!(
        processes_using(&run_dir).len() >= 3,
        "qemu and both helpers run: {:?}",
        processes_using(&run_dir)
    );
    running.signal(libc::SIGKILL);
    let killed = running.wait(BOOT_DEADLINE);
    assert_eq!(killed.status.code(), None, "host died of the signal");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !processes_using(&run_dir).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "left running after the host was killed: {:?}",
            processes_using(&run_dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Same run directory, stale sockets and all.
    second.run_dir = killed.boot.run_dir;
    let done = second
        .exec(&["/bin/sh", "-c", "exit 4"])
        .start()
        .wait(BOOT_DEADLINE);
    assert_eq!(done.status.code(), Some(4), "{}", done.output());
    assert!(done.stdout.contains("stale sockets"), "{}", done.output());
}
both_arches!(killed_host_leaves_nothing_running);

/// A guest that sends garbage on the boot channel is stopped with a protocol error (exit 4),
/// named, and nothing is left running. The host serves one connection, the first, so garbage on
/// a second connection would never reach its decoder: init's own reporter is pointed at a port
/// nobody listens on (`openshell.channel_port`), and the workload makes the first connection to
/// the real port with `openshell-init vsock-send`, an oversized length prefix then garbage.
fn garbage_on_the_boot_channel_is_a_protocol_error(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let running = boot
        .arg("--cmdline-extra=openshell.channel_port=10799 openshell.connect_timeout_ms=100")
        .exec(&[
            "/sbin/openshell-init",
            "vsock-send",
            "--port",
            &openshell_shared::BOOT_CHANNEL_PORT.to_string(),
            "--hex",
            "ffffffff67617262616765",
        ])
        .start();
    let run_dir = running.boot.run_dir.path().join("run");
    let done = running.wait(BOOT_DEADLINE);
    assert_eq!(done.status.code(), Some(4), "{}", done.output());
    let text = format!("{}{}", done.stdout, done.stderr);
    assert!(
        text.contains("announces 4294967295 bytes, more than the limit")
            && text.contains("stopping the VM"),
        "{}",
        done.output()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !processes_using(&run_dir).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "left running after the protocol error: {:?}",
            processes_using(&run_dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
both_arches!(garbage_on_the_boot_channel_is_a_protocol_error);

/// Whether KVM runs a full guest of `arch` here, asked of qemu itself: the test's kernel booted
/// under KVM with no root panics and reboots (qemu exits 0 with `-no-reboot`) or keeps running;
/// where KVM cannot run it, qemu fails at once (on these CI hosts: SIGABRT setting an MSR).
fn kvm_boots_a_guest(arch: &str, kernel: &std::path::Path) -> bool {
    let host = if cfg!(target_arch = "x86_64") {
        "x86_64"
    } else {
        "aarch64"
    };
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if arch != host || rw.is_err() {
        return false;
    }
    let machine = if arch == "x86_64" {
        "microvm,acpi=off"
    } else {
        "virt"
    };
    let mut qemu = std::process::Command::new(format!("qemu-system-{arch}"))
        .args(["-M", machine, "-accel", "kvm", "-cpu", "max", "-m", "128M"])
        .args(["-nodefaults", "-display", "none", "-no-reboot", "-kernel"])
        .arg(kernel)
        .args(["-append", "panic=-1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match qemu.try_wait().expect("wait") {
            Some(status) => return status.success(),
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            None => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                return true;
            }
        }
    }
}

/// `--accel auto` (the host's default) boots on KVM where KVM runs the guest and otherwise falls
/// back to software emulation, saying why on its own line and in the start line; the verdict must
/// match qemu's own boot under KVM. The base root's manifest sizes the VM (1 vCPU, 512 MiB), and
/// the start line says so.
fn accel_auto_boots_and_says_what_it_ran(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let kvm = kvm_boots_a_guest(arch, &boot.artifacts.kernel);
    let done = boot
        .accel("auto")
        .exec(&["/bin/true"])
        .start()
        .wait(BOOT_DEADLINE);
    assert!(done.status.success(), "{}", done.output());
    let out = &done.stdout;
    let host_arch = cfg!(target_arch = "x86_64") == (arch == "x86_64");
    if kvm {
        assert!(out.contains("accelerator auto: kvm"), "{out}");
        assert!(out.contains("(qemu/kvm pid"), "{out}");
    } else if host_arch {
        assert!(out.contains("accelerator auto: tcg, since "), "{out}");
        assert!(out.contains("(qemu/tcg (KVM fell back) pid"), "{out}");
    } else {
        assert!(
            out.contains("accelerator auto: tcg, since KVM runs only"),
            "{out}"
        );
        assert!(out.contains("(qemu/tcg pid"), "{out}");
    }
    assert!(
        out.contains("; 1 vCPU, 512 MiB (from ") && out.contains("manifest.json)"),
        "{out}"
    );
}
both_arches!(accel_auto_boots_and_says_what_it_ran);
