//! Everything one boot of the base profile needs (kernel, root filesystem, init, vsock helper),
//! built or found in the cache; `cargo xtask artifacts` prints it and the VM tests read its JSON.

use std::path::PathBuf;

use openshell_shared::Arch;

use crate::error::Result;
use crate::{kernel, rootfs, tools};

/// Everything one boot needs.
#[derive(Clone)]
pub struct Artifacts {
    /// What `up` boots: on x86_64 the ELF `vmlinux`, which qemu enters through PVH (no
    /// decompressor, no firmware path: `cargo xtask bench boot` measures both ways) and libkrun
    /// takes as it is, and whose symbols the profiler reads; the raw `Image` on aarch64.
    pub kernel: PathBuf,
    /// x86_64: the compressed `bzImage` of the same build, still bootable (`--kernel`).
    pub bzimage: Option<PathBuf>,
    pub rootfs: PathBuf,
    pub init: PathBuf,
    pub vsock_helper: PathBuf,
}

impl Artifacts {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "kernel": self.kernel,
            "bzimage": self.bzimage,
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
    let (kernel, bzimage) = match arch {
        Arch::X86_64 => (kdir.join("vmlinux"), Some(kdir.join("bzImage"))),
        Arch::Aarch64 => (kdir.join("Image"), None),
    };
    Ok(Artifacts {
        kernel,
        bzimage,
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
            kernel: PathBuf::from("/k/vmlinux"),
            bzimage: Some(PathBuf::from("/k/bzImage")),
            rootfs: PathBuf::from("/r"),
            init: PathBuf::from("/i"),
            vsock_helper: PathBuf::from("/v"),
        };
        let v: serde_json::Value = serde_json::from_str(&a.to_json()).expect("json");
        assert_eq!(v["kernel"], "/k/vmlinux");
        assert_eq!(v["bzimage"], "/k/bzImage");
        assert_eq!(v["rootfs"], "/r");
        assert_eq!(v["init"], "/i");
        assert_eq!(v["vsock_helper"], "/v");
    }
}
