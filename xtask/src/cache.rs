//! The artifact cache, outside the checkout so clean clones and CI runs on the same machine reuse
//! kernels and root filesystems. Every entry is named by a hash of its inputs and appears
//! atomically (built in a temporary directory, then renamed), so an interrupted build leaves
//! nothing that looks finished.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The cache's place: one rule for xtask and the host (`openshell_shared::cache`).
pub fn root() -> PathBuf {
    openshell_shared::cache::root()
}

/// Accumulates inputs into a short, stable key.
#[derive(Default)]
pub struct Key(Sha256);

impl Key {
    pub fn new(recipe: &str) -> Self {
        let mut k = Self(Sha256::new());
        k.str(recipe);
        k
    }

    /// Length-prefixed, so ("ab","c") and ("a","bc") differ.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    pub fn file(&mut self, path: &Path) -> Result<&mut Self> {
        let data = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        Ok(self.bytes(&data))
    }

    pub fn finish(&self) -> String {
        hex(&self.0.clone().finalize())[..16].to_string()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_file(path: &Path) -> Result<String> {
    sha256_streamed(path).map_err(|e| Error::io("read", path, e))
}

/// SHA-256 of a file read in 1 MiB pieces (image tarballs are hundreds of MB).
pub fn sha256_streamed(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Builds `dest` with `build` (given a scratch directory) unless it exists; returns `dest`.
pub fn entry(dest: &Path, build: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    if dest.exists() {
        return Ok(dest.to_path_buf());
    }
    let parent = dest
        .parent()
        .ok_or_else(|| Error::msg(format!("{} has no parent", dest.display())))?;
    std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    if let Err(e) = build(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dest).map_err(|e| Error::io("rename into", dest, e))?;
    Ok(dest.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_input_sensitive() {
        let k = |parts: &[&str]| {
            let mut k = Key::new("r1");
            for p in parts {
                k.str(p);
            }
            k.finish()
        };
        assert_eq!(k(&["a", "b"]), k(&["a", "b"]));
        assert_ne!(k(&["ab", "c"]), k(&["a", "bc"]));
        assert_ne!(k(&["a"]), k(&["b"]));
        assert_eq!(k(&[]).len(), 16);
    }

    #[test]
    fn failed_builds_leave_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("thing");
        let r = entry(&dest, |d| {
            std::fs::write(d.join("half"), "x").expect("write");
            Err(Error::msg("boom"))
        });
        assert!(r.is_err());
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).expect("list").count(), 0);
        entry(&dest, |d| {
            std::fs::write(d.join("f"), "x").map_err(|e| Error::io("write", d, e))
        })
        .expect("built");
        assert!(dest.join("f").exists());
    }
}
