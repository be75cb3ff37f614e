//! Whether this machine's hypervisor can be asked for a VM at all: on Linux `/dev/kvm` opens
//! read-write and answers `KVM_GET_API_VERSION` and `KVM_CREATE_VM`; on macOS
//! Hypervisor.framework is supported (`sysctl kern.hv_support` = 1). libkrun panics opaquely
//! without them, and qemu's `-accel kvm` aborts, so both backends ask here first. That a full
//! guest then runs is another question (see `accel`): on some machines these pass and qemu's
//! vCPU setup still fails.

use std::path::Path;

/// The KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// What KVM_GET_API_VERSION returns on every kernel since 2.6.22.
pub const KVM_API_VERSION: i32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{path} does not open read-write ({source}); add yourself to its group (`sudo usermod -aG kvm $USER`, then log in again) or check that KVM is enabled")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not KVM: KVM_GET_API_VERSION failed ({source})")]
    NotKvm {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: KVM API version {version}, expected {KVM_API_VERSION}")]
    ApiVersion { path: String, version: i32 },
    #[error("{path}: KVM_CREATE_VM failed ({source}): KVM is present but refuses to make a VM (nested virtualization off, or another hypervisor holds the CPU)")]
    CreateVm {
        path: String,
        source: std::io::Error,
    },
    #[cfg_attr(not(target_os = "macos"), allow(dead_code))]
    #[error("Hypervisor.framework is not supported on this Mac (sysctl kern.hv_support = {0}); the VM needs an Apple-silicon or VT-x Mac running macOS 11 or later, not inside another VM without nested virtualization")]
    NoHvSupport(i64),
    #[cfg_attr(not(target_os = "macos"), allow(dead_code))]
    #[error("cannot read sysctl kern.hv_support ({0}): Hypervisor.framework support unknown")]
    HvSysctl(std::io::Error),
}

/// The host's hypervisor can make a VM: KVM on Linux, Hypervisor.framework on macOS.
pub fn check() -> Result<(), HypervisorError> {
    #[cfg(target_os = "macos")]
    {
        hv_support()
    }
    #[cfg(not(target_os = "macos"))]
    {
        check_kvm(Path::new(KVM_DEVICE))
    }
}

/// `path` opens read-write, speaks KVM's API version and makes a VM (closed at once).
pub fn check_kvm(path: &Path) -> Result<(), HypervisorError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let shown = path.display().to_string();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| HypervisorError::Open {
            path: shown.clone(),
            source,
        })?;
    // KVM's ioctls on the system fd: _IO(KVMIO = 0xAE, 0x00) and _IO(KVMIO, 0x01).
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    // SAFETY: both requests take an integer argument (0) and touch no memory of ours.
    let version = unsafe { libc::ioctl(dev.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version < 0 {
        return Err(HypervisorError::NotKvm {
            path: shown,
            source: std::io::Error::last_os_error(),
        });
    }
    if version != KVM_API_VERSION {
        return Err(HypervisorError::ApiVersion {
            path: shown,
            version,
        });
    }
    // SAFETY: as above; a returned descriptor is ours to close.
    let vm = unsafe { libc::ioctl(dev.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    if vm < 0 {
        return Err(HypervisorError::CreateVm {
            path: shown,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `vm` is a fresh descriptor nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    Ok(())
}

/// `kern.hv_support` is 1.
#[cfg(target_os = "macos")]
fn hv_support() -> Result<(), HypervisorError> {
    let value = crate::sysctl::int(c"kern.hv_support").map_err(HypervisorError::HvSysctl)?;
    if value != 1 {
        return Err(HypervisorError::NoHvSupport(value.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that opens read-write but is not KVM is named with the ioctl that failed.
    #[test]
    fn a_device_that_is_not_kvm_is_named() {
        let err = check_kvm(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, HypervisorError::NotKvm { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("/dev/null is not KVM: KVM_GET_API_VERSION failed"),
            "{err}"
        );
        let err = check_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/kvm does not open read-write"),
            "{err}"
        );
    }

    /// Where this machine has KVM, the real device passes all three steps (these CI machines
    /// make VMs; it is qemu's vCPU setup that fails on them).
    #[test]
    fn the_real_kvm_device_makes_a_vm() {
        let dev = Path::new(KVM_DEVICE);
        let rw = std::fs::OpenOptions::new().read(true).write(true).open(dev);
        if rw.is_err() {
            eprintln!("skipped: {KVM_DEVICE} does not open read-write here");
            return;
        }
        check_kvm(dev).expect("KVM makes a VM");
    }
}
