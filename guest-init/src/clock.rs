//! Boot-relative time. CLOCK_BOOTTIME starts at kernel entry and needs neither /proc nor a wall
//! clock, so init can timestamp its very first instruction.

/// Microseconds since the kernel started, including time suspended.
pub fn boottime_us() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => (ts.tv_sec() as u64) * 1_000_000 + (ts.tv_nsec() as u64) / 1_000,
        // CLOCK_BOOTTIME exists since Linux 2.6.39; without it timestamps are meaningless but
        // boot must go on.
        Err(_) => 0,
    }
}

/// Measures one step in microseconds on the boot clock.
pub struct Stopwatch(u64);

impl Stopwatch {
    pub fn start() -> Self {
        Self(boottime_us())
    }

    pub fn elapsed_us(&self) -> u64 {
        boottime_us().saturating_sub(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn boottime_moves_forward() {
        let a = boottime_us();
        std::thread::sleep(Duration::from_millis(2));
        let b = boottime_us();
        assert!(a > 0 && b >= a + 2_000, "{a} -> {b}");
    }
}
