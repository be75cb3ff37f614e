//! Real containerd and runc (Debian's 1.6 and 1.1, the `containerd-test` root) in the VM with the
//! overlayfs snapshotter k3s uses, running an image the test builds from busybox-static
//! (`openshell_tests::oci_image`, no registry) with a cgroup v2 memory limit. The guest's side is
//! `tests/vm/containerd-probe.sh`.
//!
//! - With containerd's root on the virtio-fs root no container starts: the kernel refuses an
//!   overlayfs upper directory there (the negative result recorded in docs/testing.md). With its
//!   root on a tmpfs the same image runs and the limit is enforced: an allocation over it is
//!   OOM-killed, one under it is not.
//! - With its root on the state disk (k3s's agent directory, bound there by the guest's
//!   `state-disk` phase) the image, the snapshots and a volume's synced data survive a SIGKILL
//!   of the VMM while a container writes, and the next mount replays the journal.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use openshell_shared::{GuestMessage, Outcome};
use openshell_tests::oci_image::busybox_image;
use openshell_tests::{
    both_arches, containerd_rootfs, fsck_image, vm_slot, vmm_pid, Boot, Finished,
};

/// The image's name in containerd (the importer takes it from `index.json`).
const IMAGE: &str = "docker.io/openshell/busybox:test";
/// containerd, ctr and a container in 512 MiB (up's default) leave little for the page cache.
const MEMORY_MIB: &str = "1024";
/// The memory limit the probe gives its containers (`containerd-probe.sh` LIMIT).
const LIMIT: &str = "67108864";
/// Given to the aarch64 guests (qemu TCG): the kernel poisons each page it frees with ordinary
/// stores, which retire the page's translated code. Without it Debian's Go programs run stale
/// translations now and then under aarch64 TCG, `init_on_alloc=1` notwithstanding (its zeroing
/// there does not retire them; docs/testing.md). Not given to every TCG guest: poisoning all of
/// memory as the kernel frees it at boot costs about 400 ms of each aarch64 boot.
const AARCH64_TCG: &str = "page_poison=1";
/// A boot that starts containerd twice and runs four containers under TCG.
const PROBE_DEADLINE: Duration = Duration::from_secs(600);

/// A boot of the containerd-test root running the probe for `steps`, with the image and the
/// probe in its root; `None` when the test skips.
fn probe_boot(arch: &str, steps: &[&str]) -> Option<Boot> {
    let root = containerd_rootfs(arch)?;
    let boot = Boot::with_rootfs(arch, &root)?;
    let busybox_path = boot.artifacts.rootfs.join("bin/busybox");
    let busybox =
        std::fs::read(&busybox_path).unwrap_or_else(|e| panic!("{}: {e}", busybox_path.display()));
    let image = busybox_image(&busybox, arch, IMAGE);
    std::fs::write(boot.root_path("containerd-image.tar"), &image.archive).expect("image");
    std::fs::write(boot.root_path("containerd-image.name"), IMAGE).expect("image name");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/containerd-probe.sh");
    std::fs::copy(&script, boot.root_path("probe.sh")).expect("install the probe");
    let mut argv = vec!["/bin/sh", "/probe.sh"];
    argv.extend_from_slice(steps);
    let mut boot = boot.arg("--memory").arg(MEMORY_MIB);
    if arch == "aarch64" {
        boot = boot.arg("--cmdline-extra").arg(AARCH64_TCG);
    }
    Some(boot.exec(&argv))
}

/// The probe's `step.name: value` lines, by `step.name`.
fn results(root: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(root.join("probe.out"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Everything the guest left for a failure message: the results, the probe's log, containerd's.
fn evidence(root: &Path, done: Option<&Finished>) -> String {
    let read = |rel: &str| std::fs::read_to_string(root.join(rel)).unwrap_or_default();
    let mut text = format!("{:#?}\n--- probe.log\n{}", results(root), read("probe.log"));
    for step in ["virtiofs", "tmpfs", "disk-write", "disk-check"] {
        let log = read(&format!("probe-containerd-{step}.log"));
        // A Go crash's cause comes first, before pages of goroutine stacks.
        let crash: Vec<&str> = log
            .lines()
            .skip_while(|l| !l.starts_with("fatal error") && !l.starts_with("panic:"))
            .take(8)
            .collect();
        if !crash.is_empty() {
            text += &format!("\n--- containerd {step} crashed\n{}", crash.join("\n"));
        }
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        if !tail.is_empty() {
            text += &format!("\n--- containerd {step} (last lines)\n");
            text += &tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        }
    }
    if let Some(done) = done {
        text += &format!("\n{}", done.output());
    }
    text
}

/// The tmpfs step's checks, shared by the positive test's first boot: the image imported under
/// its name, the limit in the container's cgroup, an allocation under it done and charged there,
/// one over it OOM-killed (ctr's status 128 + SIGKILL, and the kill counted in the cgroup above).
/// The VM has far more memory than the allocation: only the limit can end it.
fn assert_runs_with_the_limit(step: &str, get: &dyn Fn(&str) -> String, why: &str) {
    let at = |name: &str| get(&format!("{step}.{name}"));
    assert_eq!(at("import-status"), "0", "{why}");
    assert!(at("images").split(' ').any(|n| n == IMAGE), "{why}");
    assert_eq!(at("under-status"), "0", "{why}");
    assert_eq!(at("memory-max"), LIMIT, "{why}");
    assert_eq!(at("under-allocated"), "1", "{why}");
    // The 16 MiB buffer was charged to the container's cgroup, within the limit.
    let peak: u64 = at("memory-peak").parse().unwrap_or(0);
    let limit: u64 = LIMIT.parse().expect("a number");
    assert!((16 << 20..=limit).contains(&peak), "peak {peak}: {why}");
    assert_eq!(
        at("over-status"),
        (128 + libc::SIGKILL).to_string(),
        "{why}"
    );
    let kills: u32 = at("oom-kill").parse().unwrap_or(0);
    assert!(kills >= 1, "no OOM kill counted: {why}");
}

/// containerd with its root on the virtio-fs root cannot run a container (the overlay mount of
/// its snapshot is refused); on a tmpfs it runs one with its memory limit enforced.
fn virtiofs_fails_and_tmpfs_runs(arch: &str) {
    // No state disk (the harness's default, `--no-state-disk`): k3s's agent directory stays in
    // the root.
    let Some(boot) = probe_boot(arch, &["virtiofs", "tmpfs"]) else {
        return;
    };
    let _slot = vm_slot();
    let done = boot.start().wait(PROBE_DEADLINE);
    let root = done.boot.root.path().to_path_buf();
    let found = results(&root);
    let get = |k: &str| found.get(k).cloned().unwrap_or_else(|| "(missing)".into());
    let why = evidence(&root, Some(&done));
    assert!(done.status.success(), "{why}");
    for step in ["virtiofs", "tmpfs"] {
        assert_eq!(get(&format!("{step}.containerd")), "up", "{why}");
        assert_eq!(get(&format!("{step}.done")), "yes", "{why}");
    }
    // The negative result: the image's layer unpacks (one layer needs no overlay), but every
    // container's root is an overlay with its upper directory on virtio-fs, which the kernel
    // refuses (EINVAL), and says why.
    assert_eq!(get("virtiofs.fstype"), "fuseblk", "{why}");
    assert_eq!(get("virtiofs.import-status"), "0", "{why}");
    assert_ne!(get("virtiofs.under-status"), "0", "{why}");
    let failure = get("virtiofs.under-failure");
    assert!(
        failure.contains("failed to mount") && failure.ends_with("invalid argument"),
        "{why}"
    );
    eprintln!(
        "on virtio-fs: {failure}\nkernel: {}",
        get("virtiofs.kernel")
    );
    // virtio-fs is FUSE, which overlayfs counts as a remote upper filesystem: for one it
    // requires d_type, RENAME_WHITEOUT and xattrs, and virtiofsd without --xattr refuses the
    // trusted.overlay.* attribute (fs/overlayfs/super.c, ovl_make_workdir).
    let kernel = get("virtiofs.kernel");
    assert!(
        kernel.contains("overlayfs: failed to set xattr on upper"),
        "{why}"
    );
    assert!(
        kernel.contains("overlayfs: upper fs missing required features."),
        "{why}"
    );
    assert_eq!(get("tmpfs.fstype"), "tmpfs", "{why}");
    assert_runs_with_the_limit("tmpfs", &get, &why);
    eprintln!(
        "on tmpfs: memory.max {}, memory.peak {} after 16 MiB; 100 MiB: status {}, oom_kill {}",
        get("tmpfs.memory-max"),
        get("tmpfs.memory-peak"),
        get("tmpfs.over-status"),
        get("tmpfs.oom-kill")
    );
}

both_arches!(virtiofs_fails_and_tmpfs_runs);

/// What the guest's `state-disk` phase said (its line, and on first use its format and seed
/// rows), once it finished ok.
fn state_disk_report(done: &Finished) -> String {
    let messages = done.guest_messages();
    let finished_ok = messages.iter().any(|m| {
        matches!(m, GuestMessage::PhaseFinished { phase, outcome: Outcome::Ok, .. } if phase == "state-disk")
    });
    assert!(
        finished_ok,
        "the state-disk phase did not finish ok\n{}",
        done.output()
    );
    let lines: Vec<String> = messages
        .into_iter()
        .filter_map(|m| match m {
            GuestMessage::Log { text, .. } if text.starts_with("state-disk: ") => Some(text),
            _ => None,
        })
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("found and checked")),
        "the state-disk phase's line is missing: {lines:?}\n{}",
        done.output()
    );
    lines.join("\n")
}

/// The records the writer left, checked against what it acknowledged: every line is `record N`
/// with N counting up from 1, and at least `acked` of them are whole. Only a line past the
/// acknowledged ones may be cut short (written, not yet synced, when the VM died). Returns the
/// number of whole records.
fn check_records(records: &str, acked: u64) -> u64 {
    let lines: Vec<&str> = records.split_terminator('\n').collect();
    let mut whole = 0;
    for (i, line) in lines.iter().enumerate() {
        let want = format!("record {}", i + 1);
        let last = i + 1 == lines.len();
        if *line == want && (!last || records.ends_with('\n')) {
            whole += 1;
            continue;
        }
        assert!(
            last && i as u64 >= acked && want.starts_with(line),
            "record {} of {}: {line:?}, {acked} acknowledged",
            i + 1,
            lines.len()
        );
    }
    assert!(
        whole >= acked,
        "{whole} whole records, {acked} acknowledged"
    );
    whole
}

/// The newest acknowledgement the writer made whole, from the acknowledgements file it keeps on
/// the virtio-fs root (the kill may have cut the last line short).
fn newest_ack(root: &Path) -> Option<u64> {
    std::fs::read_to_string(root.join("probe-acks/synced"))
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n')?.parse().ok())
        .max()
}

/// The first boot on a blank disk: the phase formats and seeds it, the probe imports and runs
/// the image with the limit on the disk, writes the payload, and starts the writer; the VMM is
/// SIGKILLed once records are acknowledged. Returns the boot, the payload's digest and the
/// newest acknowledged record.
fn write_then_kill(boot: Boot) -> (Finished, String, u64) {
    let run = boot.run_dir.path().join("run");
    let root = boot.root.path().to_path_buf();
    let mut running = boot.start();
    let deadline = Instant::now() + PROBE_DEADLINE;
    while !results(&root).contains_key("disk-write.writing") {
        assert!(running.is_running(), "{}", evidence(&root, None));
        assert!(Instant::now() < deadline, "{}", evidence(&root, None));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the writer run on a little, then kill the VMM in the middle of it.
    std::thread::sleep(Duration::from_millis(500));
    let qemu = vmm_pid(&run, Instant::now() + Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no qemu for {}", run.display()));
    // SAFETY: kill(2) on a pid we just looked up; no memory is involved.
    assert_eq!(unsafe { libc::kill(qemu, libc::SIGKILL) }, 0);
    let first = running.wait(PROBE_DEADLINE);
    let found = results(&root);
    let get = |k: &str| found.get(k).cloned().unwrap_or_else(|| "(missing)".into());
    let why = evidence(&root, Some(&first));
    let mounted = state_disk_report(&first);
    assert!(
        mounted.contains("formatted in") && mounted.contains("seeded "),
        "{mounted}\n{why}"
    );
    assert_eq!(get("disk-write.agent-fstype"), "ext2/ext3", "{why}");
    assert_eq!(get("disk-write.fstype"), "ext2/ext3", "{why}");
    assert_eq!(get("disk-write.writer-status"), "0", "{why}");
    assert_runs_with_the_limit("disk-write", &get, &why);
    let payload = get("disk-write.payload");
    assert_eq!(payload.len(), 64, "{why}");
    let acked = newest_ack(&root).unwrap_or_else(|| panic!("no acknowledged record: {why}"));
    eprintln!("first boot: {mounted}\nkilled qemu {qemu} after {acked} acknowledged records");
    (first, payload, acked)
}

/// containerd's root on the state disk: import, run with the limit, write a volume there, and
/// SIGKILL the VMM while a container appends and syncs records. The next boot finds the image
/// and runs it from the kept snapshots, the volume's payload and every record acknowledged
/// before the kill intact, and the journal replayed by the mount; after that boot's clean
/// power-off the host's e2fsck finds nothing to fix.
fn state_disk_survives_a_kill(arch: &str) {
    let Some(boot) = probe_boot(arch, &["disk-write"]) else {
        return;
    };
    let _slot = vm_slot();
    let (first, payload, acked) = write_then_kill(boot.state_disk("1G"));
    let root = first.boot.root.path().to_path_buf();
    let image = first.boot.instance_dir("default").join("state.img");

    // The next boot, on the same root and the same instance (so the same disk).
    let mut again = first.boot;
    again.exec = ["/bin/sh", "/probe.sh", "disk-check"]
        .map(String::from)
        .to_vec();
    let second = again.start().wait(PROBE_DEADLINE);
    let found = results(&root);
    let get = |k: &str| found.get(k).cloned().unwrap_or_else(|| "(missing)".into());
    let why = evidence(&root, Some(&second));
    assert!(second.status.success(), "{why}");
    let mounted = state_disk_report(&second);
    assert!(
        mounted.contains("not cleanly unmounted: journal replayed by the mount"),
        "{mounted}\n{why}"
    );
    assert!(!mounted.contains("formatted"), "{mounted}\n{why}");
    assert!(
        mounted.contains("seeded on an earlier boot"),
        "{mounted}\n{why}"
    );
    assert!(
        get("disk-check.ext4").contains("recovery complete"),
        "{why}"
    );
    assert_eq!(get("disk-check.agent-fstype"), "ext2/ext3", "{why}");
    assert_eq!(get("disk-check.containerd"), "up", "{why}");
    assert!(
        get("disk-check.images").split(' ').any(|n| n == IMAGE),
        "{why}"
    );
    assert_eq!(get("disk-check.payload"), payload, "{why}");
    assert_eq!(get("disk-check.again-status"), "0", "{why}");
    assert_eq!(get("disk-check.again-output"), "1", "{why}");
    assert_eq!(get("disk-check.records-copied"), "0", "{why}");
    let records = std::fs::read_to_string(root.join("probe-records")).expect("records copied");
    let whole = check_records(&records, acked);
    let (status, words) = fsck_image(&image);
    assert_eq!(status, 0, "e2fsck -fn {}: {words}", image.display());
    eprintln!(
        "next boot: {mounted}\n{whole} records kept, {acked} acknowledged; image {IMAGE} listed \
         and run again; e2fsck -fn on the host: clean"
    );
}

both_arches!(state_disk_survives_a_kill);

#[cfg(test)]
mod record_tests {
    use super::check_records;

    #[test]
    fn whole_records_at_least_the_acknowledged() {
        assert_eq!(check_records("record 1\nrecord 2\nrecord 3\n", 2), 3);
        assert_eq!(check_records("", 0), 0);
    }

    #[test]
    fn a_record_cut_short_past_the_acknowledged_is_allowed() {
        assert_eq!(check_records("record 1\nrecord 2\nreco", 2), 2);
        assert_eq!(check_records("record 1\nrecord 2\nrecord 3", 2), 2);
    }

    #[test]
    #[should_panic(expected = "acknowledged")]
    fn a_lost_acknowledged_record_fails() {
        check_records("record 1\n", 2);
    }

    #[test]
    #[should_panic(expected = "record 2 of 3")]
    fn a_gap_fails() {
        check_records("record 1\nrecord 3\nrecord 4\n", 1);
    }

    #[test]
    #[should_panic(expected = "record 2 of 2")]
    fn an_acknowledged_record_cut_short_fails() {
        check_records("record 1\nreco", 2);
    }
}
