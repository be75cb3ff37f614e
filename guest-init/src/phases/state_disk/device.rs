//! The state disk's block device: found by its virtio-blk serial in sysfs (or given as a `/dev`
//! path), opened exclusively, its size and read-only flag asked of the kernel, byte ranges read
//! from it. Never guessed: a missing disk is an error that lists the block devices there are.
//! Paths are guest paths under the phase's root (`/sys/block`, `/dev/vdb`); errors name the
//! device as the guest sees it.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use openshell_init::guest_path::under;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no block device with serial `{serial}` (block devices: {found})")]
    NotFound { serial: String, found: String },
    #[error("{device}: {source}")]
    Open {
        device: String,
        source: std::io::Error,
    },
    #[error("{device} is {what}, not a block device")]
    NotBlock { device: String, what: &'static str },
    #[error("{device} is in use (mounted or opened exclusively by someone else)")]
    InUse { device: String },
    #[error("{device}: cannot ask the kernel for its {what}: {errno}")]
    Ioctl {
        device: String,
        what: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("{device}: read error at byte {offset}: {source}")]
    Read {
        device: String,
        offset: u64,
        source: std::io::Error,
    },
    #[error("{device}: cannot write {len} bytes at byte {offset} and sync them: {source}")]
    Write {
        device: String,
        offset: u64,
        len: usize,
        source: std::io::Error,
    },
}

/// Writes `bytes` at `offset` of the device at `path` (opened exclusively: nothing else has it
/// open) and syncs them to the disk before returning.
pub fn write_synced(
    path: &Path,
    shown: &str,
    offset: u64,
    bytes: &[u8],
) -> Result<(), DeviceError> {
    let err = |source| DeviceError::Write {
        device: shown.to_string(),
        offset,
        len: bytes.len(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC);
    let file = open_exclusive(&opts, path).map_err(err)?;
    file.write_all_at(bytes, offset).map_err(err)?;
    file.sync_all().map_err(err)
}

/// Runs `op` again while it fails with EBUSY (`busy` says which errors are), for at most 2 s: a
/// device that mke2fs, e2fsck or a just-ended mount namespace held is released a moment after,
/// not at once. Busy for longer (mounted, or held by someone) is the caller's error to name.
pub fn waiting_out_busy<T, E>(
    mut op: impl FnMut() -> Result<T, E>,
    busy: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match op() {
            Err(e) if busy(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => return other,
        }
    }
}

/// Opens `path` with `opts` (which ask for O_EXCL), waiting out a short EBUSY.
fn open_exclusive(opts: &std::fs::OpenOptions, path: &Path) -> std::io::Result<File> {
    waiting_out_busy(
        || opts.open(path),
        |e: &std::io::Error| e.raw_os_error() == Some(libc::EBUSY),
    )
}

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
// BLKROGET is _IO(0x12, 94) but writes an int through its argument.
nix::ioctl_read_bad!(blk_ro_get, nix::request_code_none!(0x12, 94), libc::c_int);

/// An open block device.
pub struct Device {
    /// As the guest sees it (`/dev/vdb`).
    pub shown: String,
    /// Under the phase's root: what programs and mount(2) are given.
    pub path: PathBuf,
    pub size: u64,
    pub read_only: bool,
    file: File,
}

/// The guest path of the disk `named`: a `/dev/...` path as given, or the device whose
/// `/sys/block/<name>/serial` reads `named`.
pub fn find(root: &Path, named: &str) -> Result<String, DeviceError> {
    if named.starts_with('/') {
        return Ok(named.to_string());
    }
    let devices = block_devices(root);
    if let Some((name, _)) = devices
        .iter()
        .find(|(_, serial)| serial.as_deref() == Some(named))
    {
        return Ok(format!("/dev/{name}"));
    }
    let found = if devices.is_empty() {
        "none".to_string()
    } else {
        devices
            .iter()
            .map(|(n, s)| match s {
                Some(s) => format!("{n} (serial `{s}`)"),
                None => format!("{n} (no serial)"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(DeviceError::NotFound {
        serial: named.to_string(),
        found,
    })
}

/// Every entry of `/sys/block` with its serial, if it has one, sorted by name.
fn block_devices(root: &Path) -> Vec<(String, Option<String>)> {
    let dir = under(root, "/sys/block");
    let mut out: Vec<(String, Option<String>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let serial = std::fs::read_to_string(e.path().join("serial"))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty());
            (e.file_name().to_string_lossy().into_owned(), serial)
        })
        .collect();
    out.sort();
    out
}

impl Device {
    /// Opens the guest path `shown` under `root` for reading, exclusively: a mounted disk (or
    /// one another program holds) is refused rather than read while it changes.
    pub fn open(root: &Path, shown: &str) -> Result<Device, DeviceError> {
        let path = under(root, shown);
        let device = || shown.to_string();
        let meta = std::fs::metadata(&path).map_err(|source| DeviceError::Open {
            device: device(),
            source,
        })?;
        let ft = meta.file_type();
        if !ft.is_block_device() {
            let what = if ft.is_file() {
                "a regular file"
            } else if ft.is_dir() {
                "a directory"
            } else if ft.is_char_device() {
                "a character device"
            } else {
                "not a device"
            };
            return Err(DeviceError::NotBlock {
                device: device(),
                what,
            });
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).custom_flags(libc::O_EXCL | libc::O_CLOEXEC);
        let file = open_exclusive(&opts, &path).map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY) => DeviceError::InUse { device: device() },
            _ => DeviceError::Open {
                device: device(),
                source,
            },
        })?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let mut size = 0u64;
        let mut ro: libc::c_int = 0;
        let ioctl = |what, errno| DeviceError::Ioctl {
            device: device(),
            what,
            errno,
        };
        // SAFETY: both ioctls write one value of the given type through the pointer, which
        // points at a live local of that type; `fd` is open for the call.
        unsafe {
            blk_get_size64(fd, &mut size).map_err(|e| ioctl("size", e))?;
            blk_ro_get(fd, &mut ro).map_err(|e| ioctl("read-only flag", e))?;
        }
        Ok(Device {
            shown: device(),
            path,
            size,
            read_only: ro != 0,
            file,
        })
    }

    /// Up to `len` bytes from `offset`; fewer only at the end of the device.
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(DeviceError::Read {
                        device: self.shown.clone(),
                        offset: offset + done as u64,
                        source,
                    })
                }
            }
        }
        buf.truncate(done);
        Ok(buf)
    }
}

#[cfg(test)]
impl Device {
    /// A device over any open file: a file opened write-only stands in for a disk that fails
    /// every read (no device here can be made to).
    pub fn over(shown: &str, file: File, size: u64) -> Device {
        Device {
            shown: shown.into(),
            path: PathBuf::from(shown),
            size,
            read_only: false,
            file,
        }
    }

    /// A device named `shown` of `size` bytes whose every read fails (a write-only file), with
    /// the directory that holds it.
    pub fn failing_reads(shown: &str, size: u64) -> (tempfile::TempDir, Device) {
        let t = tempfile::tempdir().expect("tmp");
        let wo = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(t.path().join("f"))
            .expect("open");
        (t, Device::over(shown, wo, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_error_names_the_device_and_the_byte() {
        let (_t, dev) = Device::failing_reads("/dev/vdb", 1 << 30);
        let e = dev.read_at(4096, 512).expect_err("fails");
        assert!(
            e.to_string()
                .starts_with("/dev/vdb: read error at byte 4096: Bad file descriptor"),
            "{e}"
        );
    }

    fn sys_block(root: &Path, name: &str, serial: Option<&str>) {
        let dir = root.join("sys/block").join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        if let Some(s) = serial {
            std::fs::write(dir.join("serial"), format!("{s}\n")).expect("serial");
        }
    }

    #[test]
    fn the_disk_is_found_by_serial_and_a_missing_one_lists_what_is_there() {
        let root = tempfile::tempdir().expect("tmp");
        assert_eq!(
            find(root.path(), "openshell-state")
                .unwrap_err()
                .to_string(),
            "no block device with serial `openshell-state` (block devices: none)"
        );
        sys_block(root.path(), "vda", None);
        sys_block(root.path(), "vdc", Some("other"));
        let err = find(root.path(), "openshell-state")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "no block device with serial `openshell-state` (block devices: vda (no serial), vdc (serial `other`))"
        );
        sys_block(root.path(), "vdb", Some("openshell-state"));
        assert_eq!(
            find(root.path(), "openshell-state").expect("found"),
            "/dev/vdb"
        );
        assert_eq!(find(root.path(), "/dev/loop3").expect("path"), "/dev/loop3");
    }

    #[test]
    fn only_block_devices_open() {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(root.path().join("dev")).expect("mkdir");
        std::fs::write(root.path().join("dev/vdb"), "").expect("file");
        let err = Device::open(root.path(), "/dev/vdb")
            .err()
            .expect("refused");
        assert_eq!(
            err.to_string(),
            "/dev/vdb is a regular file, not a block device"
        );
        let err = Device::open(root.path(), "/dev/vdz")
            .err()
            .expect("refused");
        assert!(err.to_string().starts_with("/dev/vdz: "), "{err}");
        // /dev/null, under the real root.
        let err = Device::open(Path::new("/"), "/dev/null")
            .err()
            .expect("refused");
        assert_eq!(
            err.to_string(),
            "/dev/null is a character device, not a block device"
        );
    }
}
