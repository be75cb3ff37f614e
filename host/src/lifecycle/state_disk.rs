//! The instance's state disk: the sparse raw image `<state dir>/state.img` the guest keeps its
//! cluster on (k3s, containerd, the PKI), attached as virtio-blk with serial `openshell-state`.
//! Owns creating, growing and checking the image, its size record (`state-disk.json`), and the
//! lock (`state.img.lock`) that keeps two VMs off one image.
//!
//! The image lives in the state directory, not in the root filesystem, so a new root (an upgrade)
//! never touches it. The host never writes the image's contents: it creates the file, grows it
//! with `set_len` (the new tail reads as zeros), and otherwise only refuses. The record is the
//! size we last gave the image: a file shorter than that (or shorter than asked for and not made
//! by us) was truncated or replaced, and is refused rather than grown over.

use std::fs::File;
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::StateDir;
use crate::backend::spec::STATE_DISK_SERIAL;

/// Size of a new disk unless `--state-disk-size` says otherwise; an existing smaller one (whose
/// size we recorded) grows to it, as the old system's did.
pub const DEFAULT_SIZE: u64 = 32 << 30;
/// The guest formats no smaller disk (kine alone wants 64 MiB free): refused here already.
pub const MIN_SIZE: u64 = 64 << 20;
const SECTOR: u64 = 512;

const IMAGE: &str = "state.img";
const RECORD: &str = "state-disk.json";
const LOCK: &str = "state.img.lock";
/// Where a new image is made before it is renamed into place.
const NEW: &str = "state.img.new";

#[derive(Debug, thiserror::Error)]
pub enum StateDiskError {
    #[error("state disk {0} is a symbolic link: refusing to follow it")]
    Symlink(PathBuf),
    #[error("state disk {0} is not a regular file")]
    NotRegular(PathBuf),
    #[error(
        "state disk {path} belongs to uid {owner}, not to us (uid {ours}): refusing to use it"
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error(
        "state disk {path} is read-only ({why}): the VM must write to it; nothing was changed"
    )]
    ReadOnly { path: PathBuf, why: String },
    #[error(
        "state disk {path} is {len} bytes, not a whole number of 512-byte sectors: truncated? \
         Refusing to use it (nothing was changed); `up --reset` starts a fresh disk"
    )]
    NotSectors { path: PathBuf, len: u64 },
    #[error(
        "state disk {path} is {len} bytes, shorter than {expected} bytes ({why}): truncated or \
         replaced? Refusing to use it (nothing was changed); {hint}"
    )]
    Truncated {
        path: PathBuf,
        len: u64,
        expected: u64,
        why: &'static str,
        hint: String,
    },
    #[error(
        "state disk {path} is {} and --state-disk-size {} would shrink it, losing data: \
         a state disk only grows; ask for {} or more, or `up --reset` for a fresh disk",
        human(*.len), human(*.requested), human(*.len)
    )]
    Shrink {
        path: PathBuf,
        len: u64,
        requested: u64,
    },
    #[error("state disk record {path} is not valid ({why}): remove it to take the image as it is")]
    BadRecord { path: PathBuf, why: String },
    #[error(
        "state disk {image} is in use by another VM: {lock} is locked (last taken by pid {pid}; \
         a VMM of an `up` that was killed may still be exiting)"
    )]
    Busy {
        image: PathBuf,
        lock: PathBuf,
        pid: String,
    },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateDiskError + 'a {
    move |source| StateDiskError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A disk size as `--state-disk-size` takes it: bytes, or a number with K, M, G or T (binary
/// units, optionally `KiB`...), a whole number of sectors and at least [`MIN_SIZE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSize(pub u64);

impl std::str::FromStr for DiskSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?}: expected a size such as 32G, 512M or 1073741824"))?;
        let shift = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kib" => 10,
            "m" | "mib" => 20,
            "g" | "gib" => 30,
            "t" | "tib" => 40,
            other => return Err(format!("{s:?}: unknown unit {other:?} (use K, M, G or T)")),
        };
        let bytes = n
            .checked_mul(1u64 << shift)
            .ok_or_else(|| format!("{s:?}: too large"))?;
        if !bytes.is_multiple_of(SECTOR) {
            return Err(format!("{s:?}: not a whole number of 512-byte sectors"));
        }
        if bytes < MIN_SIZE {
            return Err(format!(
                "{s:?}: smaller than the minimum {}",
                human(MIN_SIZE)
            ));
        }
        Ok(Self(bytes))
    }
}

/// `34359738368` as `32 GiB`, `1610612736` as `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    let whole = 1u64 << (10 * unit);
    if bytes.is_multiple_of(whole) {
        format!("{} {}", bytes / whole, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / whole as f64, UNITS[unit])
    }
}

/// The image of the instance in `sdir`.
pub fn image_path(sdir: &StateDir) -> PathBuf {
    sdir.path.join(IMAGE)
}

/// What `--reset` removes for a fresh disk: the image, its record, a half-made image; those
/// that exist. Never the lock.
pub fn reset_paths(sdir: &StateDir) -> Vec<PathBuf> {
    [IMAGE, RECORD, NEW]
        .iter()
        .map(|n| sdir.path.join(n))
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .collect()
}

/// The size asked for: `--state-disk-size`, or the default, which never shrinks a bigger disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub size: u64,
    /// Given on the command line: a size below the image's is then an error, not ignored.
    pub explicit: bool,
}

impl Request {
    pub fn from_flag(flag: Option<DiskSize>) -> Self {
        match flag {
            Some(DiskSize(size)) => Self {
                size,
                explicit: true,
            },
            None => Self {
                size: DEFAULT_SIZE,
                explicit: false,
            },
        }
    }
}

/// What [`prepare`] did to the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Created,
    Grown {
        from: u64,
    },
    Kept,
    /// An image we had no record of, taken as it is.
    Adopted,
}

impl Action {
    /// The action's name in the boot timeline.
    pub fn name(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Grown { .. } => "grown",
            Action::Kept => "kept",
            Action::Adopted => "adopted",
        }
    }
}

/// The image ready for the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub path: PathBuf,
    pub size: u64,
    pub action: Action,
}

impl std::fmt::Display for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.action {
            Action::Created => "created".to_string(),
            Action::Grown { from } => format!("grown from {}", human(from)),
            Action::Kept => "kept".to_string(),
            Action::Adopted => "taken as it is".to_string(),
        };
        write!(
            f,
            "state disk: {} ({}, {what}; serial {STATE_DISK_SERIAL})",
            self.path.display(),
            human(self.size)
        )
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    size_bytes: u64,
}

fn read_record(path: &Path) -> Result<Option<u64>, StateDiskError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io("read", path)(source)),
    };
    serde_json::from_str::<Record>(&text)
        .map(|r| Some(r.size_bytes))
        .map_err(|e| StateDiskError::BadRecord {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
}

fn write_record(path: &Path, size: u64) -> Result<(), StateDiskError> {
    let mut bytes = serde_json::to_vec(&Record { size_bytes: size }).unwrap_or_default();
    bytes.push(b'\n');
    openshell_shared::fsutil::write_atomic(path, &bytes).map_err(io("write", path))
}

/// Makes the image ready for a boot: creates it (sparse, 0600) when missing, checks an existing
/// one (regular file, ours, writable, whole sectors, not shorter than recorded) and grows it when
/// asked for more. `_lock` proves no other VM uses the image meanwhile.
pub fn prepare(
    sdir: &StateDir,
    request: Request,
    _lock: &DiskLock,
) -> Result<Prepared, StateDiskError> {
    let path = image_path(sdir);
    let record_path = sdir.path.join(RECORD);
    let file = match open_image(&path)? {
        Some(f) => f,
        None => {
            create(sdir, request.size)?;
            write_record(&record_path, request.size)?;
            return Ok(Prepared {
                path,
                size: request.size,
                action: Action::Created,
            });
        }
    };
    let len = check_image(&path, &file)?;
    let record = read_record(&record_path)?;
    check_length(&path, len, record, request)?;
    let target = len.max(request.size);
    let action = if target > len {
        // Only ever longer: set_len adds a hole that reads as zeros, the data stays as it was.
        file.set_len(target).map_err(io("grow", &path))?;
        file.sync_all().map_err(io("sync", &path))?;
        Action::Grown { from: len }
    } else if record.is_none() {
        Action::Adopted
    } else {
        Action::Kept
    };
    if record != Some(target) {
        write_record(&record_path, target)?;
    }
    Ok(Prepared {
        path,
        size: target,
        action,
    })
}

/// Opens an existing image read-write without following a link; `None` when there is none.
fn open_image(path: &Path) -> Result<Option<File>, StateDiskError> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    match opened {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(open_error(path, e)),
    }
}

/// Names why an existing image did not open read-write.
fn open_error(path: &Path, e: std::io::Error) -> StateDiskError {
    let path = path.to_path_buf();
    match e.raw_os_error() {
        Some(libc::ELOOP) => StateDiskError::Symlink(path),
        Some(libc::EROFS) => StateDiskError::ReadOnly {
            path,
            why: "on a read-only file system".into(),
        },
        Some(libc::EACCES) | Some(libc::EPERM) => StateDiskError::ReadOnly {
            path,
            why: format!("cannot open it for writing: {e}"),
        },
        _ => io("open", &path)(e),
    }
}

/// Checks an opened image is a regular file of ours with a write permission and whole sectors;
/// returns its length. The mode is checked itself because root opens a 0400 file read-write.
fn check_image(path: &Path, file: &File) -> Result<u64, StateDiskError> {
    let meta = file.metadata().map_err(io("inspect", path))?;
    if !meta.file_type().is_file() {
        return Err(StateDiskError::NotRegular(path.to_path_buf()));
    }
    let ours = nix::unistd::geteuid().as_raw();
    if meta.uid() != ours {
        return Err(StateDiskError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            ours,
        });
    }
    if meta.mode() & 0o200 == 0 {
        return Err(StateDiskError::ReadOnly {
            path: path.to_path_buf(),
            why: format!("mode {:04o} has no write permission", meta.mode() & 0o7777),
        });
    }
    if !meta.len().is_multiple_of(SECTOR) {
        return Err(StateDiskError::NotSectors {
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    Ok(meta.len())
}

/// Refuses an image shorter than we made it, an unknown one shorter than asked for, and an
/// explicit request below the image's size.
fn check_length(
    path: &Path,
    len: u64,
    record: Option<u64>,
    request: Request,
) -> Result<(), StateDiskError> {
    let truncated = |expected, why, hint: String| StateDiskError::Truncated {
        path: path.to_path_buf(),
        len,
        expected,
        why,
        hint,
    };
    match record {
        Some(made) if len < made => {
            return Err(truncated(
                made,
                "the size openshell-host gave it",
                "restore it, or `up --reset` for a fresh disk".into(),
            ))
        }
        None if len < request.size => {
            return Err(truncated(
                request.size,
                "the size asked for, and openshell-host has no record of making it",
                format!(
                    "to use it as it is, pass --state-disk-size {len}; `up --reset` starts a \
                     fresh disk"
                ),
            ))
        }
        _ => {}
    }
    if request.explicit && request.size < len {
        return Err(StateDiskError::Shrink {
            path: path.to_path_buf(),
            len,
            requested: request.size,
        });
    }
    Ok(())
}

/// Makes a new sparse image of `size` bytes beside the final name and renames it into place, so
/// a crash never leaves a short image under the real name.
fn create(sdir: &StateDir, size: u64) -> Result<(), StateDiskError> {
    let new = sdir.path.join(NEW);
    let path = image_path(sdir);
    // Only ever made by us under the lock: a leftover is from a crash and holds no data.
    match std::fs::remove_file(&new) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", &new)(e)),
        _ => {}
    }
    let result = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&new)
            .map_err(io("create", &new))?;
        f.set_len(size).map_err(io("size", &new))?;
        f.sync_all().map_err(io("sync", &new))?;
        std::fs::rename(&new, &path).map_err(io("rename into place", &path))?;
        File::open(&sdir.path)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &sdir.path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&new);
    }
    result
}

/// The image as `status` shows it: apparent size and the bytes it occupies on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub path: PathBuf,
    pub apparent: u64,
    pub allocated: u64,
}

/// `None` when the instance has no image; never follows a link.
pub fn usage(sdir: &StateDir) -> Option<Usage> {
    let path = image_path(sdir);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    Some(Usage {
        apparent: meta.len(),
        allocated: meta.blocks() * 512,
        path,
    })
}

/// The exclusive lock on an instance's state disk: while it is held no other VM opens the image.
/// A sibling file rather than the image itself, since qemu on macOS locks the image with POSIX
/// locks, which conflict with a `flock` there. Dropping it closes our descriptor without
/// unlocking: the lock belongs to the open file, so it lasts while a VMM that inherited the
/// descriptor lives (an explicit unlock would release it for the VMM too).
#[derive(Debug)]
pub struct DiskLock {
    file: File,
}

/// Takes the lock without waiting and records our pid in it (information only).
pub fn lock(sdir: &StateDir) -> Result<DiskLock, StateDiskError> {
    let path = sdir.path.join(LOCK);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io("open", &path))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io("lock", &path)(e));
        }
        return Err(StateDiskError::Busy {
            image: image_path(sdir),
            pid: std::fs::read_to_string(&path)
                .map(|t| t.trim().to_string())
                .ok()
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "unknown".into()),
            lock: path,
        });
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{}", std::process::id());
    Ok(DiskLock { file })
}

impl DiskLock {
    /// The descriptor the VMM inherits, so the disk stays locked while the VMM lives, even if
    /// `up` dies first.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const MIB: u64 = 1 << 20;

    fn sdir(tmp: &tempfile::TempDir) -> StateDir {
        let dir = StateDir::at("t", tmp.path().join("t"));
        dir.create().expect("create");
        dir
    }

    fn ask(size: u64) -> Request {
        Request {
            size,
            explicit: true,
        }
    }

    /// Content marks at the start and the end, so a test sees any byte the host changed.
    fn mark(path: &Path) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open");
        let len = f.metadata().expect("meta").len();
        f.write_all_at(b"guest data at the start", 0).expect("mark");
        f.write_all_at(b"and at the end", len - 14).expect("mark");
        std::fs::read(path).expect("read")
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        let p = |s: &str| s.parse::<DiskSize>().map(|d| d.0);
        assert_eq!(p("32G"), Ok(32 << 30));
        assert_eq!(p("32GiB"), Ok(32 << 30));
        assert_eq!(p("512m"), Ok(512 << 20));
        assert_eq!(p("1T"), Ok(1 << 40));
        assert_eq!(p("67108864"), Ok(64 << 20));
        assert!(p("63M").unwrap_err().contains("minimum 64 MiB"));
        assert!(p("67108865").unwrap_err().contains("512-byte sectors"));
        assert!(p("32X").unwrap_err().contains("unknown unit"));
        assert!(p("G").is_err() && p("").is_err() && p("-1G").is_err());
        assert!(p("99999999999T").unwrap_err().contains("too large"));
        assert_eq!(human(32 << 30), "32 GiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(0), "0 B");
        assert_eq!(human(4096), "4 KiB");
    }

    #[test]
    fn a_new_disk_is_sparse_private_and_recorded() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = sdir(&tmp);
        let lock = lock(&dir).expect("lock");
        let p = prepare(&dir, Request::from_flag(None), &lock).expect("prepare");
        assert_eq!(p.action, Action::Created);
        assert_eq!(p.size, DEFAULT_SIZE);
        assert_eq!(p.path, dir.path.join("state.img"));
        let meta = std::fs::metadata(&p.path).expect("meta");
        assert_eq!(meta.len(), DEFAULT_SIZE);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let u = usage(&dir).expect("usage");
        assert_eq!(u.apparent, DEFAULT_SIZE);
        assert!(u.allocated < MIB, "sparse: {} bytes allocated", u.allocated);
        assert!(!dir.path.join(NEW).exists());
        assert_eq!(
            read_record(&dir.path.join(RECORD)).expect("record"),
            Some(DEFAULT_SIZE)
        );
        let again = prepare(&dir, Request::from_flag(None), &lock).expect("again");
        assert_eq!(again.action, Action::Kept);
        assert!(again
            .to_string()
            .contains("32 GiB, kept; serial openshell-state"));
    }

    #[test]
    fn growing_keeps_the_data_and_shrinking_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = sdir(&tmp);
        let lock = lock(&dir).expect("lock");
        let p = prepare(&dir, ask(32 * MIB), &lock).expect("create");
        let before = mark(&p.path);
        let grown = prepare(&dir, ask(64 * MIB), &lock).expect("grow");
        assert_eq!(grown.action, Action::Grown { from: 32 * MIB });
        let after = std::fs::read(&p.path).expect("read");
        assert_eq!(after.len() as u64, 64 * MIB);
        assert_eq!(&after[..before.len()], before.as_slice(), "old bytes kept");
        assert!(
            after[before.len()..].iter().all(|b| *b == 0),
            "new tail is zeros"
        );
        let err = prepare(&dir, ask(32 * MIB), &lock).unwrap_err();
        assert!(matches!(err, StateDiskError::Shrink { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("is 64 MiB") && msg.contains("would shrink"),
            "{msg}"
        );
        // The default never shrinks either, but a bigger disk is no error then.
        assert_eq!(
            prepare(
                &dir,
                Request {
                    size: 32 * MIB,
                    explicit: false
                },
                &lock
            )
            .expect("default")
            .action,
            Action::Kept
        );
        assert_eq!(std::fs::read(&p.path).expect("read"), after, "unchanged");
    }

    #[test]
    fn a_truncated_image_is_refused_and_left_alone() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = sdir(&tmp);
        let lock = lock(&dir).expect("lock");
        let p = prepare(&dir, ask(32 * MIB), &lock).expect("create");
        mark(&p.path);
        // Shorter than recorded, in whole sectors.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p.path)
            .and_then(|f| f.set_len(16 * MIB))
            .expect("truncate");
        let bytes = std::fs::read(&p.path).expect("read");
        let err = prepare(&dir, ask(32 * MIB), &lock).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StateDiskError::Truncated { .. }), "{msg}");
        assert!(msg.contains(&p.path.display().to_string()), "{msg}");
        assert!(
            msg.contains("16777216 bytes, shorter than 33554432"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&p.path).expect("read"), bytes);
        // Not a whole number of sectors.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p.path)
            .and_then(|f| f.set_len(32 * MIB + 100))
            .expect("odd length");
        let bytes = std::fs::read(&p.path).expect("read");
        let err = prepare(&dir, ask(32 * MIB), &lock).unwrap_err();
        assert!(
            matches!(err, StateDiskError::NotSectors { len, .. } if len == 32 * MIB + 100),
            "{err}"
        );
        assert_eq!(std::fs::read(&p.path).expect("read"), bytes);
    }

    #[test]
    fn an_image_we_did_not_make_is_taken_only_when_big_enough() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = sdir(&tmp);
        let lock = lock(&dir).expect("lock");
        let path = image_path(&dir);
        std::fs::write(&path, vec![7u8; 32 * MIB as usize]).expect("image");
        let err = prepare(&dir, ask(64 * MIB), &lock).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("no record") && msg.contains("--state-disk-size 33554432"),
            "{msg}"
        );
        assert!(std::fs::read(&path).expect("read").iter().all(|b| *b == 7));
        let p = prepare(&dir, ask(32 * MIB), &lock).expect("adopt");
        assert_eq!((p.action, p.size), (Action::Adopted, 32 * MIB));
        assert!(std::fs::read(&path).expect("read").iter().all(|b| *b == 7));
        // From now on it is ours: the default grows it.
        assert_eq!(
            prepare(
                &dir,
                Request {
                    size: 48 * MIB,
                    explicit: false
                },
                &lock
            )
            .expect("grow")
            .action,
            Action::Grown { from: 32 * MIB }
        );
    }

    #[test]
    fn a_read_only_image_is_refused_even_for_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = sdir(&tmp);
        let lock = lock(&dir).expect("lock");
        let p = prepare(&dir, ask(16 * MIB), &lock).expect("create");
        let bytes = mark(&p.path);
        std::fs::set_permissions(&p.path, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        let err = prepare(&dir, ask(32 * MIB), &lock).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StateDiskError::ReadOnly { .. }), "{msg}");
        assert!(msg.contains(&p.path.display().to_string()), "{msg}");
        assert_eq!(
            std::fs::metadata(&p.path).expect("meta").len(),
            16 * MIB,
            "not grown"
        );
        assert_eq!(std::fs::read(&p.path).expect("read"), bytes);
        // A read-only file system is named as such.
        let e = open_error(&p.path, std::io::Error::from_raw_os_error(libc::EROFS));
        assert!(e.to_string().contains("read-only file system"), "{e}");
    }

    #[test]
    fn links_and_other_files_are_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = sdir(&tmp);
        let lock = lock(&dir).expect("lock");
        let target = tmp.path().join("elsewhere.img");
        std::fs::write(&target, vec![1u8; 16 * MIB as usize]).expect("target");
        std::os::unix::fs::symlink(&target, image_path(&dir)).expect("link");
        let err = prepare(&dir, ask(16 * MIB), &lock).unwrap_err();
        assert!(matches!(err, StateDiskError::Symlink(_)), "{err}");
        assert_eq!(std::fs::metadata(&target).expect("meta").len(), 16 * MIB);
        std::fs::remove_file(image_path(&dir)).expect("unlink");
        std::fs::create_dir(image_path(&dir)).expect("dir");
        let err = prepare(&dir, ask(16 * MIB), &lock).unwrap_err();
        assert!(
            matches!(
                err,
                StateDiskError::NotRegular(_) | StateDiskError::Io { .. }
            ),
            "{err}"
        );
    }

    /// Needs root to give the image away; skipped otherwise.
    #[test]
    fn an_image_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = sdir(&tmp);
        let lock = lock(&dir).expect("lock");
        let p = prepare(&dir, ask(16 * MIB), &lock).expect("create");
        std::os::unix::fs::chown(&p.path, Some(65534), None).expect("chown");
        let err = prepare(&dir, ask(16 * MIB), &lock).unwrap_err();
        assert!(
            matches!(err, StateDiskError::NotOwned { owner: 65534, .. }),
            "{err}"
        );
    }

    #[test]
    fn reset_paths_name_the_image_and_its_record_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = sdir(&tmp);
        assert!(reset_paths(&dir).is_empty());
        let lock = lock(&dir).expect("lock");
        prepare(&dir, ask(16 * MIB), &lock).expect("create");
        assert_eq!(
            reset_paths(&dir),
            vec![dir.path.join("state.img"), dir.path.join("state-disk.json")]
        );
        assert!(dir.path.join("state.img.lock").exists());
    }

    /// A second lock fails naming the image and the pid; a child that inherited the descriptor
    /// keeps the disk locked after we let go, until it exits.
    #[test]
    fn the_lock_excludes_a_second_vm_and_outlives_us_in_the_vmm() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = sdir(&tmp);
        let held = lock(&dir).expect("first");
        match lock(&dir) {
            Err(StateDiskError::Busy { image, pid, .. }) => {
                assert_eq!(image, image_path(&dir));
                assert_eq!(pid, std::process::id().to_string());
            }
            other => panic!("{other:?}"),
        }
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        crate::children::keep_open(&mut cmd, held.raw_fd());
        let mut child = cmd.spawn().expect("spawn");
        drop(held);
        let still = lock(&dir);
        assert!(
            matches!(still, Err(StateDiskError::Busy { .. })),
            "{still:?}"
        );
        child.kill().expect("kill");
        child.wait().expect("wait");
        lock(&dir).expect("free once the child is gone");
    }
}
