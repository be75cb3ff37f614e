//! The state-disk phase killed during first use: a root whose k3s agent directory holds files to
//! seed (a content blob, a metadata database, a symlink) and a blank disk, booted and its VMM
//! SIGKILLed while the phase checks the blank disk, while mke2fs writes, while it mounts and
//! seeds; then killed once more while the next boot recovers. Each round starts on a fresh
//! blank disk (`up --reset --yes`). Every boot after a kill must take the disk (never a fatal
//! error refusing it), and the boot that ends each round finds the seed whole: every planted
//! file byte for byte under the bound agent directory, on ext4, no unfinished seed left; after
//! its clean power-off the host's e2fsck finds nothing to fix.
//!
//! A kill while mke2fs's own writes reach the disk is its own test: mke2fs writes the primary
//! superblock last, so that disk holds metadata and no superblock; the phase's format intent (in
//! the disk's reserved last 4 KiB) is what lets the next boot format it again instead of refusing
//! it as unknown data.
//!
//! It boots the containerd-test root (`OPENSHELL_TEST_CONTAINERD_ROOTFS_<ARCH>`): the phase
//! formats with the root's mke2fs, which the base root lacks, and binds only in a root with
//! k3s's directory; the smallest such root we build is that one.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use openshell_shared::GuestMessage;
use openshell_tests::oci_image::sha256_hex;
use openshell_tests::{
    containerd_rootfs, crash_seed, fsck_image, vm_slot, vmm_pid, wait_for_console, Boot,
    BOOT_DEADLINE,
};

/// Where each round's first kill is aimed: after which console line (or [`GROWS`]), and the
/// range of delays (µs) drawn from. Under TCG the first use takes about 1 s: the blank check,
/// mke2fs (whose writes reach the image when it flushes at its end; the `formatted` line
/// follows), then the mount and the seed's copy and syncs. These stay clear of mke2fs's own
/// writes: a kill in them is [`MID_MKE2FS`]'s.
const AIMS: [(&str, u64, u64); 3] = [
    ("phase state-disk: started", 0, 60_000),
    ("first use: formatted", 0, 400_000),
    ("first use: formatted", 400_000, 1_200_000),
];
/// A kill while mke2fs's metadata reaches the disk, its primary superblock not yet.
const MID_MKE2FS: [(&str, u64, u64); 1] = [(GROWS, 0, 5_000)];
/// Not a console line: the moment the image on the host has more than [`GROWS_PAST`] bytes
/// allocated, for a kill in the middle of mke2fs's writes. mke2fs 1.47 first zeroes a few
/// sectors at both ends (68 KiB here, still a blank disk to the phase), then its metadata
/// arrives (about 600 KiB more for 1 GiB).
const GROWS: &str = "state.img grows";
const GROWS_PAST: u64 = 96 << 10;
/// The second kill of a round, in the boot that recovers from the first.
const RECOVERY: (&str, u64, u64) = ("phase state-disk: started", 0, 600_000);
const AGENT: &str = "var/lib/rancher/k3s/agent";
/// What the guest's side writes to the root for the host to read.
const OUT: &str = "seed-check.out";

/// Files planted in the root's agent directory for the phase to seed: (path under it, bytes).
/// The blob is big enough that the copy and its sync take a while under TCG.
fn planted(seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut x = seed | 1;
    let mut bytes = |n: usize| {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
    };
    vec![
        (
            "containerd/io.containerd.content.v1.content/blobs/sha256/blob".into(),
            bytes(8 << 20),
        ),
        (
            "containerd/io.containerd.metadata.v1.bolt/meta.db".into(),
            bytes(64 << 10),
        ),
        ("pod-manifests/note".into(), b"kept\n".to_vec()),
    ]
}

/// The kills, two a round: (console line, delay after it), drawn from `OPENSHELL_CRASH_SEED`
/// or the clock; the seed is printed so a failing sequence can be replayed.
fn moments(aims: &[(&'static str, u64, u64)]) -> (u64, Vec<[(&'static str, Duration); 2]>) {
    let seed = crash_seed();
    let mut x = seed;
    let mut draw = move |(after, from, to): (&'static str, u64, u64)| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (after, Duration::from_micros(from + x % (to - from)))
    };
    let v = aims
        .iter()
        .map(|&aim| [draw(aim), draw(RECOVERY)])
        .collect();
    (seed, v)
}

/// Where in the phase a kill landed, from the console of the killed boot and whether the disk
/// was blank when it started.
fn landed(console: &str, blank: bool) -> &'static str {
    if console.contains("phase state-disk: ok") {
        "after the phase"
    } else if console.contains("first use: seeded") {
        "after the seed, before the binds"
    } else if console.contains("first use: formatted") {
        "after mke2fs, in the mount or the seed"
    } else if blank {
        "in the blank check or mke2fs"
    } else {
        "in the check, the mount or a redone seed"
    }
}

/// The guest's side of the last boot: what the agent directory is, the planted files' digests
/// as the guest reads them through the bind, and the disk's top level.
fn check_script(files: &[(String, Vec<u8>)]) -> String {
    let mut s = format!("cd /{AGENT} || exit 1\n{{\necho \"fstype $(stat -f -c %T .)\"\n");
    for (rel, _) in files {
        s += &format!("echo \"file {rel} $(sha256sum {rel} | cut -d' ' -f1)\"\n");
    }
    s += "echo \"link $(readlink latest)\"\n";
    s += "echo \"disk $(ls -A /run/openshell/state-disk | tr '\\n' ' ')\"\n";
    s += &format!("}} > /{OUT}\nsync\n");
    s
}

/// Boots `boot`, kills its qemu `delay` after the console shows `after`, and returns the ended
/// boot, its console, and the image's allocated bytes and superblock at the kill. A boot that failed on its own (a refused disk) fails the test.
fn boot_and_kill(
    boot: Boot,
    kill: &str,
    (after, delay): (&str, Duration),
) -> (Boot, String, (u64, bool)) {
    let run = boot.run_dir.path().join("run");
    let image = boot.instance_dir("default").join("state.img");
    let console = run.join("console.log");
    let _ = std::fs::remove_file(&console);
    let running = boot.exec(&["/bin/sh", "-c", "exec sleep 1000"]).start();
    let pid = vmm_pid(&run, Instant::now() + Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{kill}: no qemu for {}", run.display()));
    let deadline = Instant::now() + BOOT_DEADLINE;
    let seen = if after == GROWS {
        wait_for_blocks(&image, deadline)
    } else {
        wait_for_console(&console, after, deadline)
    };
    std::thread::sleep(delay);
    // SAFETY: kill(2) on a pid we just found; at worst it has exited already.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let allocated = allocated(&image);
    let magic = has_superblock(&image);
    let done = running.wait(BOOT_DEADLINE);
    let text = String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
    for m in done.guest_messages() {
        if let GuestMessage::Fatal { phase, error } = m {
            panic!("{kill}: the boot failed in {phase}: {error}\n{text}");
        }
    }
    assert!(seen, "{kill}: never saw {after:?}\n{text}");
    (done.boot, text, (allocated, magic))
}

/// Whether `image` has ext4's magic at its primary superblock (byte 1024 + 56) at this moment.
fn has_superblock(image: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 2];
    std::fs::File::open(image)
        .and_then(|f| f.read_exact_at(&mut magic, 1024 + 56))
        .map(|()| magic == [0x53, 0xef])
        .unwrap_or(false)
}

/// Bytes the host has allocated to `image` (a sparse file: what the guest has written).
fn allocated(image: &Path) -> u64 {
    std::fs::metadata(image)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Waits until `image` has more than [`GROWS_PAST`] bytes allocated; false at `deadline`.
fn wait_for_blocks(image: &Path, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if allocated(image) > GROWS_PAST {
            return true;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    false
}

/// The round's last boot runs to its workload: the seed must be whole and bound, and the image
/// clean after the power-off.
fn check_seed(boot: Boot, files: &[(String, Vec<u8>)], round: usize) -> Boot {
    let image = boot.instance_dir("default").join("state.img");
    let _ = std::fs::remove_file(boot.root_path(OUT));
    let done = boot
        .exec(&["/bin/sh", "/seed-check.sh"])
        .start()
        .wait(BOOT_DEADLINE);
    let out = std::fs::read_to_string(done.boot.root_path(OUT)).unwrap_or_default();
    let why = format!("round {round}: {out}\n{}", done.output());
    assert!(done.status.success(), "{why}");
    assert!(out.contains("fstype ext2/ext3\n"), "{why}");
    for (rel, bytes) in files {
        let line = format!("file {rel} {}\n", sha256_hex(bytes));
        assert!(out.contains(&line), "{rel} not seeded whole: {why}");
    }
    assert!(out.contains("link pod-manifests/note\n"), "{why}");
    // The seed finished exactly once: its marker and directory, no unfinished copy.
    let disk_line = out.lines().find(|l| l.starts_with("disk ")).unwrap_or("");
    let top: Vec<&str> = disk_line.split_whitespace().skip(1).collect();
    assert!(top.contains(&"seeded") && top.contains(&"state"), "{why}");
    assert!(!top.contains(&".seed-incomplete"), "{why}");
    let (status, words) = fsck_image(&image);
    assert_eq!(
        status,
        0,
        "round {round}: e2fsck -fn {}: {words}",
        image.display()
    );
    done.boot
}

/// Runs a round for each aim (a fresh disk, the aimed kill, a kill in the recovery, a boot that
/// checks the seed).
fn rounds_of_kills(arch: &str, aims: &[(&'static str, u64, u64)]) {
    let Some(root) = containerd_rootfs(arch) else {
        return;
    };
    let Some(boot) = Boot::with_rootfs(arch, &root) else {
        return;
    };
    let (seed, rounds) = moments(aims);
    eprintln!("state-disk crash test {arch}: seed {seed}, kills at {rounds:?}");
    let files = planted(seed);
    for (rel, bytes) in &files {
        let path = boot.root_path(&format!("{AGENT}/{rel}"));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, bytes).expect("plant");
    }
    let link = boot.root_path(&format!("{AGENT}/latest"));
    std::os::unix::fs::symlink("pod-manifests/note", link).expect("symlink");
    std::fs::write(boot.root_path("seed-check.sh"), check_script(&files)).expect("script");
    let _slot = vm_slot();
    let mut boot = boot.state_disk("1G");
    let mut in_first_use = 0;
    for (round, kills) in rounds.iter().enumerate() {
        if round > 0 {
            // A fresh blank disk for this round (the host deletes the image and its record).
            boot.extra_args = vec!["--reset".into(), "--yes".into()];
        }
        let mut blank = true;
        for (k, moment) in kills.iter().enumerate() {
            let kill = format!("round {round} kill {k}");
            let (next, console, (bytes, magic)) = boot_and_kill(boot, &kill, *moment);
            boot = next;
            boot.extra_args.clear();
            let at = landed(&console, blank);
            eprintln!(
                "{kill}, {:?} after {:?}: {at}; {} KiB of the image written, superblock {}",
                moment.1,
                moment.0,
                bytes >> 10,
                if magic { "there" } else { "not there" }
            );
            in_first_use += usize::from(k == 0 && at != "after the phase");
            blank &= !console.contains("first use: formatted");
        }
        boot = check_seed(boot, &files, round);
    }
    assert!(in_first_use > 0, "no kill landed in a disk's first use");
    eprintln!(
        "{in_first_use} of {} rounds killed in the disk's first use; every seed whole, e2fsck -fn clean",
        rounds.len()
    );
}

/// Kills in the blank check, the mount and the seed, and in the recovery after each.
fn survives_kills_during_first_use(arch: &str) {
    rounds_of_kills(arch, &AIMS);
}

mod survives_kills_during_first_use {
    #[test]
    fn x86_64() {
        super::survives_kills_during_first_use("x86_64");
    }
}

/// A kill in the middle of mke2fs's writes: the next boot finds metadata without the primary
/// superblock and the phase's format intent, formats again, and the round ends whole.
fn survives_a_kill_in_mke2fs(arch: &str) {
    rounds_of_kills(arch, &MID_MKE2FS);
}

mod survives_a_kill_in_mke2fs {
    #[test]
    fn x86_64() {
        super::survives_a_kill_in_mke2fs("x86_64");
    }
}
