//! The guest clock under qemu's software emulation of x86_64. The microvm machine has no PIT
//! the kernel can calibrate against, no HPET and no ACPI PM timer, so a guest left alone marks
//! its TSC unstable and keeps time in 4 ms jiffies: every timestamp the guest reports is then
//! rounded to 4 ms, and the kernel spends boot time on failed calibrations. Under TCG the guest
//! reads the host's own TSC, so the host measures its frequency and tells the guest
//! (`tsc_early_khz=`, `tsc=reliable`).
//!
//! The measurement takes 50 ms; it is kept in the state directory, keyed by the host's boot id
//! (the TSC rate is fixed for one host boot), so only the first `up` after a host boot pays.
//!
//! The other boot costs an emulated x86_64 CPU brings are spared in [`super::tcg_guest`].

use std::path::Path;

/// How long the TSC is counted against CLOCK_MONOTONIC_RAW: 50 ms gives a few parts per
/// million, a drift of well under a second a day.
#[cfg(target_arch = "x86_64")]
const WINDOW: std::time::Duration = std::time::Duration::from_millis(50);

/// Kernel command-line options that give an x86_64 TCG guest a TSC clock, or `None` where the
/// guest's TSC is not the host's (another host architecture).
pub fn cmdline_options(cache_dir: Option<&Path>) -> Option<String> {
    let khz = khz(cache_dir)?;
    Some(format!("tsc_early_khz={khz} tsc=reliable"))
}

/// The host TSC frequency in kHz, from the cache when it was measured in this host boot.
pub fn khz(cache_dir: Option<&Path>) -> Option<u64> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string());
    let cache = cache_dir.map(|d| d.join("tsc-khz"));
    if let (Some(path), Some(id)) = (&cache, &boot_id) {
        if let Some(khz) = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| parse_cache(&text, id))
        {
            return Some(khz);
        }
    }
    let khz = measure()?;
    if let (Some(path), Some(id)) = (&cache, &boot_id) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // A cache that cannot be written only costs the next `up` another measurement.
        let _ = openshell_shared::fsutil::write_atomic(path, format!("{id} {khz}\n").as_bytes());
    }
    Some(khz)
}

/// `<boot id> <kHz>` for this boot, else `None`.
pub fn parse_cache(text: &str, boot_id: &str) -> Option<u64> {
    let mut words = text.split_whitespace();
    if words.next()? != boot_id {
        return None;
    }
    let khz: u64 = words.next()?.parse().ok()?;
    // A TSC below 100 MHz or above 10 GHz is a corrupt file, not a CPU.
    (100_000..=10_000_000).contains(&khz).then_some(khz)
}

#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u64> {
    use nix::time::{clock_gettime, ClockId};
    let now_ns = || {
        clock_gettime(ClockId::CLOCK_MONOTONIC_RAW)
            .ok()
            .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
    };
    // SAFETY: rdtsc has no memory effects; every x86_64 CPU has it.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (now_ns()?, tsc());
    std::thread::sleep(WINDOW);
    let (t1, c1) = (now_ns()?, tsc());
    let ns = t1 - t0;
    if ns <= 0 || c1 <= c0 {
        return None;
    }
    let khz = (c1 - c0) as i128 * 1_000_000 / ns;
    u64::try_from(khz)
        .ok()
        .filter(|k| (100_000..=10_000_000).contains(k))
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_used_only_for_the_same_boot_and_sane_values() {
        assert_eq!(parse_cache("abc 2596138\n", "abc"), Some(2_596_138));
        assert_eq!(parse_cache("abc 2596138\n", "other"), None);
        assert_eq!(parse_cache("abc 12\n", "abc"), None);
        assert_eq!(parse_cache("abc nope\n", "abc"), None);
        assert_eq!(parse_cache("", "abc"), None);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn measured_rate_is_cached_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = khz(Some(dir.path())).expect("x86_64 hosts have a TSC");
        let text = std::fs::read_to_string(dir.path().join("tsc-khz")).expect("cache written");
        assert!(text.ends_with(&format!(" {first}\n")), "{text}");
        // Poison the cached value: a second call must return it, proving it was not re-measured.
        let id = text.split_whitespace().next().expect("boot id");
        std::fs::write(dir.path().join("tsc-khz"), format!("{id} 1234567\n")).expect("write");
        assert_eq!(khz(Some(dir.path())), Some(1_234_567));
        assert!(cmdline_options(Some(dir.path()))
            .is_some_and(|o| o == "tsc_early_khz=1234567 tsc=reliable"));
    }
}
