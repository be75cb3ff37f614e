//! VMM backends: each turns a [`spec::VmSpec`] into the process that runs the VM (qemu as a
//! program, libkrun as a library in a forked child). This module only chooses between them; what
//! every backend is given lives in [`spec`]; whether the hypervisor can make a VM in [`kvm`], and
//! which accelerator qemu uses in [`accel`]; what an x86_64 guest under software emulation is
//! told on its command line in [`tsc`] and [`tcg_guest`].

use std::path::Path;

use openshell_shared::Arch;

pub mod accel;
pub mod kvm;
pub mod libkrun;
pub mod qemu;
pub mod spec;
pub mod tcg_guest;
pub mod tsc;

/// Which VMM `up` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// libkrun when it loads and the hypervisor makes a VM; else qemu on Linux, an error on
    /// macOS.
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

/// Why no backend could be picked.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Libkrun(#[from] libkrun::LibkrunError),
    #[error("--backend libkrun: {0}")]
    Hypervisor(#[from] kvm::HypervisorError),
    /// On macOS `auto` runs libkrun only: qemu there would be software emulation.
    #[error("backend auto: cannot run libkrun ({why}). On macOS qemu would be software emulation, about ten times slower, so `auto` does not fall back to it: install libkrun (`brew tap slp/krun && brew install libkrun`, or --libkrun PATH), sign the host with the hypervisor entitlement (`cargo xtask sign`), or pass --backend qemu to emulate anyway")]
    MacNeedsLibkrun { why: String },
}

/// The machine `choose` decides for: whether it is a Mac, and its hypervisor check
/// ([`kvm::check`] outside the tests).
pub struct Host<'a> {
    pub macos: bool,
    pub hypervisor: &'a dyn Fn() -> Result<(), kvm::HypervisorError>,
}

impl Host<'static> {
    /// This machine.
    pub fn this() -> Self {
        Host {
            macos: cfg!(target_os = "macos"),
            hypervisor: &kvm::check,
        }
    }
}

/// Resolves `choice` for a guest of `arch`; the note says what `auto` picked and why. An
/// explicit `libkrun` that cannot be used is an error, not a fallback, and so is `auto` on a
/// Mac (see [`BackendError::MacNeedsLibkrun`]).
pub fn choose(
    choice: BackendChoice,
    arch: Arch,
    libkrun_flag: Option<&Path>,
    host: &Host,
) -> Result<(Chosen, Option<String>), BackendError> {
    // libkrun runs guests of the host's architecture only (KVM or Hypervisor.framework).
    let foreign = arch != Arch::host();
    match choice {
        BackendChoice::Qemu => Ok((Chosen::Qemu, None)),
        BackendChoice::Libkrun if foreign => Err(libkrun::LibkrunError::ForeignArch(arch).into()),
        BackendChoice::Libkrun => {
            (host.hypervisor)()?;
            Ok((Chosen::Libkrun(libkrun::Libkrun::load(libkrun_flag)?), None))
        }
        BackendChoice::Auto => match auto_libkrun(foreign, libkrun_flag, host) {
            Ok((krun, note)) => Ok((Chosen::Libkrun(krun), Some(note))),
            Err(why) if host.macos => Err(BackendError::MacNeedsLibkrun { why }),
            Err(why) => Ok((
                Chosen::Qemu,
                Some(format!("backend auto: qemu, since {why}")),
            )),
        },
    }
}

/// libkrun for `auto`, with the note saying so, or why not.
fn auto_libkrun(
    foreign: bool,
    libkrun_flag: Option<&Path>,
    host: &Host,
) -> Result<(libkrun::Libkrun, String), String> {
    if foreign {
        return Err(format!(
            "libkrun runs only {} guests here",
            Arch::host().name()
        ));
    }
    let krun = libkrun::Libkrun::load(libkrun_flag).map_err(|e| e.to_string())?;
    let hypervisor = if host.macos {
        "Hypervisor.framework is supported"
    } else {
        "/dev/kvm makes a VM"
    };
    match (host.hypervisor)() {
        Err(e) => Err(format!("{e}; libkrun loaded from {}", krun.origin)),
        Ok(()) => {
            let note = format!("backend auto: libkrun from {} ({hypervisor})", krun.origin);
            Ok((krun, note))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux() -> Host<'static> {
        Host {
            macos: false,
            hypervisor: &|| Ok(()),
        }
    }

    fn no_kvm() -> Result<(), kvm::HypervisorError> {
        Err(kvm::HypervisorError::Open {
            path: "/dev/kvm".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        })
    }

    fn other_arch() -> Arch {
        match Arch::host() {
            Arch::X86_64 => Arch::Aarch64,
            Arch::Aarch64 => Arch::X86_64,
        }
    }

    #[test]
    fn auto_falls_back_to_qemu_on_linux_and_says_why() {
        let missing = Path::new("/nonexistent/libkrun.so");
        let (chosen, note) = choose(BackendChoice::Auto, Arch::host(), Some(missing), &linux())
            .expect("auto never fails on Linux");
        assert!(matches!(chosen, Chosen::Qemu));
        let note = note.expect("a note");
        assert!(
            note.starts_with(
                "backend auto: qemu, since cannot load libkrun from /nonexistent/libkrun.so"
            ),
            "{note}"
        );
        assert!(matches!(
            choose(BackendChoice::Qemu, Arch::host(), Some(missing), &linux()),
            Ok((Chosen::Qemu, None))
        ));
    }

    #[test]
    fn explicit_libkrun_that_does_not_load_is_an_error() {
        let missing = Some(Path::new("/nonexistent/libkrun.so"));
        let err = choose(BackendChoice::Libkrun, Arch::host(), missing, &linux())
            .expect_err("no fallback");
        assert!(
            matches!(
                err,
                BackendError::Libkrun(libkrun::LibkrunError::Load { .. })
            ),
            "{err}"
        );
        let other = other_arch();
        let err = choose(BackendChoice::Libkrun, other, None, &linux()).expect_err("foreign");
        assert!(
            matches!(err, BackendError::Libkrun(libkrun::LibkrunError::ForeignArch(a)) if a == other),
            "{err}"
        );
        let (chosen, note) = choose(BackendChoice::Auto, other, None, &linux()).expect("auto");
        assert!(matches!(chosen, Chosen::Qemu));
        assert!(note.is_some_and(|n| n.contains("libkrun runs only")));
    }

    /// Explicit libkrun without a usable hypervisor names what is missing, before loading.
    #[test]
    fn explicit_libkrun_without_kvm_names_the_device() {
        let host = Host {
            macos: false,
            hypervisor: &no_kvm,
        };
        let err = choose(BackendChoice::Libkrun, Arch::host(), None, &host).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--backend libkrun: /dev/kvm does not open read-write"),
            "{err}"
        );
        assert!(err.to_string().contains("usermod -aG kvm"), "{err}");
    }

    /// On a Mac `auto` never turns into qemu's software emulation: it fails saying what to do.
    #[test]
    fn auto_on_a_mac_fails_instead_of_emulating() {
        let mac = Host {
            macos: true,
            hypervisor: &|| Err(kvm::HypervisorError::NoHvSupport(0)),
        };
        let missing = Some(Path::new("/nonexistent/libkrun.dylib"));
        for (arch, flag, says) in [
            (
                Arch::host(),
                missing,
                "cannot load libkrun from /nonexistent/libkrun.dylib",
            ),
            (other_arch(), None, "libkrun runs only"),
        ] {
            let err = choose(BackendChoice::Auto, arch, flag, &mac).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, BackendError::MacNeedsLibkrun { .. }),
                "{text}"
            );
            assert!(text.contains(says), "{text}");
            assert!(
                text.contains("--backend qemu") && text.contains("cargo xtask sign"),
                "{text}"
            );
        }
        assert!(matches!(
            choose(BackendChoice::Qemu, Arch::host(), missing, &mac),
            Ok((Chosen::Qemu, None))
        ));
        let err = choose(BackendChoice::Libkrun, Arch::host(), missing, &mac).unwrap_err();
        assert!(err.to_string().contains("kern.hv_support = 0"), "{err}");
    }
}
