//! The names the kernel build and Debian give each architecture.

use openshell_shared::Arch;

/// Names the kernel build and Debian use for an architecture.
pub trait BuildNames {
    fn kernel_arch(self) -> &'static str;
    fn cross_prefix(self) -> &'static str;
    fn debian(self) -> &'static str;
    /// Debian's multiarch directory name (`usr/lib/<this>/`).
    fn gnu_triple(self) -> &'static str;
}

impl BuildNames for Arch {
    fn kernel_arch(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86",
            Arch::Aarch64 => "arm64",
        }
    }
    fn cross_prefix(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-linux-gnu-",
            Arch::Aarch64 => "aarch64-linux-gnu-",
        }
    }
    fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
    fn gnu_triple(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-linux-gnu",
            Arch::Aarch64 => "aarch64-linux-gnu",
        }
    }
}
