//! The VM's vCPUs and memory for one boot: `--cpus`/`--memory` when given, else what the root's
//! `manifest.json` records (`vm`, see `openshell_shared::sizing`), else the base profile's.
//! Sizing from the manifest is clamped to this machine, with a warning: at most its online CPUs,
//! and at most [`MEMORY_SHARE_PERCENT`] of its physical memory. Explicit flags are taken as
//! given.
//!
//! The root is the guest's own writable file system, so its manifest is read as hostile input:
//! opened without following a link, a regular file only, at most [`MAX_MANIFEST`] bytes.

use std::io::Read;
use std::path::{Path, PathBuf};

use openshell_shared::sizing::{self, SizingError, VmSizing};

/// The manifest's name at the top of a root.
pub const MANIFEST: &str = "manifest.json";

/// Largest manifest read (the gateway's is about 9 KB; the base's lists every file).
pub const MAX_MANIFEST: u64 = 4 << 20;

/// Most of this machine's physical memory a VM sized by its manifest gets: the guest may touch
/// all it has (k3s's page cache fills it), and the host keeps a quarter for itself, the VMM
/// and its helpers. A 16 GiB Mac runs the gateway's 8 GiB as asked; an 8 GiB one gets 6 GiB.
pub const MEMORY_SHARE_PERCENT: u64 = 75;

/// What this machine offers a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostResources {
    pub online_cpus: u32,
    pub memory_mib: u64,
}

impl HostResources {
    /// This machine's, from sysconf; `None` for what it does not say.
    pub fn this() -> Option<HostResources> {
        // SAFETY: sysconf reads a system value and touches no memory of ours.
        let (cpus, pages, page) = unsafe {
            (
                libc::sysconf(libc::_SC_NPROCESSORS_ONLN),
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if cpus < 1 || pages < 1 || page < 1 {
            return None;
        }
        Some(HostResources {
            online_cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
            memory_mib: (pages as u64).saturating_mul(page as u64) >> 20,
        })
    }
}

/// The sizing of a boot and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizing {
    pub vm: VmSizing,
    /// For the summary line: `--cpus/--memory`, the manifest's path, or the default's reason.
    pub source: String,
    /// What was clamped to this machine, one line each.
    pub warnings: Vec<String>,
}

impl std::fmt::Display for Sizing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.vm, self.source)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a regular file")]
    NotFile { path: PathBuf },
    #[error("{path}: larger than {MAX_MANIFEST} bytes")]
    TooBig { path: PathBuf },
    #[error("{path}: not JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {source}")]
    Field { path: PathBuf, source: SizingError },
    #[error("--cpus/--memory: {0}")]
    Flag(SizingError),
}

/// The sizing for a boot of `rootfs` with the flags given, clamped to `host` (when known) if it
/// came from the manifest.
pub fn resolve(
    cpus: Option<u32>,
    memory_mib: Option<u32>,
    rootfs: &Path,
    host: Option<HostResources>,
) -> Result<Sizing, ManifestError> {
    if let (Some(cpus), Some(memory_mib)) = (cpus, memory_mib) {
        let vm = VmSizing { cpus, memory_mib };
        vm.check().map_err(ManifestError::Flag)?;
        return Ok(Sizing {
            vm,
            source: "--cpus and --memory".into(),
            warnings: Vec::new(),
        });
    }
    let path = rootfs.join(MANIFEST);
    let (recorded, source) = match read_manifest_sizing(&path)? {
        Some(vm) => (vm, format!("from {}", path.display())),
        None => (
            VmSizing::BASE,
            format!("default: {} records no `vm`", path.display()),
        ),
    };
    let mut warnings = Vec::new();
    let clamped = match host {
        Some(host) => clamp(recorded, host, &mut warnings),
        None => recorded,
    };
    let vm = VmSizing {
        cpus: cpus.unwrap_or(clamped.cpus),
        memory_mib: memory_mib.unwrap_or(clamped.memory_mib),
    };
    vm.check().map_err(ManifestError::Flag)?;
    let given = match (cpus, memory_mib) {
        (Some(_), _) => ", vCPUs from --cpus",
        (_, Some(_)) => ", memory from --memory",
        _ => "",
    };
    Ok(Sizing {
        vm,
        source: format!("{source}{given}"),
        warnings,
    })
}

/// `vm` within what `host` offers, a warning per clamped number.
fn clamp(vm: VmSizing, host: HostResources, warnings: &mut Vec<String>) -> VmSizing {
    let mut out = vm;
    if vm.cpus > host.online_cpus {
        out.cpus = host.online_cpus.max(1);
        warnings.push(format!(
            "the root asks for {} vCPUs, this machine has {} online CPUs: booting with {}",
            vm.cpus, host.online_cpus, out.cpus
        ));
    }
    let cap = host.memory_mib * MEMORY_SHARE_PERCENT / 100;
    if u64::from(vm.memory_mib) > cap {
        out.memory_mib = u32::try_from(cap)
            .unwrap_or(u32::MAX)
            .max(sizing::MIN_MEMORY_MIB);
        warnings.push(format!(
            "the root asks for {} MiB, this machine has {} MiB ({MEMORY_SHARE_PERCENT}% is {cap}): booting with {} MiB (give --memory to choose)",
            vm.memory_mib, host.memory_mib, out.memory_mib
        ));
    }
    out
}

/// The `vm` field of the manifest at `path`: `None` when there is no manifest or it has no
/// `vm`; an error naming the file for anything else wrong.
pub fn read_manifest_sizing(path: &Path) -> Result<Option<VmSizing>, ManifestError> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = std::fs::OpenOptions::new()
        .read(true)
        // A link is refused (ELOOP), and a FIFO the guest left there does not block the open.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    let file = match open {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ManifestError::Open {
                path: path.into(),
                source,
            })
        }
        Ok(f) => f,
    };
    let meta = file.metadata().map_err(|source| ManifestError::Open {
        path: path.into(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ManifestError::NotFile { path: path.into() });
    }
    let mut text = Vec::new();
    file.take(MAX_MANIFEST + 1)
        .read_to_end(&mut text)
        .map_err(|source| ManifestError::Open {
            path: path.into(),
            source,
        })?;
    if text.len() as u64 > MAX_MANIFEST {
        return Err(ManifestError::TooBig { path: path.into() });
    }
    let doc: serde_json::Value =
        serde_json::from_slice(&text).map_err(|source| ManifestError::Json {
            path: path.into(),
            source,
        })?;
    match doc.get(sizing::MANIFEST_KEY) {
        None => Ok(None),
        Some(v) => VmSizing::from_json(v)
            .map(Some)
            .map_err(|source| ManifestError::Field {
                path: path.into(),
                source,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: HostResources = HostResources {
        online_cpus: 64,
        memory_mib: 1 << 20,
    };

    fn root_with(manifest: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::write(root.path().join(MANIFEST), manifest).expect("write");
        root
    }

    #[test]
    fn the_manifest_sizes_the_vm_and_flags_win() {
        let root = root_with(r#"{"profile": "gateway", "vm": {"cpus": 4, "memory_mib": 8192}}"#);
        let s = resolve(None, None, root.path(), Some(BIG)).expect("sizing");
        assert_eq!(s.vm, VmSizing::GATEWAY);
        assert!(s.source.starts_with("from ") && s.source.ends_with("manifest.json"));
        assert!(s.warnings.is_empty());
        let s = resolve(Some(1), Some(1024), root.path(), Some(BIG)).expect("sizing");
        assert_eq!((s.vm.cpus, s.vm.memory_mib), (1, 1024));
        assert_eq!(s.source, "--cpus and --memory");
        let s = resolve(None, Some(2048), root.path(), Some(BIG)).expect("sizing");
        assert_eq!((s.vm.cpus, s.vm.memory_mib), (4, 2048));
        assert!(s.source.ends_with(", memory from --memory"), "{}", s.source);
    }

    #[test]
    fn a_root_without_a_manifest_or_vm_gets_the_base_sizing() {
        let empty = tempfile::tempdir().expect("tmp");
        let s = resolve(None, None, empty.path(), Some(BIG)).expect("sizing");
        assert_eq!(s.vm, VmSizing::BASE);
        assert!(s.source.starts_with("default: "), "{}", s.source);
        let old = root_with(r#"{"profile": "base"}"#);
        assert_eq!(
            resolve(None, None, old.path(), Some(BIG))
                .expect("sizing")
                .vm,
            VmSizing::BASE
        );
    }

    /// A small machine clamps the manifest's sizing and says so; explicit flags are not
    /// clamped.
    #[test]
    fn a_small_host_clamps_with_a_warning() {
        let root = root_with(r#"{"vm": {"cpus": 4, "memory_mib": 8192}}"#);
        let small = HostResources {
            online_cpus: 2,
            memory_mib: 8192,
        };
        let s = resolve(None, None, root.path(), Some(small)).expect("sizing");
        assert_eq!((s.vm.cpus, s.vm.memory_mib), (2, 6144));
        assert_eq!(s.warnings.len(), 2, "{:?}", s.warnings);
        assert!(s.warnings[0].contains("2 online CPUs"), "{:?}", s.warnings);
        assert!(
            s.warnings[1].contains("booting with 6144 MiB"),
            "{:?}",
            s.warnings
        );
        let s = resolve(Some(4), Some(8192), root.path(), Some(small)).expect("sizing");
        assert_eq!(s.vm, VmSizing::GATEWAY);
        assert!(s.warnings.is_empty());
    }

    /// Whatever the guest left as its manifest is refused with the file named, never followed
    /// or waited on.
    #[test]
    fn a_hostile_manifest_is_refused_by_name() {
        let root = root_with(r#"{"vm": {"cpus": 0, "memory_mib": 512}}"#);
        let err = resolve(None, None, root.path(), Some(BIG))
            .unwrap_err()
            .to_string();
        assert!(err.contains("manifest.json: field `vm.cpus`"), "{err}");
        let root = root_with("{not json");
        let err = resolve(None, None, root.path(), Some(BIG))
            .unwrap_err()
            .to_string();
        assert!(err.contains("manifest.json: not JSON"), "{err}");
        let linked = tempfile::tempdir().expect("tmp");
        let target = linked.path().join("elsewhere.json");
        std::fs::write(&target, r#"{"vm": {"cpus": 1, "memory_mib": 512}}"#).expect("write");
        std::os::unix::fs::symlink(&target, linked.path().join(MANIFEST)).expect("link");
        let err = resolve(None, None, linked.path(), Some(BIG))
            .unwrap_err()
            .to_string();
        assert!(err.contains("manifest.json"), "{err}");
        let fifo = tempfile::tempdir().expect("tmp");
        nix::unistd::mkfifo(&fifo.path().join(MANIFEST), nix::sys::stat::Mode::S_IRWXU)
            .expect("mkfifo");
        let err = resolve(None, None, fifo.path(), Some(BIG))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("not a regular file"), "{err}");
        let big = root_with(&" ".repeat(MAX_MANIFEST as usize + 1));
        let err = resolve(None, None, big.path(), Some(BIG))
            .unwrap_err()
            .to_string();
        assert!(err.contains("larger than"), "{err}");
        let bad_flag = resolve(Some(0), Some(512), big.path(), Some(BIG)).unwrap_err();
        assert!(
            bad_flag.to_string().starts_with("--cpus/--memory: "),
            "{bad_flag}"
        );
    }

    #[test]
    fn this_machine_reports_its_resources() {
        let host = HostResources::this().expect("sysconf");
        assert!(host.online_cpus >= 1 && host.memory_mib >= 64, "{host:?}");
    }
}
