//! Writing a bundle (xtask, on Linux): the root filesystem walked into a tar (owners, modes,
//! xattrs, symlinks, hard links, device nodes; sorted, so the same tree gives the same bytes),
//! every member hashed, the manifest first, all in one zstd stream, written beside the output
//! and renamed over it when complete.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::BundleError;
use super::manifest::{hex, Manifest, Member, VmSizing, INIT, KERNEL, MANIFEST, ROOTFS};
use super::tar::{write_end, write_header, write_padding, Header, Kind, Xattrs};
use super::unpack::{check_digest, Hashing};
use crate::arch::Arch;

/// What goes into a bundle.
pub struct Inputs<'a> {
    pub crate_version: &'a str,
    pub arch: Arch,
    pub profile: &'a str,
    pub kernel: &'a Path,
    pub init: &'a Path,
    pub rootfs: &'a Path,
    pub vm: Option<VmSizing>,
    /// zstd level (3 is zstd's default).
    pub level: i32,
}

/// Writes the bundle to `out`; returns its manifest.
pub fn write_bundle(inputs: &Inputs, out: &Path) -> Result<Manifest, BundleError> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let root_tar = tempfile_in(dir, &format!(".{name}.rootfs"));
    let result = write_with(inputs, out, dir, &name, &root_tar);
    let _ = std::fs::remove_file(&root_tar);
    result
}

fn write_with(
    inputs: &Inputs,
    out: &Path,
    dir: &Path,
    name: &str,
    root_tar: &Path,
) -> Result<Manifest, BundleError> {
    let rootfs = {
        let file = File::create(root_tar).map_err(|e| BundleError::io("create", root_tar, e))?;
        let mut w = HashingWriter::new(BufWriter::new(file));
        write_root(inputs.rootfs, &mut w)?;
        let (size, sha256, _) = w
            .finish()
            .map_err(|e| BundleError::io("write", root_tar, e))?;
        Member {
            name: ROOTFS.into(),
            size,
            sha256,
        }
    };
    let files = [
        (KERNEL, inputs.kernel.to_path_buf()),
        (INIT, inputs.init.to_path_buf()),
        (ROOTFS, root_tar.to_path_buf()),
    ];
    let mut members = Vec::new();
    for (member, path) in &files[..files.len() - 1] {
        members.push(describe(member, path)?);
    }
    members.push(rootfs);
    let manifest = Manifest::new(
        inputs.crate_version,
        inputs.arch,
        inputs.profile,
        members,
        inputs.vm,
    );
    let partial = tempfile_in(dir, &format!(".{name}"));
    let written = write_outer(&manifest, &files, inputs.level, &partial).and_then(|()| {
        std::fs::rename(&partial, out).map_err(|e| BundleError::io("rename to", out, e))
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written.map(|()| manifest)
}

fn describe(member: &str, path: &Path) -> Result<Member, BundleError> {
    let size = std::fs::metadata(path)
        .map_err(|e| BundleError::io("stat", path, e))?
        .len();
    let sha256 = super::unpack::file_digest(path)?;
    Ok(Member {
        name: member.into(),
        size,
        sha256,
    })
}

/// The outer tar in one zstd frame: the manifest, then each member, re-hashed as copied (a file
/// that changed since it was described is an error, not a bundle that fails at every host).
fn write_outer(
    manifest: &Manifest,
    files: &[(&str, PathBuf)],
    level: i32,
    partial: &Path,
) -> Result<(), BundleError> {
    let io = |e| BundleError::io("write", partial, e);
    let file = File::create(partial).map_err(io)?;
    let mut z = zstd::Encoder::new(BufWriter::new(file), level).map_err(io)?;
    z.include_checksum(true).map_err(io)?;
    let json = manifest.to_json();
    write_header(&mut z, &Header::file(MANIFEST, json.len() as u64, 0o644)).map_err(io)?;
    z.write_all(&json).map_err(io)?;
    write_padding(&mut z, json.len() as u64).map_err(io)?;
    for (member, (name, path)) in manifest.members.iter().zip(files) {
        debug_assert_eq!(member.name, *name);
        write_header(&mut z, &Header::file(name, member.size, 0o644)).map_err(io)?;
        let src = File::open(path).map_err(|e| BundleError::io("open", path, e))?;
        let mut hashing = Hashing::new(io::Read::take(src, member.size));
        let copied = io::copy(&mut hashing, &mut z).map_err(io)?;
        if copied != member.size {
            return Err(BundleError::member(
                name,
                format!("{} changed while it was written", path.display()),
            ));
        }
        check_digest(member, hashing.finish())?;
        write_padding(&mut z, member.size).map_err(io)?;
    }
    write_end(&mut z).map_err(io)?;
    let file = z
        .finish()
        .map_err(io)?
        .into_inner()
        .map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

/// The tree at `root` as a tar: "." first, then every entry in name order, parents first.
pub fn write_root<W: Write>(root: &Path, w: &mut W) -> Result<(), BundleError> {
    let mut links = HashMap::new();
    let meta = std::fs::symlink_metadata(root).map_err(|e| BundleError::io("stat", root, e))?;
    if !meta.is_dir() {
        return Err(BundleError::io(
            "read the root filesystem",
            root,
            io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
        ));
    }
    entry(root, b".".to_vec(), &meta, &mut links, w)?;
    walk(root, root, &mut links, w)?;
    write_end(w).map_err(|e| BundleError::io("write the root of", root, e))
}

fn walk<W: Write>(
    root: &Path,
    dir: &Path,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
    w: &mut W,
) -> Result<(), BundleError> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| BundleError::io("list", dir, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| BundleError::io("list", dir, e))?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| BundleError::io("stat", &path, e))?;
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .as_os_str()
            .as_bytes()
            .to_vec();
        if meta.file_type().is_socket() {
            continue; // a runtime leftover; nothing can be restored from it
        }
        entry(&path, rel, &meta, links, w)?;
        if meta.is_dir() {
            walk(root, &path, links, w)?;
        }
    }
    Ok(())
}

fn entry<W: Write>(
    path: &Path,
    rel: Vec<u8>,
    meta: &std::fs::Metadata,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
    w: &mut W,
) -> Result<(), BundleError> {
    let t = meta.file_type();
    let mut h = Header {
        path: rel,
        kind: Kind::File,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: u64::try_from(meta.mtime()).unwrap_or(0),
        size: 0,
        link: Vec::new(),
        dev: (0, 0),
        xattrs: Vec::new(),
    };
    if t.is_dir() {
        h.kind = Kind::Dir;
    } else if t.is_symlink() {
        h.kind = Kind::Symlink;
        h.link = std::fs::read_link(path)
            .map_err(|e| BundleError::io("read the link", path, e))?
            .into_os_string()
            .into_vec();
    } else if t.is_char_device() || t.is_block_device() {
        h.kind = if t.is_char_device() {
            Kind::Char
        } else {
            Kind::Block
        };
        h.dev = linux_dev(meta.rdev());
    } else if t.is_fifo() {
        h.kind = Kind::Fifo;
    } else if meta.nlink() > 1 {
        if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
            h.kind = Kind::HardLink;
            h.link = first.clone();
        } else {
            links.insert((meta.dev(), meta.ino()), h.path.clone());
            h.size = meta.len();
        }
    } else {
        h.size = meta.len();
    }
    if h.kind != Kind::HardLink {
        h.xattrs = xattrs(path)?;
    }
    let io = |e| BundleError::io("write the entry for", path, e);
    write_header(w, &h).map_err(io)?;
    if h.kind == Kind::File {
        let file = File::open(path).map_err(|e| BundleError::io("open", path, e))?;
        let copied = io::copy(&mut io::Read::take(file, h.size), w).map_err(io)?;
        if copied != h.size {
            return Err(BundleError::io(
                "read",
                path,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was read",
                ),
            ));
        }
        write_padding(w, h.size).map_err(io)?;
    }
    Ok(())
}

fn xattrs(path: &Path) -> Result<Xattrs, BundleError> {
    let io = |e| BundleError::io("read the xattrs of", path, e);
    let mut names: Vec<_> = xattr::list(path).map_err(io)?.collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        if let Some(value) = xattr::get(path, &name).map_err(io)? {
            out.push((name.into_vec(), value));
        }
    }
    Ok(out)
}

/// Major and minor from a Linux `st_rdev`.
fn linux_dev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// A name beside the output for a file written before it is renamed or removed.
fn tempfile_in(dir: &Path, prefix: &str) -> PathBuf {
    dir.join(format!("{prefix}.{}.partial", std::process::id()))
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
            len: 0,
        }
    }

    fn finish(mut self) -> io::Result<(u64, String, W)> {
        self.inner.flush()?;
        Ok((self.len, hex(&self.hash.finalize()), self.inner))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
