//! The bundle's manifest (`manifest.json`, the first member): format version, bundle version,
//! arch, profile, every member's size and SHA-256, and the VM sizing the root was built for.
//! Checked field by field when read: it names the directory a bundle unpacks into.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::BundleError;
use crate::arch::Arch;

/// The layout this code writes and reads; a bundle of another format is refused.
pub const FORMAT_VERSION: u32 = 1;
/// The first member.
pub const MANIFEST: &str = "manifest.json";
/// The kernel `up` boots: bzImage (x86_64) or Image (aarch64).
pub const KERNEL: &str = "kernel";
/// x86_64's ELF kernel, which libkrun boots instead of the bzImage.
pub const VMLINUX: &str = "vmlinux";
pub const INIT: &str = "openshell-init";
/// The root filesystem as a tar of its own (owners, modes, xattrs, links, device nodes).
pub const ROOTFS: &str = "rootfs.tar";
/// Members in the order they are written and must be read.
pub const MEMBER_ORDER: [&str; 4] = [KERNEL, VMLINUX, INIT, ROOTFS];
/// Largest manifest read.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest member accepted (a gateway root with its images is a few GiB).
pub const MAX_MEMBER_BYTES: u64 = 64 << 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// `<crate version>+<16 hex digits of the content digest>`: the unpack directory's name.
    pub version: String,
    pub arch: String,
    pub profile: String,
    pub members: Vec<Member>,
    /// Copied from the root's own `manifest.json` when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmSizing>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// The sizing the root was built for: the same `vm` field its `manifest.json` holds.
pub use crate::sizing::VmSizing;

impl Manifest {
    /// A manifest for these members; the version is computed from them.
    pub fn new(
        crate_version: &str,
        arch: Arch,
        profile: &str,
        members: Vec<Member>,
        vm: Option<VmSizing>,
    ) -> Manifest {
        let mut m = Manifest {
            format: FORMAT_VERSION,
            version: String::new(),
            arch: arch.name().to_string(),
            profile: profile.to_string(),
            members,
            vm,
        };
        m.version = format!("{crate_version}+{}", m.content_digest());
        m
    }

    /// Parses and checks a manifest read from a bundle.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, BundleError> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| BundleError::Manifest(format!("not valid JSON: {e}")))?;
        m.check()?;
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut text = serde_json::to_vec_pretty(self).unwrap_or_default();
        text.push(b'\n');
        text
    }

    pub fn arch(&self) -> Result<Arch, BundleError> {
        self.arch
            .parse()
            .map_err(|e| BundleError::Manifest(format!("arch: {e}")))
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// 16 hex digits of SHA-256 over everything but the version: same content, same version.
    fn content_digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!(
            "{}\n{}\n{}\n{:?}\n",
            self.format, self.arch, self.profile, self.vm
        ));
        for m in &self.members {
            h.update(format!("{} {} {}\n", m.name, m.size, m.sha256));
        }
        hex(&h.finalize())[..16].to_string()
    }

    fn check(&self) -> Result<(), BundleError> {
        let fail = |what: String| Err(BundleError::Manifest(what));
        if self.format != FORMAT_VERSION {
            return fail(format!(
                "format {}, this host reads format {FORMAT_VERSION}",
                self.format
            ));
        }
        self.arch()?;
        if self.profile.is_empty()
            || self.profile.len() > 32
            || !self
                .profile
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return fail(format!("profile {:?} is not a profile name", self.profile));
        }
        self.check_members()?;
        if let Some(vm) = self.vm {
            if let Err(e) = vm.check() {
                return fail(format!("vm sizing {vm:?} is out of range: {e}"));
            }
        }
        let (crate_version, digest) = self.version.split_once('+').unwrap_or(("", ""));
        let expected = self.content_digest();
        if crate_version.is_empty()
            || crate_version.len() > 32
            || !crate_version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            || digest != expected
        {
            return fail(format!(
                "version {:?} is not <crate version>+{expected} (the digest of the members listed)",
                self.version
            ));
        }
        Ok(())
    }

    fn check_members(&self) -> Result<(), BundleError> {
        let mut last = None;
        for m in &self.members {
            let Some(pos) = MEMBER_ORDER.iter().position(|n| *n == m.name) else {
                return Err(BundleError::member(&m.name, "not a member a bundle holds"));
            };
            if last.is_some_and(|l| pos <= l) {
                return Err(BundleError::member(&m.name, "listed twice or out of order"));
            }
            last = Some(pos);
            if m.size > MAX_MEMBER_BYTES {
                return Err(BundleError::member(
                    &m.name,
                    format!("{} bytes, over the limit of {MAX_MEMBER_BYTES}", m.size),
                ));
            }
            if m.sha256.len() != 64
                || !m
                    .sha256
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err(BundleError::member(
                    &m.name,
                    "sha256 is not 64 lowercase hex digits",
                ));
            }
        }
        for required in [KERNEL, INIT, ROOTFS] {
            if self.member(required).is_none() {
                return Err(BundleError::member(required, "missing from the manifest"));
            }
        }
        Ok(())
    }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str) -> Member {
        Member {
            name: name.into(),
            size: 3,
            sha256: "ab".repeat(32),
        }
    }

    fn sample() -> Manifest {
        Manifest::new(
            "0.1.0",
            Arch::Aarch64,
            "base",
            vec![member(KERNEL), member(INIT), member(ROOTFS)],
            Some(VmSizing {
                cpus: 4,
                memory_mib: 8192,
            }),
        )
    }

    #[test]
    fn a_written_manifest_reads_back() {
        let m = sample();
        assert!(m.version.starts_with("0.1.0+"), "{}", m.version);
        assert_eq!(Manifest::parse(&m.to_json()).expect("parse"), m);
    }

    #[test]
    fn a_version_that_does_not_match_the_members_is_refused() {
        for version in ["0.1.0+0000000000000000", "../../etc", "0.1.0"] {
            let mut m = sample();
            m.version = version.into();
            let err = Manifest::parse(&m.to_json()).unwrap_err().to_string();
            assert!(err.contains("is not <crate version>+"), "{version}: {err}");
        }
        let mut m = sample();
        m.members[0].sha256 = "cd".repeat(32);
        let err = Manifest::parse(&m.to_json()).unwrap_err().to_string();
        assert!(err.contains("version"), "{err}");
    }

    #[test]
    fn unknown_duplicate_missing_and_oversize_members_are_named() {
        let cases: [(Vec<Member>, &str); 4] = [
            (vec![member("etc/passwd")], "etc/passwd: not a member"),
            (vec![member(KERNEL), member(KERNEL)], "kernel: listed twice"),
            (
                vec![member(KERNEL), member(ROOTFS)],
                "openshell-init: missing",
            ),
            (
                vec![
                    member(KERNEL),
                    member(INIT),
                    Member {
                        size: MAX_MEMBER_BYTES + 1,
                        ..member(ROOTFS)
                    },
                ],
                "rootfs.tar: 68719476737 bytes, over the limit",
            ),
        ];
        for (members, expected) in cases {
            let m = Manifest::new("0.1.0", Arch::X86_64, "base", members, None);
            let err = Manifest::parse(&m.to_json()).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}
