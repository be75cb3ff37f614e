//! Tests of the k3s pins and downloads. The downloads run the real curl against a local HTTP
//! server (`test_server`) laid out like the release: the assets and `sha256sum-<arch>.txt`.

use super::test_server::{Reply, Server};
use super::*;
use sha2::{Digest, Sha256};

fn sha(bytes: &[u8]) -> String {
    cache::hex(&Sha256::digest(bytes))
}

/// A `'static` SHA-256 for a pin made in a test.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// The release path on the server, as on GitHub.
const REL: &str = "/k3s-io/k3s/releases/download/v1.35.2%2Bk3s1";

/// A release of fake assets for `arch` served by `server`, cached under `dir`.
struct Fixture {
    server: Server,
    release: Release,
    k3s: Vec<u8>,
    images: Vec<u8>,
    _tmp: tempfile::TempDir,
}

impl Fixture {
    /// The k3s pin is `k3s_pin`'s, except that amd64's is the fake binary's SHA-256 (the real
    /// k3s cannot be served here) unless `real_pin`.
    fn new(arch: Arch, real_pin: bool) -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        let server = Server::start();
        let k3s = format!("fake k3s for {}", arch.name()).into_bytes();
        let images = format!("fake images for {}", arch.name()).into_bytes();
        let mut k3s_p = k3s_pin(arch);
        if k3s_p.sha256.is_some() && !real_pin {
            k3s_p.sha256 = Some(leak(sha(&k3s)));
        }
        let release = Release {
            url: format!("{}{REL}", server.url),
            dir: tmp.path().join("cache/downloads/k3s-v1.35.2-k3s1"),
            checksums: checksums_asset(arch),
            k3s: k3s_p,
            images: images_pin(arch),
        };
        let f = Self {
            server,
            release,
            k3s,
            images,
            _tmp: tmp,
        };
        f.serve(f.k3s_asset(), f.k3s.clone());
        f.serve(f.images_asset(), f.images.clone());
        f.serve_sums(&f.sums_text());
        f
    }

    fn k3s_asset(&self) -> &'static str {
        self.release.k3s.asset
    }

    fn images_asset(&self) -> &'static str {
        self.release.images.asset
    }

    fn serve(&self, asset: &str, body: Vec<u8>) {
        self.server
            .put(&format!("{REL}/{asset}"), Reply::Whole(body));
    }

    /// The release's layout: the three image tarballs, then the binary.
    fn sums_text(&self) -> String {
        let images = self.images_asset();
        let tar = images.trim_end_matches(".zst");
        format!(
            "{}  {tar}\n{}  {tar}.gz\n{}  {images}\n{}  {}\n",
            sha(b"tar"),
            sha(b"gz"),
            sha(&self.images),
            sha(&self.k3s),
            self.k3s_asset()
        )
    }

    fn serve_sums(&self, text: &str) {
        self.serve(self.release.checksums, text.as_bytes().to_vec());
    }

    fn gets(&self, asset: &str) -> usize {
        self.server.gets(&format!("{REL}/{asset}"))
    }

    fn url(&self, asset: &str) -> String {
        format!("{}/{asset}", self.release.url)
    }

    /// The names in the cache directory (none when it does not exist).
    fn cached_names(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.release.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = dir
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

#[test]
fn both_arches_binary_and_images_are_verified_and_cached() {
    for arch in [Arch::X86_64, Arch::Aarch64] {
        let f = Fixture::new(arch, false);
        let r = &f.release;
        for (pin, body) in [(r.k3s, &f.k3s), (r.images, &f.images)] {
            let got = r.fetch(pin).expect("verified download");
            assert_eq!(got.path, r.dir.join(pin.asset));
            assert_eq!(std::fs::read(&got.path).expect("read"), *body);
            assert_eq!(got.sha256, sha(body));
            assert!(got.pinned && got.origin == "download" && got.name == pin.asset);
            assert_eq!(r.cached(pin).expect("in the cache"), got);
        }
        let mut want = vec![
            f.k3s_asset().to_string(),
            f.images_asset().to_string(),
            r.checksums.to_string(),
        ];
        want.sort();
        assert_eq!(f.cached_names(), want, "{}", arch.name());
        assert_eq!(f.gets(r.checksums), 1, "the checksum file is fetched once");
        // Cached: no network. Served bytes changed meanwhile do not matter.
        f.serve(f.k3s_asset(), b"changed on the server".to_vec());
        r.fetch(r.k3s).expect("from the cache");
        assert_eq!((f.gets(f.k3s_asset()), f.gets(r.checksums)), (1, 1));
    }
}

#[test]
fn a_damaged_cached_asset_is_checked_again_and_replaced() {
    let f = Fixture::new(Arch::Aarch64, false);
    let r = &f.release;
    r.fetch(r.k3s).expect("download");
    let cached = r.dir.join(f.k3s_asset());
    std::fs::write(&cached, b"bit rot").expect("damage");
    assert!(r.cached(r.k3s).is_none(), "a damaged copy is not available");
    let got = r.fetch(r.k3s).expect("downloaded again");
    assert_eq!(std::fs::read(&got.path).expect("read"), f.k3s);
    assert_eq!(f.gets(f.k3s_asset()), 2);
    // A damaged cached checksum file is fetched again too.
    std::fs::write(r.dir.join(r.checksums), b"garbage\n").expect("damage");
    assert!(r.cached(r.k3s).is_none());
    r.fetch(r.k3s).expect("checksum file fetched again");
    assert_eq!(f.gets(r.checksums), 2);
}

/// The refusals below leave nothing of the refused asset in the cache, no partial file, and
/// the checksum file only when it passed its own checks.
fn assert_kept_only(f: &Fixture, checksums_kept: bool) {
    let want: Vec<String> = if checksums_kept {
        vec![f.release.checksums.to_string()]
    } else {
        Vec::new()
    };
    assert_eq!(f.cached_names(), want);
}

#[test]
fn a_tampered_asset_is_refused_and_not_kept() {
    for arch in [Arch::X86_64, Arch::Aarch64] {
        let f = Fixture::new(arch, false);
        let r = &f.release;
        f.serve(f.images_asset(), b"tampered images".to_vec());
        let err = r.fetch(r.images).expect_err("refused");
        assert!(matches!(err, PinError::DownloadMismatch { .. }), "{err}");
        let text = err.to_string();
        for part in [
            f.url(f.images_asset()),
            sha(&f.images),
            sha(b"tampered images"),
            f.url(r.checksums),
            "not kept".to_string(),
        ] {
            assert!(text.contains(&part), "missing {part:?} in {text}");
        }
        assert_kept_only(&f, true);
        assert!(r.cached(r.images).is_none());
    }
}

#[test]
fn a_tampered_checksum_file_is_refused_and_not_kept() {
    let f = Fixture::new(Arch::Aarch64, false);
    let r = &f.release;
    // A line that is not a checksum line: the file is refused, naming it and the line.
    let text = f.sums_text().replacen("  ", " ", 2);
    f.serve_sums(&text);
    let err = r.fetch(r.k3s).expect_err("refused");
    let msg = err.to_string();
    assert!(matches!(err, PinError::Sums(_)), "{msg}");
    assert!(
        msg.contains(&f.url(r.checksums)) && msg.contains("line 1"),
        "{msg}"
    );
    assert_eq!(
        f.gets(f.k3s_asset()),
        0,
        "nothing verified, nothing fetched"
    );
    assert_kept_only(&f, false);
    // A well-formed file with another digest for the binary: the download is refused.
    let other = f.sums_text().replace(&sha(&f.k3s), &sha(b"other"));
    f.serve_sums(&other);
    let err = r.fetch(r.k3s).expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&sha(b"other")) && msg.contains(&sha(&f.k3s)),
        "{msg}"
    );
    assert_kept_only(&f, true);
}

#[test]
fn an_asset_missing_from_the_checksum_file_is_never_downloaded() {
    let f = Fixture::new(Arch::Aarch64, false);
    let r = &f.release;
    let without: String = f
        .sums_text()
        .lines()
        .filter(|l| !l.ends_with(" k3s-arm64"))
        .map(|l| format!("{l}\n"))
        .collect();
    f.serve_sums(&without);
    let err = r.fetch(r.k3s).expect_err("refused");
    assert!(matches!(err, PinError::NotPublished { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&f.url(r.checksums)) && msg.contains("k3s-arm64"),
        "{msg}"
    );
    assert_eq!(f.gets(f.k3s_asset()), 0);
    assert_kept_only(&f, true);
    // The images it does list still come.
    r.fetch(r.images).expect("listed");
}

#[test]
fn a_checksum_file_disagreeing_with_the_amd64_pin_is_refused_naming_both() {
    // The real pin; the served checksum file lists the fake binary's SHA-256.
    let f = Fixture::new(Arch::X86_64, true);
    let r = &f.release;
    let pin = k3s_pin(Arch::X86_64).sha256.expect("amd64 is pinned");
    for asset in [r.k3s, r.images] {
        let err = r.fetch(asset).expect_err("refused");
        assert!(matches!(err, PinError::PinDisagrees { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(pin) && msg.contains(&sha(&f.k3s)), "{msg}");
        assert!(msg.contains(&f.url(r.checksums)), "{msg}");
    }
    assert_eq!((f.gets(f.k3s_asset()), f.gets(f.images_asset())), (0, 0));
    assert_kept_only(&f, false);
    // One that agrees with the pin verifies the binary with both.
    f.serve_sums(&f.sums_text().replace(&sha(&f.k3s), pin));
    let err = r
        .fetch(r.k3s)
        .expect_err("the fake binary is not the pinned k3s");
    assert!(err.to_string().contains(pin), "{err}");
    assert_kept_only(&f, true);
}

#[test]
fn a_truncated_download_is_refused_and_not_kept() {
    let f = Fixture::new(Arch::X86_64, false);
    let r = &f.release;
    f.server.put(
        &format!("{REL}/{}", f.k3s_asset()),
        Reply::Truncated {
            body: f.k3s[..5].to_vec(),
            announced: f.k3s.len(),
        },
    );
    let err = r.fetch(r.k3s).expect_err("refused");
    assert!(matches!(err, PinError::Download { .. }), "{err}");
    assert!(err.to_string().contains(&f.url(f.k3s_asset())), "{err}");
    assert_kept_only(&f, true);
    // Cut short without a length: what arrived is not what the checksum file says.
    f.serve(f.k3s_asset(), f.k3s[..5].to_vec());
    let err = r.fetch(r.k3s).expect_err("refused");
    assert!(matches!(err, PinError::DownloadMismatch { .. }), "{err}");
    assert_kept_only(&f, true);
}

#[test]
fn a_checksum_file_that_never_ends_is_cut_off() {
    let f = Fixture::new(Arch::Aarch64, false);
    let r = &f.release;
    f.server
        .put(&format!("{REL}/{}", r.checksums), Reply::Endless);
    let err = r.fetch(r.k3s).expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("more than the {}", sums::MAX_BYTES)),
        "{msg}"
    );
    assert!(msg.contains(&f.url(r.checksums)), "{msg}");
    assert_kept_only(&f, false);
}

#[test]
fn the_release_url_is_the_mirror_when_one_is_set() {
    let github = "https://github.com/k3s-io/k3s/releases/download/v1.35.2%2Bk3s1";
    assert_eq!(release_url_from(None), github);
    assert_eq!(release_url_from(Some("  ".into())), github);
    assert_eq!(
        release_url_from(Some("file:///srv/k3s/v1.35.2+k3s1/".into())),
        "file:///srv/k3s/v1.35.2+k3s1"
    );
}

#[test]
fn wrong_checksum_is_refused_naming_file_and_both_hashes() {
    let t = tempfile::tempdir().expect("tmp");
    let f = t.path().join("k3s");
    std::fs::write(&f, b"not k3s").expect("write");
    let pin = k3s_pin(Arch::X86_64);
    let expected = pin.sha256.expect("amd64 is pinned");
    let err = verify(&f, pin.asset, expected).expect_err("must be refused");
    let text = err.to_string();
    assert!(text.contains(&f.display().to_string()), "{text}");
    assert!(text.contains(expected), "{text}");
    assert!(text.contains(&sha(b"not k3s")), "{text}");
    assert!(text.contains("refusing"), "{text}");
    // The right one passes and returns its hash.
    assert_eq!(
        verify(&f, pin.asset, &sha(b"not k3s")).expect("matches"),
        sha(b"not k3s")
    );
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
    assert_eq!(i.sha256, sha(b"#!/bin/sh\n"));
    let pin = Pin {
        asset: "k3s",
        sha256: Some(leak(i.sha256.clone())),
    };
    assert!(local(&f, pin).expect("accepted").pinned);
    assert!(local(t.path(), pin).is_err(), "a directory is not a k3s");
}

#[test]
fn missing_k3s_says_what_and_how() {
    let text = missing_k3s_text(Arch::X86_64, "download failed: no network");
    for part in [
        "k3s v1.35.2+k3s1 for x86_64",
        "download failed: no network",
        "verified against its `sha256sum-amd64.txt`",
        "3ae8e35a62ac83e8e197c117858a564134057a7b8703cf73e67ce60d19f4a22b",
        RELEASE_URL_ENV,
        "/k3s)",
        "--k3s FILE",
        "--images FILE",
        "k3s-airgap-images-amd64.tar.zst",
        "--profile base",
    ] {
        assert!(text.contains(part), "missing {part:?} in:\n{text}");
    }
    let arm = missing_k3s_text(Arch::Aarch64, "x");
    assert!(arm.contains("/k3s-arm64"), "{arm}");
    assert!(arm.contains("`sha256sum-arm64.txt`."), "{arm}");
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
