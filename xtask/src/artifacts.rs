//! Everything one boot of the base profile needs (kernel, root filesystem, init, vsock helper),
//! built or found in the cache; `cargo xtask artifacts` prints it and the VM tests read its JSON.

use std::path::PathBuf;

use openshell_shared::Arch;

use crate::error::Result;
use crate::{kernel, rootfs, tools};

/// Everything one boot needs.
pub struct Artifacts {
    pub kernel: PathBuf,
    pub vmlinux: Option<PathBuf>,
    pub rootfs: PathBuf,
    pub init: PathBuf,
    pub vsock_helper: PathBuf,
}

impl Artifacts {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "kernel": self.kernel,
            "vmlinux": self.vmlinux,
            "rootfs": self.rootfs,
            "init": self.init,
            "vsock_helper": self.vsock_helper,
        })
        .to_string()
    }
}

/// Builds whatever of them is missing for `arch`.
pub fn artifacts(arch: Arch) -> Result<Artifacts> {
    let kdir = kernel::build(arch)?;
    let init = tools::init(arch)?;
    let rootfs = rootfs::build_base(arch, &init)?;
    let vsock_helper = tools::vsock_helper()?;
    let (kernel, vmlinux) = match arch {
        Arch::X86_64 => (kdir.join("bzImage"), Some(kdir.join("vmlinux"))),
        Arch::Aarch64 => (kdir.join("Image"), None),
    };
    Ok(Artifacts {
        kernel,
        vmlinux,
        rootfs,
        init,
        vsock_helper,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_every_path_as_the_vm_tests_read_them() {
        let a = Artifacts {
            kernel: PathBuf::from("/k/bzImage"),
            vmlinux: None,
            rootfs: PathBuf::from("/r"),
            init: PathBuf::from("/i"),
            vsock_helper: PathBuf::from("/v"),
        };
        let v: serde_json::Value = serde_json::from_str(&a.to_json()).expect("json");
        assert_eq!(v["kernel"], "/k/bzImage");
        assert_eq!(v["vmlinux"], serde_json::Value::Null);
        assert_eq!(v["rootfs"], "/r");
        assert_eq!(v["init"], "/i");
        assert_eq!(v["vsock_helper"], "/v");
    }
}
