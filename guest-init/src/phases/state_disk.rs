//! The `state-disk` phase: the block device that holds everything k3s, containerd and the PKI
//! write, when the host attached one (`openshell.state_disk=` names it). Found by identity
//! ([`device`]), never guessed; formatted only when provably blank ([`ondisk`], [`e2fs`]): a
//! foreign filesystem, a partition table, unknown data or a read error stops the boot with
//! what was found and the disk untouched. Then mounted `noatime` (after `e2fsck -p` if ext4
//! recorded errors; a journal replay is reported), grown online when the disk grew, seeded on
//! first use from the root before any bind hides it ([`seed`]), and bound over the guest paths
//! of [`layout::BINDS`], so the phases after it work on the disk's copies. Power-off unmounts
//! it (`crate::teardown`).

mod copy;
mod device;
mod e2fs;
mod layout;
mod ondisk;
mod seed;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::MsFlags;
use openshell_init::clock::Stopwatch;
use openshell_shared::Level;

use crate::context::{Ctx, StateDiskInUse};
use crate::engine::phase::{Done, Phase, PhaseResult};
use device::{Device, DeviceError};
use e2fs::E2fs;
use layout::{BINDS, MOUNT_POINT, STATE_DIR};
use ondisk::{Content, Ext};

pub const PHASE: Phase = Phase {
    name: "state-disk",
    after: &["mounts", "config"],
    fatal: true,
    waits: false,
    purpose: "find the state disk, format it only if blank, mount, seed and bind it",
    run,
};

/// A blank disk smaller than this is refused (a truncated image, most likely): kine alone
/// wants 64 MiB free.
pub const MIN_FORMAT_BYTES: u64 = 64 << 20;
/// The disk is grown when it exceeds the filesystem by this much: mke2fs and resize2fs leave
/// a tail too short for a block group unused, which must not start a resize at every boot.
pub const GROW_MIN_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StateDiskError {
    #[error(
        "{device} is read-only: the state disk must be writable (is its image file read-only?)"
    )]
    ReadOnly { device: String },
    #[error("{device} holds {found}: not formatting it; a state disk is blank or holds the ext4 filesystem labelled `{}` made on an earlier boot", ondisk::LABEL)]
    Foreign { device: String, found: String },
    #[error("{source}; not formatting or mounting it")]
    Unreadable { source: DeviceError },
    #[error("{device} is blank but only {size} bytes: too small for a state disk (at least {} MiB); a truncated image?", MIN_FORMAT_BYTES >> 20)]
    TooSmall { device: String, size: u64 },
    #[error("{device}: its ext4 filesystem is {fs} bytes but the device only {size}: the image was truncated; not mounting it")]
    Truncated { device: String, fs: u64, size: u64 },
    #[error("{device}: after {step} it holds {found}, not our ext4")]
    NotOursAfter {
        device: String,
        step: &'static str,
        found: String,
    },
    #[error("{device}: something is already mounted on {mount_point}")]
    AlreadyMounted { device: String, mount_point: String },
    #[error("mount {device} (ext4) on {target} failed: {errno} ({desc})", desc = errno.desc())]
    Mount {
        device: String,
        target: String,
        errno: Errno,
    },
    #[error("{target}: {what}: {source}")]
    Target {
        target: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{target} in the root is a symbolic link: not binding the state disk over it")]
    LinkTarget { target: String },
    #[error("{name} on the state disk is not a directory (a link?): not binding it")]
    NotDirOnDisk { name: String },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Tool(#[from] e2fs::ToolError),
}

/// What the phase did, for its report.
#[derive(Debug, Default)]
struct Report {
    /// Finding, opening and reading the disk, formatting or checking included.
    check_ms: f64,
    formatted_ms: Option<f64>,
    fsck: Option<(e2fs::Checked, f64)>,
    replayed: bool,
    unclean: bool,
    mount_ms: f64,
    grew: Option<(u64, f64)>,
    seeded: Option<seed::Seeded>,
    /// Seeding, or finding the marker that says it is done.
    seed_ms: f64,
    binds: usize,
    binds_ms: f64,
}

fn ms(w: &Stopwatch) -> f64 {
    w.elapsed_us() as f64 / 1000.0
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

fn run(ctx: &Ctx) -> PhaseResult {
    let Some(named) = ctx.config().state_disk.device.clone() else {
        return Ok(Done::Skipped(
            "no state disk attached (no openshell.state_disk= on the kernel command line)".into(),
        ));
    };
    let w = Stopwatch::start();
    let shown = device::find(&ctx.root, &named)?;
    let dev = Device::open(&ctx.root, &shown)?;
    let (path, size) = (dev.path.clone(), dev.size);
    let tools = E2fs::new(&ctx.root, ctx.pid1);
    let mut report = Report::default();
    let ext = prepare(ctx, dev, &tools, &mut report)?;
    report.check_ms = ms(&w);
    let mount_point = ctx.path(MOUNT_POINT);
    mount(&path, &shown, &mount_point, &ext, &mut report)?;
    if size >= ext.bytes() + GROW_MIN_BYTES {
        grow(ctx, &tools, &path, &shown, (size, ext.bytes()), &mut report);
    }
    let w = Stopwatch::start();
    let seeded = seed::ensure(&ctx.root, &mount_point, &shown)?;
    report.seed_ms = ms(&w);
    if let Some(s) = seeded {
        ctx.reporter.log(
            Level::Info,
            format!(
                "state-disk: first use: seeded {} entries ({} MiB) from {} in {:.1} ms",
                s.copied.entries,
                mib(s.copied.bytes),
                if s.from_root.is_empty() {
                    "nothing in the root".to_string()
                } else {
                    s.from_root.join(", ")
                },
                report.seed_ms
            ),
        );
        report.seeded = Some(s);
    }
    let bound = bind(&ctx.root, &mount_point, &mut report)?;
    let _ = ctx.state_disk.set(StateDiskInUse {
        device: shown.clone(),
        named: named.clone(),
        bound,
    });
    Ok(Done::Ok(Some(describe(
        &shown,
        &named,
        &mount_point,
        &report,
    ))))
}

/// Grows the mounted filesystem to the disk's `(size, fs)`; a failure is a warning: the disk
/// still works at its old size.
fn grow(
    ctx: &Ctx,
    tools: &E2fs,
    path: &Path,
    shown: &str,
    (size, fs): (u64, u64),
    report: &mut Report,
) {
    let w = Stopwatch::start();
    match tools.grow(path, shown, ondisk::fs_blocks(size)) {
        Ok(()) => report.grew = Some((fs, ms(&w))),
        Err(e) => ctx.reporter.log(
            Level::Warn,
            format!(
                "state-disk: the disk is {} MiB, its filesystem {} MiB, and growing it failed: {e}; going on at the old size",
                mib(size),
                mib(fs)
            ),
        ),
    }
}

/// Reads what the disk holds and makes it our filesystem, ready to mount: formats a blank
/// disk (or one whose format a killed boot cut short: [`ondisk::intent`]), runs `e2fsck -p` on
/// one that recorded errors, refuses anything else. The device is closed before mke2fs or
/// e2fsck open it exclusively.
fn prepare(
    ctx: &Ctx,
    dev: Device,
    tools: &E2fs,
    report: &mut Report,
) -> Result<Ext, StateDiskError> {
    let shown = dev.shown.clone();
    if dev.read_only {
        return Err(StateDiskError::ReadOnly { device: shown });
    }
    let unreadable = |source| StateDiskError::Unreadable { source };
    let head = dev.read_at(0, ondisk::HEAD_LEN).map_err(unreadable)?;
    let (path, size) = (dev.path.clone(), dev.size);
    let tail = dev
        .read_at(ondisk::intent_offset(size), ondisk::INTENT_LEN)
        .map_err(unreadable)?;
    let step = match ondisk::identify(&head) {
        _ if ondisk::is_intent(&tail, size) => {
            drop(dev);
            ctx.reporter.log(
                Level::Warn,
                format!(
                    "state-disk: a format of {shown} was cut short on an earlier boot (its intent is at byte {}): formatting it again",
                    ondisk::intent_offset(size)
                ),
            );
            format(ctx, tools, (&path, &shown, size), report)?;
            "formatting"
        }
        Content::Ours(ext) if ext.bytes() > size => {
            return Err(StateDiskError::Truncated {
                device: shown,
                fs: ext.bytes(),
                size,
            })
        }
        Content::Ours(ext) if !ext.has_errors() => return Ok(ext),
        Content::Ours(_) => {
            drop(dev);
            let w = Stopwatch::start();
            let checked = tools.check(&path, &shown)?;
            report.fsck = Some((checked, ms(&w)));
            "e2fsck"
        }
        Content::Foreign(found) => {
            return Err(StateDiskError::Foreign {
                device: shown,
                found,
            })
        }
        Content::Zero => {
            ensure_blank(&dev)?;
            drop(dev);
            format(ctx, tools, (&path, &shown, size), report)?;
            "formatting"
        }
    };
    let again = Device::open(&ctx.root, &shown)?;
    let found = ondisk::identify(&again.read_at(0, ondisk::HEAD_LEN).map_err(unreadable)?);
    drop(again);
    match found {
        Content::Ours(ext) if !ext.has_errors() || step == "e2fsck" => {
            if step == "formatting" {
                // Whole now: the intent goes before anything mounts it.
                let zeros = vec![0u8; ondisk::INTENT_LEN];
                device::write_synced(&path, &shown, ondisk::intent_offset(size), &zeros)?;
            }
            Ok(ext)
        }
        Content::Ours(_) => Err(StateDiskError::NotOursAfter {
            device: shown,
            step,
            found: "an ext4 filesystem that still records errors".into(),
        }),
        Content::Zero => Err(StateDiskError::NotOursAfter {
            device: shown,
            step,
            found: "zeros".into(),
        }),
        Content::Foreign(found) => Err(StateDiskError::NotOursAfter {
            device: shown,
            step,
            found,
        }),
    }
}

/// Formats the closed device `(path, shown, size)`: the intent written and synced first, then
/// mke2fs over all but the reserved tail.
fn format(
    ctx: &Ctx,
    tools: &E2fs,
    (path, shown, size): (&Path, &str, u64),
    report: &mut Report,
) -> Result<(), StateDiskError> {
    device::write_synced(
        path,
        shown,
        ondisk::intent_offset(size),
        &ondisk::intent(size),
    )?;
    let w = Stopwatch::start();
    tools.format(path, shown, ondisk::fs_blocks(size))?;
    let took = ms(&w);
    report.formatted_ms = Some(took);
    ctx.reporter.log(
        Level::Info,
        format!(
            "state-disk: first use: formatted the blank {shown} ({} MiB) as ext4 in {took:.1} ms",
            mib(size)
        ),
    );
    Ok(())
}

/// Every region a blank disk has zeros in ([`ondisk::blank_regions`]) does, and the disk is
/// big enough to be worth formatting.
fn ensure_blank(dev: &Device) -> Result<(), StateDiskError> {
    for (offset, len) in ondisk::blank_regions(dev.size) {
        let bytes = dev
            .read_at(offset, len as usize)
            .map_err(|source| StateDiskError::Unreadable { source })?;
        let found = match ondisk::identify(&bytes) {
            Content::Zero => continue,
            Content::Foreign(what) if offset == 0 => what,
            _ => match ondisk::parse_superblock(&bytes) {
                Some(Ok(ext)) => format!(
                    "zeros in its first MiB, but a backup superblock of {} at byte {offset} (e2fsck can recover that filesystem)",
                    ext.describe()
                ),
                _ => {
                    let at = offset + ondisk::first_nonzero(&bytes).unwrap_or(0) as u64;
                    format!("zeros in its first MiB, but data at byte {at}")
                }
            },
        };
        return Err(StateDiskError::Foreign {
            device: dev.shown.clone(),
            found,
        });
    }
    if dev.size < MIN_FORMAT_BYTES {
        return Err(StateDiskError::TooSmall {
            device: dev.shown.clone(),
            size: dev.size,
        });
    }
    Ok(())
}

/// ext4's options. mke2fs leaves the inode tables uninitialised (`lazy_itable_init`), which
/// ext4 tracks per block group and needs no zeroing to be correct; without `noinit_itable` the
/// kernel would zero them in the background after the first mount anyway, hundreds of MiB of
/// writes on a big disk that turn a sparse image file into allocated space on the host.
const MOUNT_DATA: &str = "noinit_itable";

/// Mounts the filesystem `noatime` on the mount point, which must have nothing mounted.
fn mount(
    path: &Path,
    shown: &str,
    mount_point: &Path,
    ext: &Ext,
    report: &mut Report,
) -> Result<(), StateDiskError> {
    let shown_mp = MOUNT_POINT.to_string();
    std::fs::create_dir_all(mount_point).map_err(|source| StateDiskError::Target {
        target: shown_mp.clone(),
        what: "create the mount point",
        source,
    })?;
    let mounted = crate::mountinfo::is_mount_point(mount_point).unwrap_or_else(|| {
        let table = crate::mountinfo::read().unwrap_or_default();
        crate::mountinfo::find(&table, mount_point).is_some()
    });
    if mounted {
        return Err(StateDiskError::AlreadyMounted {
            device: shown.into(),
            mount_point: shown_mp,
        });
    }
    let w = Stopwatch::start();
    // The exclusive claim of e2fsck or of the blank check's own open can outlive them by a
    // moment, and mount(2) claims the device exclusively too.
    device::waiting_out_busy(
        || {
            nix::mount::mount(
                Some(path),
                mount_point,
                Some("ext4"),
                MsFlags::MS_NOATIME,
                Some(MOUNT_DATA),
            )
        },
        |e| *e == Errno::EBUSY,
    )
    .map_err(|errno| StateDiskError::Mount {
        device: shown.into(),
        target: shown_mp,
        errno,
    })?;
    report.mount_ms = ms(&w);
    report.replayed = ext.needs_recovery;
    report.unclean = !ext.clean;
    Ok(())
}

/// Binds each of the disk's directories over its guest path, in a root that has the bind's
/// anchor. Returns the guest paths bound.
fn bind(
    root: &Path,
    mount_point: &Path,
    report: &mut Report,
) -> Result<Vec<&'static str>, StateDiskError> {
    let w = Stopwatch::start();
    let mut bound = Vec::new();
    for b in BINDS {
        if !crate::remove::is_real_dir(&openshell_init::guest_path::under(root, b.anchor)) {
            continue;
        }
        let target = openshell_init::guest_path::under(root, b.target);
        let err = |what| {
            move |source| StateDiskError::Target {
                target: b.target.into(),
                what,
                source,
            }
        };
        if target
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(StateDiskError::LinkTarget {
                target: b.target.into(),
            });
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(b.mode)
            .create(&target)
            .map_err(err("create"))?;
        let source: PathBuf = mount_point.join(STATE_DIR).join(b.name);
        // What pods wrote lives on the disk: never bind through a link planted there.
        if !crate::remove::is_real_dir(&source) {
            return Err(StateDiskError::NotDirOnDisk {
                name: format!("{STATE_DIR}/{}", b.name),
            });
        }
        nix::mount::mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| err("bind the state disk over it")(e.into()))?;
        bound.push(b.target);
    }
    report.binds = bound.len();
    report.binds_ms = ms(&w);
    Ok(bound)
}

/// The phase's line: device, size and free space, and what was done, with the time each took.
fn describe(shown: &str, named: &str, mount_point: &Path, r: &Report) -> String {
    let mut parts = Vec::new();
    let (size, free) = seed::space(mount_point).unwrap_or((0, 0));
    let name = if named == shown {
        shown.to_string()
    } else {
        format!("{shown} (serial {named})")
    };
    parts.push(format!(
        "{name}: ext4 {} MiB, {} MiB free; found and checked in {:.1} ms",
        mib(size),
        mib(free),
        r.check_ms
    ));
    if let Some(t) = r.formatted_ms {
        parts.push(format!("formatted in {t:.1} ms"));
    }
    if let Some((c, t)) = &r.fsck {
        parts.push(format!(
            "e2fsck -p (the filesystem recorded errors): status {} in {t:.1} ms: {}",
            c.status, c.output
        ));
    }
    parts.push(match (r.replayed, r.unclean) {
        (true, _) => format!(
            "not cleanly unmounted: journal replayed by the mount in {:.1} ms",
            r.mount_ms
        ),
        (false, true) => format!(
            "not cleanly unmounted (nothing to replay); mounted in {:.1} ms",
            r.mount_ms
        ),
        (false, false) => format!("journal clean; mounted in {:.1} ms", r.mount_ms),
    });
    if let Some((from, t)) = r.grew {
        parts.push(format!("grown from {} MiB in {t:.1} ms", mib(from)));
    }
    parts.push(match &r.seeded {
        Some(s) => format!(
            "seeded {} entries ({} MiB) in {:.1} ms",
            s.copied.entries,
            mib(s.copied.bytes),
            r.seed_ms
        ),
        None => format!(
            "seeded on an earlier boot (marker read in {:.1} ms)",
            r.seed_ms
        ),
    });
    parts.push(format!("{} binds in {:.1} ms", r.binds, r.binds_ms));
    parts.join("; ")
}

#[cfg(test)]
#[path = "../../tests/support/loop_disk.rs"]
mod loop_disk;
#[cfg(test)]
mod loop_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that fails its reads is neither formatted nor mounted, and the error says so.
    #[test]
    fn a_read_error_stops_before_anything_is_written() {
        let (_t, dev) = Device::failing_reads("/dev/vdb", 1 << 30);
        let err = ensure_blank(&dev).unwrap_err().to_string();
        assert!(
            err.starts_with("/dev/vdb: read error at byte 0: ")
                && err.ends_with("; not formatting or mounting it"),
            "{err}"
        );
    }
}
