//! Disk images on real loop devices, for the state disk's tests: a sparse image file, prepared
//! with real tools (mke2fs, mkswap) or raw bytes, attached with `losetup` (read-only or with a
//! size limit when asked), digested before and after to prove nothing changed, detached on drop.
//! Needs root and loop devices; [`Image::attach`] says so and returns `None` elsewhere.
//!
//! One copy for the phase's in-process tests (`src/phases/state_disk/loop_tests.rs`) and the
//! command's (`tests/state_disk.rs`), which include this file with `#[path]`.

#![allow(dead_code)] // each includer uses its own part

use std::hash::Hasher;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A sparse image file in a directory of its own.
pub struct Image {
    dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Image {
    pub fn new(size: u64) -> Image {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("image");
        Image { dir, path }
    }

    /// Runs `program args... <image>`; panics with its output if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> &Image {
        let out = Command::new(program)
            .args(args)
            .arg(&self.path)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self
    }

    /// Writes `bytes` at `offset`.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> &Image {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .expect("open image");
        f.seek(SeekFrom::Start(offset)).expect("seek");
        f.write_all(bytes).expect("write");
        self
    }

    /// Attached read-write.
    pub fn attach(self) -> Option<LoopDisk> {
        self.attach_with(&[])
    }

    /// Attached with extra `losetup` options (`-r`, `--sizelimit N`); `None`, said on stderr,
    /// where loop devices cannot be made.
    pub fn attach_with(self, opts: &[&str]) -> Option<LoopDisk> {
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists() {
            eprintln!("skipped: needs root and loop devices");
            return None;
        }
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .args(opts)
            .arg(&self.path)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: losetup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDisk { image: self, dev })
    }
}

/// An image attached to a loop device; detached on drop.
pub struct LoopDisk {
    pub image: Image,
    /// `/dev/loopN`.
    pub dev: PathBuf,
}

impl LoopDisk {
    /// `loopN`.
    pub fn name(&self) -> String {
        self.dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// A digest of every byte of the device.
    pub fn digest(&self) -> u64 {
        self.wait_free();
        let mut f = std::fs::File::open(&self.dev).expect("open device");
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).expect("read device");
            if n == 0 {
                break;
            }
            h.write(&buf[..n]);
        }
        h.finish()
    }

    /// Waits until nothing holds the device: a mount in a namespace that just ended is
    /// released by the kernel a moment later.
    pub fn wait_free(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let free = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(&self.dev)
                .is_ok();
            if free {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} stays busy",
                self.dev.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The device node under `root` as the guest would have it (`<root>/dev/loopN`); returns
    /// the guest path.
    pub fn node_in(&self, root: &Path) -> String {
        let meta = std::fs::metadata(&self.dev).expect("stat device");
        assert!(meta.file_type().is_block_device());
        std::fs::create_dir_all(root.join("dev")).expect("mkdir dev");
        let node = root.join("dev").join(self.name());
        let _ = std::fs::remove_file(&node);
        nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            meta.rdev(),
        )
        .expect("mknod");
        format!("/dev/{}", self.name())
    }

    /// Grows the image to `size` and tells the loop device.
    pub fn grow(&self, size: u64) {
        self.wait_free();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.image.path)
            .and_then(|f| f.set_len(size))
            .expect("grow image");
        let ok = Command::new("losetup")
            .arg("-c")
            .arg(&self.dev)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "losetup -c {}", self.dev.display());
    }

    /// The ext superblock's fields by `dumpe2fs -h` (field name -> value).
    pub fn dumpe2fs(&self) -> std::collections::BTreeMap<String, String> {
        self.wait_free();
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&self.dev)
            .output()
            .expect("dumpe2fs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }
}

impl LoopDisk {
    /// Whether the device still has our image behind it: once it is detached (or cleared when
    /// its last user let go) the number can already be another test's, in this process or
    /// another test run's.
    fn holds_our_image(&self) -> bool {
        let ours = std::fs::canonicalize(&self.image.path).unwrap_or(self.image.path.clone());
        std::fs::read_to_string(format!("/sys/block/{}/loop/backing_file", self.name()))
            .is_ok_and(|f| Path::new(f.trim()) == ours)
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && self.holds_our_image() {
            let ok = Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.holds_our_image() {
            eprintln!("could not detach {}", self.dev.display());
        }
    }
}
