//! `openshell-init phase state-disk` on real loop devices with the host's e2fsprogs, run the
//! way the lead or a user runs it on a host: a scratch root holding the device node where the
//! guest has it, `--cmdline openshell.state_disk=...` as the host passes it. What the phase
//! reports is read from its JSON lines; what it did to the disk from the disk itself. Every
//! refusal must name the device and what it found, and leave every byte of the disk as it was.
//! (Binds, power-off unmounting and kine on a full disk are the in-process tests in
//! `src/phases/state_disk/loop_tests.rs`.)

#[path = "support/loop_disk.rs"]
mod loop_disk;

use std::path::Path;
use std::process::Command;

use loop_disk::{Image, LoopDisk};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_openshell-init");
const MIB: u64 = 1 << 20;

/// What one run of the phase printed.
struct Run {
    ok: bool,
    events: Vec<Value>,
}

impl Run {
    /// The phase's outcome: its `ok` detail line or its failure text.
    fn outcome(&self) -> String {
        let finished = self
            .events
            .iter()
            .find(|e| e["msg"]["type"] == "phase_finished")
            .unwrap_or_else(|| panic!("no phase_finished in {:?}", self.events));
        let outcome = &finished["msg"]["outcome"];
        let detail = outcome["detail"].as_str().unwrap_or("").to_string();
        match outcome["kind"].as_str() {
            Some("failed") => detail,
            Some("skipped") => format!("skipped: {detail}"),
            _ => self
                .logs()
                .into_iter()
                .find(|l| l.starts_with("state-disk: /dev/"))
                .unwrap_or_default(),
        }
    }

    fn logs(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["msg"]["type"] == "log")
            .filter_map(|e| e["msg"]["text"].as_str().map(String::from))
            .collect()
    }
}

/// Runs the phase against `root` with `openshell.state_disk=<named>`.
fn phase(root: &Path, named: &str, disk: &LoopDisk) -> Run {
    disk.wait_free();
    let out = Command::new(BIN)
        .args(["phase", "state-disk", "--root"])
        .arg(root)
        .arg("--cmdline")
        .arg(format!("quiet openshell.state_disk={named}"))
        .output()
        .expect("run");
    let events = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    Run {
        ok: out.status.success(),
        events,
    }
}

/// A scratch root shaped like the gateway's: image tarballs and a pre-baked database to seed.
fn gateway_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("root");
    let r = root.path();
    std::fs::create_dir_all(r.join("var/lib/rancher/k3s/agent/images")).expect("mkdir");
    std::fs::write(
        r.join("var/lib/rancher/k3s/agent/images/gw.tar"),
        vec![7u8; 300_000],
    )
    .expect("image");
    std::fs::create_dir_all(r.join("var/lib/rancher/k3s/server/db")).expect("mkdir");
    std::fs::write(
        r.join("var/lib/rancher/k3s/server/db/state.db"),
        b"prebaked",
    )
    .expect("db");
    std::fs::create_dir_all(r.join("opt/openshell")).expect("mkdir");
    root
}

/// mke2fs as the phase formats: ext4, 4 KiB blocks, our label (over the whole image unless a
/// size follows it).
const OUR_MKE2FS: &[&str] = &[
    "-q",
    "-F",
    "-t",
    "ext4",
    "-b",
    "4096",
    "-L",
    "openshell-state",
];

/// A refusal: the phase fails naming the device and `found`, and the disk is unchanged.
fn refused(disk: LoopDisk, found: &str) {
    let root = gateway_root();
    let before = disk.digest();
    let node = disk.node_in(root.path());
    let run = phase(root.path(), &node, &disk);
    assert!(!run.ok, "{}", run.outcome());
    let text = run.outcome();
    assert!(
        text.starts_with(&format!("{node} ")) || text.starts_with(&format!("{node}:")),
        "{text}"
    );
    assert!(text.contains(found), "{text}\nwanted: {found}");
    assert_eq!(disk.digest(), before, "the disk changed: {text}");
}

#[test]
fn a_blank_disk_is_formatted_and_seeded_once() {
    let Some(disk) = Image::new(256 * MIB).attach() else {
        return;
    };
    let root = gateway_root();
    let node = disk.node_in(root.path());
    let first = phase(root.path(), &node, &disk);
    assert!(first.ok, "{}", first.outcome());
    let line = first.outcome();
    assert!(
        line.starts_with(&format!("state-disk: {node}: ext4 ")),
        "{line}"
    );
    assert!(line.contains(" MiB free; found and checked in "), "{line}");
    assert!(
        line.contains("formatted in ") && line.contains("journal clean"),
        "{line}"
    );
    assert!(line.contains("binds in "), "{line}");
    // The first use's own rows: formatting and seeding, each with its time.
    let logs = first.logs().join("\n");
    assert!(
        logs.contains(&format!(
            "state-disk: first use: formatted the blank {node} (256 MiB) as ext4 in "
        )),
        "{logs}"
    );
    assert!(
        logs.contains("state-disk: first use: seeded ")
            && logs.contains("/var/lib/rancher/k3s/agent, /var/lib/rancher/k3s/server/db in "),
        "{logs}"
    );
    let sb = disk.dumpe2fs();
    assert_eq!(sb["Filesystem volume name"], "openshell-state");
    assert_eq!(
        sb["Filesystem state"], "clean",
        "unmounted cleanly when the namespace ended"
    );
    assert_eq!(sb["Reserved block count"], "0");
    // Second boot: not formatted, not seeded again.
    let second = phase(root.path(), &node, &disk);
    assert!(second.ok, "{}", second.outcome());
    let line = second.outcome();
    assert!(!line.contains("formatted"), "{line}");
    assert!(line.contains("seeded on an earlier boot"), "{line}");
    assert!(!second.logs().iter().any(|l| l.contains("first use")));
}

#[test]
fn the_disk_is_found_by_its_serial() {
    let Some(disk) = Image::new(128 * MIB).attach() else {
        return;
    };
    let root = gateway_root();
    let node = disk.node_in(root.path());
    // sysfs as the guest has it: the disk among others, by serial.
    let sys = root.path().join("sys/block");
    for (name, serial) in [
        ("vda", None),
        (disk.name().as_str(), Some("openshell-state")),
    ] {
        std::fs::create_dir_all(sys.join(name)).expect("mkdir");
        if let Some(s) = serial {
            std::fs::write(sys.join(name).join("serial"), format!("{s}\n")).expect("serial");
        }
    }
    let run = phase(root.path(), "openshell-state", &disk);
    assert!(run.ok, "{}", run.outcome());
    assert!(
        run.outcome().starts_with(&format!(
            "state-disk: {node} (serial openshell-state): ext4 "
        )),
        "{}",
        run.outcome()
    );
    let missing = phase(root.path(), "other-serial", &disk);
    assert!(!missing.ok);
    assert_eq!(
        missing.outcome(),
        format!("no block device with serial `other-serial` (block devices: {} (serial `openshell-state`), vda (no serial))", disk.name())
    );
}

#[test]
fn no_key_no_disk() {
    let root = tempfile::tempdir().expect("root");
    let out = Command::new(BIN)
        .args(["phase", "state-disk", "--root"])
        .arg(root.path())
        .args(["--cmdline", "quiet"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("no state disk attached"), "{text}");
    assert!(!root.path().join("run").exists(), "nothing created: {text}");
}

/// A crash in the middle of the seed (its temporary directory left, no marker): the next boot
/// removes it and copies again.
#[test]
fn an_interrupted_seed_is_redone() {
    let Some(disk) = Image::new(128 * MIB).attach() else {
        return;
    };
    let root = gateway_root();
    let node = disk.node_in(root.path());
    assert!(phase(root.path(), &node, &disk).ok);
    // What a crash before the marker leaves, made with debugfs on the unmounted disk.
    disk.wait_free();
    let script = "rm /seeded\nmkdir /.seed-incomplete\nmkdir /.seed-incomplete/k3s-agent\n";
    let out = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(&disk.dev)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())?;
            c.wait()
        })
        .expect("debugfs");
    assert!(out.success());
    let run = phase(root.path(), &node, &disk);
    assert!(run.ok, "{}", run.outcome());
    assert!(run.outcome().contains("; seeded "), "{}", run.outcome());
    assert!(run
        .logs()
        .iter()
        .any(|l| l.starts_with("state-disk: first use: seeded ")));
    let ls = Command::new("debugfs")
        .args(["-R", "ls /"])
        .arg(&disk.dev)
        .output()
        .expect("debugfs");
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls.contains("seeded") && ls.contains("state") && !ls.contains(".seed-incomplete"),
        "{ls}"
    );
}

#[test]
fn a_foreign_ext4_is_refused_untouched() {
    let img = Image::new(128 * MIB);
    img.run("mke2fs", &["-q", "-F", "-t", "ext4", "-L", "data"]);
    let Some(disk) = img.attach() else { return };
    refused(
        disk,
        "holds an ext4 filesystem labelled `data`: not formatting it",
    );
}

#[test]
fn a_swap_area_is_refused_untouched() {
    let img = Image::new(128 * MIB);
    img.run("mkswap", &[]);
    let Some(disk) = img.attach() else { return };
    refused(disk, "holds a swap area: not formatting it");
}

#[test]
fn a_partition_table_is_refused_untouched() {
    let img = Image::new(128 * MIB);
    // One Linux partition from sector 2048, as fdisk writes it.
    let mut entry = [0u8; 16];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&(200_000u32).to_le_bytes());
    img.write_at(446, &entry).write_at(510, &[0x55, 0xAA]);
    let Some(disk) = img.attach() else { return };
    refused(
        disk,
        "holds an MBR partition table (1 partition): not formatting it",
    );
}

/// Our own filesystem whose first MiB was wiped: e2fsck could still recover it from a backup
/// superblock, so it is not blank.
#[test]
fn a_wiped_first_mib_over_our_filesystem_is_not_blank() {
    let img = Image::new(256 * MIB);
    img.run("mke2fs", OUR_MKE2FS);
    img.write_at(0, &vec![0u8; MIB as usize]);
    let Some(disk) = img.attach() else { return };
    refused(
        disk,
        &format!(
            "holds zeros in its first MiB, but a backup superblock of an ext4 filesystem labelled `openshell-state` at byte {} (e2fsck can recover that filesystem)",
            32768 * 4096
        ),
    );
}

/// What a boot killed inside mke2fs leaves (mke2fs writes the primary superblock last): our
/// format intent in the disk's last 4 KiB and every other piece of a filesystem, but no
/// superblock at the start. The next boot formats it again and goes on.
#[test]
fn a_format_cut_short_is_formatted_again() {
    let size = 256 * MIB;
    let img = cut_short_format(size);
    img.write_at(size - 4096, &intent(size));
    let Some(disk) = img.attach() else { return };
    let root = gateway_root();
    let node = disk.node_in(root.path());
    let run = phase(root.path(), &node, &disk);
    assert!(run.ok, "{}", run.outcome());
    let logs = run.logs().join("\n");
    assert!(
        logs.contains(&format!(
            "state-disk: a format of {node} was cut short on an earlier boot (its intent is at byte {}): formatting it again",
            size - 4096
        )),
        "{logs}"
    );
    assert!(run.outcome().contains("formatted in "), "{}", run.outcome());
    assert_eq!(disk.dumpe2fs()["Filesystem volume name"], "openshell-state");
    // The intent went before the mount: the next boot takes the disk as it is.
    let again = phase(root.path(), &node, &disk);
    assert!(again.ok, "{}", again.outcome());
    assert!(
        !again.outcome().contains("formatted"),
        "{}",
        again.outcome()
    );
}

/// The same bytes without the intent (or with one for another disk size): nothing says they are
/// a format of ours, so they are refused untouched like any unknown data.
#[test]
fn a_superblock_missing_without_our_intent_is_refused() {
    let size = 256 * MIB;
    let img = cut_short_format(size);
    img.write_at(size - 4096, &intent(size - MIB));
    let Some(disk) = img.attach() else { return };
    refused(
        disk,
        "holds unknown data (first non-zero byte at offset 4096)",
    );
}

/// An image as mke2fs leaves it when cut short before its last write: formatted as the phase
/// formats (all but the last MiB), then the primary superblock zeroed.
fn cut_short_format(size: u64) -> Image {
    let img = Image::new(size);
    let blocks = ((size - MIB) / 4096).to_string();
    // By hand: Image::run puts nothing after the image, where mke2fs takes the size.
    let out = std::process::Command::new("mke2fs")
        .args(OUR_MKE2FS)
        .arg(&img.path)
        .arg(&blocks)
        .output()
        .expect("mke2fs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img.write_at(1024, &[0u8; 1024]);
    img
}

/// The phase's format intent for a disk of `size` bytes, as `ondisk::intent` writes it.
fn intent(size: u64) -> Vec<u8> {
    let magic = b"openshell-state: formatting a blank disk\n";
    let mut b = vec![0u8; 4096];
    b[..magic.len()].copy_from_slice(magic);
    b[magic.len()..magic.len() + 8].copy_from_slice(&size.to_le_bytes());
    b
}

/// Zeros everywhere but the last MiB (where a GPT keeps its backup header).
#[test]
fn data_at_the_end_of_a_zeroed_disk_is_not_blank() {
    let img = Image::new(128 * MIB);
    img.write_at(128 * MIB - 512, b"EFI PART");
    let Some(disk) = img.attach() else { return };
    refused(
        disk,
        &format!(
            "holds zeros in its first MiB, but data at byte {}",
            128 * MIB - 512
        ),
    );
}

#[test]
fn a_read_only_disk_is_refused_untouched() {
    let Some(disk) = Image::new(128 * MIB).attach_with(&["-r"]) else {
        return;
    };
    refused(disk, "is read-only: the state disk must be writable");
}

/// Our filesystem on a device smaller than it (an image cut short).
#[test]
fn a_truncated_image_is_refused_untouched() {
    let img = Image::new(128 * MIB);
    img.run("mke2fs", OUR_MKE2FS);
    let limit = (96 * MIB).to_string();
    let Some(disk) = img.attach_with(&["--sizelimit", &limit]) else {
        return;
    };
    refused(
        disk,
        &format!(
            "its ext4 filesystem is {} bytes but the device only {}: the image was truncated",
            128 * MIB,
            96 * MIB
        ),
    );
}

#[test]
fn a_tiny_blank_disk_is_refused() {
    let Some(disk) = Image::new(16 * MIB).attach() else {
        return;
    };
    refused(
        disk,
        "is blank but only 16777216 bytes: too small for a state disk",
    );
}

/// A disk that grew since the last boot: grown online by resize2fs where this process may
/// (CAP_SYS_RESOURCE); elsewhere a warning that names the disk, and the boot goes on.
#[test]
fn a_grown_disk_grows_its_filesystem() {
    let Some(disk) = Image::new(128 * MIB).attach() else {
        return;
    };
    let root = gateway_root();
    let node = disk.node_in(root.path());
    assert!(phase(root.path(), &node, &disk).ok);
    disk.grow(256 * MIB);
    let run = phase(root.path(), &node, &disk);
    assert!(run.ok, "{}", run.outcome());
    let blocks = disk.dumpe2fs()["Block count"].clone();
    let may_resize = caps_effective() & (1 << CAP_SYS_RESOURCE) != 0;
    if may_resize {
        assert!(
            run.outcome().contains("grown from 127 MiB"),
            "{}",
            run.outcome()
        );
        assert_eq!(blocks, (255 * MIB / 4096).to_string(), "the tail stays out");
    } else {
        let logs = run.logs().join("\n");
        assert!(
            logs.contains(
                "state-disk: the disk is 256 MiB, its filesystem 127 MiB, and growing it failed: "
            ) && logs.contains(&node),
            "{logs}"
        );
        assert_eq!(blocks, (127 * MIB / 4096).to_string());
        eprintln!("resize2fs refused here (no CAP_SYS_RESOURCE): checked the warning instead");
    }
}

/// linux/capability.h: the right to resize a mounted ext4 (and to use its reserved blocks).
const CAP_SYS_RESOURCE: u32 = 24;

/// This process's effective capabilities, from /proc.
fn caps_effective() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Runs debugfs's `request` on the (unattached) disk's device, writable.
fn debugfs_w(disk: &LoopDisk, request: &str) {
    disk.wait_free();
    let ok = Command::new("debugfs")
        .args(["-w", "-R", request])
        .arg(&disk.dev)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "debugfs -w -R {request}");
}

/// ext4 recorded errors: e2fsck -p mends what it can before the mount and says so.
#[test]
fn recorded_errors_are_checked_before_the_mount() {
    let Some(disk) = Image::new(128 * MIB).attach() else {
        return;
    };
    let root = gateway_root();
    let node = disk.node_in(root.path());
    assert!(phase(root.path(), &node, &disk).ok);
    debugfs_w(&disk, "ssv state 3");
    debugfs_w(&disk, "ssv error_count 2");
    let run = phase(root.path(), &node, &disk);
    assert!(run.ok, "{}", run.outcome());
    let line = run.outcome();
    assert!(
        line.contains("e2fsck -p (the filesystem recorded errors): status 0 in ")
            && line.contains("check forced"),
        "{line}"
    );
    assert_eq!(disk.dumpe2fs()["Filesystem state"], "clean");
}

/// Damage e2fsck -p will not mend alone: the boot stops with e2fsck's own words.
#[test]
fn damage_e2fsck_cannot_mend_stops_the_boot() {
    let Some(disk) = Image::new(128 * MIB).attach() else {
        return;
    };
    let root = gateway_root();
    let node = disk.node_in(root.path());
    assert!(phase(root.path(), &node, &disk).ok);
    debugfs_w(&disk, "clri <2>");
    debugfs_w(&disk, "ssv state 3");
    let run = phase(root.path(), &node, &disk);
    assert!(!run.ok);
    let text = run.outcome();
    assert!(
        text.starts_with(&format!(
            "{node}: `e2fsck -p {node}` failed (exit status 4: errors left uncorrected): "
        )) && text.contains("RUN fsck MANUALLY"),
        "{text}"
    );
}
