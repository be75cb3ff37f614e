//! k3s and its airgap images for the gateway profile: pinned by version, downloaded from the
//! release (GitHub, or the mirror `OPENSHELL_K3S_RELEASE_URL` names) into the artifact cache, or
//! taken from local copies (`--k3s FILE`, `--images FILE|DIR`).
//!
//! A download is verified as k3s's own installer verifies it: against the SHA-256 the release
//! publishes in `sha256sum-<arch>.txt` (read strictly, bounded in size, kept next to the
//! downloads); the amd64 binary also against the SHA-256 pinned here, which the checksum file
//! must agree with. Nothing unverified is kept, and a cached asset is checked again on every use.
//! A local copy is accepted whatever it is, recorded as unpinned unless it matches the pin.

mod curl;
pub mod sums;
#[cfg(test)]
mod test_server;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use openshell_shared::Arch;

use crate::cache;
use sums::{Sums, SumsError};

/// The k3s release the gateway profile is built with (as the legacy system pinned it).
pub const VERSION: &str = "v1.35.2+k3s1";

/// Names the URL this release's assets are under (a mirror, or a `file://` directory for an
/// air-gapped host); unset or empty: the GitHub release.
pub const RELEASE_URL_ENV: &str = "OPENSHELL_K3S_RELEASE_URL";

/// The most we take of one asset: the real ones are about 70 MB (k3s) and 200 MB (the zstd
/// airgap tarball), so this only stops a server that never ends from filling the disk.
const MAX_ASSET_BYTES: u64 = 4 << 30;

/// Where this release's assets are: `$OPENSHELL_K3S_RELEASE_URL` (without a trailing `/`), else
/// the GitHub release.
pub fn release_url() -> String {
    release_url_from(std::env::var(RELEASE_URL_ENV).ok())
}

fn release_url_from(configured: Option<String>) -> String {
    match configured.as_deref().map(str::trim) {
        Some(u) if !u.is_empty() => u.trim_end_matches('/').to_string(),
        _ => format!(
            "https://github.com/k3s-io/k3s/releases/download/{}",
            VERSION.replace('+', "%2B")
        ),
    }
}

/// One release asset and the SHA-256 kept for it here, a second check on top of the release's
/// checksum file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub asset: &'static str,
    /// `None`: no SHA-256 kept here; the release's checksum file alone verifies a download.
    pub sha256: Option<&'static str>,
}

impl Pin {
    pub fn url(&self) -> String {
        format!("{}/{}", release_url(), self.asset)
    }
}

/// The k3s binary for `arch`. amd64: the SHA-256 published for v1.35.2+k3s1 (its first 8 hex
/// digits match the legacy build script's pin). arm64: only the first 8 hex digits of the legacy
/// pin (`228809a7`) are known, too few to pin, so the checksum file alone verifies it.
pub fn k3s_pin(arch: Arch) -> Pin {
    match arch {
        Arch::X86_64 => Pin {
            asset: "k3s",
            sha256: Some("3ae8e35a62ac83e8e197c117858a564134057a7b8703cf73e67ce60d19f4a22b"),
        },
        Arch::Aarch64 => Pin {
            asset: "k3s-arm64",
            sha256: None,
        },
    }
}

/// The airgap image tarball for `arch` (the zstd one of the three the release publishes: `.tar`,
/// `.tar.gz`, `.tar.zst`); no SHA-256 kept here for either arch.
pub fn images_pin(arch: Arch) -> Pin {
    match arch {
        Arch::X86_64 => Pin {
            asset: "k3s-airgap-images-amd64.tar.zst",
            sha256: None,
        },
        Arch::Aarch64 => Pin {
            asset: "k3s-airgap-images-arm64.tar.zst",
            sha256: None,
        },
    }
}

/// The release's checksum file for `arch`, as k3s's installer names it.
pub fn checksums_asset(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "sha256sum-amd64.txt",
        Arch::Aarch64 => "sha256sum-arm64.txt",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{file}: SHA-256 {actual} does not match {expected}, the SHA-256 of {asset} {VERSION}; refusing to use it")]
    Mismatch {
        file: PathBuf,
        asset: &'static str,
        expected: String,
        actual: String,
    },
    #[error("download of {url}: SHA-256 {actual} does not match {expected}, the SHA-256 {sums} publishes for {asset}; refused and not kept")]
    DownloadMismatch {
        url: String,
        sums: String,
        asset: &'static str,
        expected: String,
        actual: String,
    },
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", missing_k3s_text(*.arch, .reason))]
    MissingK3s { arch: Arch, reason: String },
    #[error(transparent)]
    Sums(#[from] SumsError),
    #[error(
        "{sums} publishes no SHA-256 for {asset}, so a download of it cannot be verified; refused"
    )]
    NotPublished { sums: String, asset: &'static str },
    #[error("{sums} says {asset} has SHA-256 {published}, but the SHA-256 pinned for {asset} {VERSION} (xtask/src/k3s.rs) is {pin}; refusing the checksum file and every download it would verify")]
    PinDisagrees {
        sums: String,
        asset: &'static str,
        published: String,
        pin: &'static str,
    },
    #[error("download of {url} failed: {reason}")]
    Download { url: String, reason: String },
}

/// What the gateway profile says when it has no k3s: what is missing and the two ways to give it.
pub fn missing_k3s_text(arch: Arch, reason: &str) -> String {
    let pin = k3s_pin(arch);
    let images = images_pin(arch);
    let also = pin
        .sha256
        .map(|p| format!(" and `{}` against the SHA-256 pinned here, {p}", pin.asset))
        .unwrap_or_default();
    format!(
        "the gateway profile needs k3s {VERSION} for {arch} and none is available: {reason}.\n\
         Downloads come from {release} (set {RELEASE_URL_ENV} to use a mirror) and are verified \
         against its `{sums}`{also}.\n\
         Give a local copy: --k3s FILE (the release asset `{asset}`: {url}),\n\
         and optionally --images FILE (the airgap images, `{iasset}`: {iurl});\n\
         or boot the base profile (--profile base).",
        arch = arch.name(),
        release = release_url(),
        sums = checksums_asset(arch),
        asset = pin.asset,
        url = pin.url(),
        iasset = images.asset,
        iurl = images.url(),
    )
}

/// SHA-256 of a file, with the pin error naming it.
pub fn sha256_of(file: &Path) -> Result<String, PinError> {
    cache::sha256_streamed(file).map_err(|source| PinError::Read {
        file: file.to_path_buf(),
        source,
    })
}

/// Checks `file` against `expected`; returns its SHA-256.
pub fn verify(file: &Path, asset: &'static str, expected: &str) -> Result<String, PinError> {
    let actual = sha256_of(file)?;
    if actual.eq_ignore_ascii_case(expected) {
        Ok(actual)
    } else {
        Err(PinError::Mismatch {
            file: file.to_path_buf(),
            asset,
            expected: expected.to_string(),
            actual,
        })
    }
}

/// A file going into the root, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub path: PathBuf,
    /// Name in the root (the asset name for downloads, the file name for local copies).
    pub name: String,
    pub sha256: String,
    /// True when the SHA-256 is the release's for the asset: a download verified against the
    /// checksum file (and the pin, where one is kept), or a local copy equal to the pin.
    pub pinned: bool,
    /// "download" or "local".
    pub origin: &'static str,
}

/// A local file: accepted whatever its SHA-256, flagged unpinned unless it matches `pin`.
pub fn local(file: &Path, pin: Pin) -> Result<Input, PinError> {
    let meta = std::fs::metadata(file).map_err(|source| PinError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(PinError::Read {
            file: file.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    let sha256 = sha256_of(file)?;
    let pinned = pin.sha256.is_some_and(|p| p.eq_ignore_ascii_case(&sha256));
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| pin.asset.to_string());
    Ok(Input {
        path: file.to_path_buf(),
        name,
        sha256,
        pinned,
        origin: "local",
    })
}

/// One arch's assets of the release: where they come from and where verified copies are kept.
#[derive(Debug, Clone)]
pub struct Release {
    /// The URL the assets are under, without a trailing `/`.
    pub url: String,
    /// The cache directory of verified downloads (and the checksum file).
    pub dir: PathBuf,
    /// `sha256sum-<arch>.txt`.
    pub checksums: &'static str,
    pub k3s: Pin,
    pub images: Pin,
}

impl Release {
    /// The release as configured: [`release_url`], the artifact cache, `arch`'s pins.
    pub fn for_arch(arch: Arch) -> Self {
        Self {
            url: release_url(),
            dir: cache::root()
                .join("downloads")
                .join(format!("k3s-{}", VERSION.replace('+', "-"))),
            checksums: checksums_asset(arch),
            k3s: k3s_pin(arch),
            images: images_pin(arch),
        }
    }

    fn url_of(&self, asset: &str) -> String {
        format!("{}/{asset}", self.url)
    }

    /// A verified download already in the cache, checked again against the cached checksum
    /// file; no network.
    pub fn cached(&self, pin: Pin) -> Option<Input> {
        let sums = self.cached_sums().ok()??;
        let expected = self.expected(&sums, pin).ok()?;
        let path = self.dir.join(pin.asset);
        let sha256 = verify(&path, pin.asset, &expected).ok()?;
        Some(downloaded(path, pin, sha256))
    }

    /// The verified download of `pin`: from the cache when it still matches the checksum file,
    /// else fetched, verified and only then kept.
    pub fn fetch(&self, pin: Pin) -> Result<Input, PinError> {
        let sums = self.sums()?;
        let expected = self.expected(&sums, pin)?;
        let dest = self.dir.join(pin.asset);
        if dest.exists() {
            match verify(&dest, pin.asset, &expected) {
                Ok(sha256) => return Ok(downloaded(dest, pin, sha256)),
                // Damaged in the cache: never used.
                Err(e) => {
                    eprintln!("xtask: warning: {e}; removing it and downloading again");
                    let _ = std::fs::remove_file(&dest);
                }
            }
        }
        let url = self.url_of(pin.asset);
        let part = self.fetch_part(pin.asset, &url, MAX_ASSET_BYTES)?;
        let checked = sha256_of(&part).and_then(|actual| {
            if actual == expected {
                Ok(actual)
            } else {
                Err(PinError::DownloadMismatch {
                    url: url.clone(),
                    sums: sums.file.clone(),
                    asset: pin.asset,
                    expected: expected.clone(),
                    actual,
                })
            }
        });
        let sha256 = keep(&part, &dest, checked, &url)?;
        Ok(downloaded(dest, pin, sha256))
    }

    /// The checksum file: the cached one when it still reads and agrees with the pins, else
    /// downloaded (bounded), read, checked against the pins and only then kept.
    pub fn sums(&self) -> Result<Sums, PinError> {
        match self.cached_sums() {
            Ok(Some(sums)) => return Ok(sums),
            Ok(None) => {}
            Err(e) => {
                eprintln!("xtask: warning: {e}; removing it and downloading it again");
                let _ = std::fs::remove_file(self.dir.join(self.checksums));
            }
        }
        let url = self.url_of(self.checksums);
        let part = self.fetch_part(self.checksums, &url, sums::MAX_BYTES)?;
        let read = std::fs::read(&part)
            .map_err(|source| PinError::Read {
                file: part.clone(),
                source,
            })
            .and_then(|bytes| Ok(sums::parse(&url, &bytes)?))
            .and_then(|sums| self.agree_with_pins(&sums).map(|()| sums));
        keep(&part, &self.dir.join(self.checksums), read, &url)
    }

    /// The cached checksum file, read and checked against the pins; `Ok(None)` when absent.
    fn cached_sums(&self) -> Result<Option<Sums>, PinError> {
        let path = self.dir.join(self.checksums);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(PinError::Read { file: path, source }),
        };
        let sums = sums::parse(&path.display().to_string(), &bytes)?;
        self.agree_with_pins(&sums)?;
        Ok(Some(sums))
    }

    /// A checksum file that contradicts a pin kept here is wrong about everything it lists.
    fn agree_with_pins(&self, sums: &Sums) -> Result<(), PinError> {
        for pin in [self.k3s, self.images] {
            if let (Some(kept), Some(published)) = (pin.sha256, sums.digest(pin.asset)) {
                if !kept.eq_ignore_ascii_case(published) {
                    return Err(PinError::PinDisagrees {
                        sums: sums.file.clone(),
                        asset: pin.asset,
                        published: published.to_string(),
                        pin: kept,
                    });
                }
            }
        }
        Ok(())
    }

    /// The SHA-256 a download of `pin` must have (lowercase).
    fn expected(&self, sums: &Sums, pin: Pin) -> Result<String, PinError> {
        let published = sums.digest(pin.asset).ok_or(PinError::NotPublished {
            sums: sums.file.clone(),
            asset: pin.asset,
        })?;
        match pin.sha256 {
            Some(kept) if !kept.eq_ignore_ascii_case(published) => Err(PinError::PinDisagrees {
                sums: sums.file.clone(),
                asset: pin.asset,
                published: published.to_string(),
                pin: kept,
            }),
            _ => Ok(published.to_string()),
        }
    }

    /// Downloads `url` (at most `max` bytes) into a temporary file in the cache directory.
    fn fetch_part(&self, asset: &str, url: &str, max: u64) -> Result<PathBuf, PinError> {
        let failed = |reason: String| PinError::Download {
            url: url.to_string(),
            reason,
        };
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| failed(format!("{}: {e}", self.dir.display())))?;
        let part = self
            .dir
            .join(format!(".{asset}.part-{}", std::process::id()));
        if let Err(reason) = curl::download(url, &part, max) {
            let _ = std::fs::remove_file(&part);
            return Err(failed(reason));
        }
        Ok(part)
    }
}

/// Renames the checked `part` to `dest`, or removes it when the check failed.
fn keep<T>(
    part: &Path,
    dest: &Path,
    checked: Result<T, PinError>,
    url: &str,
) -> Result<T, PinError> {
    match checked {
        Ok(v) => match std::fs::rename(part, dest) {
            Ok(()) => Ok(v),
            Err(e) => {
                let _ = std::fs::remove_file(part);
                Err(PinError::Download {
                    url: url.to_string(),
                    reason: format!("{}: {e}", dest.display()),
                })
            }
        },
        Err(e) => {
            let _ = std::fs::remove_file(part);
            Err(e)
        }
    }
}

fn downloaded(path: PathBuf, pin: Pin, sha256: String) -> Input {
    Input {
        path,
        name: pin.asset.to_string(),
        sha256,
        pinned: true,
        origin: "download",
    }
}

/// k3s for a build: `--k3s FILE`, else a verified cached or fresh download; the error says what
/// is missing and how to provide it.
pub fn resolve_k3s(arch: Arch, local_file: Option<&Path>) -> Result<Input, PinError> {
    let release = Release::for_arch(arch);
    if let Some(f) = local_file {
        return local(f, release.k3s);
    }
    release
        .fetch(release.k3s)
        .map_err(|e| PinError::MissingK3s {
            arch,
            reason: e.to_string(),
        })
}

/// A verified k3s already in the cache (what `up` checks to pick the gateway profile).
pub fn available(arch: Arch) -> bool {
    let release = Release::for_arch(arch);
    release.cached(release.k3s).is_some()
}

/// Airgap images for a build: every regular file of an `--images DIR` (sorted by name), else a
/// verified download; `Ok(empty)` when there are none (the first boot then pulls images).
pub fn resolve_images(
    arch: Arch,
    dir: Option<&Path>,
) -> Result<(Vec<Input>, Option<String>), PinError> {
    let release = Release::for_arch(arch);
    if let Some(dir) = dir {
        let read = |source| PinError::Read {
            file: dir.to_path_buf(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(read)?;
        files.retain(|p| p.is_file());
        files.sort();
        let inputs = files
            .iter()
            .map(|f| local(f, release.images))
            .collect::<Result<Vec<_>, _>>()?;
        if inputs.is_empty() {
            return Ok((inputs, Some(format!("{} holds no files", dir.display()))));
        }
        return Ok((inputs, None));
    }
    match release.fetch(release.images) {
        Ok(i) => Ok((vec![i], None)),
        Err(e) => Ok((Vec::new(), Some(e.to_string()))),
    }
}
