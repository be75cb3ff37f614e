//! The state disk against real VMs: the guest sees the image the host attached as a virtio-blk
//! device with serial `openshell-state` and the image's size, and what the guest wrote there
//! outlives its root filesystem: after the instance's root is replaced by a new copy (an
//! upgrade), the next boot finds every file, and the host finds them in the image between boots.
//!
//! The base root has no mke2fs, so the tests format the image on the host (e2fsprogs' mkfs.ext4,
//! label `openshell-state`, as the guest's state-disk phase makes it) and `up` takes it as it is.
//! The guest script uses the filesystem where the guest mounted it (the state-disk phase), else
//! mounts it itself (a guest without that phase).

use std::path::{Path, PathBuf};
use std::process::Command;

use openshell_tests::{both_arches, vm_slot, Boot, Finished, BOOT_DEADLINE};

const SIZE: &str = "64M";
const SIZE_BYTES: u64 = 64 << 20;
const SERIAL: &str = "openshell-state";

/// Where the guest script leaves its findings, in the root (virtio-fs).
const REPORT: &str = "disk-report";

/// Finds the disk by serial (`$dev`, and how many carry it in `$count`) and its filesystem's
/// mount (`$mnt`): the guest's own mount of the whole filesystem, else one of ours (`$own`).
const FIND_DISK: &str = r#"
set -eu
dev= count=0
for d in /sys/block/vd*; do
  if [ "$(cat "$d/serial" 2>/dev/null)" = openshell-state ]; then
    dev="${d##*/}"; count=$((count + 1))
  fi
done
[ -n "$dev" ] || { echo "no block device with serial openshell-state" > /disk-report; exit 3; }
mount_disk() {
  mm=$(cat "/sys/block/$dev/dev")
  mnt=$(awk -v m="$mm" '$3 == m && $4 == "/" { print $5; exit }' /proc/self/mountinfo)
  own=
  if [ -z "$mnt" ]; then
    mnt=/tmp/state-disk-test own=1
    mkdir -p "$mnt"
    mount -t ext4 "/dev/$dev" "$mnt"
  fi
}
unmount_disk() {
  sync
  if [ -n "$own" ]; then umount "$mnt"; fi
}
"#;

/// Makes the instance's image, formatted, before `up` sees it.
fn formatted_image(boot: &Boot) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let dir = boot.instance_dir("default");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .expect("state dir");
    let image = dir.join("state.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(SIZE_BYTES))
        .expect("image");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", SERIAL])
        .arg(&image)
        .output()
        .unwrap_or_else(|e| panic!("mkfs.ext4 (e2fsprogs) is needed to format the image: {e}"));
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

/// The detail of the host's timeline event `what`.
fn host_event(done: &Finished, what: &str) -> serde_json::Value {
    let report = done.report.as_ref().expect("report");
    report["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["source"] == "host" && e["event"]["type"] == what)
        .map(|e| e["event"]["detail"].clone())
        .unwrap_or_else(|| panic!("no host event {what}\n{}", done.output()))
}

fn read_report(root: &Path) -> String {
    std::fs::read_to_string(root.join(REPORT))
        .unwrap_or_else(|e| panic!("{}: {e}", root.join(REPORT).display()))
}

fn guest_sees_the_disk_by_its_serial(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let boot = boot.state_disk(SIZE);
    let image = formatted_image(&boot);
    let script = format!(
        "{FIND_DISK}\necho \"$count $(cat /sys/block/$dev/serial) $(cat /sys/block/$dev/size) \
         $(cat /sys/block/$dev/ro)\" > /{REPORT}"
    );
    let _slot = vm_slot();
    let done = boot
        .exec(&["/bin/sh", "-c", &script])
        .start()
        .wait(BOOT_DEADLINE);
    assert!(done.status.success(), "{}", done.output());
    let report = read_report(done.boot.root.path());
    let fields: Vec<&str> = report.split_whitespace().collect();
    let sectors = (SIZE_BYTES / 512).to_string();
    assert_eq!(
        fields,
        ["1", SERIAL, sectors.as_str(), "0"],
        "one writable disk with our serial and the image's size\n{}",
        done.output()
    );
    let said = format!(
        "state disk: {} (64 MiB, taken as it is; serial {SERIAL})",
        image.display()
    );
    assert!(done.output().contains(&said), "{}", done.output());
    let detail = host_event(&done, "state-disk");
    assert_eq!(detail["path"], serde_json::json!(image));
    assert_eq!(detail["size_bytes"], serde_json::json!(SIZE_BYTES));
    let cmdline = host_event(&done, "vmm-started")["cmdline"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        cmdline.contains(" openshell.state_disk=openshell-state"),
        "{cmdline}"
    );
}

both_arches!(guest_sees_the_disk_by_its_serial);

/// Replaces the root's contents with a fresh copy of the base, as `cargo xtask up` does when the
/// base changed, and marks it as the new generation.
fn replace_root(boot: &Boot) {
    let root = boot.root.path();
    for entry in std::fs::read_dir(root).expect("root") {
        let path = entry.expect("entry").path();
        let meta = std::fs::symlink_metadata(&path).expect("meta");
        if meta.is_dir() {
            std::fs::remove_dir_all(&path).expect("remove");
        } else {
            std::fs::remove_file(&path).expect("remove");
        }
    }
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", boot.artifacts.rootfs.display()))
        .arg(root)
        .status()
        .expect("cp");
    assert!(status.success(), "copy of the new root");
    std::fs::write(root.join("root-generation"), "2\n").expect("mark");
}

/// `debugfs` reads a file out of the image on the host: what the guest wrote is in the file
/// once the VM is gone.
fn file_in_image(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("debugfs (e2fsprogs) is needed to read the image: {e}"));
    assert!(out.status.success(), "debugfs: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const WRITE: &str = r#"
mount_disk
mkdir -p "$mnt/upgrade/nested"
echo "kept across roots" > "$mnt/upgrade/a"
cat /root-generation > "$mnt/upgrade/nested/written-by-generation"
dd if=/dev/urandom of="$mnt/upgrade/blob" bs=64k count=64 2>/dev/null
(cd "$mnt/upgrade" && find . -type f | sort | xargs sha256sum) > /disk-report
unmount_disk
"#;

const READ: &str = r#"
mount_disk
(cd "$mnt/upgrade" && find . -type f | sort | xargs sha256sum) > /disk-report
cat /root-generation >> /disk-report
unmount_disk
"#;

fn a_new_root_keeps_the_disk(arch: &str) {
    let Some(boot) = Boot::new(arch) else { return };
    let boot = boot.state_disk(SIZE);
    let image = formatted_image(&boot);
    std::fs::write(boot.root_path("root-generation"), "1\n").expect("mark");
    let _slot = vm_slot();
    let first = boot
        .exec(&["/bin/sh", "-c", &format!("{FIND_DISK}{WRITE}")])
        .start()
        .wait(BOOT_DEADLINE);
    assert!(first.status.success(), "{}", first.output());
    let written = read_report(first.boot.root.path());
    assert_eq!(written.lines().count(), 3, "three files: {written}");
    assert_eq!(
        file_in_image(&image, "/upgrade/a"),
        "kept across roots\n",
        "the guest's write is in the image on the host"
    );

    replace_root(&first.boot);
    assert!(!first.boot.root_path(REPORT).exists(), "a new root");
    let second = first
        .boot
        .exec(&["/bin/sh", "-c", &format!("{FIND_DISK}{READ}")])
        .start()
        .wait(BOOT_DEADLINE);
    assert!(second.status.success(), "{}", second.output());
    assert!(
        second
            .output()
            .contains("(64 MiB, kept; serial openshell-state)"),
        "{}",
        second.output()
    );
    let read = read_report(second.boot.root.path());
    assert_eq!(
        read,
        format!("{written}2\n"),
        "every file of the old root's boot, byte for byte, under the new root"
    );
    assert!(written.contains("./nested/written-by-generation"));
    assert_eq!(
        file_in_image(&image, "/upgrade/nested/written-by-generation"),
        "1\n"
    );
}

both_arches!(a_new_root_keeps_the_disk);
