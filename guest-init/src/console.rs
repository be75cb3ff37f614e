//! The kernel console: init's human-readable log. Lines carry the boot clock so they line up with
//! the kernel's own `[    1.234567]` prefixes.

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};

use openshell_init::clock::boottime_us;

/// Writes one line to standard error (the console when init runs as PID 1). Failures are ignored:
/// before devtmpfs is mounted there may be no console at all, and logging must never stop boot.
pub fn log(text: &str) {
    let us = boottime_us();
    let line = format!(
        "[{:5}.{:06}] openshell-init: {text}\n",
        us / 1_000_000,
        us % 1_000_000
    );
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// If the kernel could not open `/dev/console` for us (the root filesystem has no device node),
/// fds 0-2 are closed; once devtmpfs is mounted, attach them to the console.
pub fn ensure_stdio(dev_console: &std::path::Path) {
    let closed: Vec<i32> = (0..3).filter(|fd| !fd_is_open(*fd)).collect();
    if closed.is_empty() {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev_console)
    else {
        return;
    };
    for fd in closed {
        // SAFETY: dup2 onto a closed standard descriptor; `console` stays open for the call.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

fn fd_is_open(fd: i32) -> bool {
    // SAFETY: only used to query flags; a closed descriptor yields EBADF.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    nix::fcntl::fcntl(borrowed.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).is_ok()
}
