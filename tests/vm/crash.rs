//! Crash recovery, proven: a root filesystem with the state a killed gateway leaves behind (a
//! kine database with pods, stale events, leases and a bootstrap lock; IPAM files; containerd
//! task and sandbox leftovers; stale sockets; the node password; bundled manifests), booted and
//! killed (the VMM, SIGKILL) at random moments during boot ten times in a row, then booted to
//! ready: the database must pass `PRAGMA integrity_check`, every stale item must be gone, and every
//! kept item (meta.db, content blobs, the pods' and other kine keys' every revision, the user's
//! files) must be byte for byte as it was, and kine's current revision the same; then `openshell-host down` must shut it down cleanly with a synced exit.

use std::path::Path;
use std::time::{Duration, Instant};

use openshell_shared::config::Kine;
use openshell_shared::GuestMessage;
use openshell_tests::crashed_root::{kept_rows, query, stale_rows, CrashedRoot};
use openshell_tests::{
    both_arches, crash_seed, processes_using, vm_slot, vmm_pid, wait_for_console, Boot, Finished,
    BOOT_DEADLINE,
};

const KILLS: usize = 10;

/// kine's current revision: its newest row.
const REVISION: &str = "SELECT max(id) FROM kine";

/// Phases that change the persistent root: each kill lands while one of them runs.
const TARGETS: [&str; 6] = [
    "runtime-cleanup",
    "network-cleanup",
    "manifests",
    "pki",
    "kine",
    "network",
];

/// Where each kill lands: a phase and a delay after the console says it started. A small
/// xorshift generator: the moments vary per run, and the seed is printed so a failing sequence
/// can be replayed (`OPENSHELL_CRASH_SEED`).
fn moments(count: usize) -> (u64, Vec<(&'static str, Duration)>) {
    let seed = crash_seed();
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let v = (0..count)
        .map(|_| {
            let phase = TARGETS[(next() % TARGETS.len() as u64) as usize];
            (phase, Duration::from_micros(next() % 40_000))
        })
        .collect();
    (seed, v)
}

/// What the boot after the kills must find in kine: no stale row, the kept rows and the
/// revision as they were.
struct Expected {
    stale_sql: String,
    kept_sql: String,
    kept_rows: String,
    revision: String,
}

fn survives_being_killed_during_boot(arch: &str) {
    let Some(first) = Boot::new(arch) else { return };
    let _slot = vm_slot();
    let kept = CrashedRoot {
        kine_rows: 3000,
        tasks: 5,
    }
    .build(first.root.path())
    .expect("a crashed gateway's root");
    let db = first.root_path("var/lib/rancher/k3s/server/db/state.db");
    let boot = Kine::default().prune_prefixes;
    let (stale_sql, kept_sql) = (stale_rows(&boot), kept_rows(&boot));
    let expected = Expected {
        kept_rows: query(&db, &kept_sql),
        revision: query(&db, REVISION),
        stale_sql,
        kept_sql,
    };
    assert!(
        query(&db, &expected.stale_sql)
            .parse::<u32>()
            .expect("count")
            > 1000
    );
    assert!(
        expected.kept_rows.contains("/registry/pods/"),
        "pods are kept rows"
    );
    let (seed_value, moments) = moments(KILLS);
    let mut before_ready = 0;
    eprintln!("crash test {arch}: seed {seed_value}, kills at {moments:?}");
    let mut boot = first;
    for (i, (phase, delay)) in moments.iter().enumerate() {
        let (next, ready) = kill_once(arch, boot, i, phase, *delay);
        before_ready += usize::from(!ready);
        boot = next;
    }
    assert!(before_ready > 0, "no kill landed during boot");
    // Now boot to ready and shut down cleanly.
    let mut running = boot
        .exec(&["/bin/sh", "-c", "echo up > /workload-up; exec sleep 1000"])
        .start();
    running.wait_for_file("workload-up", BOOT_DEADLINE);
    // A clean shutdown as a user asks for one.
    let down = running.down(60);
    let said = String::from_utf8_lossy(&down.stdout).into_owned();
    let done = running.wait(BOOT_DEADLINE);
    assert!(
        down.status.success() && said.contains("is down") && said.contains("filesystems synced"),
        "down: {said}{}\n{}",
        String::from_utf8_lossy(&down.stderr),
        done.output()
    );
    let msgs = done.guest_messages();
    assert!(
        msgs.iter()
            .any(|m| matches!(m, GuestMessage::Ready { stage } if stage == "workload-started")),
        "{}",
        done.output()
    );
    let (status, _, synced) = done.exit_message();
    assert_eq!(status, 128 + libc::SIGTERM, "{}", done.output());
    assert!(synced, "{}", done.output());
    assert_recovered(done.boot.root.path(), &expected, &kept);
    assert_client_bundle(&done);
}

/// Boots `boot` and SIGKILLs its VMM `delay` after the console says `phase` started (kill `i`);
/// returns the next boot, on the same root and run directory (stale sockets and all), and
/// whether the guest had reported ready when it died.
fn kill_once(arch: &str, boot: Boot, i: usize, phase: &str, delay: Duration) -> (Boot, bool) {
    let run = boot.run_dir.path().join("run");
    let console = run.join("console.log");
    let _ = std::fs::remove_file(&console);
    let running = boot.exec(&["/bin/sh", "-c", "exec sleep 1000"]).start();
    let pid = vmm_pid(&run, Instant::now() + Duration::from_secs(30))
        .unwrap_or_else(|| panic!("kill {i}: no qemu for {}", run.display()));
    assert!(
        wait_for_console(
            &console,
            &format!("phase {phase}: started"),
            Instant::now() + BOOT_DEADLINE
        ),
        "kill {i}: phase {phase} never started"
    );
    std::thread::sleep(delay);
    // SAFETY: kill(2) on a pid we just found; at worst it has exited already.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let done = running.wait(BOOT_DEADLINE);
    assert_ne!(done.status.code(), Some(0), "kill {i}\n{}", done.output());
    // What the guest had reported when it died: the report is written on every way out.
    let msgs = done.guest_messages();
    let ready = msgs.iter().any(|m| matches!(m, GuestMessage::Ready { .. }));
    let text = std::fs::read(&console).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let last = text
        .lines()
        .rev()
        .find(|l| l.contains("openshell-init: phase "))
        .unwrap_or("");
    eprintln!(
        "kill {i}, {delay:?} into {phase}: {}; console's last phase line: {}",
        if ready { "after ready" } else { "during boot" },
        last.trim()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_using(&run).is_empty() {
        assert!(Instant::now() < deadline, "kill {i}: helpers left running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut next = Boot::new(arch).expect("artifacts");
    next.root = done.boot.root;
    next.run_dir = done.boot.run_dir;
    (next, ready)
}

/// The root after the boot that followed the kills: kine intact and pruned as `expected` says,
/// every stale runtime item gone, every `kept` file byte for byte, the manifests deployed.
fn assert_recovered(root: &Path, expected: &Expected, kept: &[(String, Vec<u8>)]) {
    assert_eq!(query(&db_in(root), "PRAGMA integrity_check"), "ok");
    assert_eq!(
        query(&db_in(root), &expected.stale_sql),
        "0",
        "stale rows left"
    );
    assert_eq!(
        query(&db_in(root), &expected.kept_sql),
        expected.kept_rows,
        "kept rows changed"
    );
    assert_eq!(
        query(&db_in(root), REVISION),
        expected.revision,
        "the revision moved"
    );
    assert!(
        std::fs::read_dir(root.join("var/lib/rancher/k3s/server/db"))
            .expect("db dir")
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("corrupt-")),
        "the database needed recovery: a kill left it damaged"
    );
    for gone in [
        "var/lib/rancher/k3s/agent/containerd/io.containerd.runtime.v2.task",
        "var/lib/rancher/k3s/agent/containerd/io.containerd.sandbox.controller.v1.shim",
        "var/lib/rancher/k3s/agent/containerd/containerd.sock",
        "var/lib/rancher/k3s/server/kine.sock",
        "var/lib/rancher/k3s/server/cred/node-passwd",
        "var/lib/cni/networks/cbr0",
        "var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content/ingest/x",
    ] {
        assert!(
            std::fs::symlink_metadata(root.join(gone)).is_err(),
            "{gone} survived"
        );
    }
    for (rel, bytes) in kept {
        assert_eq!(
            &std::fs::read(root.join(rel)).unwrap_or_default(),
            bytes,
            "{rel} changed"
        );
    }
    assert!(
        root.join("var/lib/rancher/k3s/server/manifests/openshell-helmchart.yaml")
            .is_file(),
        "manifests not deployed"
    );
}

/// The client bundle came over the boot channel and is stored privately on the host, and the
/// key never reached the boot report.
fn assert_client_bundle(done: &Finished) {
    let root = done.boot.root.path();
    let mtls = done
        .boot
        .config_dir()
        .join("openshell/gateways/openshell-vm-default/mtls");
    assert_eq!(
        std::fs::read(mtls.join("ca.crt")).expect("stored CA"),
        std::fs::read(root.join("opt/openshell/pki/ca.crt")).expect("guest CA"),
    );
    assert_eq!(
        std::fs::read(mtls.join("tls.key")).expect("stored key"),
        std::fs::read(root.join("opt/openshell/pki/client.key")).expect("guest key"),
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(mtls.join("tls.key"))
            .expect("meta")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let report = std::fs::read_to_string(done.boot.report_path()).expect("report");
    assert!(
        !report.contains("PRIVATE KEY"),
        "the key leaked into the report"
    );
}
both_arches!(survives_being_killed_during_boot);

fn db_in(root: &Path) -> std::path::PathBuf {
    root.join("var/lib/rancher/k3s/server/db/state.db")
}
