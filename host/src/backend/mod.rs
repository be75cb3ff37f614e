//! VMM backends: each turns a [`VmSpec`] into the process that runs the VM (qemu as a program,
//! libkrun as a library in a forked child), and the choice between them.

use std::path::{Path, PathBuf};

pub mod libkrun;
pub mod qemu;
pub mod tsc;

pub use openshell_shared::Arch;

/// The serial console the kernel writes to on this architecture's machine model.
pub fn console(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    }
}

/// What every backend needs to know to start the VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub arch: Arch,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// vhost-user socket of the virtio-fs daemon serving the root filesystem.
    pub virtiofs_socket: PathBuf,
    /// vhost-user socket of the vsock device.
    pub vsock_socket: PathBuf,
    /// File the guest console is written to.
    pub console_log: PathBuf,
    /// Stream socket of the user-mode network (passt), if the VM has a network device.
    pub net_socket: Option<PathBuf>,
}

/// The MAC of the guest's eth0: gvproxy's static DHCP lease is tied to this one, and passt
/// accepts any, so one address serves both.
pub const GUEST_MAC: &str = "5a:94:ef:e4:0c:ee";

/// The kernel command line for a boot: root on virtio-fs, our init, no reboot loops, then the
/// `openshell.*` keys init reads.
pub fn kernel_cmdline(arch: Arch, exec: &[String], extra: Option<&str>) -> String {
    let mut parts = vec![
        format!("console={}", console(arch)),
        "rootfstype=virtiofs".to_string(),
        "root=rootfs".to_string(),
        "rw".to_string(),
        "init=/sbin/openshell-init".to_string(),
        "panic=-1".to_string(),
        "reboot=t".to_string(),
        "quiet".to_string(),
        // The guest has no other entropy at boot: until its RNG is seeded, every random number
        // the kernel hands out (socket ports, inode generations, MACs) re-hashes the whole input
        // pool. The CPU's RNG (RDRAND, RNDR; emulated by TCG) seeds it at once.
        "random.trust_cpu=on".to_string(),
    ];
    if !exec.is_empty() {
        parts.push(format!(
            "openshell.exec={}",
            openshell_shared::config::encode_argv(exec)
        ));
    }
    if let Some(extra) = extra.filter(|e| !e.trim().is_empty()) {
        parts.push(extra.trim().to_string());
    }
    parts.join(" ")
}

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

    #[test]
    fn cmdline_carries_the_workload_encoded() {
        let line = kernel_cmdline(
            Arch::Aarch64,
            &["/bin/sh".into(), "-c".into(), "exit 7".into()],
            Some("openshell.grace_ms=5"),
        );
        assert!(line.starts_with(
            "console=ttyAMA0 rootfstype=virtiofs root=rootfs rw init=/sbin/openshell-init"
        ));
        assert!(
            line.contains(" openshell.exec=/bin/sh,-c,exit%207 "),
            "{line}"
        );
        assert!(line.ends_with(" openshell.grace_ms=5"));
        assert!(line.contains(" random.trust_cpu=on "), "{line}");
        let parsed = openshell_shared::Cmdline::parse(&line);
        assert_eq!(
            openshell_shared::config::decode_argv(parsed.get("openshell.exec").unwrap_or("")),
            Ok(vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                "exit 7".to_string()
            ])
        );
    }
}
