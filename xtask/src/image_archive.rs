//! Container image archives as k3s imports them from `agent/images/`: which file names it takes
//! (the extension picks the decompressor, case-insensitively: `.tar`, `.tar.gz`/`.tgz`,
//! `.tar.zst`/`.tzst`, `.tar.bz2`/`.tbz`, `.tar.lz4`; anything else is skipped by k3s with an
//! error in its log), whether the bytes agree with the name, and which image references a
//! docker-archive (`manifest.json` RepoTags) or OCI layout (`index.json` annotations) holds.
//! Also the small tar writer the tests and stand-ins make archives with.
//!
//! Compressed archives are read through the system's decompressors (`gzip`, `zstd`, `bzip2`,
//! `lz4`) as a stream; only the tar headers and the small index files are kept.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// k3s's zstd decoder is capped at 32 MiB (rancher/wharfie `MaxDecoderMemory`): a frame whose
/// window is larger (`zstd --long=26` and up) fails there with "window size exceeded".
pub const K3S_ZSTD_MAX_WINDOW: u64 = 1 << 25;
/// The index files are small; a larger one is not an image archive's.
const INDEX_LIMIT: u64 = 16 << 20;

/// How an archive is compressed, as its name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Bzip2,
    Lz4,
}

/// The names k3s imports, lower-case, with what each means.
const EXTENSIONS: &[(&str, Compression)] = &[
    (".tar", Compression::None),
    (".tar.gz", Compression::Gzip),
    (".tgz", Compression::Gzip),
    (".tar.zst", Compression::Zstd),
    (".tzst", Compression::Zstd),
    (".tar.bz2", Compression::Bzip2),
    (".tbz", Compression::Bzip2),
    (".tar.lz4", Compression::Lz4),
];

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Lz4 => "lz4",
        }
    }

    /// What k3s would do with a file of this name: `None` when it skips it.
    pub fn of_name(name: &str) -> Option<Compression> {
        let lower = name.to_ascii_lowercase();
        EXTENSIONS
            .iter()
            .find(|(ext, _)| lower.ends_with(ext) && lower.len() > ext.len())
            .map(|(_, c)| *c)
    }

    /// What the first bytes say.
    fn of_bytes(head: &[u8]) -> Option<Compression> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(Compression::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else if head.starts_with(b"BZh") {
            Some(Compression::Bzip2)
        } else if head.starts_with(&[0x04, 0x22, 0x4d, 0x18]) {
            Some(Compression::Lz4)
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            Some(Compression::None)
        } else {
            None
        }
    }

    fn tool(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Gzip => Some("gzip"),
            Compression::Zstd => Some("zstd"),
            Compression::Bzip2 => Some("bzip2"),
            Compression::Lz4 => Some("lz4"),
        }
    }
}

/// The layout inside the tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `docker save`: `manifest.json` with RepoTags.
    DockerArchive,
    /// An OCI image layout: `oci-layout` and `index.json`.
    Oci,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::DockerArchive => "docker-archive",
            Format::Oci => "oci",
        }
    }
}

/// What an accepted archive holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    pub compression: Compression,
    pub format: Format,
    /// The image references it names, as written in it.
    pub refs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{file}: k3s does not import a file of this name from agent/images (it takes {}); rename it or give another file", accepted())]
    Extension { file: PathBuf },
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: named as {named} but the content is {found}; k3s picks the decompressor by the name, so it would fail to import it")]
    Mismatch {
        file: PathBuf,
        named: &'static str,
        found: String,
    },
    #[error("{file}: zstd window of {window} bytes is over k3s's decoder limit of {K3S_ZSTD_MAX_WINDOW} (compress without --long, or with --long=25 or less)")]
    ZstdWindow { file: PathBuf, window: u64 },
    #[error("{file}: cannot decompress with {tool}: {reason}")]
    Decompress {
        file: PathBuf,
        tool: &'static str,
        reason: String,
    },
    #[error("{file}: malformed tar at byte {offset}: {reason}")]
    Tar {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{file}: not an image archive: {reason}")]
    NotImage { file: PathBuf, reason: String },
}

fn accepted() -> String {
    EXTENSIONS
        .iter()
        .map(|(e, _)| *e)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks `file` as k3s would import it and lists the images it holds.
pub fn inspect(file: &Path) -> Result<Archive, ArchiveError> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let compression =
        Compression::of_name(&name).ok_or_else(|| ArchiveError::Extension { file: file.into() })?;
    let head = read_head(file, 512)?;
    let found = Compression::of_bytes(&head);
    if found != Some(compression) {
        return Err(ArchiveError::Mismatch {
            file: file.into(),
            named: if compression == Compression::None {
                "an uncompressed tar"
            } else {
                compression.name()
            },
            found: found.map_or("neither a tar nor a compressed stream".into(), |c| {
                format!("{} data", c.name())
            }),
        });
    }
    if compression == Compression::Zstd {
        if let Some(window) = zstd_window(&head).filter(|w| *w > K3S_ZSTD_MAX_WINDOW) {
            return Err(ArchiveError::ZstdWindow {
                file: file.into(),
                window,
            });
        }
    }
    let index = read_files(file, compression, |n| {
        matches!(n, "manifest.json" | "index.json" | "oci-layout")
    })?;
    let (format, refs) = image_refs(file, &index)?;
    Ok(Archive {
        compression,
        format,
        refs,
    })
}

fn read_head(file: &Path, n: u64) -> Result<Vec<u8>, ArchiveError> {
    let mut head = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(n).read_to_end(&mut head))
        .map_err(|source| ArchiveError::Read {
            file: file.into(),
            source,
        })?;
    Ok(head)
}

/// The window size the first zstd frame asks its decoder for (RFC 8878 section 3.1.1.1);
/// `None` when the header is cut short.
pub fn zstd_window(head: &[u8]) -> Option<u64> {
    let fhd = *head.get(4)?;
    let single_segment = fhd & 0x20 != 0;
    if !single_segment {
        let wd = *head.get(5)?;
        let base = 1u64 << (10 + u64::from(wd >> 3));
        return Some(base + (base / 8) * u64::from(wd & 7));
    }
    // Single segment: the window is the content size, after the dictionary id.
    let dict_len = [0usize, 1, 2, 4][usize::from(fhd & 3)];
    let at = 5 + dict_len;
    let field = |n: usize| -> Option<u64> {
        let b = head.get(at..at + n)?;
        Some(b.iter().rev().fold(0u64, |v, x| (v << 8) | u64::from(*x)))
    };
    match fhd >> 6 {
        0 => field(1),
        1 => field(2).map(|v| v + 256),
        2 => field(4),
        _ => field(8),
    }
}

/// The files [`read_files`] kept, and how many entries the archive has.
#[derive(Debug, Default)]
pub struct Kept {
    pub files: Vec<(String, Vec<u8>)>,
    pub entries: usize,
}

impl Kept {
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_slice())
    }
}

/// Streams the tar in `file` (through its decompressor) and keeps the regular files whose
/// names `want` picks (each at most 16 MiB; a leading `./` is dropped from names).
pub fn read_files(
    file: &Path,
    compression: Compression,
    want: impl Fn(&str) -> bool,
) -> Result<Kept, ArchiveError> {
    let Some(tool) = compression.tool() else {
        let f = std::fs::File::open(file).map_err(|source| ArchiveError::Read {
            file: file.into(),
            source,
        })?;
        return scan_tar(file, std::io::BufReader::with_capacity(1 << 20, f), want);
    };
    let failed = |reason: String| ArchiveError::Decompress {
        file: file.into(),
        tool,
        reason,
    };
    let mut child = Command::new(tool)
        .arg("-dc")
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run {tool} (install it): {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| failed("no output".into()))?;
    let mut stream = std::io::BufReader::with_capacity(1 << 20, stdout);
    let scanned = scan_tar(file, &mut stream, want);
    // The rest (tar's padding, or what follows a bad header) is read too: the decompressor
    // then checks the whole stream and is not killed by a closed pipe.
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    scanned
}

/// Walks tar headers, keeping the wanted files and skipping everything else.
fn scan_tar(
    file: &Path,
    mut r: impl Read,
    want: impl Fn(&str) -> bool,
) -> Result<Kept, ArchiveError> {
    let mut kept = Kept::default();
    let mut offset = 0u64;
    let mut long_name: Option<String> = None;
    let bad = |offset: u64, reason: &str| ArchiveError::Tar {
        file: file.into(),
        offset,
        reason: reason.to_string(),
    };
    let read_err = |at: u64, source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            bad(at, "cut short")
        } else {
            ArchiveError::Read {
                file: file.into(),
                source,
            }
        }
    };
    loop {
        let mut h = [0u8; 512];
        if !read_full(&mut r, &mut h).map_err(|e| read_err(offset, e))? {
            break; // The end of the stream without the zero blocks: tar accepts it too.
        }
        if h.iter().all(|b| *b == 0) {
            break;
        }
        let size = header_size(&h).ok_or_else(|| bad(offset, "bad size field"))?;
        check_sum(&h).ok_or_else(|| bad(offset, "header checksum does not match"))?;
        offset += 512;
        let kind = h[156];
        let name = long_name.take().unwrap_or_else(|| header_name(&h));
        let name = name.trim_start_matches("./").to_string();
        let padded = size.div_ceil(512) * 512;
        let regular = kind == b'0' || kind == 0;
        if kind == b'L' || kind == b'x' || (regular && want(&name)) {
            if size > INDEX_LIMIT {
                return Err(bad(offset, &format!("{name}: {size} bytes is too large")));
            }
            let mut data = vec![0u8; padded as usize];
            if !read_full(&mut r, &mut data).map_err(|e| read_err(offset, e))? {
                return Err(bad(offset, "cut short"));
            }
            data.truncate(size as usize);
            match kind {
                b'L' => long_name = Some(cstr(&data)),
                b'x' => long_name = pax_path(&data),
                _ => kept.files.push((name, data)),
            }
        } else {
            let skipped = std::io::copy(&mut (&mut r).take(padded), &mut std::io::sink())
                .map_err(|e| read_err(offset, e))?;
            if skipped != padded {
                return Err(bad(offset, "cut short"));
            }
        }
        offset += padded;
        if kind != b'L' && kind != b'x' {
            kept.entries += 1;
        }
    }
    Ok(kept)
}

/// Fills `buf`; false when the stream ended before its first byte.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 if got == 0 => return Ok(false),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(true)
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn header_name(h: &[u8; 512]) -> String {
    let name = cstr(&h[..100]);
    let prefix = if &h[257..262] == b"ustar" {
        cstr(&h[345..500])
    } else {
        String::new()
    };
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

/// The size field: octal text, or GNU base-256 (high bit set) for large files.
fn header_size(h: &[u8; 512]) -> Option<u64> {
    let f = &h[124..136];
    if f[0] & 0x80 != 0 {
        return Some(f[1..].iter().fold(0u64, |v, b| (v << 8) | u64::from(*b)));
    }
    let text = cstr(f);
    let text = text.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// The header checksum: the byte sum with the checksum field read as spaces.
fn check_sum(h: &[u8; 512]) -> Option<()> {
    let stored = u64::from_str_radix(cstr(&h[148..156]).trim(), 8).ok()?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(*b)
            }
        })
        .sum();
    (sum == stored).then_some(())
}

/// The `path` record of a PAX extended header, which names the next entry.
fn pax_path(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.lines().find_map(|l| {
        let (_, kv) = l.split_once(' ')?;
        kv.strip_prefix("path=").map(str::to_string)
    })
}

/// The format and the references in the index files.
fn image_refs(file: &Path, index: &Kept) -> Result<(Format, Vec<String>), ArchiveError> {
    let not = |reason: String| ArchiveError::NotImage {
        file: file.into(),
        reason,
    };
    let (format, refs) = if let Some(m) = index.get("manifest.json") {
        let v: serde_json::Value = serde_json::from_slice(m)
            .map_err(|e| not(format!("manifest.json does not parse: {e}")))?;
        let list = v
            .as_array()
            .ok_or_else(|| not("manifest.json is not a list".into()))?;
        let refs = list
            .iter()
            .filter_map(|e| e["RepoTags"].as_array())
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect();
        (Format::DockerArchive, refs)
    } else if let (Some(i), Some(_)) = (index.get("index.json"), index.get("oci-layout")) {
        let v: serde_json::Value = serde_json::from_slice(i)
            .map_err(|e| not(format!("index.json does not parse: {e}")))?;
        (Format::Oci, oci_refs(&v))
    } else {
        return Err(not(format!(
            "no manifest.json (docker-archive) or oci-layout and index.json (OCI) among its {} entries",
            index.entries
        )));
    };
    if refs.is_empty() {
        return Err(not(format!(
            "a {} with no image name (no RepoTags, no io.containerd.image.name or full \
             org.opencontainers.image.ref.name): no pod could refer to what k3s imports",
            format.name()
        )));
    }
    Ok((format, refs))
}

/// OCI names: containerd's own annotation, else a ref.name that is a whole reference (a bare
/// tag there needs a name given at import, which k3s does not give).
fn oci_refs(index: &serde_json::Value) -> Vec<String> {
    let Some(list) = index["manifests"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|m| {
            let a = &m["annotations"];
            a["io.containerd.image.name"]
                .as_str()
                .map(str::to_string)
                .or_else(|| {
                    a["org.opencontainers.image.ref.name"]
                        .as_str()
                        .filter(|r| r.contains('/') || r.contains(':'))
                        .map(str::to_string)
                })
        })
        .collect()
}

/// A reference as containerd stores it: `docker.io/` and `library/` added to Docker Hub names,
/// `:latest` to one without a tag or digest.
pub fn normalize(reference: &str) -> String {
    let mut r = reference.to_string();
    let first = r.split('/').next().unwrap_or("");
    let has_registry =
        r.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if !r.contains('/') {
        r = format!("docker.io/library/{r}");
    } else if !has_registry {
        r = format!("docker.io/{r}");
    }
    let last = r.rsplit('/').next().unwrap_or("");
    if !last.contains(':') && !r.contains('@') {
        r.push_str(":latest");
    }
    r
}

/// A ustar archive of `entries` (name, content; regular files, mode 0644, mtime 0), with the
/// closing zero blocks. For tests and stand-ins; names up to 100 bytes.
// Also for the stand-in image of `cargo xtask test`'s gateway build.
#[cfg_attr(not(test), allow(dead_code))]
pub fn tar_bytes(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        let mut h = [0u8; 512];
        h[..name.len().min(100)].copy_from_slice(&name.as_bytes()[..name.len().min(100)]);
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// A docker-archive (`docker save` layout) of one image with one empty layer, tagged `refs`.
/// Not runnable: its config names no command; k3s imports it and containerd can unpack it.
// Also for the stand-in image of `cargo xtask test`'s gateway build.
#[cfg_attr(not(test), allow(dead_code))]
pub fn docker_archive_bytes(refs: &[&str]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let layer = tar_bytes(&[]);
    let layer_id = crate::cache::hex(&Sha256::digest(&layer));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_id}")]},
    })
    .to_string();
    let config_id = crate::cache::hex(&Sha256::digest(config.as_bytes()));
    let manifest = serde_json::json!([{
        "Config": format!("blobs/sha256/{config_id}"),
        "RepoTags": refs,
        "Layers": [format!("blobs/sha256/{layer_id}")],
    }])
    .to_string();
    tar_bytes(&[
        (&format!("blobs/sha256/{config_id}"), config.as_bytes()),
        (&format!("blobs/sha256/{layer_id}"), &layer),
        ("manifest.json", manifest.as_bytes()),
    ])
}

/// Writes `bytes` to `path` compressed with `compression`, through the same tools [`inspect`]
/// reads with.
// Also for the stand-in image of `cargo xtask test`'s gateway build.
#[cfg_attr(not(test), allow(dead_code))]
pub fn write_compressed(
    path: &Path,
    bytes: &[u8],
    compression: Compression,
) -> std::io::Result<()> {
    let Some(tool) = compression.tool() else {
        return std::fs::write(path, bytes);
    };
    let out = std::fs::File::create(path)?;
    let mut child = Command::new(tool)
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("no stdin"))?
        .write_all(bytes)?;
    let status = child.wait()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("{tool} -c: {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_k3s_imports_and_names_it_skips() {
        for (name, c) in [
            ("gw.tar", Compression::None),
            ("GW.TAR.ZST", Compression::Zstd),
            ("a.tzst", Compression::Zstd),
            ("a.tar.gz", Compression::Gzip),
            ("a.tgz", Compression::Gzip),
            ("a.tar.bz2", Compression::Bzip2),
            ("a.tbz", Compression::Bzip2),
            ("a.tar.lz4", Compression::Lz4),
        ] {
            assert_eq!(Compression::of_name(name), Some(c), "{name}");
        }
        for name in [
            "a.zst",
            "a.tar.xz",
            "a.gz",
            "a.txt",
            "image",
            ".tar",
            "a.tar.zstd",
        ] {
            assert_eq!(Compression::of_name(name), None, "{name}");
        }
    }

    #[test]
    fn a_skipped_name_is_refused_naming_the_file_and_the_accepted_names() {
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("gateway.tar.xz");
        std::fs::write(&f, docker_archive_bytes(&["openshell/gateway:dev"])).expect("write");
        let text = inspect(&f).expect_err("refused").to_string();
        assert!(text.contains(&f.display().to_string()), "{text}");
        assert!(text.contains(".tar.zst") && text.contains(".tgz"), "{text}");
    }

    #[test]
    fn docker_archives_are_read_plain_and_in_every_compression_k3s_takes() {
        let t = tempfile::tempdir().expect("tmp");
        let tar = docker_archive_bytes(&["openshell/gateway:dev", "ghcr.io/x/y:1"]);
        for (name, c) in [
            ("a.tar", Compression::None),
            ("a.tar.gz", Compression::Gzip),
            ("a.tar.zst", Compression::Zstd),
            ("a.TBZ", Compression::Bzip2),
            ("a.tar.lz4", Compression::Lz4),
        ] {
            let f = t.path().join(name);
            write_compressed(&f, &tar, c).expect("write");
            let a = inspect(&f).expect(name);
            assert_eq!(a.compression, c);
            assert_eq!(a.format, Format::DockerArchive);
            assert_eq!(a.refs, ["openshell/gateway:dev", "ghcr.io/x/y:1"]);
        }
    }

    #[test]
    fn oci_layouts_give_their_full_names_only() {
        let t = tempfile::tempdir().expect("tmp");
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"annotations": {"io.containerd.image.name": "registry.k8s.io/a/b:v1",
                             "org.opencontainers.image.ref.name": "v1"}},
            {"annotations": {"org.opencontainers.image.ref.name": "docker.io/c/d:2"}},
            {"annotations": {"org.opencontainers.image.ref.name": "latest"}},
        ]})
        .to_string();
        let f = t.path().join("ctl.tar");
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        std::fs::write(
            &f,
            tar_bytes(&[("oci-layout", layout), ("index.json", index.as_bytes())]),
        )
        .expect("write");
        let a = inspect(&f).expect("oci");
        assert_eq!(a.format, Format::Oci);
        assert_eq!(a.refs, ["registry.k8s.io/a/b:v1", "docker.io/c/d:2"]);
        // Only a bare tag: nothing a pod could name.
        let bare = serde_json::json!({"manifests": [
            {"annotations": {"org.opencontainers.image.ref.name": "v1"}}]})
        .to_string();
        let g = t.path().join("bare.tar");
        std::fs::write(
            &g,
            tar_bytes(&[("oci-layout", layout), ("index.json", bare.as_bytes())]),
        )
        .expect("write");
        let text = inspect(&g).expect_err("unnamed").to_string();
        assert!(text.contains("bare.tar: not an image archive"), "{text}");
    }

    #[test]
    fn content_that_disagrees_with_the_name_or_is_no_image_is_refused() {
        let t = tempfile::tempdir().expect("tmp");
        let tar = docker_archive_bytes(&["a:b"]);
        let f = t.path().join("a.tar.zst");
        write_compressed(&f, &tar, Compression::Gzip).expect("write");
        let text = inspect(&f).expect_err("gzip named zst").to_string();
        assert!(
            text.contains("named as zstd but the content is gzip"),
            "{text}"
        );
        let g = t.path().join("text.tar");
        std::fs::write(&g, b"a small stand-in\n").expect("write");
        let text = inspect(&g).expect_err("text").to_string();
        assert!(text.contains("neither a tar nor"), "{text}");
        let h = t.path().join("files.tar");
        std::fs::write(&h, tar_bytes(&[("etc/passwd", b"root:x:0:0::/:/bin/sh\n")]))
            .expect("write");
        let text = inspect(&h).expect_err("a plain tar").to_string();
        assert!(
            text.contains("files.tar: not an image archive: no manifest.json"),
            "{text}"
        );
        let mut cut = tar_bytes(&[("manifest.json", b"[]")]);
        cut.truncate(600);
        let k = t.path().join("cut.tar");
        std::fs::write(&k, cut).expect("write");
        let text = inspect(&k).expect_err("cut short").to_string();
        assert!(text.contains("cut.tar: malformed tar"), "{text}");
    }

    #[test]
    fn a_zstd_window_over_k3s_limit_is_refused() {
        // Frame header: magic, descriptor (no single segment), window descriptor.
        let wd = |exp: u8| vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, exp << 3];
        assert_eq!(zstd_window(&wd(15)), Some(1 << 25));
        assert_eq!(zstd_window(&wd(17)), Some(1 << 27));
        // Single segment, 2-byte content size 0x0100 (+256).
        assert_eq!(
            zstd_window(&[0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0x01]),
            Some(512)
        );
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("long.tar.zst");
        let mut bytes = wd(17);
        bytes.resize(64, 0);
        std::fs::write(&f, bytes).expect("write");
        let text = inspect(&f).expect_err("window").to_string();
        assert!(
            text.contains("long.tar.zst: zstd window of 134217728"),
            "{text}"
        );
    }

    #[test]
    fn references_are_compared_as_containerd_names_them() {
        assert_eq!(normalize("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            normalize("openshell/gateway:dev"),
            "docker.io/openshell/gateway:dev"
        );
        assert_eq!(normalize("ghcr.io/a/b"), "ghcr.io/a/b:latest");
        assert_eq!(normalize("localhost:5000/a:1"), "localhost:5000/a:1");
        assert_eq!(normalize("localhost/a"), "localhost/a:latest");
        assert_eq!(normalize("r.io/a@sha256:00"), "r.io/a@sha256:00");
    }
}
