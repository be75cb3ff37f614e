//! The VM's sizing (vCPUs, memory) as a root filesystem records it in its `manifest.json`:
//! `"vm": {"cpus": N, "memory_mib": M}`. xtask writes it for each profile (and the bundle copies
//! it), the host reads it from the root it boots when `--cpus`/`--memory` are not given. One
//! name and shape for all three.

use serde::{Deserialize, Serialize};

/// The key of the sizing in `manifest.json`.
pub const MANIFEST_KEY: &str = "vm";

/// Most vCPUs a manifest may ask for (qemu's microvm and virt take far fewer than this anyway).
pub const MAX_CPUS: u32 = 256;
/// Least memory a manifest may ask for: below it the kernel does not boot.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Most memory a manifest may ask for (1 TiB).
pub const MAX_MEMORY_MIB: u32 = 1 << 20;

/// vCPUs and memory of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSizing {
    pub cpus: u32,
    pub memory_mib: u32,
}

impl VmSizing {
    /// The base profile: one vCPU and 512 MiB, enough for init and a shell.
    pub const BASE: VmSizing = VmSizing {
        cpus: 1,
        memory_mib: 512,
    };
    /// The gateway profile: the old system's 4 vCPUs and 8 GiB, what k3s with the gateway and
    /// a sandbox needs.
    pub const GATEWAY: VmSizing = VmSizing {
        cpus: 4,
        memory_mib: 8192,
    };

    /// The sizing as it goes into `manifest.json` under [`MANIFEST_KEY`].
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({ "cpus": self.cpus, "memory_mib": self.memory_mib })
    }

    /// Reads the sizing from a manifest's [`MANIFEST_KEY`] value: both fields, whole numbers in
    /// range, nothing else. The error names the field at fault.
    pub fn from_json(value: &serde_json::Value) -> Result<VmSizing, SizingError> {
        let sizing: VmSizing =
            serde_json::from_value(value.clone()).map_err(|e| SizingError::Shape(e.to_string()))?;
        sizing.check()?;
        Ok(sizing)
    }

    /// Both numbers in the range a VM can boot with.
    pub fn check(self) -> Result<(), SizingError> {
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return Err(SizingError::Cpus(self.cpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(SizingError::Memory(self.memory_mib));
        }
        Ok(())
    }
}

impl std::fmt::Display for VmSizing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = if self.cpus == 1 { "vCPU" } else { "vCPUs" };
        write!(f, "{} {unit}, {} MiB", self.cpus, self.memory_mib)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizingError {
    #[error("field `vm`: {0} (expected {{\"cpus\": N, \"memory_mib\": M}})")]
    Shape(String),
    #[error("field `vm.cpus`: {0} is not between 1 and {MAX_CPUS}")]
    Cpus(u32),
    #[error("field `vm.memory_mib`: {0} is not between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}")]
    Memory(u32),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_manifest_shape_round_trips() {
        for s in [VmSizing::BASE, VmSizing::GATEWAY] {
            assert_eq!(VmSizing::from_json(&s.to_json()), Ok(s));
        }
        assert_eq!(
            VmSizing::GATEWAY.to_json(),
            json!({"cpus": 4, "memory_mib": 8192})
        );
        assert_eq!(VmSizing::GATEWAY.to_string(), "4 vCPUs, 8192 MiB");
        assert_eq!(VmSizing::BASE.to_string(), "1 vCPU, 512 MiB");
    }

    #[test]
    fn a_bad_field_is_named() {
        let err = |v| VmSizing::from_json(&v).unwrap_err().to_string();
        assert!(err(json!({"cpus": 0, "memory_mib": 512})).contains("vm.cpus"));
        assert!(err(json!({"cpus": 2, "memory_mib": 8})).contains("vm.memory_mib"));
        assert!(err(json!({"cpus": 2})).contains("memory_mib"));
        assert!(err(json!({"cpus": -1, "memory_mib": 512})).starts_with("field `vm`"));
        assert!(err(json!({"cpus": 1.5, "memory_mib": 512})).starts_with("field `vm`"));
        assert!(err(json!({"cpus": 1, "memory_mib": 512, "disk": 3})).contains("disk"));
        assert!(err(json!("4x8G")).starts_with("field `vm`"));
    }
}
