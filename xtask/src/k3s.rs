//! k3s and its airgap images for the gateway profile: pinned by version and SHA-256, downloaded
//! from the real GitHub release into the artifact cache when the network allows, or taken from
//! local copies (`--k3s FILE`, `--images FILE|DIR`).
//!
//! A download is only ever used when its SHA-256 equals the pin; an asset whose SHA-256 we could
//! not find from a source we trust has no pin (`None`) and is never downloaded: a local copy is
//! the only way in for it. A local copy that differs from the pin (or has none) is accepted but
//! recorded as unpinned, in the manifest and on the terminal.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use openshell_shared::Arch;

use crate::cache;

/// The k3s release the gateway profile is built with (as the legacy system pinned it).
pub const VERSION: &str = "v1.35.2+k3s1";

/// One release asset and its expected SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub asset: &'static str,
    /// `None`: no trustworthy SHA-256 known, so a download cannot be verified and is refused.
    pub sha256: Option<&'static str>,
}

impl Pin {
    pub fn url(&self) -> String {
        format!(
            "https://github.com/k3s-io/k3s/releases/download/{}/{}",
            VERSION.replace('+', "%2B"),
            self.asset
        )
    }
}

/// The k3s binary for `arch`. amd64: the SHA-256 published for v1.35.2+k3s1 (its first 8 hex
/// digits match the legacy build script's pin). arm64: only the first 8 hex digits of the legacy
/// pin (`228809a7`) are known, which cannot verify anything, so it has no pin.
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

/// The airgap image tarball for `arch`: no SHA-256 found for v1.35.2+k3s1 on either arch.
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

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{file}: SHA-256 {actual} does not match the pin {expected} for {asset} {VERSION}; refusing to use it")]
    Mismatch {
        file: PathBuf,
        asset: &'static str,
        expected: String,
        actual: String,
    },
    #[error("download of {url}: SHA-256 {actual} does not match the pin {expected} for {asset} {VERSION}; refused and not kept")]
    DownloadMismatch {
        url: String,
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
    #[error("{asset} {VERSION} has no SHA-256 pin, so a download of {url} cannot be verified and is not used")]
    Unverifiable { asset: &'static str, url: String },
    #[error("download of {url} failed: {reason}")]
    Download { url: String, reason: String },
}

/// What the gateway profile says when it has no k3s: what is missing and the two ways to give it.
pub fn missing_k3s_text(arch: Arch, reason: &str) -> String {
    let pin = k3s_pin(arch);
    let images = images_pin(arch);
    let sha = pin
        .sha256
        .map(String::from)
        .unwrap_or_else(|| "none known (an unpinned download is refused)".into());
    let isha = images
        .sha256
        .map(String::from)
        .unwrap_or_else(|| "none known".into());
    format!(
        "the gateway profile needs k3s {VERSION} for {arch} and none is available: {reason}.\n\
         Give a local copy: --k3s FILE (the release asset `{asset}`: {url}, expected SHA-256 {sha}),\n\
         and optionally --images FILE (the airgap images, `{iasset}`: {iurl}, expected SHA-256 {isha});\n\
         or boot the base profile (--profile base).",
        arch = arch.name(),
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
    /// True when the SHA-256 equals this release's pin for the asset.
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

/// Where a verified download of `pin` lives in the cache.
pub fn cached_path(pin: Pin) -> PathBuf {
    cache::root()
        .join("downloads")
        .join(format!("k3s-{}", VERSION.replace('+', "-")))
        .join(pin.asset)
}

/// A download already in the cache that still matches its pin.
pub fn cached(pin: Pin) -> Option<Input> {
    let expected = pin.sha256?;
    let path = cached_path(pin);
    let sha256 = verify(&path, pin.asset, expected).ok()?;
    Some(Input {
        path,
        name: pin.asset.to_string(),
        sha256,
        pinned: true,
        origin: "download",
    })
}

/// The cached download of `pin`, fetching it first when missing. Refused without a pin.
pub fn fetch(pin: Pin) -> Result<Input, PinError> {
    if let Some(hit) = cached(pin) {
        return Ok(hit);
    }
    let Some(expected) = pin.sha256 else {
        return Err(PinError::Unverifiable {
            asset: pin.asset,
            url: pin.url(),
        });
    };
    let url = pin.url();
    let dest = cached_path(pin);
    if dest.exists() {
        // In the cache but not what the pin says (damaged, or a pin that changed): never used.
        if let Err(e) = verify(&dest, pin.asset, expected) {
            eprintln!("xtask: warning: {e}; removing it and downloading again");
            let _ = std::fs::remove_file(&dest);
        }
    }
    fetch_into(pin.asset, expected, &url, &dest)
}

/// Downloads `url` next to `dest`, and renames it to `dest` only when its SHA-256 is `expected`.
fn fetch_into(
    asset: &'static str,
    expected: &str,
    url: &str,
    dest: &Path,
) -> Result<Input, PinError> {
    let failed = |reason: String| PinError::Download {
        url: url.to_string(),
        reason,
    };
    let dir = dest
        .parent()
        .ok_or_else(|| failed("no cache directory".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
    let part = dir.join(format!(".{asset}.part-{}", std::process::id()));
    let result = download(url, &part);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(failed(e));
    }
    let actual = match sha256_of(&part) {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    if !actual.eq_ignore_ascii_case(expected) {
        let _ = std::fs::remove_file(&part);
        return Err(PinError::DownloadMismatch {
            url: url.to_string(),
            asset,
            expected: expected.to_string(),
            actual,
        });
    }
    std::fs::rename(&part, dest).map_err(|e| failed(format!("{}: {e}", dest.display())))?;
    Ok(Input {
        path: dest.to_path_buf(),
        name: asset.to_string(),
        sha256: actual,
        pinned: true,
        origin: "download",
    })
}

/// curl into `part`, with a byte progress bar fed by the growing file.
fn download(url: &str, part: &Path) -> Result<(), String> {
    let total = content_length(url);
    let bar = crate::progress::bytes(total, &format!("download {url}"));
    let mut child = Command::new("curl")
        .args(["-fsSL", "--connect-timeout", "15", "-o"])
        .arg(part)
        .arg(url)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    let status = loop {
        if let Ok(m) = std::fs::metadata(part) {
            bar.set_position(m.len());
        }
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("curl: {e}")),
        }
    };
    bar.finish_and_clear();
    if status.success() {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    Err(format!("curl {status}: {}", err.trim()))
}

/// The size a HEAD request announces, if the server answers one.
fn content_length(url: &str) -> Option<u64> {
    let out = Command::new("curl")
        .args(["-fsSLI", "--connect-timeout", "15", url])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .filter(|n| *n > 0)
}

/// k3s for a build: `--k3s FILE`, else a verified cached or fresh download; the error says what
/// is missing and how to provide it.
pub fn resolve_k3s(arch: Arch, local_file: Option<&Path>) -> Result<Input, PinError> {
    let pin = k3s_pin(arch);
    if let Some(f) = local_file {
        return local(f, pin);
    }
    fetch(pin).map_err(|e| PinError::MissingK3s {
        arch,
        reason: e.to_string(),
    })
}

/// A verified k3s already in the cache (what `up` checks to pick the gateway profile).
pub fn available(arch: Arch) -> bool {
    cached(k3s_pin(arch)).is_some()
}

/// Airgap images for a build: every regular file of an `--images DIR` (sorted by name), else a
/// verified download; `Ok(empty)` when there are none (the first boot then pulls images).
pub fn resolve_images(
    arch: Arch,
    dir: Option<&Path>,
) -> Result<(Vec<Input>, Option<String>), PinError> {
    let pin = images_pin(arch);
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
            .map(|f| local(f, pin))
            .collect::<Result<Vec<_>, _>>()?;
        if inputs.is_empty() {
            return Ok((inputs, Some(format!("{} holds no files", dir.display()))));
        }
        return Ok((inputs, None));
    }
    match fetch(pin) {
        Ok(i) => Ok((vec![i], None)),
        Err(e) => Ok((Vec::new(), Some(e.to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn wrong_checksum_is_refused_naming_file_and_both_hashes() {
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("k3s");
        std::fs::write(&f, b"not k3s").expect("write");
        let pin = k3s_pin(Arch::X86_64);
        let expected = pin.sha256.expect("amd64 is pinned");
        let err = verify(&f, pin.asset, expected).expect_err("must be refused");
        let text = err.to_string();
        let actual = cache::hex(&Sha256::digest(b"not k3s"));
        assert!(text.contains(&f.display().to_string()), "{text}");
        assert!(text.contains(expected), "{text}");
        assert!(text.contains(&actual), "{text}");
        assert!(text.contains("refusing"), "{text}");
        // The right one passes and returns its hash.
        assert_eq!(verify(&f, pin.asset, &actual).expect("matches"), actual);
    }

    #[test]
    fn a_download_that_does_not_match_the_pin_is_refused_and_not_kept() {
        let t = tempfile::tempdir().expect("tmp");
        let release = t.path().join("release-k3s");
        std::fs::write(&release, b"tampered").expect("write");
        let url = format!("file://{}", release.display());
        let dest = t.path().join("cache/k3s");
        let pin = k3s_pin(Arch::X86_64);
        let expected = pin.sha256.expect("pinned");
        let err = fetch_into(pin.asset, expected, &url, &dest).expect_err("refused");
        let text = err.to_string();
        assert!(text.contains(&url), "{text}");
        assert!(text.contains(expected), "{text}");
        assert!(
            text.contains(&cache::hex(&Sha256::digest(b"tampered"))),
            "{text}"
        );
        assert!(!dest.exists());
        let left: Vec<_> = std::fs::read_dir(t.path().join("cache"))
            .expect("list")
            .collect();
        assert!(left.is_empty(), "the partial download must go");
        // The same file with its real hash as the pin is kept.
        let good = cache::hex(&Sha256::digest(b"tampered"));
        let got = fetch_into(pin.asset, &good, &url, &dest).expect("kept");
        assert!(got.pinned && dest.is_file());
    }

    #[test]
    fn local_copies_are_accepted_and_flagged_unpinned() {
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("fake-k3s.sh");
        std::fs::write(&f, b"#!/bin/sh\n").expect("write");
        let i = local(&f, k3s_pin(Arch::X86_64)).expect("accepted");
        assert!(!i.pinned);
        assert_eq!(i.origin, "local");
        assert_eq!(i.name, "fake-k3s.sh");
        assert_eq!(i.sha256, cache::hex(&Sha256::digest(b"#!/bin/sh\n")));
        let pin = Pin {
            asset: "k3s",
            sha256: Some(Box::leak(i.sha256.clone().into_boxed_str())),
        };
        assert!(local(&f, pin).expect("accepted").pinned);
        assert!(local(t.path(), pin).is_err(), "a directory is not a k3s");
    }

    #[test]
    fn unpinned_assets_are_never_downloaded() {
        // No pin: refused before the cache or the network is looked at.
        let err = fetch(k3s_pin(Arch::Aarch64)).expect_err("no pin");
        assert!(matches!(err, PinError::Unverifiable { .. }), "{err}");
        assert!(err.to_string().contains("k3s-arm64"), "{err}");
    }

    #[test]
    fn missing_k3s_says_what_and_how() {
        let text = missing_k3s_text(Arch::X86_64, "download failed: no network");
        for part in [
            "k3s v1.35.2+k3s1 for x86_64",
            "download failed: no network",
            "https://github.com/k3s-io/k3s/releases/download/v1.35.2%2Bk3s1/k3s, expected SHA-256",
            "3ae8e35a62ac83e8e197c117858a564134057a7b8703cf73e67ce60d19f4a22b",
            "--k3s FILE",
            "--images FILE",
            "k3s-airgap-images-amd64.tar.zst",
            "--profile base",
        ] {
            assert!(text.contains(part), "missing {part:?} in:\n{text}");
        }
        let arm = missing_k3s_text(Arch::Aarch64, "x");
        assert!(arm.contains("/k3s-arm64"), "{arm}");
        assert!(arm.contains("none known"), "{arm}");
    }

    #[test]
    fn images_dir_is_listed_sorted() {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::write(t.path().join("b.tar"), b"b").expect("write");
        std::fs::write(t.path().join("a.tar.zst"), b"a").expect("write");
        std::fs::create_dir(t.path().join("sub")).expect("mkdir");
        let (imgs, note) = resolve_images(Arch::X86_64, Some(t.path())).expect("images");
        assert!(note.is_none());
        let names: Vec<_> = imgs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["a.tar.zst", "b.tar"]);
        assert!(imgs.iter().all(|i| !i.pinned));
        let empty = tempfile::tempdir().expect("tmp");
        let (imgs, note) = resolve_images(Arch::X86_64, Some(empty.path())).expect("images");
        assert!(imgs.is_empty());
        assert!(note.expect("note").contains("holds no files"));
    }
}
