//! What every backend is given to start the VM: the [`VmSpec`] (with its [`Engine`]), the kernel
//! command line, the serial console's name and the guest's MAC. Shared by the backends; imports none of them.

use std::path::PathBuf;

use openshell_shared::Arch;

/// The serial console the kernel writes to on this architecture's machine model.
pub fn console(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    }
}

/// How the guest's CPU runs: under the hypervisor (KVM, Hypervisor.framework: libkrun always)
/// or emulated in software (qemu's TCG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Kvm,
    Tcg,
}

impl Engine {
    /// qemu's name for it (`-accel NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Engine::Kvm => "kvm",
            Engine::Tcg => "tcg",
        }
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
    /// qemu's accelerator; libkrun runs under the hypervisor whatever this says.
    pub engine: Engine,
    /// vhost-user socket of the virtio-fs daemon serving the root filesystem.
    pub virtiofs_socket: PathBuf,
    /// vhost-user socket of the vsock device.
    pub vsock_socket: PathBuf,
    /// File the guest console is written to.
    pub console_log: PathBuf,
    /// Stream socket of the user-mode network (passt), if the VM has a network device.
    pub net_socket: Option<PathBuf>,
    /// Raw image attached as virtio-blk with serial [`STATE_DISK_SERIAL`], if any.
    pub state_disk: Option<PathBuf>,
}

/// The virtio-blk serial (libkrun: block id) of the state disk, which the guest finds it by; in
/// the guest `/sys/block/vdX/serial` reads it. One value, shared with the guest.
pub use openshell_shared::config::STATE_DISK_SERIAL;

/// The kernel command line key that tells the guest a state disk is attached (and which): with
/// it the guest requires the disk, without it the guest runs with none.
pub fn state_disk_cmdline() -> String {
    format!("openshell.state_disk={STATE_DISK_SERIAL}")
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

#[cfg(test)]
mod tests {
    use super::*;

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
