//! The end of the VM: flush and unmount filesystems, report the exit, and power off so that the VMM ends.
//!
//! Power-off is `reboot(RB_AUTOBOOT)`: the VMMs we run under end on a guest reset (qemu with
//! `-no-reboot`, libkrun), while RB_POWER_OFF has no way out on x86 microvm without ACPI and
//! would leave PID 1 to return and panic the kernel.

use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::mount::MsFlags;
use openshell_shared::{GuestMessage, Level};

use crate::console;
use crate::reporter::Reporter;

/// Exit statuses init uses for its own failures (the workload's own are 0-255 as the shell sees
/// them; these stay distinct from common shell codes).
pub const STATUS_FATAL_BOOT: i32 = 251;
pub const STATUS_INIT_PANIC: i32 = 250;

/// libkrun's virtio-fs takes the VM's exit code through this ioctl on the root directory.
const KRUN_EXIT_CODE_IOCTL: libc::c_ulong = 0x7602;
const VIRTIOFS_MAGIC: i64 = 0x6573_5546;

/// Peak resident set size of this process in KiB.
pub fn peak_rss_kib() -> u64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| u.max_rss().max(0) as u64)
        .unwrap_or(0)
}

/// Syncs and, as PID 1, unmounts everything mounted since boot (the state disk among it, after
/// its binds and whatever the workload left mounted on it) and remounts the root read-only.
/// Returns whether all of it worked.
pub fn sync_filesystems(pid1: bool, reporter: &Reporter) -> bool {
    nix::unistd::sync();
    if !pid1 {
        return true;
    }
    let keep: Vec<&str> = crate::phases::mounts::TABLE
        .iter()
        .map(|m| m.target)
        .collect();
    let torn = crate::teardown::unmount_all(std::path::Path::new("/"), &keep);
    let mut ok = torn.busy.is_empty();
    if !ok {
        let list: Vec<String> = torn
            .busy
            .iter()
            .map(|(p, e)| format!("{} ({e})", p.display()))
            .collect();
        reporter.log(
            Level::Warn,
            format!(
                "unmounted {} filesystems; still busy, detached: {}",
                torn.unmounted,
                list.join(", ")
            ),
        );
    } else if torn.unmounted > 0 {
        reporter.log(
            Level::Info,
            format!("unmounted {} filesystems", torn.unmounted),
        );
    }
    if let Err(e) = nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        reporter.log(Level::Warn, format!("remount / read-only failed: {e}"));
        ok = false;
    }
    ok
}

/// Reports the exit and ends the VM (or, outside a VM, the process) with `status`.
pub fn finish(reporter: &Reporter, status: i32, pid1: bool) -> ! {
    let synced = sync_filesystems(pid1, reporter);
    reporter.emit(GuestMessage::Exit {
        status,
        peak_rss_kib: peak_rss_kib(),
        synced,
    });
    reporter.close(Duration::from_secs(1));
    power_off(status, pid1)
}

/// Ends the VM without reporting (the panic path, or after [`finish`]).
pub fn power_off(status: i32, pid1: bool) -> ! {
    if !pid1 {
        std::process::exit(status);
    }
    set_libkrun_exit_code(status);
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // PID 1 must never return: that panics the kernel.
    console::log(&format!("reboot failed ({err:?}); halting here"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn set_libkrun_exit_code(status: i32) {
    let Ok(root) = std::fs::File::open("/") else {
        return;
    };
    // The type's width differs between libcs (c_long on glibc, c_ulong on musl).
    #[allow(clippy::unnecessary_cast)]
    let on_virtiofs = nix::sys::statfs::fstatfs(&root)
        .map(|s| s.filesystem_type().0 as i64 == VIRTIOFS_MAGIC)
        .unwrap_or(false);
    if on_virtiofs {
        // SAFETY: an integer-argument ioctl on an open directory fd. Other virtio-fs daemons
        // answer ENOTTY/ENOSYS, which is fine: the host also gets the status in `exit`.
        unsafe {
            libc::ioctl(
                root.as_raw_fd(),
                KRUN_EXIT_CODE_IOCTL as _,
                status as libc::c_long,
            )
        };
    }
}
