//! The open-file limit (RLIMIT_NOFILE), raised at start to as far as the hard limit allows:
//! libkrun's virtio-fs (in the VMM, which inherits the limit) holds a host descriptor for every
//! guest file the guest kernel keeps open or cached, and macOS starts processes with a soft
//! limit of 256. On macOS the soft limit may not exceed `kern.maxfilesperproc` (nor `OPEN_MAX`
//! when the hard limit is unlimited): the target is clamped so setrlimit succeeds.
//!
//! [`NEEDED`] is the level below which `up` warns.

/// Open files below which `up` warns: 10240, macOS's `OPEN_MAX`, the most every Mac allows a
/// process by default. A k3s node's root over virtio-fs keeps thousands of inodes cached (k3s's
/// unpacked data directory alone holds about two thousand files), each a descriptor in the
/// VMM; 256 runs out during k3s's start, 1024 under a gateway with a sandbox.
pub const NEEDED: u64 = 10240;

/// macOS's `OPEN_MAX` (sys/syslimits.h): what setrlimit accepts for an unlimited hard limit.
#[cfg_attr(not(any(target_os = "macos", test)), allow(dead_code))]
pub const OPEN_MAX: u64 = 10240;

/// The limit before and after the raise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raise {
    pub before: u64,
    pub now: u64,
    pub hard: u64,
}

impl Raise {
    /// The line for `up`'s output: what it is now and, below [`NEEDED`], what to do.
    pub fn describe(&self) -> String {
        let shown = |n: u64| {
            if n == libc::RLIM_INFINITY {
                "unlimited".to_string()
            } else {
                n.to_string()
            }
        };
        let mut line = if self.now > self.before {
            format!(
                "open files: {} (raised from {}; hard limit {})",
                self.now,
                self.before,
                shown(self.hard)
            )
        } else {
            format!("open files: {} (hard limit {})", self.now, shown(self.hard))
        };
        if let Some(w) = self.warning() {
            line.push_str("; warning: ");
            line.push_str(&w);
        }
        line
    }

    /// Why the limit is too low, when it is.
    pub fn warning(&self) -> Option<String> {
        (self.now < NEEDED).then(|| {
            format!(
                "below the {NEEDED} a k3s root over libkrun's virtio-fs may need; raise the hard \
                 limit (`ulimit -Hn`, `/etc/security/limits.conf`, or on macOS \
                 `sudo launchctl limit maxfiles {NEEDED} unlimited`)"
            )
        })
    }
}

/// The soft limit to ask for: the hard limit, no more than `os_ceiling` (macOS's per-process
/// ceiling) when there is one.
pub fn target(hard: u64, os_ceiling: Option<u64>) -> u64 {
    match os_ceiling {
        Some(ceiling) => hard.min(ceiling),
        None => hard,
    }
}

/// What [`raise_at_start`] did, for `up` to report.
static AT_START: std::sync::OnceLock<Result<Raise, nix::errno::Errno>> = std::sync::OnceLock::new();

/// Raises the limit once, at the host's start (before any thread or child), and keeps the
/// result for [`at_start`].
pub fn raise_at_start() {
    let _ = AT_START.set(raise());
}

/// What the raise at start did; `None` if there was none (tests).
pub fn at_start() -> Option<Result<Raise, nix::errno::Errno>> {
    AT_START.get().copied()
}

/// Raises this process's soft limit to [`target`]; a failed setrlimit leaves it as it was.
pub fn raise() -> Result<Raise, nix::errno::Errno> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (before, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = target(hard, os_ceiling(hard));
    if want > before {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    }
    let (now, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(Raise { before, now, hard })
}

/// macOS: `kern.maxfilesperproc`, or `OPEN_MAX` when that cannot be read and the hard limit is
/// unlimited. Elsewhere none: Linux takes the hard limit itself.
fn os_ceiling(hard: u64) -> Option<u64> {
    #[cfg(target_os = "macos")]
    {
        match crate::sysctl::int(c"kern.maxfilesperproc").map(u64::try_from) {
            Ok(Ok(v)) if v > 0 => Some(v),
            _ => Some(hard.min(OPEN_MAX)),
        }
    }
    #[cfg(not(target_os = "macos"))]
    {
        let _ = hard;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_hard_limit_within_the_os_ceiling() {
        assert_eq!(target(1 << 20, None), 1 << 20);
        assert_eq!(target(libc::RLIM_INFINITY, Some(OPEN_MAX)), OPEN_MAX);
        assert_eq!(target(4096, Some(122_880)), 4096);
        assert_eq!(target(1 << 20, Some(122_880)), 122_880);
    }

    #[test]
    fn a_low_limit_warns_and_says_what_to_do() {
        let low = Raise {
            before: 256,
            now: 2048,
            hard: 2048,
        };
        let line = low.describe();
        assert!(
            line.starts_with(
                "open files: 2048 (raised from 256; hard limit 2048); warning: below the 10240"
            ),
            "{line}"
        );
        assert!(line.contains("launchctl limit maxfiles"), "{line}");
        let fine = Raise {
            before: 1024,
            now: 1 << 20,
            hard: 1 << 20,
        };
        assert_eq!(fine.warning(), None);
        assert_eq!(
            fine.describe(),
            "open files: 1048576 (raised from 1024; hard limit 1048576)"
        );
    }
}
