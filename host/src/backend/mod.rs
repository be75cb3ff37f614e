//! VMM backends: each turns a [`spec::VmSpec`] into the process that runs the VM (qemu as a
//! program, libkrun as a library in a forked child). This module only chooses between them; what
//! every backend is given lives in [`spec`].

use std::path::Path;

use openshell_shared::Arch;

pub mod libkrun;
pub mod qemu;
pub mod spec;
pub mod tsc;

/// Which VMM `up` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// libkrun when it loads and (Linux) `/dev/kvm` opens read-write, else qemu.
    Auto,
    Qemu,
    Libkrun,
}

/// The VMM picked for one run.
#[derive(Debug)]
pub enum Chosen {
    Qemu,
    Libkrun(libkrun::Libkrun),
}

/// Resolves `choice` for a guest of `arch`; the note says what `auto` picked and why. An
/// explicit `libkrun` that cannot be used is an error, not a fallback.
pub fn choose(
    choice: BackendChoice,
    arch: Arch,
    libkrun_flag: Option<&Path>,
) -> Result<(Chosen, Option<String>), libkrun::LibkrunError> {
    // libkrun runs guests of the host's architecture only (KVM or Hypervisor.framework).
    let foreign = arch != Arch::host();
    match choice {
        BackendChoice::Libkrun if foreign => Err(libkrun::LibkrunError::ForeignArch(arch)),
        BackendChoice::Auto if foreign => Ok((
            Chosen::Qemu,
            Some(format!(
                "backend auto: qemu, since libkrun runs only {} guests here",
                Arch::host().name()
            )),
        )),
        BackendChoice::Qemu => Ok((Chosen::Qemu, None)),
        BackendChoice::Libkrun => {
            Ok((Chosen::Libkrun(libkrun::Libkrun::load(libkrun_flag)?), None))
        }
        BackendChoice::Auto => Ok(match libkrun::Libkrun::load(libkrun_flag) {
            Err(e) => (Chosen::Qemu, Some(format!("backend auto: qemu, since {e}"))),
            Ok(krun) => match kvm_usable() {
                Err(e) => (
                    Chosen::Qemu,
                    Some(format!(
                        "backend auto: qemu, since /dev/kvm does not open read-write ({e}); \
                         libkrun loaded from {}",
                        krun.origin
                    )),
                ),
                Ok(()) => {
                    let note = format!(
                        "backend auto: libkrun from {} (/dev/kvm opens read-write)",
                        krun.origin
                    );
                    (Chosen::Libkrun(krun), Some(note))
                }
            },
        }),
    }
}

/// libkrun on Linux needs KVM, and panics opaquely without it: check first.
fn kvm_usable() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_qemu_and_says_why() {
        let missing = Path::new("/nonexistent/libkrun.so");
        let (chosen, note) =
            choose(BackendChoice::Auto, Arch::host(), Some(missing)).expect("auto never fails");
        assert!(matches!(chosen, Chosen::Qemu));
        let note = note.expect("a note");
        assert!(
            note.starts_with(
                "backend auto: qemu, since cannot load libkrun from /nonexistent/libkrun.so"
            ),
            "{note}"
        );
        assert!(matches!(
            choose(BackendChoice::Qemu, Arch::host(), Some(missing)),
            Ok((Chosen::Qemu, None))
        ));
    }

    #[test]
    fn explicit_libkrun_that_does_not_load_is_an_error() {
        let err = choose(
            BackendChoice::Libkrun,
            Arch::host(),
            Some(Path::new("/nonexistent/libkrun.so")),
        )
        .expect_err("no fallback");
        assert!(matches!(err, libkrun::LibkrunError::Load { .. }), "{err}");
        let other = match Arch::host() {
            Arch::X86_64 => Arch::Aarch64,
            Arch::Aarch64 => Arch::X86_64,
        };
        let err = choose(BackendChoice::Libkrun, other, None).expect_err("foreign arch");
        assert!(
            matches!(err, libkrun::LibkrunError::ForeignArch(a) if a == other),
            "{err}"
        );
        let (chosen, note) = choose(BackendChoice::Auto, other, None).expect("auto");
        assert!(matches!(chosen, Chosen::Qemu));
        assert!(note.is_some_and(|n| n.contains("libkrun runs only")));
    }
}
