//! How a run ends: `up`'s exit code from what the loop learned by the time the VMM exited. A pure
//! function, so that every way a boot can end is tested without a VM.

use super::args::code;

/// What decides the exit code, gathered by the loop's handlers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// An error the host detected and stopped the VM for (its exit code); the last one counts.
    pub error: Option<i32>,
    /// The guest reported a fatal boot error.
    pub fatal: bool,
    /// The workload's status from the guest's exit message.
    pub exit: Option<i32>,
}

/// How the run ended, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The host stopped the VM for an error: its code.
    HostError(i32),
    /// The guest's boot failed.
    GuestFatal,
    /// The workload ended with this status.
    Workload(i32),
    /// The VM ended without reporting an exit (crashed, killed, or never booted).
    NoExit,
}

impl End {
    pub fn code(self) -> i32 {
        match self {
            End::HostError(code) => code,
            End::GuestFatal => code::GUEST_FATAL,
            End::Workload(status) => status,
            End::NoExit => code::NO_EXIT,
        }
    }
}

/// A host error wins over a guest's fatal error, which wins over the workload's status.
pub fn end(v: &Verdict) -> End {
    match (v.error, v.fatal, v.exit) {
        (Some(code), _, _) => End::HostError(code),
        (None, true, _) => End::GuestFatal,
        (None, false, Some(status)) => End::Workload(status),
        (None, false, None) => End::NoExit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(error: Option<i32>, fatal: bool, exit: Option<i32>) -> i32 {
        end(&Verdict { error, fatal, exit }).code()
    }

    #[test]
    fn the_workload_status_is_passed_through() {
        assert_eq!(code_of(None, false, Some(0)), 0);
        assert_eq!(code_of(None, false, Some(7)), 7);
        // A workload killed by SIGKILL, in the shell's convention.
        assert_eq!(code_of(None, false, Some(137)), 137);
    }

    #[test]
    fn a_fatal_guest_error_beats_the_exit_status() {
        assert_eq!(
            end(&Verdict {
                fatal: true,
                ..Verdict::default()
            }),
            End::GuestFatal
        );
        assert_eq!(code_of(None, true, None), code::GUEST_FATAL);
        assert_eq!(code_of(None, true, Some(0)), code::GUEST_FATAL);
    }

    #[test]
    fn host_errors_beat_everything() {
        for host in [code::PROTOCOL, code::TIMEOUT, code::SETUP] {
            assert_eq!(code_of(Some(host), false, None), host);
            assert_eq!(code_of(Some(host), true, None), host);
            assert_eq!(code_of(Some(host), true, Some(0)), host);
        }
    }

    #[test]
    fn a_vm_that_reported_nothing_ended_without_exit() {
        assert_eq!(end(&Verdict::default()), End::NoExit);
        assert_eq!(End::NoExit.code(), code::NO_EXIT);
    }

    #[test]
    fn exit_codes_are_distinct() {
        let all = [
            code::SETUP,
            code::NO_EXIT,
            code::GUEST_FATAL,
            code::PROTOCOL,
            code::TIMEOUT,
        ];
        assert_eq!(all, [1, 2, 3, 4, 5]);
    }
}
