//! The guest's wall clock set from the host's (`openshell.host_time=`): a VM without a real-time
//! clock (aarch64 virt here, libkrun) starts in 1970, and the PKI phase would issue certificates
//! dated then, which every client refuses. Only moved forward: a guest clock ahead of the value
//! (the host's time at VM start, a few seconds old by now) is already closer to the truth.

use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_settime, ClockId};

/// Behind the host by more than this, the clock is set; less is boot time passing.
const SLACK_S: i64 = 60;

/// What was done, for the config phase's line.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The clock was behind the host's and now reads it; `from` is where it was (seconds).
    Set { from: i64 },
    /// The clock already agreed with (or was ahead of) the host's.
    Kept,
}

/// Whether a clock reading `now` (seconds) must be set to the host's `host`.
pub fn behind(now: i64, host: i64) -> bool {
    now.saturating_add(SLACK_S) < host
}

/// Sets CLOCK_REALTIME to `host` seconds when it is [`behind`]; only PID 1 may (a developer's
/// `openshell-init phase config` must never move the machine's clock).
pub fn apply(host: u64) -> Result<Outcome, nix::errno::Errno> {
    let host = i64::try_from(host).unwrap_or(i64::MAX);
    let now = clock_gettime(ClockId::CLOCK_REALTIME)?.tv_sec();
    if !behind(now, host) {
        return Ok(Outcome::Kept);
    }
    clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::new(host, 0))?;
    Ok(Outcome::Set { from: now })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clock_well_behind_the_host_is_set() {
        assert!(behind(0, 1_764_633_600), "1970 against today");
        assert!(!behind(1_764_633_590, 1_764_633_600), "boot time passing");
        assert!(!behind(1_764_633_700, 1_764_633_600), "ahead: kept");
        assert!(!behind(i64::MAX, 0));
        assert!(behind(i64::MIN, 0));
    }
}
