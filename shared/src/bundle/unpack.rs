//! Reading a bundle: the zstd stream (ruzstd: pure Rust, so the macOS host needs no C), the outer
//! tar, the manifest first, then each member in the manifest's order into a directory, hashed as
//! it streams. A member whose name, size or SHA-256 differs from the manifest, a missing member,
//! or anything after the last one is refused, naming it; the caller never uses a directory an
//! unpack failed in.

use std::fs::OpenOptions;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ruzstd::decoding::{FrameDecoder, StreamingDecoder};
use sha2::{Digest, Sha256};

use super::error::BundleError;
use super::manifest::{hex, Manifest, Member, INIT, MANIFEST, MAX_MANIFEST_BYTES, ROOTFS};
use super::owners::Owners;
use super::root::{unpack_root, RootSummary};
use super::tar::{Kind, Reader};

type Decoder<R> = StreamingDecoder<BufReader<R>, FrameDecoder>;

/// A bundle whose manifest has been read and checked; the members are still unread.
pub struct Opened<R: Read> {
    pub manifest: Manifest,
    /// The manifest as stored: the completion marker of an unpacked copy.
    pub manifest_bytes: Vec<u8>,
    tar: Reader<Decoder<R>>,
}

/// Reads the manifest, the bundle's first member.
pub fn open<R: Read>(input: R) -> Result<Opened<R>, BundleError> {
    let decoder = StreamingDecoder::new(BufReader::with_capacity(1 << 20, input))
        .map_err(|e| BundleError::Compression(e.to_string()))?;
    let mut tar = Reader::new(decoder);
    let tar_err = |source| BundleError::Tar {
        member: MANIFEST.into(),
        source,
    };
    let Some(h) = tar.next_entry().map_err(tar_err)? else {
        return Err(BundleError::member(
            MANIFEST,
            "missing: the bundle is empty",
        ));
    };
    if h.path != MANIFEST.as_bytes() || h.kind != Kind::File {
        return Err(BundleError::member(
            MANIFEST,
            format!(
                "missing: the first member is {:?}",
                String::from_utf8_lossy(&h.path)
            ),
        ));
    }
    if h.size > MAX_MANIFEST_BYTES {
        return Err(BundleError::member(
            MANIFEST,
            format!("{} bytes, over the limit of {MAX_MANIFEST_BYTES}", h.size),
        ));
    }
    let mut manifest_bytes = Vec::new();
    tar.body()
        .read_to_end(&mut manifest_bytes)
        .map_err(|e| tar_err(e.into()))?;
    let manifest = Manifest::parse(&manifest_bytes)?;
    Ok(Opened {
        manifest,
        manifest_bytes,
        tar,
    })
}

impl<R: Read> Opened<R> {
    /// Unpacks every member into `dir` (existing and empty): `kernel`, `vmlinux`,
    /// `openshell-init` as files, the root filesystem as `rootfs/`. Nothing is synced here.
    pub fn unpack_into(mut self, dir: &Path, owners: Owners) -> Result<RootSummary, BundleError> {
        let mut summary = RootSummary::default();
        for member in self.manifest.members.clone() {
            let tar_err = |source| BundleError::Tar {
                member: member.name.clone(),
                source,
            };
            let Some(h) = self.tar.next_entry().map_err(tar_err)? else {
                return Err(BundleError::member(
                    &member.name,
                    "missing: the archive ends before it (truncated)",
                ));
            };
            if h.path != member.name.as_bytes() || h.kind != Kind::File {
                return Err(BundleError::member(
                    &member.name,
                    format!(
                        "missing: found {:?} where it should be",
                        String::from_utf8_lossy(&h.path)
                    ),
                ));
            }
            if h.size != member.size {
                return Err(BundleError::member(
                    &member.name,
                    format!("{} bytes, the manifest says {}", h.size, member.size),
                ));
            }
            let mut body = Hashing::new(self.tar.body());
            if member.name == ROOTFS {
                let root = dir.join("rootfs");
                std::fs::create_dir(&root).map_err(|e| BundleError::io("create", &root, e))?;
                let (s, mut rest) = unpack_root(&mut body, &root, owners)?;
                // The member's bytes after the end marker count too.
                io::copy(&mut rest, &mut io::sink()).map_err(|e| tar_err(e.into()))?;
                summary = s;
            } else {
                write_member(&member, &mut body, dir)?;
            }
            check_digest(&member, body.finish())?;
        }
        match self.tar.next_entry() {
            Ok(None) => Ok(summary),
            Ok(Some(h)) => Err(BundleError::member(
                &String::from_utf8_lossy(&h.path),
                "not listed in the manifest",
            )),
            Err(source) => Err(BundleError::Tar {
                member: "(after the last member)".into(),
                source,
            }),
        }
    }
}

/// Fails unless `found` (lowercase hex) is the member's digest.
pub fn check_digest(member: &Member, found: String) -> Result<(), BundleError> {
    if found != member.sha256 {
        return Err(BundleError::Digest {
            member: member.name.clone(),
            expected: member.sha256.clone(),
            found,
        });
    }
    Ok(())
}

/// The SHA-256 of a file, lowercase hex.
pub fn file_digest(path: &Path) -> Result<String, BundleError> {
    let file = std::fs::File::open(path).map_err(|e| BundleError::io("open", path, e))?;
    let mut h = Hashing::new(file);
    io::copy(&mut h, &mut io::sink()).map_err(|e| BundleError::io("read", path, e))?;
    Ok(h.finish())
}

fn write_member<R: Read>(member: &Member, body: &mut R, dir: &Path) -> Result<(), BundleError> {
    let path = dir.join(&member.name);
    let mode = if member.name == INIT { 0o755 } else { 0o644 };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| BundleError::io("create", &path, e))?;
    io::copy(body, &mut file).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::Other | io::ErrorKind::InvalidData => {
            BundleError::member(
                &member.name,
                format!("reading it (truncated or damaged bundle): {e}"),
            )
        }
        _ => BundleError::io("write", &path, e),
    })?;
    file.sync_all()
        .map_err(|e| BundleError::io("fsync", &path, e))
}

/// A reader that hashes what passes through it.
pub struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
        }
    }

    pub fn finish(self) -> String {
        hex(&self.hash.finalize())
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}
